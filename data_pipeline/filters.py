"""Per-image quality filters of the curation job (Diff-ID sec. 3.1, FlashFace sec. 3.1).

:func:`check_face` returns the chosen face or a reject reason (the manifest's key), tested in this
order: ``resolution`` (shorter image side), ``no_face``, ``det_score`` / ``face_size`` (no detection
passes both; face size = shorter box side in pixels, and as a fraction of the shorter image side),
``multiple_faces`` (several faces pass the score and size filters; policy: reject, or keep the
largest), ``blur`` (variance of the Laplacian of the grey face crop, :func:`sharpness`:
low = blurry).

Set-level filters: :func:`near_duplicates` keeps the first image of every group of embeddings with
cosine >= threshold, in chunks (no N x N matrix); :class:`OcclusionFilter` flags sunglasses, hats,
masks... with a CLIP zero-shot test (Radford et al. 2021, sec. 3.1.4): softmax over the cosine
similarities of the image to each occlusion prompt and to the clean prompt (CLIP's logit scale),
flagged when the occlusion prompts' total probability reaches the threshold.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from .detect import FaceDetection

log = logging.getLogger(__name__)

REASONS = ("resolution", "no_face", "multiple_faces", "det_score", "face_size", "blur")
DEFAULT_OCCLUSION_PROMPTS = (
    "a photo of a person wearing sunglasses",
    "a photo of a person wearing a hat",
    "a photo of a person wearing a face mask",
    "a photo of a face covered by a hand",
)
CLEAN_PROMPT = "a photo of a person's face, fully visible"


@dataclass
class FilterConfig:
    min_det_score: float = 0.5
    min_face_px: float = 32.0
    """Minimum shorter side of the face box, pixels."""
    min_face_fraction: float = 0.0
    """Minimum face-box side / shorter image side."""
    min_resolution: int = 64
    """Minimum shorter image side, pixels."""
    min_sharpness: float | None = None
    """Minimum variance of the Laplacian on the grey face crop (None: no blur filter)."""
    multiple_faces: str = "reject"
    """``reject`` images with several faces, or keep the ``largest``."""
    duplicate_threshold: float | str | None = "auto"
    """Cosine at or above which an image duplicates an earlier one of the same identity (None: keep all;
    ``auto``: the embedder's own value, :data:`idforge.data_pipeline.embed.THRESHOLDS`)."""
    occlusion: bool = False
    occlusion_prompts: tuple[str, ...] = DEFAULT_OCCLUSION_PROMPTS
    clean_prompt: str = CLEAN_PROMPT
    occlusion_threshold: float = 0.5
    """Flag when the summed softmax probability of the occlusion prompts reaches this."""

    def __post_init__(self):
        if self.multiple_faces not in ("reject", "largest"):
            raise ValueError(
                f"FilterConfig.multiple_faces must be 'reject' or 'largest', got {self.multiple_faces!r}"
            )
        if not 0.0 <= self.min_face_fraction <= 1.0:
            raise ValueError(
                f"FilterConfig.min_face_fraction must be in [0, 1], got {self.min_face_fraction}"
            )
        if self.min_resolution < 1 or self.min_face_px < 0:
            raise ValueError("FilterConfig.min_resolution must be >= 1 and min_face_px >= 0")
        if self.duplicate_threshold not in (None, "auto") and not -1.0 <= self.duplicate_threshold <= 1.0:
            raise ValueError(
                f"FilterConfig.duplicate_threshold is a cosine in [-1, 1], got {self.duplicate_threshold}"
            )
        if not 0.0 <= self.occlusion_threshold <= 1.0:
            raise ValueError(
                f"FilterConfig.occlusion_threshold is a probability, got {self.occlusion_threshold}"
            )
        self.occlusion_prompts = tuple(self.occlusion_prompts)
        if self.occlusion and not self.occlusion_prompts:
            raise ValueError("FilterConfig.occlusion is on but occlusion_prompts is empty")


def sharpness(gray: np.ndarray) -> float:
    """Variance of the 4-neighbour Laplacian of a 2-D image (higher = sharper)."""
    if gray.ndim != 2:
        raise ValueError(f"sharpness expects a 2-D grey image, got shape {gray.shape}")
    g = gray.astype(np.float32)
    lap = -4 * g[1:-1, 1:-1] + g[:-2, 1:-1] + g[2:, 1:-1] + g[1:-1, :-2] + g[1:-1, 2:]
    return float(lap.var()) if lap.size else 0.0


def face_crop(image: np.ndarray, det: FaceDetection) -> np.ndarray:
    """The face box clipped to the image (the whole image if the box is degenerate)."""
    h, w = image.shape[:2]
    x0, y0, x1, y1 = np.clip(np.round(det.box), 0, [w, h, w, h]).astype(int)
    return image[y0:y1, x0:x1] if x1 > x0 + 2 and y1 > y0 + 2 else image


def _score_size_reason(det: FaceDetection, cfg: FilterConfig, short_side: int) -> str | None:
    if det.score < cfg.min_det_score:
        return "det_score"
    if det.size < cfg.min_face_px or det.size / short_side < cfg.min_face_fraction:
        return "face_size"
    return None


def check_face(
    image: np.ndarray, detections: list[FaceDetection], cfg: FilterConfig
) -> tuple[FaceDetection | None, str | None]:
    """(face, None) if the image passes, else (None, reason); reasons in :data:`REASONS`."""
    h, w = image.shape[:2]
    if min(h, w) < cfg.min_resolution:
        return None, "resolution"
    if not detections:
        return None, "no_face"
    # Only faces that pass the score and size filters count towards "several faces": a weak false
    # detection (a pattern on clothing, score 0.1) must not reject a one-person photo.
    passing, first_reason = [], None
    for d in detections:
        reason = _score_size_reason(d, cfg, min(h, w))
        if reason is None:
            passing.append(d)
        elif first_reason is None or (reason == "face_size" and first_reason == "det_score"):
            first_reason = reason  # the reason of the closest miss: size beats score
    if not passing:
        return None, first_reason
    if len(passing) > 1:
        if cfg.multiple_faces == "reject":
            return None, "multiple_faces"
        passing = [max(passing, key=lambda d: d.area)]
    det = passing[0]
    if cfg.min_sharpness is not None:
        crop = face_crop(image, det)
        gray = crop.astype(np.float32).mean(-1) if crop.ndim == 3 else crop
        if sharpness(gray) < cfg.min_sharpness:
            return None, "blur"
    return det, None


def near_duplicates(embeddings: np.ndarray, threshold: float, chunk: int = 4096) -> np.ndarray:
    """Keep mask over (N, D) L2-normalised embeddings: image i is dropped when its cosine to an
    EARLIER kept image is >= ``threshold`` (so the first of each duplicate group stays).

    Memory is O(chunk x chunk + chunk x N_kept-block): earlier kept images are compared block by
    block, and the greedy pass inside a chunk uses one chunk x chunk matrix.
    """
    e = np.asarray(embeddings, dtype=np.float32)
    if e.ndim != 2:
        raise ValueError(f"near_duplicates expects (N, D) embeddings, got shape {e.shape}")
    n = len(e)
    keep = np.ones(n, dtype=bool)
    for start in range(0, n, chunk):
        block = e[start : start + chunk]  # (c, D)
        alive = np.ones(len(block), dtype=bool)
        for prev in range(0, start, chunk):  # against kept images of earlier chunks
            kept = np.flatnonzero(keep[prev : prev + chunk]) + prev
            if kept.size:
                alive &= (block @ e[kept].T).max(1) < threshold
        sims = block @ block.T  # (c, c)
        for j in range(len(block)):
            if alive[j]:
                later = sims[j, j + 1 :] >= threshold
                alive[j + 1 :] &= ~later
        keep[start : start + len(block)] = alive
    return keep


class OcclusionFilter:
    """CLIP zero-shot occlusion test with an open_clip model (image + text towers).

    ``flags(images)`` -> (B,) bool: True where the summed probability of the occlusion prompts
    (softmax against the clean prompt, scaled by the model's logit scale) >= ``threshold``.
    """

    def __init__(
        self,
        model,
        preprocess,
        tokenizer,
        prompts=DEFAULT_OCCLUSION_PROMPTS,
        threshold: float = 0.5,
        clean_prompt: str = CLEAN_PROMPT,
        device: str = "cpu",
        batch_size: int = 32,
    ):
        import torch

        if not prompts:
            raise ValueError("OcclusionFilter needs at least one occlusion prompt")
        self.model, self.preprocess = model.to(device).eval(), preprocess
        self.threshold, self.device, self.batch_size = threshold, device, batch_size
        self.prompts = tuple(prompts)
        with torch.no_grad():
            tokens = tokenizer([*self.prompts, clean_prompt]).to(device)
            text = model.encode_text(tokens).float()
        self.text = text / text.norm(dim=-1, keepdim=True)  # (P + 1, D); last = clean
        scale = getattr(model, "logit_scale", None)
        self.logit_scale = float(scale.detach().exp()) if scale is not None else 100.0

    def probabilities(self, images) -> np.ndarray:
        """(B,) summed occlusion-prompt probability per image."""
        import torch

        out = []
        for i in range(0, len(images), self.batch_size):
            batch = torch.stack([self.preprocess(im) for im in images[i : i + self.batch_size]]).to(
                self.device
            )
            with torch.no_grad():
                feats = self.model.encode_image(batch).float()
            feats = feats / feats.norm(dim=-1, keepdim=True)
            probs = (self.logit_scale * feats @ self.text.T).softmax(-1)  # (b, P + 1)
            out.append(probs[:, :-1].sum(-1).cpu().numpy())
        return np.concatenate(out) if out else np.zeros(0, np.float32)

    def flags(self, images) -> np.ndarray:
        return self.probabilities(images) >= self.threshold

    @classmethod
    def from_spec(cls, spec: str, cfg: FilterConfig, **kw) -> OcclusionFilter:
        """Build from an open_clip spec (``local-dir:/path``, ``ARCH@/path/weights``, ``hf-hub:org/repo``),
        the same forms the generator's CLIP image encoder accepts."""
        from idforge.models.image_encoder import load_open_clip, load_open_clip_tokenizer

        model, preprocess = load_open_clip(spec)
        return cls(
            model,
            preprocess,
            load_open_clip_tokenizer(spec),
            cfg.occlusion_prompts,
            cfg.occlusion_threshold,
            cfg.clean_prompt,
            **kw,
        )

    @classmethod
    def from_open_clip(
        cls, model_name: str, pretrained: str | None, cfg: FilterConfig, **kw
    ) -> OcclusionFilter:
        """Build from an open_clip model name and a LOCAL checkpoint path (never downloads)."""
        import open_clip

        model, _, preprocess = open_clip.create_model_and_transforms(model_name, pretrained=pretrained)
        return cls(
            model,
            preprocess,
            open_clip.get_tokenizer(model_name),
            cfg.occlusion_prompts,
            cfg.occlusion_threshold,
            cfg.clean_prompt,
            **kw,
        )
