"""Edit-protocol aggregation (FlowID / FINEdits, SPEC sec. 8): which edits count, and the means.

Each edit record carries its chain id, its step in the chain, its VLM score and per-edit quality
metrics (IP, LPIPS, ...). An edit succeeds when its VLM score is below ``threshold`` (0.5); IP / LPIPS
and the set-level FID / CMMD are computed over successful edits only, and a sequence of edits stops
at its first failure (later steps of that chain are not scored at all).
"""

from __future__ import annotations

from collections import defaultdict


def successful_edits(records: list[dict], threshold: float = 0.5) -> tuple[list[dict], dict]:
    """(successful records, counts) with chains cut at their first failed step."""
    chains: dict = defaultdict(list)
    for r in records:
        chains[r.get("chain", id(r))].append(r)
    kept, failed, cut = [], 0, 0
    for steps in chains.values():
        steps = sorted(steps, key=lambda r: r.get("step", 0))
        for i, r in enumerate(steps):
            if r["vlm"] >= threshold:
                failed += 1
                cut += len(steps) - i - 1
                break
            kept.append(r)
    return kept, {
        "edits": len(records),
        "successful": len(kept),
        "failed": failed,
        "not_scored_after_failure": cut,
    }


def summarize_edits(
    records: list[dict], threshold: float = 0.5, metrics: tuple[str, ...] = ("ip", "lpips", "clip")
) -> dict:
    """VLM mean over every scored edit, success rate, and quality means over successful edits only."""
    kept, counts = successful_edits(records, threshold)
    scored = kept + [r for r in records if r["vlm"] >= threshold]
    out = dict(counts, vlm=sum(r["vlm"] for r in scored) / max(len(scored), 1))
    out["success_rate"] = counts["successful"] / max(counts["edits"], 1)
    for m in metrics:
        vals = [r[m] for r in kept if m in r]
        out[m] = sum(vals) / len(vals) if vals else float("nan")
    return out
