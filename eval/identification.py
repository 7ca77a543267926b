"""Identity metrics on face embeddings (SPEC sec. 8).

- FS (Diff-ID sec. 4): cosine between a generated face and one source photo.
- IP (FlowID's InjuredFaces protocol): cosine to the mean embedding of the person's other photos.
- Identification: each generated image is matched against one gallery embedding per evaluated
  identity; top-1 / top-5 accuracy with chance level 1 / N and min(5, N) / N.
- FlashFace (sec. 4, Table 1): Sim_Target = cosine to the held-out target photo, Sim_Ref = max
  cosine over the references, Paste = Sim_Ref - Sim_Target (high Paste: the model copies a
  reference instead of rendering the person anew).

Rows of undetected faces are NaN in the embeddings (:func:`idforge.eval.identity.embed_generated`);
every function here averages over detected rows only and reports how many were left out.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _valid(emb: torch.Tensor) -> torch.Tensor:
    return ~torch.isnan(emb).any(-1)


def mean_embedding(photos: torch.Tensor) -> torch.Tensor:
    """L2-normalised mean of a person's photo embeddings (K, D) -> (D,)."""
    return F.normalize(F.normalize(photos.float(), dim=-1).mean(0), dim=-1)


def face_similarity(generated: torch.Tensor, sources: torch.Tensor) -> dict:
    """Mean cosine (FS, or IP when ``sources`` are mean embeddings) over detected rows (N, D)."""
    ok = _valid(generated)
    cos = (F.normalize(generated[ok].float(), dim=-1) * F.normalize(sources[ok].float(), dim=-1)).sum(-1)
    return {
        "mean": float(cos.mean()) if ok.any() else float("nan"),
        "scored": int(ok.sum()),
        "undetected": int((~ok).sum()),
    }


def identification(generated: torch.Tensor, gallery: torch.Tensor, truth: torch.Tensor | None = None) -> dict:
    """Top-1 / top-5 identification of generated (N, D) among gallery (G, D) identities.

    ``truth`` (N,) is each image's gallery row (default: row i for image i). Undetected faces count
    as misses (an image whose face cannot be found identifies no one).
    """
    n, g = generated.shape[0], gallery.shape[0]
    truth = torch.arange(n) if truth is None else truth
    ok = _valid(generated)
    sims = F.normalize(generated.nan_to_num(0).float(), dim=-1) @ F.normalize(gallery.float(), dim=-1).T
    rank = (sims > sims.gather(1, truth[:, None])).sum(1)  # (N,) 0 = best
    k5 = min(5, g)
    return {
        "top1": float(((rank < 1) & ok).float().mean()),
        "top5": float(((rank < k5) & ok).float().mean()),
        "chance_top1": 1.0 / g,
        "chance_top5": k5 / g,
        "identities": g,
    }


def flashface_similarity(generated: torch.Tensor, target: torch.Tensor, references: torch.Tensor) -> dict:
    """Sim_Target, Sim_Ref (max over references) and Paste for generated (N, D), target (N, D),
    references (N, R, D); means over detected rows."""
    ok = _valid(generated)
    gen = F.normalize(generated[ok].float(), dim=-1)
    sim_t = (gen * F.normalize(target[ok].float(), dim=-1)).sum(-1)
    sim_r = torch.einsum("nd,nrd->nr", gen, F.normalize(references[ok].float(), dim=-1)).amax(1)
    return {
        "sim_target": float(sim_t.mean()),
        "sim_ref": float(sim_r.mean()),
        "paste": float((sim_r - sim_t).mean()),
        "scored": int(ok.sum()),
        "undetected": int((~ok).sum()),
    }
