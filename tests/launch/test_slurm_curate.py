"""launch/slurm_curate.sh under a stand-in sbatch: an array of unit workers then one finalizer gives the
same shards as a single `idforge curate` process."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import yaml
from idforge.data_pipeline.synthid import SynthIDConfig, write_synthid_folder

ROOT = Path(__file__).resolve().parents[2]

# Runs each array task in turn with SLURM's variables (rank 0 first, so it finds the others pending
# and leaves the shards to the finalizer), then the dependent job; prints a job id like sbatch.
FAKE_SBATCH = r"""#!/usr/bin/env bash
arr="" wrap=""
for a in "$@"; do
  case "$a" in --array=*) arr=${a#--array=} ;; --wrap=*) wrap=${a#--wrap=} ;; esac
done
echo "$*" >> "$SBATCH_LOG"
if [ -n "$arr" ]; then
  lo=${arr%-*} hi=${arr#*-}
  for ((i = lo; i <= hi; i++)); do
    SLURM_ARRAY_TASK_ID=$i SLURM_ARRAY_TASK_MIN=$lo SLURM_ARRAY_TASK_MAX=$hi \
      SLURM_ARRAY_TASK_COUNT=$((hi - lo + 1)) bash -c "$wrap" >> "$SBATCH_LOG.out" 2>&1 || exit 1
  done
else
  bash -c "$wrap" >> "$SBATCH_LOG.out" 2>&1 || exit 1
fi
echo 4242
"""


def test_slurm_array_then_finalizer_matches_one_process(tmp_path):
    photos = write_synthid_folder(
        SynthIDConfig(num_identities=5, images_per_identity=3, resolution=64, heldout_identities=1, seed=2),
        tmp_path / "photos",
    )
    cfg = yaml.safe_load((ROOT / "configs" / "curate" / "tiny.yaml").read_text())
    cfg["unit_size"] = 4  # 15 photos -> 4 units over 2 workers
    config = tmp_path / "curate.yaml"
    config.write_text(yaml.safe_dump(cfg))
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "sbatch").write_text(FAKE_SBATCH)
    (bin_dir / "sbatch").chmod(0o755)
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "RANK", "WORLD_SIZE"))},
        "PATH": f"{bin_dir}:{Path(sys.executable).parent}:{os.environ['PATH']}",
        "SBATCH_LOG": str(tmp_path / "sbatch.log"),
        "OMP_NUM_THREADS": "1",
    }
    run = subprocess.run(
        [
            "bash",
            str(ROOT / "launch" / "slurm_curate.sh"),
            str(config),
            str(photos),
            str(tmp_path / "array"),
            "2",
        ],
        env=env,
        capture_output=True,
        text=True,
        check=False,
        timeout=300,
    )
    log = (tmp_path / "sbatch.log.out").read_text() if (tmp_path / "sbatch.log.out").exists() else ""
    assert run.returncode == 0, run.stderr + log
    calls = (tmp_path / "sbatch.log").read_text().splitlines()
    assert "--array=0-1" in calls[0] and "--dependency=afterok:4242" in calls[1]
    assert "idforge curate-finalize" in calls[1]
    assert "units done" not in log and "files seen" in log  # the finalizer wrote the summary

    single = subprocess.run(
        [
            sys.executable,
            "-m",
            "idforge.launch.cli",
            "curate",
            "--config",
            str(config),
            "--input",
            str(photos),
            "--output",
            str(tmp_path / "single"),
        ],
        env=env,
        capture_output=True,
        text=True,
        check=False,
        timeout=300,
    )
    assert single.returncode == 0, single.stderr
    shards = sorted(p.name for p in (tmp_path / "single").glob("*.tar"))
    assert shards and shards == sorted(p.name for p in (tmp_path / "array").glob("*.tar"))
    for name in shards:
        assert (tmp_path / "single" / name).read_bytes() == (tmp_path / "array" / name).read_bytes()
