"""Text encoders run once per new prompt and wait off the accelerator (SPEC sec. 5, issue item 7)."""

from __future__ import annotations

import pytest
import torch
from idforge.inference.edit import Editor, FinetuneConfig, load_backbone

from .conftest import photo

SRC = "a person's face with red hair"
TGT = "a person's face with blond hair"
TGT2 = "a person's face with blond hair and a hat"


def _run(bb) -> list[torch.Tensor]:
    """Fine-tune, edit, a sequential edit with a new prompt, and the first edit again."""
    ed = Editor(bb, photo())
    ed.finetune(SRC, FinetuneConfig(steps=1, lr=1e-3, grad_accum=2))
    first = ed.edit(SRC, TGT, "red hair", strength=0.8, steps=6, kernel=1)
    second = ed.edit(TGT, TGT2, "hat", mode="addition", chain=True, strength=0.8, steps=6, kernel=1)
    third = ed.edit(SRC, TGT, "red hair", strength=0.8, steps=6, kernel=1)
    return [first.image, second.image, third.image]


@pytest.mark.parametrize("kind", ["sd3", "export"])
def test_text_encoders_run_once_per_prompt_and_go_back_to_the_offload_device(
    kind, tiny_sd3_dir, tiny_export_dir, monkeypatch
):
    bb = load_backbone(tiny_sd3_dir if kind == "sd3" else tiny_export_dir, offload_text_encoders=True)
    assert bb.text_offload == torch.device("cpu") and bb.text_encoder_device == torch.device("cpu")
    encoders = bb.text_encoders()
    assert len(encoders) == (3 if kind == "sd3" else 1)
    forwards = []
    for i, enc in enumerate(encoders):
        enc.register_forward_pre_hook(lambda m, a, i=i: forwards.append((i, next(m.parameters()).device)))
    moves = []
    real_move = bb._move_text_encoders
    monkeypatch.setattr(bb, "_move_text_encoders", lambda d: (moves.append(torch.device(d)), real_move(d)))
    _run(bb)
    # three distinct prompts: each encoder runs three times, always on the denoiser's device
    assert sorted(i for i, _ in forwards) == sorted(list(range(len(encoders))) * 3)
    assert {d for _, d in forwards} == {bb.device}
    # three visits (fine-tune: SRC; first edit: TGT; sequential edit: TGT2), each ending offloaded
    assert moves == [bb.device, torch.device("cpu")] * 3


@pytest.mark.parametrize("kind", ["sd3", "export"])
def test_offloaded_text_encoders_are_not_needed_after_encoding_and_change_nothing(
    kind, tiny_sd3_dir, tiny_export_dir
):
    """Offloading to `meta` (weights gone) after one visit: any later text-encoder use would fail, and
    the fine-tune and edits give the same images as with the encoders in place."""
    folder = tiny_sd3_dir if kind == "sd3" else tiny_export_dir
    torch.manual_seed(0)
    plain = _run(load_backbone(folder))
    bb = load_backbone(folder)
    assert bb.text_offload is None  # default on CPU: in place
    bb.text_offload = torch.device("meta")
    Editor(bb, photo())  # the export's prompts depend on the photo's identity
    bb.encode_prompts([SRC, TGT, TGT2])
    assert all(p.device.type == "meta" for e in bb.text_encoders() for p in e.parameters())
    torch.manual_seed(0)
    offloaded = _run(bb)
    assert all(torch.equal(a, b) for a, b in zip(plain, offloaded))
