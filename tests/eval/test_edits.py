"""Success filtering of edits: quality metrics over successful edits only, chains cut at the first failure."""

from __future__ import annotations

import pytest
from idforge.eval.edits import successful_edits, summarize_edits


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
