"""`idforge edit` on an `idforge export` folder and a tiny SD3: files, marker, no GPS, presets, batch."""

from __future__ import annotations

import inspect
import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from idforge.inference.edit.output import GPS_IFD, MARKER, MARKER_KEY
from idforge.launch.cli import main
from idforge.launch.edit_cmd import edit
from PIL import Image

CONFIGS = sorted((Path(__file__).resolve().parents[3] / "configs" / "edit").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_edit_configs_name_only_edit_options(path):
    keys = set(yaml.safe_load(path.read_text()))
    assert keys <= set(inspect.signature(edit).parameters), keys - set(inspect.signature(edit).parameters)


def _photo_with_gps(path: Path) -> Path:
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8))
    exif = Image.Exif()
    exif[0x010F] = "TestCam"  # Make
    exif[GPS_IFD] = {1: "N", 2: (52.0, 31.0, 12.0)}
    img.save(path, exif=exif)
    assert GPS_IFD in Image.open(path).getexif()
    return path


def test_edit_command_on_an_exported_folder_writes_a_marked_edit_and_its_mask(tiny_export_dir, tmp_path):
    photo = _photo_with_gps(tmp_path / "x.jpg")
    out = tmp_path / "out"
    rc = main([
        "edit", "--config", str(Path(CONFIGS[0]).parent / "tiny.yaml"), "--model", str(tiny_export_dir),
        "--image", str(photo), "--out", str(out), "--source", "a person's face with red hair",
        "--target", "a person's face with blond hair", "--concept", "red hair", "--preset", "hair_color",
    ])  # fmt: skip
    assert rc == 0
    edited, mask = Image.open(out / "edited.png"), Image.open(out / "mask.png")
    assert edited.size == (32, 32) and mask.size == (32, 32)
    assert edited.text[MARKER_KEY] == MARKER
    info = json.loads(edited.text["idforge:edit"])
    assert info["strength"] == 0.92 and info["kernel"] == 15 and info["finetune_steps"] == 2
    exif = edited.getexif()
    assert GPS_IFD not in exif and exif[0x010F] == "TestCam" and exif[0x010E] == MARKER
    assert set(np.unique(np.asarray(mask))) <= {0, 255}


def test_edit_command_batch_and_sequential_edits_on_sd3(tiny_sd3_dir, tmp_path):
    _photo_with_gps(tmp_path / "a.png")
    rows = [
        {"image": "a.png", "source": "a person's face with red hair", "target": "a person's face",
         "concept": "red hair", "then": [{"target": "a person's face with a hat", "concept": "hat",
                                          "mode": "addition"}]},
        {"image": "a.png", "source": "a person's face", "target": "a person's face", "strength": 0.5},
    ]  # fmt: skip
    batch = tmp_path / "edits.jsonl"
    batch.write_text("\n".join(json.dumps(r) for r in rows))
    out = tmp_path / "out"
    rc = main(["edit", "--model", str(tiny_sd3_dir), "--batch", str(batch), "--out", str(out),
               "--steps", "6", "--finetune_steps", "1", "--grad_accum", "2"])  # fmt: skip
    assert rc == 0
    assert {p.name for p in (out / "0000").iterdir()} == {
        "edit_00_edited.png", "edit_00_mask.png", "edit_01_edited.png", "edit_01_mask.png"
    }  # fmt: skip
    assert {p.name for p in (out / "0001").iterdir()} == {"edited.png"}  # no concept: no mask
    second = json.loads(Image.open(out / "0000" / "edit_01_edited.png").text["idforge:edit"])
    assert second["source"] == "a person's face" and second["mode"] == "addition"


def test_edit_command_guidance_changes_the_edit_and_is_recorded(tiny_export_dir, tmp_path):
    photo = _photo_with_gps(tmp_path / "x.png")
    args = ["edit", "--model", str(tiny_export_dir), "--image", str(photo), "--steps", "6",
            "--finetune_steps", "0", "--source", "a person's face with red hair",
            "--target", "a person's face with blond hair"]  # fmt: skip
    assert main([*args, "--out", str(tmp_path / "plain")]) == 0
    assert main([*args, "--out", str(tmp_path / "g"), "--guidance_scale", "4", "--negative", ""]) == 0
    plain, guided = (Image.open(tmp_path / d / "edited.png") for d in ("plain", "g"))
    assert json.loads(plain.text["idforge:edit"])["guidance_scale"] == 1.0
    info = json.loads(guided.text["idforge:edit"])
    assert info["guidance_scale"] == 4.0 and info["negative"] == ""
    assert not np.array_equal(np.asarray(plain), np.asarray(guided))


