"""One command line with one behaviour: --config / --print_config everywhere, one-line errors, exit codes."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from idforge.launch.cli import COMMANDS, _shell_style, main

ROOT = Path(__file__).resolve().parents[2]


def _print_config(capsys, argv: list[str]) -> dict:
    with pytest.raises(SystemExit) as stop:
        main(argv)
    assert stop.value.code in (0, None)
    return yaml.safe_load(capsys.readouterr().out)


@pytest.mark.parametrize("name", [n for n in COMMANDS if n != "train"])
def test_every_command_prints_its_config_and_reads_it_back(name, tmp_path, capsys):
    printed = _print_config(capsys, [name, "--print_config"])
    assert isinstance(printed, dict) and printed, f"{name} printed no options"
    numeric = [k for k, v in printed.items() if isinstance(v, (int, float)) and not isinstance(v, bool)]
    # a changed value must come back through --config (commands without a numeric default: set one)
    fixed = {"demo": ("steps", 7), "export": ("resolution", 64), "convert-onnx": ("out", "enc")}
    key, value = fixed[name] if name in fixed else (numeric[0], None)
    printed[key] = value if value is not None else printed[key] + 3
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(printed))
    again = _print_config(capsys, [name, "--config", str(path), "--print_config"])
    assert again[key] == printed[key]
    assert again == printed


def test_train_prints_its_config_and_reads_it_back(tmp_path, capsys):
    cfg = ROOT / "configs" / "train" / "tiny.yaml"
    printed = _print_config(capsys, ["train", "fit", "--config", str(cfg), "--print_config"])
    assert printed["data"]["batch_size"] == yaml.safe_load(cfg.read_text())["data"]["batch_size"]
    printed["data"]["batch_size"] = 7
    path = tmp_path / "train.yaml"
    path.write_text(yaml.safe_dump(printed))
    assert (
        _print_config(capsys, ["train", "fit", "--config", str(path), "--print_config"])["data"]["batch_size"]
        == 7
    )


def test_unknown_key_in_a_curation_config_names_the_key_and_the_file(tmp_path, capsys):
    cfg = yaml.safe_load((ROOT / "configs" / "curate" / "tiny.yaml").read_text())
    cfg["filters"] = {**cfg.get("filters", {}), "min_det_scor": 0.3}
    path = tmp_path / "curate.yaml"
    path.write_text(yaml.safe_dump({"input": str(tmp_path), "output": str(tmp_path / "o"), **cfg}))
    assert main(["curate", "--config", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    assert f"{path}: unknown key 'filters.min_det_scor'" in err[0]
    assert not (tmp_path / "o").exists()  # nothing ran


def test_unknown_key_in_a_training_config_names_the_key_and_the_file(tmp_path, capsys):
    cfg = yaml.safe_load((ROOT / "configs" / "train" / "tiny.yaml").read_text())
    cfg["data"]["batch_sizee"] = cfg["data"].pop("batch_size")
    path = tmp_path / "train.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert main(["train", "fit", "--config", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    assert (
        f"{path}: unknown key 'data.batch_sizee'" in err[0] and "idforge train fit --print_config" in err[0]
    )


def test_a_bad_value_and_an_unknown_option_are_usage_errors(capsys):
    assert main(["demo", "--steps", "many"]) == 2
    assert "invalid value 'many' for 'steps' (expected int)" in capsys.readouterr().err
    assert main(["demo", "--step", "3"]) == 2  # no abbreviations: a typo is an error, not another option
    assert "unrecognized arguments: --step 3" in capsys.readouterr().err
    assert main(["frobnicate"]) == 2
    assert "unknown command 'frobnicate'" in capsys.readouterr().err


def test_paths_expand_home_and_variables(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("IDFORGE_TEST_ROOT", str(tmp_path))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert main(["export", "--checkpoint", "$IDFORGE_TEST_ROOT/run/last.ckpt", "--out", "~/model"]) == 1
    assert f"{tmp_path}/run/last.ckpt: checkpoint not found" in capsys.readouterr().err


def test_debug_shows_the_traceback(tmp_path, capsys):
    assert main(["--debug", "export", "--checkpoint", str(tmp_path / "x.ckpt"), "--out", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and "FileNotFoundError" in err


def test_shell_style_flags_and_repeated_list_options():
    hints = {"quick": bool, "prompt": list[str], "steps": int}
    argv = ["--quick", "--prompt", "a face", "--prompt", "b", "--steps", "3", "--quick"]
    assert _shell_style(argv, hints) == [
        "--quick=true",
        "--prompt+",
        "a face",
        "--prompt+",
        "b",
        "--steps",
        "3",
        "--quick=true",
    ]
    assert _shell_style(["--quick", "false"], hints) == ["--quick", "false"]
    assert _shell_style(["--prompt", '["x", "y"]'], hints) == ["--prompt", '["x", "y"]']


def _run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "idforge.launch.cli", *args],
        capture_output=True,
        check=False,
        text=True,
        env=env,
        cwd=cwd,
        timeout=120,
    )


def test_a_missing_model_folder_is_one_line_on_stderr(tmp_path):
    ref = tmp_path / "face.png"
    ref.write_bytes(b"")
    run = _run_cli(
        "generate",
        "--model",
        str(tmp_path / "no-model"),
        "--ref",
        str(ref),
        "--prompt",
        "a",
        "--out",
        str(tmp_path / "out"),
        cwd=tmp_path,
    )
    assert run.returncode == 1
    assert run.stderr.strip().splitlines() == [
        (
            f"idforge generate: error: --model {tmp_path / 'no-model'}: no such folder (write one with "
            "`idforge export`) (--debug shows the traceback)"
        )
    ]
    assert "Traceback" not in run.stdout + run.stderr


def test_a_missing_input_folder_is_one_line_on_stderr(tmp_path):
    run = _run_cli(
        "curate", "--input", str(tmp_path / "photos"), "--output", str(tmp_path / "out"), cwd=tmp_path
    )
    assert run.returncode == 1
    err = run.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(
        f"idforge curate: error: --input {tmp_path / 'photos'}: no such"
    )
    assert not (tmp_path / "out").exists()
