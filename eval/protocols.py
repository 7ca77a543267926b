"""Evaluation protocols as data (``configs/eval/*.yaml``): what to generate and which metrics to report.

- ``diffid`` (Diff-ID sec. 4, Table 1): one reference per held-out identity, FS to it, identification,
  FID against the real photos, FIQ = 100 FS% / FID.
- ``flashface`` (FlashFace sec. 4, Table 1): 4 references + 1 target per held-out identity;
  Sim_Target, Sim_Ref, Paste, CLIP score (image-text, to the target's caption), FID.
- ``edits`` (FlowID / FINEdits): IP, CLIP, FID, CMMD, LPIPS, VLM over a folder of edits; the quality
  metrics over successful edits only (VLM < ``success_threshold``, the yes/no score of
  ``vlm_model`` asked ``vlm_question``); a sequence of edits stops at its first failure.

``reference_rows`` are the papers' published numbers (SPEC sec. 8), printed as reference rows and
marked as such: they were measured on the papers' data with real weights.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import yaml

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs" / "eval"
METRICS = {"fs", "ip", "identification", "sim_target", "sim_ref", "paste", "clip", "clip_image", "fid",
           "fiq", "cmmd", "lpips", "vlm"}  # fmt: skip


@dataclass
class Protocol:
    """One evaluation protocol (see the module docstring)."""

    name: str
    kind: str = "generate"  # generate | edit
    references: int = 1  # photos per identity used as the identity input
    targets: int = 1  # held-out photo(s) per identity the generated image is compared with
    metrics: list[str] = field(default_factory=lambda: ["fs", "identification"])
    baseline: bool = True  # also generate text-only (null identity) images with the same seeds
    steps: int = 50
    guidance: float = 1.0
    seed: int = 0
    batch_size: int = 8
    max_identities: int = 200
    # the VLM's question (FlowID sec. 4.1); ``{concept}`` in it is filled with each edit's concept
    vlm_question: str = "Is this person's face injured? Only answer with yes or no."
    vlm_model: str | None = None  # local VLM folder or cached hub name (idforge.eval.vlm); --vlm overrides
    vlm_prompt: str | None = None  # '{image}...{question}...' for VLMs without a chat template
    success_threshold: float = 0.5  # an edit succeeds when its VLM score is below this (SPEC sec. 8)
    vlm_success: str = "below"  # or "above": the question asks about what the edit adds (FlowID Table 1b)
    reference_rows: dict[str, dict[str, float]] = field(default_factory=dict)

    def __post_init__(self):
        if self.kind not in ("generate", "edit"):
            raise ValueError(f"protocol {self.name}: kind must be 'generate' or 'edit', got {self.kind!r}")
        unknown = set(self.metrics) - METRICS
        if unknown:
            raise ValueError(
                f"protocol {self.name}: unknown metrics {sorted(unknown)}; known: {sorted(METRICS)}"
            )
        if self.vlm_success not in ("below", "above"):
            raise ValueError(
                f"protocol {self.name}: vlm_success must be 'below' or 'above', got {self.vlm_success!r}"
            )
        if self.references < 1 or self.targets < 0:
            raise ValueError(f"protocol {self.name}: references must be >= 1 and targets >= 0")


def protocol_names() -> list[str]:
    return sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))


def load_protocol(name_or_path: str | Path) -> Protocol:
    """A protocol by name (``configs/eval/NAME.yaml``) or from a YAML file."""
    path = Path(name_or_path).expanduser()
    if not path.is_file():
        path = CONFIG_DIR / f"{name_or_path}.yaml"
    if not path.is_file():
        raise FileNotFoundError(
            f"--protocol {name_or_path}: no such protocol; choose one of {', '.join(protocol_names())} or a YAML file"
        )
    data = yaml.safe_load(path.read_text()) or {}
    data.setdefault("name", path.stem)
    try:
        return Protocol(**data)
    except TypeError as e:
        raise ValueError(f"{path}: {e}; see idforge.eval.protocols.Protocol for the keys") from e
