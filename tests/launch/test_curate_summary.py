"""The curate summary lists the reasons that rejected something, largest first, and no empty ones."""

from __future__ import annotations

from idforge.launch.curate_cmd import _summary


def _manifest(rejected: dict) -> dict:
    return {
        "files_seen": 10,
        "images_accepted": 6,
        "rejected": rejected,
        "identities": {"a": 6},
        "shards": [],
    }


def test_summary_lists_only_nonzero_rejects_largest_first(tmp_path, capsys):
    _summary(_manifest({"blur": 1, "cluster_outlier": 0, "no_face": 3}), str(tmp_path))
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("rejected")]
    assert [ln.split()[1] for ln in lines] == ["no_face", "blur"]
    assert [int(ln.split()[-1]) for ln in lines] == [3, 1]


def test_summary_says_nothing_was_rejected(tmp_path, capsys):
    _summary(_manifest({"blur": 0}), str(tmp_path))
    out = capsys.readouterr().out
    assert "blur" not in out and any(ln.split() == ["rejected", "0"] for ln in out.splitlines())
