"""Held-out identity benchmark: FS of the adapter model against its own baselines.

For every held-out identity, one photo is the reference and the identity's other photos are the
gallery. We report the mean cosine (face similarity, Diff-ID sec. 4) between the gallery's mean
ArcFace embedding (FlowID's InjuredFaces protocol) and:

- ``fs_adapter``: an image generated from the reference (caption of a gallery photo);
- ``fs_text_only``: the same model and seed with the identity input zeroed;
- ``fs_same_identity``: the real reference photo (ceiling: what a perfect copy of the person scores);
- ``fs_different``: the reference photo of a *different* held-out person (floor).

``fs_adapter_vs_reference`` (generated vs the reference itself, Diff-ID's pairing) is reported too,
and identification (top-1 / top-5 of each generated image among the held-out identities' gallery
means, chance 1 / N) for the adapter and the text-only rows. ``judges`` score the same images with
other face encoders (an independent judge that played no part in training) under ``judges[name]``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .groups import IdentityGroup
from .identity import cosine, embed_faces


def benchmark_steps(num_groups: int, steps: int, batch_size: int = 32, per_identity: bool = False) -> int:
    """Denoising steps :func:`identity_benchmark` runs (adapter + text-only, per batch; a ReferenceNet
    model's adapter row runs one identity per call: ``per_identity``): a progress total."""
    batches = -(-num_groups // batch_size)
    return (num_groups if per_identity else batches) * steps + batches * steps


@torch.no_grad()
def identity_benchmark(
    pipe,
    groups: list[IdentityGroup],
    face_encoder: torch.nn.Module,
    steps: int = 25,
    guidance_scale: float = 1.0,
    seed: int = 0,
    generated_landmarks: torch.Tensor | None = None,
    batch_size: int = 32,
    progress: Callable[[int], object] | None = None,
    num_refs: int = 1,
    gallery_start: int | None = None,
    reference_guidance_scale: float = 2.0,
    judges: dict[str, torch.nn.Module] | None = None,
) -> tuple[dict, dict[str, torch.Tensor]]:
    """Run the benchmark; returns (figures, images) with images["reference"|"adapter"|"text_only"].

    ``pipe`` is an :class:`~idforge.inference.pipeline.IdentityPipeline` (``load_pipeline`` of an
    export, or ``pipeline_from_generator`` of a live model); every batch starts from the z_T of
    ``seed`` and runs ``steps`` DDIM steps (the pipeline's scheduler). ``face_encoder`` is the
    evaluation ArcFace (may differ from the one the generator conditions on). ``generated_landmarks``
    (5, 2) places the face in generated images (models trained on aligned crops generate aligned
    faces); by default each reference's landmarks are used. ``progress(1)`` is called after every
    denoising step (:func:`benchmark_steps` gives the total).

    The first ``num_refs`` photos of each identity are its references, the photos from
    ``gallery_start`` (default ``num_refs``) on its gallery: compare several ``num_refs`` with one
    ``gallery_start`` so every setting is scored against the same photos. An adapter model gets the
    references' mean embeddings, guided by ``guidance_scale`` against the null identity. A
    ReferenceNet model (FlashFace) gets the reference photos themselves, one identity per call, with
    FlashFace's three-branch guidance (text ``guidance_scale``, references
    ``reference_guidance_scale``); its text-only row runs without references. The figures then also
    hold FlashFace's Sim_Target / Sim_Ref / Paste (``flashface``).
    """
    from idforge.inference.pipeline import IdentityEmbeds

    start = num_refs if gallery_start is None else gallery_start
    if num_refs < 1 or start < num_refs:
        raise ValueError(f"identity_benchmark: need 1 <= num_refs <= gallery_start, got {num_refs}, {start}")
    if len(groups) < 2:
        raise ValueError("identity_benchmark needs at least 2 held-out identities (for the floor figure)")
    if any(g.images.shape[0] < start + 1 for g in groups):
        short = min(groups, key=lambda g: g.images.shape[0])
        raise ValueError(
            f"every held-out identity needs at least {start + 1} photos ({num_refs} reference(s) + a gallery "
            f"from photo {start}); identity {short.identity} has {short.images.shape[0]}"
        )
    device = pipe._execution_device
    refs = torch.stack([g.images[0] for g in groups]).to(device)
    ref_lms = torch.stack([g.landmarks[0] for g in groups]).to(device)
    captions = [g.captions[start] for g in groups]
    resolution = refs.shape[-1]

    def on_step(p, step, t, kwargs):
        if progress is not None:
            progress(1)
        return kwargs

    def run(prompts, **kw):
        images = pipe(
            prompts,
            num_inference_steps=steps,
            height=resolution,
            width=resolution,
            generator=torch.Generator(device="cpu").manual_seed(seed),
            output_type="pt",
            callback_on_step_end=on_step,
            **kw,
        ).images
        return (images.float() * 2 - 1).clamp(-1, 1)  # [0, 1] -> [-1, 1]

    def identity_of(g: IdentityGroup):
        if pipe.adapter is None:
            return None
        return pipe.encode_identity(g.images[:num_refs].to(device), g.landmarks[:num_refs].to(device))

    outs = {"adapter": [], "text_only": []}
    if getattr(pipe, "reference_net", None) is not None:  # FlashFace: the photos, one person per call
        for g, caption in zip(groups, captions, strict=True):
            outs["adapter"].append(
                run(
                    [caption],
                    identity=identity_of(g),
                    reference_images=g.images[:num_refs].to(device),
                    guidance_scale=guidance_scale,
                    reference_guidance_scale=reference_guidance_scale,
                )
            )
        for i in range(0, len(groups), batch_size):
            outs["text_only"].append(run(captions[i : i + batch_size], guidance_scale=1.0))
    else:
        for i in range(0, len(groups), batch_size):
            sl = slice(i, i + batch_size)
            ids = [identity_of(g) for g in groups[sl]]
            identity = IdentityEmbeds(torch.cat([e.arcface for e in ids]), torch.cat([e.clip for e in ids]))
            # text-only: the identity input zeroed (the null identity identity dropout trains)
            for name, ident in (("adapter", identity), ("text_only", identity.zeros_like())):
                outs[name].append(run(captions[sl], identity=ident, guidance_scale=guidance_scale))
    images = {"reference": refs.cpu(), **{k: torch.cat(v).cpu() for k, v in outs.items()}}
    gen_lms = ref_lms if generated_landmarks is None else generated_landmarks.to(device).expand_as(ref_lms)
    fig = score_images(face_encoder, images, groups, gen_lms, num_refs, start)
    fig["judges"] = {
        name: score_images(judge, images, groups, gen_lms, num_refs, start)
        for name, judge in (judges or {}).items()
    }
    fig["heldout_identities"] = len(groups)
    fig["num_refs"] = num_refs
    return fig, images


@torch.no_grad()
def score_images(
    face_encoder: torch.nn.Module,
    images: dict[str, torch.Tensor],
    groups: list[IdentityGroup],
    generated_landmarks: torch.Tensor,
    num_refs: int,
    gallery_start: int,
) -> dict:
    """FS, identification and FlashFace similarities of ``images`` under one face encoder.

    ``images["reference"]`` are the references (first photo of each group, their own landmarks);
    every other key (``identity_benchmark``'s "adapter" / "text_only", or e.g. VAE reconstructions
    of the references) is one image per group at ``generated_landmarks`` and gets ``fs_<key>`` and
    ``identification[<key>]``; "adapter" also gets FlashFace's similarities."""
    from .identification import flashface_similarity, identification

    device = next((p.device for p in face_encoder.parameters()), torch.device("cpu"))
    gallery = torch.stack(
        [
            torch.nn.functional.normalize(
                embed_faces(
                    face_encoder, g.images[gallery_start:].to(device), g.landmarks[gallery_start:].to(device)
                ).mean(0),
                dim=-1,
            )
            for g in groups
        ]
    )
    ref_lms = torch.stack([g.landmarks[0] for g in groups]).to(device)
    ref_emb = embed_faces(face_encoder, images["reference"].to(device), ref_lms)
    fig: dict = {"identification": {}}
    for name in [k for k in images if k != "reference"]:
        emb = embed_faces(face_encoder, images[name].to(device), generated_landmarks.to(device))
        fig[f"fs_{name}"] = float(cosine(emb, gallery).mean())
        fig["identification"][name] = identification(emb, gallery)
        if name == "adapter":
            fig["fs_adapter_vs_reference"] = float(cosine(emb, ref_emb).mean())
            all_refs = torch.stack(
                [
                    embed_faces(
                        face_encoder, g.images[:num_refs].to(device), g.landmarks[:num_refs].to(device)
                    )
                    for g in groups
                ]
            )
            fig["flashface"] = flashface_similarity(emb, gallery, all_refs)
    fig["fs_same_identity"] = float(cosine(ref_emb, gallery).mean())
    fig["fs_different"] = float(cosine(ref_emb.roll(1, dims=0), gallery).mean())
    fig["identification"]["reference"] = identification(ref_emb, gallery)
    return fig
