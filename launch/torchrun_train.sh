#!/usr/bin/env bash
# Single-node multi-GPU training with torchrun (one process per GPU, Lightning DDP or DeepSpeed).
#
#   bash launch/torchrun_train.sh CONFIG [NPROC] [-- extra `idforge train fit` options]
#
# NPROC defaults to the number of visible GPUs (nvidia-smi -L; 1 without one). torchrun sets RANK,
# LOCAL_RANK, WORLD_SIZE, MASTER_ADDR/PORT; Lightning reads them (TorchElasticEnvironment), so the
# config's trainer.devices is overridden to NPROC. Examples:
#   bash launch/torchrun_train.sh configs/train/sd15_diffid.yaml 8 -- --trainer.max_steps 1000
#   bash launch/torchrun_train.sh configs/train/sd15_diffid.yaml 8 -- \
#     --trainer.strategy lightning.pytorch.strategies.DeepSpeedStrategy \
#     --trainer.strategy.config launch/deepspeed_zero2.json
# PYTHON picks the interpreter (default: python); MASTER_PORT the rendezvous port (default 29500).
set -euo pipefail
if [ $# -lt 1 ]; then
  sed -n '2,14p' "$0" >&2
  exit 2
fi
config=$1
shift
if [ $# -ge 1 ] && [ "$1" != "--" ]; then
  nproc=$1
  shift
else
  nproc=$( (nvidia-smi -L 2>/dev/null || true) | grep -c '^GPU' || true)
  [ "$nproc" -ge 1 ] 2>/dev/null || nproc=1
fi
[ "${1:-}" = "--" ] && shift
[ -f "$config" ] || { echo "torchrun_train.sh: config $config not found" >&2; exit 2; }
[[ "$nproc" =~ ^[1-9][0-9]*$ ]] || { echo "torchrun_train.sh: NPROC must be a positive integer, got $nproc" >&2; exit 2; }
exec "${PYTHON:-python}" -m torch.distributed.run --standalone --nnodes=1 --nproc_per_node="$nproc" \
  --master_port="${MASTER_PORT:-29500}" \
  -m idforge.launch.cli train fit --config "$config" --trainer.num_nodes 1 --trainer.devices "$nproc" "$@"
