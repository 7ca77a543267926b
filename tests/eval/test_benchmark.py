"""The held-out identity benchmark (FS of the adapter vs its baselines) on hand-made faces and a tiny model.

The judge is a hand-made face encoder (the mean colour of the aligned crop), so the real-photo figures
have hand-computed values; the text-only baseline must not see the reference at all.
"""

from __future__ import annotations

import pytest
import torch
from idforge.data_pipeline.align import template_for
from idforge.eval.benchmark import identity_benchmark
from idforge.eval.groups import IdentityGroup
from idforge.inference.pipeline import IdentityEmbeds

from tests.builders import live_pipeline, perturbed_generator

COLOURS = [(1.0, 0.0, 0.0), (0.6, 0.8, 0.0), (0.0, 0.0, 1.0)]  # pairwise cosines 0.6, 0, 0
STEPS = 2


class MeanColour(torch.nn.Module):
    """A judge whose embedding of a constant-colour face is that colour's direction."""

    def forward(self, crops: torch.Tensor) -> torch.Tensor:
        return crops.mean(dim=(2, 3))


@pytest.fixture(scope="module")
def model(tiny_zoo):
    return perturbed_generator(tiny_zoo, adapter={"variant": "final"})


@pytest.fixture(scope="module")
def pipe(model):
    p = live_pipeline(model)
    return p


def _groups(reference_seed: int | None = None) -> list[IdentityGroup]:
    """Three people, three constant-colour photos each; ``reference_seed`` replaces every person's
    reference photo (photo 0) by noise, keeping the gallery and the captions."""
    lms = torch.as_tensor(template_for(32, 1.0), dtype=torch.float32)
    groups = []
    for i, c in enumerate(COLOURS):
        images = torch.tensor(c).view(1, 3, 1, 1).expand(3, 3, 32, 32).clone()
        if reference_seed is not None:
            g = torch.Generator().manual_seed(reference_seed + i)
            images[0] = torch.rand(3, 32, 32, generator=g) * 2 - 1
        groups.append(IdentityGroup(f"p{i}", images, lms.expand(3, 5, 2).clone(), [f"person {i}"] * 3))
    return groups


def test_real_photo_figures_are_the_hand_computed_cosines(pipe):
    fig, images = identity_benchmark(pipe, _groups(), MeanColour(), steps=STEPS)
    assert fig["fs_same_identity"] == pytest.approx(1.0, abs=1e-5)  # reference = gallery colour
    # floor: each gallery against the previous person's reference: cos(c0, c2), cos(c1, c0), cos(c2, c1)
    assert fig["fs_different"] == pytest.approx((0.0 + 0.6 + 0.0) / 3, abs=1e-5)
    assert fig["heldout_identities"] == 3
    assert images["reference"].shape == images["adapter"].shape == images["text_only"].shape == (3, 3, 32, 32)


def test_text_only_images_do_not_depend_on_the_reference_and_the_adapters_do(pipe, model):
    fig_a, a = identity_benchmark(pipe, _groups(), MeanColour(), steps=STEPS)
    fig_b, b = identity_benchmark(pipe, _groups(reference_seed=7), MeanColour(), steps=STEPS)
    assert torch.equal(a["text_only"], b["text_only"])
    assert fig_a["fs_text_only"] == fig_b["fs_text_only"]
    assert (a["adapter"] - b["adapter"]).abs().max() > 1e-4
    assert (a["adapter"] - a["text_only"]).abs().max() > 1e-4
    # the text-only baseline is the same model with a zero identity input
    zeros_arc, zeros_clip = torch.zeros(3, 512), torch.zeros(3, model.image_encoder.output_dim)
    captions = [f"person {i}" for i in range(3)]
    expected = pipe(
        captions,
        identity=IdentityEmbeds(zeros_arc, zeros_clip),
        num_inference_steps=STEPS,
        guidance_scale=1.0,
        generator=torch.Generator().manual_seed(0),
        output_type="pt",
    ).images
    expected = (expected * 2 - 1).clamp(-1, 1)
    assert torch.allclose(a["text_only"], expected, atol=1e-6)


