"""kill -9 during curation, then a re-run: the same images as an uninterrupted run, none lost or doubled."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import webdataset as wds
from idforge.data_pipeline.curate import run_curation
from idforge.data_pipeline.filters import FilterConfig
from idforge.data_pipeline.job import CurateConfig

SCRIPT = textwrap.dedent("""
    import sys, time
    from idforge.data_pipeline.job import CurateConfig
    from idforge.data_pipeline.curate import run_curation
    from idforge.data_pipeline.filters import FilterConfig
    cfg = CurateConfig(input=sys.argv[1], output=sys.argv[2], resolution=32, unit_size=2, embedder=None,
                       filters=FilterConfig(min_resolution=16, min_face_px=4))
    run_curation(cfg, progress=lambda n: time.sleep(0.3))  # slow enough to be killed mid-run
""")


def _sources(out: Path) -> list[str]:
    found = []
    for shard in sorted(out.glob("*.tar")):
        for sample in wds.WebDataset(str(shard), shardshuffle=False, empty_check=False):
            found += [r["source"] for r in json.loads(sample["meta.json"])["images"]]
    return sorted(found)


def test_kill_minus_nine_then_rerun_matches_an_uninterrupted_run(synthid_folder, tmp_path):
    kw = {
        "input": str(synthid_folder),
        "resolution": 32,
        "unit_size": 2,
        "embedder": None,
        "filters": FilterConfig(min_resolution=16, min_face_px=4),
    }
    reference = run_curation(CurateConfig(output=str(tmp_path / "ref"), **kw))

    out = tmp_path / "killed"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-c", SCRIPT, str(synthid_folder), str(out)], env=env)
    units = out / "_units"
    deadline = time.time() + 120
    while time.time() < deadline and len(list(units.glob("unit-*"))) < 3:
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    committed = len(list(units.glob("unit-*")))
    assert 3 <= committed < 12, "the job must be killed part-way"
    assert not (out / "manifest.json").exists()

    resumed = run_curation(CurateConfig(output=str(out), **kw))
    assert resumed["files_seen"] == reference["files_seen"]
    assert resumed["images_accepted"] == reference["images_accepted"]
    srcs = _sources(out)
    assert srcs == _sources(tmp_path / "ref")
    assert len(srcs) == len(set(srcs)) == reference["images_accepted"]
