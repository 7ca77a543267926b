#!/usr/bin/env bash
# Multi-node curation on SLURM: an array of unit workers, then the single finalizer.
#
#   bash launch/slurm_curate.sh CONFIG INPUT OUTPUT [WORKERS] [-- extra sbatch options]
#
# Every array task runs `idforge curate` on its share of the units (rank = array id minus the
# array's minimum, world = the array's size: see idforge.data_pipeline.job.env_rank_world), with
# one GPU each for detection, embedding and the occlusion test. Re-submitting the same command
# resumes: committed units are skipped. When every task has succeeded, one job runs
# `idforge curate-finalize` (clustering, captions, shards, manifest). Override resources with
# sbatch options after `--` (e.g. `-- --partition=gpu --time=12:00:00`), or with SBATCH_* variables.
set -euo pipefail
if [ $# -lt 3 ]; then
  sed -n '2,12p' "$0" >&2
  exit 2
fi
config=$1 input=$2 output=$3 workers=${4:-8}
shift $(( $# >= 4 ? 4 : 3 ))
[ "${1:-}" = "--" ] && shift
[ -f "$config" ] || { echo "slurm_curate.sh: config $config not found" >&2; exit 2; }
[ -e "$input" ] || { echo "slurm_curate.sh: input $input not found" >&2; exit 2; }
mkdir -p "$output/slurm"
args=(--config "$config" --input "$input" --output "$output")
units=$(sbatch --parsable --job-name=idforge-curate --array="0-$((workers - 1))" \
  --gres=gpu:1 --cpus-per-task=8 --output="$output/slurm/units-%A_%a.log" "$@" \
  --wrap="idforge curate ${args[*]@Q}")
final=$(sbatch --parsable --job-name=idforge-finalize --dependency="afterok:${units%%;*}" \
  --gres=gpu:1 --cpus-per-task=8 --output="$output/slurm/finalize-%j.log" "$@" \
  --wrap="idforge curate-finalize ${args[*]@Q}")
echo "submitted units job ${units%%;*} ($workers tasks) and finalizer $final; logs in $output/slurm"
