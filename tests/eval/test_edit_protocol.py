"""`idforge eval --protocol tiny-edits`: the VLM decides which edits count, chains stop at the first
failure, and IP / LPIPS / CMMD are computed over the successful edits only."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from idforge.data_pipeline.align import template_for
from idforge.eval.clip_score import ClipModel
from idforge.eval.cmmd import cmmd
from idforge.eval.edits import load_edit_outputs
from idforge.eval.identification import mean_embedding
from idforge.eval.identity import cosine, embed_generated, load_judge
from idforge.eval.lpips_metric import load_lpips, lpips_distance
from idforge.eval.protocols import CONFIG_DIR
from idforge.eval.vlm import VlmJudge
from idforge.inference.edit.output import save_marked
from idforge.launch.cli import main
from idforge.models.zoo import TinyConfig, _write_open_clip, build_tiny_vlm, tiny_face_encoder
from PIL import Image


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    import torchvision

    root = tmp_path_factory.mktemp("edit-models")
    torch.manual_seed(0)
    _write_open_clip(TinyConfig(), root / "clip", image_size=32)
    tiny_face_encoder(seed=0).save_pretrained(root / "judge")
    torch.save(torchvision.models.squeezenet1_1(weights=None).state_dict(), root / "squeeze.pth")
    return {"vlm": build_tiny_vlm(root / "vlm"), "clip": root / "clip", "judge": root / "judge",
            "lpips": root / "squeeze.pth"}  # fmt: skip


def _u8_images(n, seed):
    """Images (n, 3, 32, 32) in [-1, 1] on the uint8 grid, so a PNG round trip is exact."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, 32, 32), generator=g).float() / 127.5 - 1


def test_edits_protocol_scores_successful_edits_only(models, tmp_path):
    originals, pool = _u8_images(3, 0), _u8_images(4, 1)
    s = VlmJudge(models["vlm"]).score(pool)
    order = s.argsort().tolist()  # low .. high VLM score
    # row 0 and row 2 succeed (lowest scores); row 1's first step fails (highest), its second is cut
    chains = {0: [order[0]], 1: [order[3], order[2]], 2: [order[1]]}
    threshold = float(s[order[1]] + s[order[3]]) / 2
    lines = []
    for row, steps in chains.items():
        Image.fromarray(((originals[row] + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()).save(
            tmp_path / f"in{row}.png"
        )
        lines.append({"image": f"in{row}.png", "target": "a person's face", "concept": "wound"})
        if row == 2:  # IP of row 2 against its person's other photos (FlowID), rows 0-1 against the input
            lines[-1]["references"] = ["in0.png", "in1.png"]
        for j, k in enumerate(steps):
            name = "edited.png" if len(steps) == 1 else f"edit_{j:02d}_edited.png"
            info = {"target": f"a person's face, step {j}", "concept": "wound"}
            save_marked((pool[k] + 1) / 2, tmp_path / "out" / f"{row:04d}" / name, None, info)
    (tmp_path / "edits.jsonl").write_text("\n".join(json.dumps(r) for r in lines))
    proto = yaml.safe_load((CONFIG_DIR / "tiny-edits.yaml").read_text())
    (tmp_path / "p.yaml").write_text(yaml.safe_dump({**proto, "success_threshold": threshold}))

    args = ["eval", "--protocol", str(tmp_path / "p.yaml"), "--edits", str(tmp_path / "edits.jsonl")]
    args += ["--images", str(tmp_path / "out"), "--judge", str(models["judge"]), "--vlm", str(models["vlm"])]
    args += ["--clip", f"local-dir:{models['clip']}", "--lpips", f"squeeze:{models['lpips']}"]
    assert main([*args, "--out", str(tmp_path / "ev")]) == 0
    result = json.loads((tmp_path / "ev" / "p.json").read_text())
    summary, records = result["rows"]["edits"], result["edits"]

    assert [r["vlm"] for r in records] == pytest.approx([float(s[order[k]]) for k in (0, 3, 2, 1)])
    assert records[1]["target"] == "a person's face, step 0" and records[2]["target"].endswith("step 1")
    assert (summary["successful"], summary["failed"], summary["not_scored_after_failure"]) == (1 + 1, 1, 1)
    assert summary["vlm"] == pytest.approx(float(s[order[0]] + s[order[1]] + s[order[3]]) / 3)
    kept = [0, 3]  # edit index of rows 0 and 2
    edits = load_edit_outputs(tmp_path / "edits.jsonl", tmp_path / "out")
    edited = torch.stack([e.edited for e in edits])
    original = torch.stack([e.original for e in edits])
    torch.testing.assert_close(edited, pool[[order[0], order[3], order[2], order[1]]])
    lp = lpips_distance(load_lpips(models["lpips"], net="squeeze"), edited, original)
    assert summary["lpips"] == pytest.approx(float(lp[kept].mean()), abs=1e-6)
    lms = torch.as_tensor(template_for(32), dtype=torch.float32)
    e = embed_generated(
        load_judge(models["judge"])[0], torch.cat([edited, original, originals[:2]]), None, lms
    )[0]
    ip = [cosine(e[0], e[4]), cosine(e[3], mean_embedding(e[8:]))]  # row 0: the input; row 2: in0, in1
    assert [r.get("ip_against") for r in records] == ["input", "input", "input", "references"]
    assert summary["ip_against"] == {"references": 1, "input": 1} and summary["ip_references_failed"] == 0
    assert summary["ip"] == pytest.approx(float(sum(ip)) / 2, abs=1e-5)
    clip = ClipModel(f"local-dir:{models['clip']}")
    expect = cmmd(clip.image_features(edited[kept]), clip.image_features(original))
    assert summary["cmmd"] == pytest.approx(expect, rel=1e-5)
    assert "| edits |" in (tmp_path / "ev" / "p.md").read_text()


def test_edits_protocol_without_a_vlm_is_a_one_line_error(models, tmp_path, capsys):
    (tmp_path / "e.jsonl").write_text('{"image": "x.png", "target": "t"}\n')
    code = main(["eval", "--protocol", "tiny-edits", "--edits", str(tmp_path / "e.jsonl"),
                 "--images", str(tmp_path), "--judge", str(models["judge"])])  # fmt: skip
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(err) == 1 and "--vlm" in err[0]
