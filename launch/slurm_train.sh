#!/usr/bin/env bash
# Multi-node training on SLURM: one task per GPU, Lightning's SLURM environment, auto-requeue.
#
#   sbatch --nodes=4 --gpus-per-node=8 --ntasks-per-node=8 launch/slurm_train.sh CONFIG [-- extra options]
#
# Submit with as many tasks per node as GPUs per node: srun starts one `idforge train fit` per task and
# Lightning's SLURMEnvironment reads SLURM_PROCID / SLURM_LOCALID / SLURM_NODEID / SLURM_NTASKS for the
# ranks. The rendezvous is the job's first node (`scontrol show hostnames`) on a port derived from the
# job id (override with MASTER_ADDR / MASTER_PORT). trainer.num_nodes and trainer.devices are set from
# the allocation. On pre-emption or time limit SLURM sends SIGUSR1 90 s ahead; Lightning saves an
# hpc_ckpt in trainer.default_root_dir and requeues the job, which resumes from it by itself.
#SBATCH --job-name=idforge-train
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=1
#SBATCH --cpus-per-task=8
#SBATCH --signal=SIGUSR1@90
#SBATCH --requeue
#SBATCH --output=slurm-%x-%j.out
set -euo pipefail
if [ $# -lt 1 ]; then
  sed -n '2,11p' "$0" >&2
  exit 2
fi
config=$1
shift
[ "${1:-}" = "--" ] && shift
[ -f "$config" ] || { echo "slurm_train.sh: config $config not found" >&2; exit 2; }
: "${SLURM_JOB_ID:?slurm_train.sh: not inside a SLURM allocation; submit it with sbatch}"
nodes=${SLURM_JOB_NUM_NODES:-${SLURM_NNODES:-1}}
per_node=${SLURM_NTASKS_PER_NODE:-1}
per_node=${per_node%%(*}  # "8(x4)" -> 8
export MASTER_ADDR=${MASTER_ADDR:-$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)}
export MASTER_PORT=${MASTER_PORT:-$((10000 + SLURM_JOB_ID % 20000))}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-8}}
echo "slurm_train.sh: $nodes node(s) x $per_node task(s), rendezvous $MASTER_ADDR:$MASTER_PORT"
srun --kill-on-bad-exit=1 --nodes="$nodes" --ntasks-per-node="$per_node" \
  "${PYTHON:-python}" -m idforge.launch.cli train fit --config "$config" \
  --trainer.num_nodes "$nodes" --trainer.devices "$per_node" "$@"
