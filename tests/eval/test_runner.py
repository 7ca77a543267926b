"""The protocol runner: splits, undetected-face counting, the table's reference rows, protocol configs."""

from __future__ import annotations

import pytest
import torch
from idforge.data_pipeline.detect import Detector, FaceDetection
from idforge.eval.groups import IdentityGroup
from idforge.eval.identity import embed_generated
from idforge.eval.protocols import Protocol, load_protocol, protocol_names
from idforge.eval.runner import Scorers, markdown_table, real_ceiling, score_generation, split_groups
from idforge.models.zoo import tiny_face_encoder

LMS = torch.tensor([[10.0, 12], [22, 12], [16, 17], [11, 23], [21, 23]])


class EveryOther(Detector):
    """Finds a face (template landmarks) in even-indexed images only."""

    def __init__(self):
        self.i = -1

    def detect(self, image, provided=None):
        self.i += 1
        return [FaceDetection([0, 0, 32, 32], LMS.numpy(), 0.9)] if self.i % 2 == 0 else []


def _groups(n=4, k=3, size=32):
    g = torch.Generator().manual_seed(0)
    return [
        IdentityGroup(
            f"id{i}", torch.rand(k, 3, size, size, generator=g) * 2 - 1, LMS.expand(k, 5, 2), ["c"] * k
        )
        for i in range(n)
    ] + [IdentityGroup("few", torch.zeros(1, 3, size, size), LMS[None], ["c"])]


def test_undetected_faces_are_counted_not_dropped():
    enc = tiny_face_encoder(seed=0).eval()
    imgs = torch.rand(4, 3, 32, 32) * 2 - 1
    emb, found = embed_generated(enc, imgs, EveryOther())
    assert found.tolist() == [True, False, True, False]
    assert torch.isnan(emb[1]).all() and not torch.isnan(emb[0]).any()
    split = split_groups(_groups(), Protocol("t", metrics=["fs", "identification"]))
    fig = score_generation(
        imgs, split, Protocol("t", metrics=["fs", "identification"]), Scorers(enc, "tiny", EveryOther()), "x"
    )
    assert fig["undetected"] == 2 and fig["images"] == 4
    assert fig["id_top1"] <= 0.5  # the two undetected images count as misses


def test_split_skips_small_identities_and_real_photos_score_themselves():
    proto = Protocol("t", references=2, metrics=["fs", "sim_target", "sim_ref", "paste", "identification"])
    split = split_groups(_groups(), proto)
    assert split.skipped == 1 and split.references.shape[:2] == (4, 2)
    enc = tiny_face_encoder(seed=0).eval()
    fig = score_generation(
        split.references[:, 0], split, proto, Scorers(enc, "tiny", template_landmarks=LMS), "copy"
    )
    assert fig["fs"] == pytest.approx(1.0, abs=1e-5) and fig["sim_ref"] == pytest.approx(1.0, abs=1e-5)
    assert fig["paste"] == pytest.approx(fig["sim_ref"] - fig["sim_target"], abs=1e-6)
    ceil = real_ceiling(split, proto, enc, resolution=8)
    assert ceil["undetected"] == 0 and -1 <= ceil["fs"] <= 1


def test_protocol_configs_load_and_table_marks_reference_rows(tmp_path):
    names = {"diffid", "flashface", "edits", "edits-ffhq", "tiny-diffid", "tiny-flashface", "tiny-edits"}
    assert names | {"tiny-edits-ffhq"} <= set(protocol_names())
    assert (
        load_protocol("edits").vlm_success == "below" and load_protocol("edits-ffhq").vlm_success == "above"
    )
    ff = load_protocol("flashface")
    assert ff.references == 4 and {"sim_target", "sim_ref", "paste", "clip", "fid"} <= set(ff.metrics)
    assert load_protocol("diffid").reference_rows["Diff-ID (published, their data)"]["fiq"] == 71.74
    result = {"judge": "j", "detector": "d", "rows": {"adapter": {"sim_target": 0.5, "undetected": 1}}}
    md = markdown_table(result, ff)
    assert "| adapter | 50.00 |" in md and "*reference:* FlashFace (published, their data) | 56.10" in md
    bad = tmp_path / "bad.yaml"
    bad.write_text("metrics: [fs, nonsense]\n")
    with pytest.raises(ValueError, match="nonsense"):
        load_protocol(bad)
    with pytest.raises(FileNotFoundError, match="diffid"):
        load_protocol("no-such-protocol")
