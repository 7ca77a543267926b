"""Success filtering of edits: quality metrics over successful edits only, chains cut at the first
failure; IP against the mean of the person's reference photos (FlowID) or the input photo."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from idforge.data_pipeline.detect import Detector, FaceDetection
from idforge.eval.edits import Edit, load_edit_outputs, score_edits, successful_edits, summarize_edits
from idforge.eval.protocols import Protocol
from idforge.eval.runner import Scorers
from idforge.inference.edit.output import save_marked
from PIL import Image


def test_success_filtering_and_sequential_stop():
    recs = [
        {"chain": "a", "step": 0, "vlm": 0.1, "ip": 0.9},
        {"chain": "a", "step": 1, "vlm": 0.8, "ip": 0.1},  # fails: chain a stops here
        {"chain": "a", "step": 2, "vlm": 0.2, "ip": 0.5},  # after a failure: not scored
        {"chain": "b", "step": 0, "vlm": 0.3, "ip": 0.7},
    ]
    kept, counts = successful_edits(recs)
    assert [(r["chain"], r["step"]) for r in kept] == [("a", 0), ("b", 0)]
    assert counts == {"edits": 4, "successful": 2, "failed": 1, "not_scored_after_failure": 1}
    s = summarize_edits(recs)
    assert s["ip"] == pytest.approx(0.8)  # (0.9 + 0.7) / 2, the failed edit's 0.1 excluded
    assert s["vlm"] == pytest.approx((0.1 + 0.3 + 0.8) / 3)
    assert s["success_rate"] == pytest.approx(0.5)


def test_vlm_and_clip_average_every_scored_edit_and_addition_edits_succeed_above():
    recs = [
        {"chain": "a", "step": 0, "vlm": 0.9, "clip": 30.0, "ip": 0.4},
        {"chain": "a", "step": 1, "vlm": 0.95, "clip": 20.0, "ip": 0.1},  # cut: not scored at all
        {"chain": "b", "step": 0, "vlm": 0.2, "clip": 10.0, "ip": 0.8},
    ]
    below = summarize_edits(recs)  # removal question: a fails at step 0, b succeeds
    assert (below["successful"], below["failed"], below["not_scored_after_failure"]) == (1, 1, 1)
    assert below["vlm"] == pytest.approx((0.9 + 0.2) / 2)  # the cut step's 0.95 is not averaged
    assert below["clip"] == pytest.approx((30.0 + 10.0) / 2)  # CLIP over every scored edit
    assert below["ip"] == pytest.approx(0.8)
    above = summarize_edits(recs, success="above")  # addition question: a's chain succeeds, b fails
    assert (above["successful"], above["failed"]) == (2, 1)
    assert above["ip"] == pytest.approx((0.4 + 0.1) / 2)
    with pytest.raises(ValueError, match="vlm_success 'sideways'"):
        successful_edits(recs, success="sideways")


# --- IP against the person's other photos (FlowID sec. 4.1) or the input photo --------------------

LMS = torch.tensor([[10.0, 12], [22, 12], [16, 17], [11, 23], [21, 23]])


class MeanColour(torch.nn.Module):
    """A hand-made judge: a face's embedding is its crop's mean colour (3,), so a flat image of
    colour c embeds to c / |c| (the crop of a flat image is flat: border padding)."""

    def forward(self, x):
        return x.mean((2, 3))


class NoFaceInBlack(Detector):
    """Finds a face (fixed landmarks) in every image except an all-black one."""

    def detect(self, image, provided=None):
        return [] if image.max() == 0 else [FaceDetection([0, 0, 32, 32], LMS.numpy(), 0.9)]


class FixedVlm:
    question = "Is this person's face injured?"

    def __init__(self, scores):
        self.scores = scores

    def score(self, images, concepts=None):
        assert len(images) == len(self.scores)
        return torch.tensor(self.scores)


def _flat(*colour, k=None):
    x = torch.tensor(colour, dtype=torch.float32)[:, None, None].expand(3, 32, 32)
    return x.clone() if k is None else x.expand(k, 3, 32, 32).clone()


def _cos(a, b):
    return sum(x * y for x, y in zip(a, b)) / math.sqrt(sum(x * x for x in a) * sum(y * y for y in b))


def test_ip_is_against_the_mean_of_the_reference_photos_else_the_input():
    black = (-1.0, -1.0, -1.0)  # no face found: left out of a mean, or no IP for an edited image
    r1, r2, o = (0.5, 0.5, -0.5), (0.1, 0.3, 0.9), (0.2, 0.6, 0.2)
    refs = torch.stack([_flat(*r1), _flat(*black), _flat(*r2)])  # (3, 3, 32, 32), the 2nd undetected
    edits = [
        Edit("a", 0, _flat(*o), _flat(0.6, 0.2, 0.2), "t", references=refs),
        Edit("a", 1, _flat(*o), _flat(0.3, -0.4, 0.8), "t", references=refs),  # same chain, same refs
        Edit("b", 0, _flat(0.9, 0.1, 0.1), _flat(0.1, 0.9, 0.1), "t"),  # no references: the input
        Edit("c", 0, _flat(*o), _flat(0.4, 0.4, 0.1), "t", references=_flat(*black, k=2)),  # all fail
        Edit("d", 0, _flat(*o), _flat(*black), "t", references=refs),  # edited face not found
    ]
    scorers = Scorers(MeanColour(), "mean colour", NoFaceInBlack(), vlm=FixedVlm([0.1] * 5))
    records, summary = score_edits(edits, Protocol("p", kind="edit", metrics=["ip"]), scorers)

    n1, n2 = ([x / math.sqrt(sum(y * y for y in r)) for x in r] for r in (r1, r2))
    mean = [(x + y) / 2 for x, y in zip(n1, n2)]  # FlowID: the mean of the references' embeddings
    assert records[0]["ip"] == pytest.approx(_cos((0.6, 0.2, 0.2), mean), abs=1e-6)
    assert records[1]["ip"] == pytest.approx(_cos((0.3, -0.4, 0.8), mean), abs=1e-6)
    assert records[2]["ip"] == pytest.approx(_cos((0.1, 0.9, 0.1), (0.9, 0.1, 0.1)), abs=1e-6)
    assert records[3]["ip"] == pytest.approx(_cos((0.4, 0.4, 0.1), o), abs=1e-6)
    assert [r.get("ip_against") for r in records] == ["references", "references", "input", "input", None]
    assert "ip" not in records[4]  # undetected edited face: no IP, as before
    assert [r["face_found"] for r in records] == [True, True, True, True, False]
    assert summary["undetected"] == 1 and summary["undetected_successful"] == 1
    assert summary["ip_against"] == {"references": 2, "input": 2}
    assert summary["ip_references_failed"] == 1
    assert summary["ip"] == pytest.approx(sum(r["ip"] for r in records[:4]) / 4)


def _png(path, colour):
    Image.fromarray(np.full((24, 40, 3), colour, np.uint8)).save(path)  # not square: load_photo crops


def _edited(folder, colour, name="edited.png"):
    save_marked(torch.full((3, 32, 32), colour / 255),
                folder / name, None, {"target": "a person's face"})  # fmt: skip


@pytest.mark.parametrize("fmt", ["jsonl", "csv"])
def test_load_edit_outputs_reads_the_references_column_of_jsonl_and_csv(tmp_path, fmt):
    from idforge.inference.edit.output import load_photo

    (tmp_path / "refs").mkdir()
    for name, c in [("in.png", 10), ("refs/r1.png", 60), ("r2.png", 120), ("other.png", 200)]:
        _png(tmp_path / name, c)
    _edited(tmp_path / "out" / "0000", 30, "edit_00_edited.png")
    _edited(tmp_path / "out" / "0000", 40, "edit_01_edited.png")
    _edited(tmp_path / "out" / "0001", 50)
    if fmt == "jsonl":
        text = (
            json.dumps({"image": "in.png", "target": "t", "references": ["refs/r1.png", str(tmp_path / "r2.png")]})
            + "\n\n" + json.dumps({"image": "other.png", "target": "t"}) + "\n"
        )  # fmt: skip
    else:
        text = f"image,target,references\nin.png,t,refs/r1.png; {tmp_path / 'r2.png'}\nother.png,t,\n"
    (tmp_path / f"e.{fmt}").write_text(text)

    edits = load_edit_outputs(tmp_path / f"e.{fmt}", tmp_path / "out")
    assert [(e.chain, e.step) for e in edits] == [("0000", 0), ("0000", 1), ("0001", 0)]
    expect = torch.cat([load_photo(tmp_path / p, 32)[0] for p in ("refs/r1.png", "r2.png")])  # (2, 3, 32, 32)
    torch.testing.assert_close(edits[0].references.load(), expect)
    assert edits[1].references is edits[0].references  # the chain's steps share one tensor
    assert edits[2].references is None
    torch.testing.assert_close(edits[2].original, load_photo(tmp_path / "other.png", 32)[0][0])


@pytest.mark.parametrize(
    ("name", "text", "line"),
    [
        ("e.jsonl", '{"image": "in.png", "target": "t"}\n\n{"image": "in.png", "target": "t", "references": ["gone.png"]}\n', 3),
        ("e.csv", "image,target,references\nin.png,t,\nin.png,t,in.png;gone.png\n", 3),
    ],
)  # fmt: skip
def test_a_missing_reference_photo_is_a_one_line_error_naming_the_file_and_line(tmp_path, name, text, line):
    _png(tmp_path / "in.png", 10)
    for row in ("0000", "0001"):
        _edited(tmp_path / "out" / row, 30)
    (tmp_path / name).write_text(text)
    with pytest.raises(FileNotFoundError, match=rf"{name}: line {line}, reference photo .*gone\.png") as e:
        load_edit_outputs(tmp_path / name, tmp_path / "out")
    assert "\n" not in str(e.value)


def test_undetected_edited_faces_are_counted_over_all_edits_and_over_the_successful_ones():
    o = (0.2, 0.6, 0.2)
    black = (-1.0, -1.0, -1.0)  # NoFaceInBlack finds no face here
    edits = [
        Edit("a", 0, _flat(*o), _flat(*black), "t"),  # successful, no face
        Edit("b", 0, _flat(*o), _flat(*black), "t"),  # failed (VLM 0.9), no face
        Edit("c", 0, _flat(*o), _flat(0.4, 0.4, 0.1), "t"),  # successful, face found
    ]
    scorers = Scorers(MeanColour(), "mean colour", NoFaceInBlack(), vlm=FixedVlm([0.1, 0.9, 0.2]))
    records, summary = score_edits(edits, Protocol("p", kind="edit", metrics=["ip"]), scorers)
    assert [r["face_found"] for r in records] == [False, False, True]
    assert (summary["undetected"], summary["undetected_successful"]) == (2, 1)
    assert summary["ip"] == pytest.approx(_cos((0.4, 0.4, 0.1), o), abs=1e-6)  # the one found face


def test_reference_photos_read_from_disk_score_as_the_same_photos_in_memory(tmp_path):
    from idforge.eval.edits import ReferencePhotos
    from idforge.inference.edit.output import load_photo

    for name, c in [("r1.png", (200, 120, 40)), ("r2.png", (30, 160, 220))]:
        _png(tmp_path / name, c)
    loads = []

    class Counted(ReferencePhotos):
        def load(self):
            loads.append(self.paths)
            return super().load()

    lazy = Counted((tmp_path / "r1.png", tmp_path / "r2.png"), 32)
    photos = torch.cat([load_photo(p, 32)[0] for p in lazy.paths])  # (2, 3, 32, 32)
    o, e1, e2 = _flat(0.2, 0.6, 0.2), _flat(0.6, 0.2, 0.2), _flat(0.3, -0.4, 0.8)
    scorers = Scorers(MeanColour(), "mean colour", NoFaceInBlack(), vlm=FixedVlm([0.1, 0.1]))
    proto = Protocol("p", kind="edit", metrics=["ip"])
    chain = [Edit("a", 0, o, e1, "t", references=lazy), Edit("a", 1, o, e2, "t", references=lazy)]
    from_disk, _ = score_edits(chain, proto, scorers)
    in_memory, _ = score_edits(
        [Edit(e.chain, e.step, o, e.edited, "t", references=photos) for e in chain], proto, scorers
    )
    assert [r["ip"] for r in from_disk] == pytest.approx([r["ip"] for r in in_memory], abs=1e-6)
    assert [r["ip_against"] for r in from_disk] == ["references", "references"]
    assert len(loads) == 1  # the chain's two steps share one read