def test_the_benchmark_needs_two_people_with_two_photos_each(pipe):
    with pytest.raises(ValueError, match="at least 2 held-out identities"):
        identity_benchmark(pipe, _groups()[:1], MeanColour(), steps=STEPS)
    one_photo = _groups()
    one_photo[1] = IdentityGroup("p1", one_photo[1].images[:1], one_photo[1].landmarks[:1], ["x"])
    with pytest.raises(ValueError, match="at least 2 photos"):
        identity_benchmark(pipe, one_photo, MeanColour(), steps=STEPS)


def test_references_and_gallery_are_split_where_asked(pipe):
    groups = _groups()
    for g in groups:  # photo 1 becomes another colour: in the gallery it would lower the ceiling
        g.images[1] = torch.tensor((0.0, 1.0, 0.0)).view(3, 1, 1).expand(3, 32, 32)
    fig, _ = identity_benchmark(pipe, groups, MeanColour(), steps=STEPS, num_refs=1, gallery_start=2)
    assert fig["fs_same_identity"] == pytest.approx(1.0, abs=1e-5)  # gallery = photo 2 only
    fig_all, _ = identity_benchmark(pipe, groups, MeanColour(), steps=STEPS)  # gallery = photos 1, 2
    assert fig_all["fs_same_identity"] < 0.99
    # two references: the identity is their mean embedding, so the generated images change
    _, one = identity_benchmark(pipe, groups, MeanColour(), steps=STEPS, num_refs=1, gallery_start=2)
    _, two = identity_benchmark(pipe, groups, MeanColour(), steps=STEPS, num_refs=2, gallery_start=2)
    assert (one["adapter"] - two["adapter"]).abs().max() > 1e-4
    assert torch.equal(one["text_only"], two["text_only"])
    assert set(fig["flashface"]) >= {"sim_target", "sim_ref", "paste"}
    with pytest.raises(ValueError, match="at least 4 photos"):
        identity_benchmark(pipe, groups, MeanColour(), steps=STEPS, num_refs=3)


class Channels(torch.nn.Module):
    """Another hand-made judge: the mean colour with its channels reordered (B, G, R)."""

    def forward(self, crops: torch.Tensor) -> torch.Tensor:
        return crops.mean(dim=(2, 3)).flip(-1)


def test_a_second_judge_scores_the_same_images_with_its_own_embedding(pipe):
    from idforge.eval.benchmark import score_images

    groups = _groups()
    fig, images = identity_benchmark(pipe, groups, MeanColour(), steps=STEPS, judges={"bgr": Channels()})
    lms = groups[0].landmarks[:1].expand(3, 5, 2)
    own = score_images(Channels(), images, groups, lms, 1, 1)
    assert fig["judges"]["bgr"] == own
    # the real photos: every reference is its own gallery's colour -> FS 1 and top-1 100 % (chance 1/3)
    assert own["fs_same_identity"] == pytest.approx(1.0, abs=1e-5)
    ident = own["identification"]["reference"]
    assert ident["top1"] == 1.0 and ident["chance_top1"] == pytest.approx(1 / 3)
    # a hand computation of the judge's FS for the generated images (cosine to the gallery colour)
    gen = Channels()(images["adapter"])
    gallery = torch.tensor(COLOURS).flip(-1)
    expected = torch.nn.functional.cosine_similarity(gen, gallery, dim=-1).mean()
    assert own["fs_adapter"] == pytest.approx(float(expected), abs=1e-4)


def test_extra_image_sets_are_scored_like_the_generated_ones():
    """VAE reconstructions (or any other per-identity image set) get their own FS and identification."""
    from idforge.eval.benchmark import score_images

    groups = _groups()
    refs = torch.stack([g.images[0] for g in groups])
    swapped = refs.roll(1, dims=0)  # each person gets the previous person's colour
    lms = groups[0].landmarks[:1].expand(3, 5, 2)
    fig = score_images(MeanColour(), {"reference": refs, "swapped": swapped}, groups, lms, 1, 1)
    assert fig["fs_swapped"] == pytest.approx(fig["fs_different"], abs=1e-5)
    assert fig["identification"]["swapped"]["top1"] == 0.0
    assert "flashface" not in fig  # FlashFace's similarities belong to generated ("adapter") images
