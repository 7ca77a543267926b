"""Training launchers and extras: the SLURM template under stand-in srun/scontrol, the torchrun
launcher's argument checks, the DeepSpeed configs, and the one-line errors for missing extras."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
from idforge.launch.errors import UsageError
from idforge.launch.train_extras import check_train_extras, deepspeed_config

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "configs" / "train" / "tiny.yaml"

FAKE_SRUN = r"""#!/usr/bin/env bash
{ echo "ARGS $*"; echo "MASTER_ADDR=$MASTER_ADDR MASTER_PORT=$MASTER_PORT"; } >> "$SRUN_LOG"
"""
FAKE_SCONTROL = r"""#!/usr/bin/env bash
[ "$1 $2" = "show hostnames" ] && printf 'gpu-node07\ngpu-node08\n'
"""


def _bin(tmp_path):
    d = tmp_path / "bin"
    d.mkdir()
    for name, text in (("srun", FAKE_SRUN), ("scontrol", FAKE_SCONTROL)):
        (d / name).write_text(text)
        (d / name).chmod(0o755)
    return d


def test_slurm_template_runs_one_task_per_gpu_with_rendezvous_on_the_first_node(tmp_path):
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "MASTER_"))},
        "PATH": f"{_bin(tmp_path)}:{os.environ['PATH']}",
        "SRUN_LOG": str(tmp_path / "srun.log"),
        "SLURM_JOB_ID": "123456",
        "SLURM_JOB_NODELIST": "gpu-node[07-08]",
        "SLURM_JOB_NUM_NODES": "2",
        "SLURM_NTASKS_PER_NODE": "8(x2)",
    }
    run = subprocess.run(
        ["bash", str(ROOT / "launch" / "slurm_train.sh"), str(CONFIG), "--", "--trainer.max_steps", "7"],
        env=env, capture_output=True, text=True, check=False, timeout=30,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    args, rdv = (tmp_path / "srun.log").read_text().splitlines()
    assert rdv == f"MASTER_ADDR=gpu-node07 MASTER_PORT={10000 + 123456 % 20000}"
    assert "--nodes=2 --ntasks-per-node=8" in args
    assert (
        f"train fit --config {CONFIG} --trainer.num_nodes 2 --trainer.devices 8 --trainer.max_steps 7" in args
    )


def test_slurm_template_refuses_to_run_outside_an_allocation(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    run = subprocess.run(
        ["bash", str(ROOT / "launch" / "slurm_train.sh"), str(CONFIG)],
        env=env, capture_output=True, text=True, check=False, timeout=30,
    )  # fmt: skip
    assert run.returncode != 0 and "submit it with sbatch" in run.stderr


@pytest.mark.parametrize("nproc", ["0", "two"])
def test_torchrun_launcher_rejects_a_bad_process_count(nproc):
    run = subprocess.run(
        ["bash", str(ROOT / "launch" / "torchrun_train.sh"), str(CONFIG), nproc],
        capture_output=True, text=True, check=False, timeout=30,
    )  # fmt: skip
    assert run.returncode == 2 and "NPROC must be a positive integer" in run.stderr


@pytest.mark.parametrize("name,stage", [("zero2", 2), ("zero3", 3)])
def test_deepspeed_configs_set_the_zero_stage_and_leave_batch_and_accumulation_to_lightning(name, stage):
    cfg = json.loads(deepspeed_config(name).read_text())
    assert cfg["zero_optimization"]["stage"] == stage
    # Lightning fills these from the trainer and refuses a config that sets gradient_accumulation_steps
    assert not {"gradient_accumulation_steps", "train_batch_size", "train_micro_batch_size_per_gpu"} & set(
        cfg
    )


def test_a_deepspeed_strategy_without_the_extra_names_the_extra(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda m, *a: None if m == "deepspeed" else real(m, *a))
    with pytest.raises(UsageError, match=r"idforge\[deepspeed\]"):
        check_train_extras({"strategy": "deepspeed_stage_2", "logger": False})
    with pytest.raises(UsageError, match=r"trainer.strategy"):
        check_train_extras({"strategy": {"class_path": "lightning.pytorch.strategies.DeepSpeedStrategy"}})
    check_train_extras({"strategy": "ddp"})  # no extra needed


def test_a_wandb_logger_without_the_extra_names_the_extra_and_with_it_defaults_to_offline(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    logger = {"class_path": "lightning.pytorch.loggers.WandbLogger", "init_args": {"project": "x"}}
    monkeypatch.setattr(importlib.util, "find_spec", lambda m, *a: None if m == "wandb" else real(m, *a))
    with pytest.raises(UsageError, match=r"idforge\[wandb\]"):
        check_train_extras({"logger": [logger]})
    monkeypatch.setattr(importlib.util, "find_spec", lambda m, *a: object() if m == "wandb" else real(m, *a))
    monkeypatch.delenv("WANDB_MODE", raising=False)
    check_train_extras({"logger": logger})
    assert os.environ["WANDB_MODE"] == "offline"
    monkeypatch.setenv("WANDB_MODE", "online")
    check_train_extras({"logger": logger})
    assert os.environ["WANDB_MODE"] == "online"


def test_train_command_reports_the_missing_extra_before_building_models(monkeypatch):
    import importlib.util

    from idforge.launch.train_cmd import parse_train_config

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda m, *a: None if m == "deepspeed" else real(m, *a))
    with pytest.raises(UsageError, match=r"deepspeed"):
        parse_train_config(["--config", str(CONFIG), "--trainer.strategy", "deepspeed_stage_3"])