def test_edit_command_errors_name_the_option(tmp_path, capsys):
    assert main(["edit", "--model", str(tmp_path / "nope"), "--image", "x.jpg"]) != 0
    assert "--model" in capsys.readouterr().err


def test_csv_batch_reads_the_same_edits_as_jsonl(tmp_path):
    from idforge.launch.edit_cmd import read_batch

    rows = [
        {"image": "a.png", "source": "a person's face with red hair", "target": "a person's face",
         "concept": "red hair", "preset": "hair_color",
         "then": [{"target": "a person's face with a hat", "concept": "hat", "mode": "addition"}]},
        {"image": "b.png", "target": "a person's face", "strength": "0.5",
         "references": ["refs/b1.png", "/photos/b 2.png"]},
    ]  # fmt: skip
    (tmp_path / "e.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    (tmp_path / "e.csv").write_text(
        "image,source,target,concept,preset,strength,then,references\n"
        "a.png,a person's face with red hair,a person's face,red hair,hair_color,,"
        '"[{""target"": ""a person\'s face with a hat"", ""concept"": ""hat"", ""mode"": ""addition""}]",\n'
        "b.png,,a person's face,,,0.5,,refs/b1.png; /photos/b 2.png;\n"
    )
    assert read_batch(tmp_path / "e.csv") == read_batch(tmp_path / "e.jsonl") == rows


@pytest.mark.parametrize(
    ("name", "text", "message"),
    [
        ("no_col.csv", "image,source\na.png,x\n", r"no_col\.csv: the header \(line 1: image, source\) has no 'target'"),
        ("empty_cell.csv", "image,target\na.png,t\n,t\n", r"empty_cell\.csv: line 3 has no 'image'"),
        ("short.csv", "image,target\na.png\n", r"short\.csv: line 2 has no 'target'"),
        ("bad_then.csv", "image,target,then\na.png,t,[x\n", r"bad_then\.csv: line 2, column 'then'"),
        ("lines.jsonl", '{"image": "a.png", "target": "t"}\n{"image": "b.png"}\n', r"lines\.jsonl: line 2 has no 'target'"),
        ("refs.jsonl", '{"image": "a.png", "target": "t", "references": "r.png"}\n', r"refs\.jsonl: line 1, column 'references' is 'r.png'; give a list"),
    ],
)  # fmt: skip
def test_batch_errors_name_the_file_the_row_and_the_missing_column(tmp_path, name, text, message):
    from idforge.launch.edit_cmd import read_batch

    (tmp_path / name).write_text(text)
    with pytest.raises(ValueError, match=message) as e:
        read_batch(tmp_path / name)
    assert "\n" not in str(e.value)


def test_edit_command_runs_a_csv_batch(tiny_export_dir, tmp_path):
    _photo_with_gps(tmp_path / "a.png")
    (tmp_path / "edits.csv").write_text(
        "image,source,target,concept,references\n"
        "a.png,a person's face with red hair,a person's face,red hair,a2.png;a3.png\n"
    )  # references: read by `idforge eval` only, not needed (nor checked) by the edit
    out = tmp_path / "out"
    rc = main(["edit", "--config", str(Path(CONFIGS[0]).parent / "tiny.yaml"), "--model", str(tiny_export_dir),
               "--batch", str(tmp_path / "edits.csv"), "--out", str(out), "--steps", "4"])  # fmt: skip
    assert rc == 0
    assert {p.name for p in (out / "0000").iterdir()} == {"edited.png", "mask.png"}
    info = json.loads(Image.open(out / "0000" / "edited.png").text["idforge:edit"])
    assert info["source"] == "a person's face with red hair" and info["concept"] == "red hair"
