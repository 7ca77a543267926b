"""SynthID: a deterministic renderer of synthetic people, with known landmarks and attribute captions.

Learning is tested on data whose ground truth is known. Each identity has fixed geometry and
colours (face shape and jaw, eye spacing/size/colour, nose length/width, mouth width and lips, brow
thickness/angle, skin, hair colour and style, facial hair, a mole); each photo of it varies pose
(roll, a small yaw), scale, position, expression, lighting and background. Every image records
the 5 ArcFace landmarks (image-left eye centre, image-right eye centre, nose tip, image-left and
image-right mouth corners) in pixel coordinates, the face box, and an attribute caption.

Faces are drawn as polygons in a canonical frame (face half-width = 1, eyes on y = eye_y) mapped to
the image by a similarity transform, at 4x supersampling, then downsampled (LANCZOS). Everything
derives from ``numpy.random.default_rng([seed, identity(, index)])``: no global state, so any image
can be rendered alone and equals the same image rendered within a full pass.
Held-out identities are the last ``heldout_identities`` ids.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

_SS = 4  # supersampling factor

SKIN = {
    "pale": (236, 208, 190),
    "fair": (224, 180, 150),
    "olive": (190, 150, 105),
    "tan": (165, 115, 80),
    "brown": (120, 80, 55),
    "dark": (80, 52, 38),
}
HAIR = {
    "black": (25, 20, 20),
    "brown": (95, 60, 30),
    "blonde": (225, 195, 120),
    "red": (170, 60, 25),
    "grey": (150, 150, 150),
    "white": (235, 235, 235),
    "blue": (50, 80, 190),
    "green": (40, 140, 70),
}
EYES = {
    "brown": (90, 50, 20),
    "blue": (40, 110, 210),
    "green": (40, 150, 70),
    "grey": (120, 130, 140),
    "amber": (200, 140, 30),
    "violet": (130, 60, 170),
}
BACKGROUND = {
    "blue": (70, 110, 200),
    "green": (80, 170, 90),
    "red": (200, 70, 70),
    "yellow": (225, 205, 80),
    "purple": (140, 80, 170),
    "teal": (60, 160, 160),
    "grey": (128, 128, 128),
    "orange": (230, 140, 60),
}
HAIR_STYLES = ("bald", "short", "long", "fringe", "bun", "curly")
FACIAL_HAIR = ("none", "none", "beard", "moustache")
EXPRESSIONS = ("neutral", "smiling", "open", "surprised")
LIGHT_DIRS = ("left", "right", "top", "front")
BG_KINDS = ("plain", "gradient", "noisy", "striped")


@dataclass(frozen=True)
class SynthIDConfig:
    num_identities: int = 64
    images_per_identity: int = 8
    resolution: int = 64
    heldout_identities: int = 16
    seed: int = 0

    def __post_init__(self):
        if self.num_identities < 1 or self.images_per_identity < 1:
            raise ValueError("num_identities and images_per_identity must be >= 1")
        if not 0 <= self.heldout_identities < self.num_identities:
            raise ValueError(
                f"heldout_identities must be in [0, num_identities), got {self.heldout_identities} "
                f"for {self.num_identities} identities"
            )
        if self.resolution < 16:
            raise ValueError(f"resolution must be >= 16 px, got {self.resolution}")


@dataclass(frozen=True)
class IdentityParams:
    """The fixed look of one synthetic person (canonical frame: face half-width 1)."""

    aspect: float  # face half-height / half-width
    jaw: float  # 0 round .. 1 pointed chin
    eye_spacing: float  # half distance between eye centres
    eye_size: float
    eye_colour: str
    nose_length: float
    nose_width: float
    mouth_width: float
    lip: float
    brow_thickness: float
    brow_angle: float
    skin: str
    hair_colour: str
    hair_style: str
    facial_hair: str
    mole: tuple[float, float] | None


@dataclass
class SynthIDSample:
    image: Image.Image
    landmarks: np.ndarray  # (5, 2) float32, pixel coordinates
    box: tuple[float, float, float, float]
    caption: str
    attributes: dict
    identity: int
    index: int
    split: str
    key: str
    score: float = 1.0


def _pick(rng: np.random.Generator, options):
    return options[int(rng.integers(len(options)))]


def _ellipse(cx, cy, rx, ry, n=48, start=0.0, end=2 * math.pi):
    t = np.linspace(start, end, n)
    return np.stack([cx + rx * np.cos(t), cy + ry * np.sin(t)], 1)


class SynthID:
    """Renders identities and their photos; see the module docstring."""

    def __init__(self, config: SynthIDConfig | None = None):
        self.config = config or SynthIDConfig()

    # ------------------------------------------------------------------ identities and splits
    @property
    def train_ids(self) -> range:
        return range(self.config.num_identities - self.config.heldout_identities)

    @property
    def heldout_ids(self) -> range:
        return range(self.config.num_identities - self.config.heldout_identities, self.config.num_identities)

    def split_of(self, identity: int) -> str:
        self._check_identity(identity)
        return "train" if identity in self.train_ids else "heldout"

    def __len__(self) -> int:
        return self.config.num_identities * self.config.images_per_identity

    def _check_identity(self, identity: int) -> None:
        if not 0 <= identity < self.config.num_identities:
            raise IndexError(f"identity {identity} out of range [0, {self.config.num_identities})")

    def identity_params(self, identity: int) -> IdentityParams:
        self._check_identity(identity)
        rng = np.random.default_rng([self.config.seed, identity])
        has_mole = rng.random() < 0.4
        mole = (float(rng.uniform(-0.6, 0.6)), float(rng.uniform(-0.1, 0.6))) if has_mole else None
        return IdentityParams(
            aspect=float(rng.uniform(1.1, 1.55)),
            jaw=float(rng.uniform(0, 1)),
            eye_spacing=float(rng.uniform(0.30, 0.52)),
            eye_size=float(rng.uniform(0.09, 0.17)),
            eye_colour=_pick(rng, list(EYES)),
            nose_length=float(rng.uniform(0.30, 0.55)),
            nose_width=float(rng.uniform(0.08, 0.22)),
            mouth_width=float(rng.uniform(0.45, 0.95)),
            lip=float(rng.uniform(0.03, 0.10)),
            brow_thickness=float(rng.uniform(0.03, 0.10)),
            brow_angle=float(rng.uniform(-0.25, 0.25)),
            skin=_pick(rng, list(SKIN)),
            hair_colour=_pick(rng, list(HAIR)),
            hair_style=_pick(rng, HAIR_STYLES),
            facial_hair=_pick(rng, FACIAL_HAIR),
            mole=mole,
        )

    # ------------------------------------------------------------------ rendering
    def render(self, identity: int, index: int) -> SynthIDSample:
        cfg = self.config
        if not 0 <= index < cfg.images_per_identity:
            raise IndexError(f"image index {index} out of range [0, {cfg.images_per_identity})")
        p = self.identity_params(identity)
        rng = np.random.default_rng([cfg.seed, identity, index, 1])
        res = cfg.resolution
        big = res * _SS
        # pose: similarity transform canonical -> supersampled image
        height_frac = rng.uniform(0.45, 0.70)
        unit = height_frac * big / (2 * p.aspect * 1.15)  # face half-width in px (hair adds ~15%)
        roll = math.radians(rng.uniform(-15, 15))
        yaw = float(rng.uniform(-0.3, 0.3))
        reach = unit * p.aspect * 1.35
        cx = big / 2 + rng.uniform(-1, 1) * max(0.0, big / 2 - reach)
        cy = big / 2 + rng.uniform(-1, 1) * max(0.0, big / 2 - reach)
        cos_r, sin_r = math.cos(roll), math.sin(roll)

        def to_img(pts):
            pts = np.asarray(pts, dtype=np.float64)
            x, y = pts[:, 0] * unit, pts[:, 1] * unit
            return np.stack([cx + cos_r * x - sin_r * y, cy + sin_r * x + cos_r * y], 1)

        expression = _pick(rng, EXPRESSIONS)
        light = _pick(rng, LIGHT_DIRS)
        bg_kind = _pick(rng, BG_KINDS)
        bg_name = _pick(rng, list(BACKGROUND))
        img = self._background(rng, big, bg_kind, bg_name)
        draw = ImageDraw.Draw(img)
        a = p.aspect
        skin = np.array(SKIN[p.skin], dtype=np.float64)
        hair = HAIR[p.hair_colour]
        shift = yaw * 0.25  # inner features move with yaw; the nose tip moves more
        eye_y = -0.18 * a
        poly = lambda pts, fill: draw.polygon(
            [tuple(q) for q in to_img(pts)], fill=tuple(int(c) for c in fill)
        )

        # hair behind the head
        if p.hair_style == "long":
            poly(_ellipse(0, 0.25 * a, 1.25, 1.35 * a), hair)
        elif p.hair_style == "curly":
            for k in range(10):
                ang = math.pi + k * math.pi / 9
                poly(_ellipse(1.0 * math.cos(ang), -0.1 * a + 0.95 * a * math.sin(ang), 0.35, 0.35), hair)
        # face outline (jaw narrows the lower half)
        t = np.linspace(0, 2 * math.pi, 72)
        lower = np.clip(np.sin(t), 0, None) ** 2
        face = np.stack([np.cos(t) * (1 - 0.35 * p.jaw * lower), a * np.sin(t)], 1)
        poly(face, skin)
        # hair on top
        top = _ellipse(0, 0, 1.04, a * 1.04, start=math.pi, end=2 * math.pi)
        if p.hair_style in ("short", "fringe", "bun", "long", "curly"):
            cut = -0.55 * a if p.hair_style != "fringe" else -0.32 * a
            cap = np.concatenate([top, [[1.0, cut], [-1.0, cut]]])
            cap[:, 1] = np.minimum(cap[:, 1], cut)
            poly(cap, hair)
        if p.hair_style == "bun":
            poly(_ellipse(0, -1.12 * a, 0.38, 0.3), hair)
        # facial hair
        if p.facial_hair == "beard":
            beard = face[(face[:, 1] > 0.3 * a)]
            poly(np.concatenate([beard, [[0.0, 0.45 * a]]]), hair)
        # eyes
        brow_raise = 0.08 if expression == "surprised" else 0.0
        eyes = []
        for side in (-1, 1):
            ex = side * p.eye_spacing + shift
            eyes.append((ex, eye_y))
            poly(
                _ellipse(
                    ex, eye_y, p.eye_size * 1.6, p.eye_size * (1.15 if expression == "surprised" else 1.0)
                ),
                (245, 245, 245),
            )
            poly(_ellipse(ex, eye_y, p.eye_size * 0.8, p.eye_size * 0.8), EYES[p.eye_colour])
            poly(_ellipse(ex, eye_y, p.eye_size * 0.35, p.eye_size * 0.35), (10, 10, 10))
            by = eye_y - p.eye_size - 0.12 - brow_raise
            half = p.eye_size * 1.8
            dy = side * p.brow_angle * half
            brow = [
                [ex - half, by + dy],
                [ex + half, by - dy],
                [ex + half, by - dy - p.brow_thickness],
                [ex - half, by + dy - p.brow_thickness],
            ]
            poly(brow, hair if p.hair_style != "bald" else (60, 45, 35))
        # nose
        tip = (yaw * 0.45, eye_y + p.nose_length)
        poly(
            [[shift, eye_y + 0.08], [tip[0] + p.nose_width, tip[1]], [tip[0] - p.nose_width, tip[1]]],
            skin * 0.78,
        )
        # mouth
        my = tip[1] + 0.45 + 0.05 * a  # eye-mouth / eye-eye ~ 1.16 on average, as in the ArcFace template
        half_w = p.mouth_width / 2
        lift = 0.08 if expression == "smiling" else 0.0
        corners = [(shift - half_w, my - lift), (shift + half_w, my - lift)]
        lips = (150, 50, 60)
        if expression == "open":
            poly(_ellipse(shift, my + 0.02, half_w * 0.8, 0.09 + p.lip), (60, 15, 20))
        mouth_t = np.linspace(-1, 1, 24)
        curve = np.stack([shift + half_w * mouth_t, my - lift * (1 - mouth_t**2) * -1 - lift], 1)
        upper = curve - [0, p.lip * 0.6]
        lower_lip = curve[::-1] + [0, p.lip]
        poly(np.concatenate([upper, lower_lip]), lips)
        if p.facial_hair == "moustache":
            poly(
                [
                    [shift - half_w * 0.9, my - p.lip - 0.02],
                    [shift + half_w * 0.9, my - p.lip - 0.02],
                    [shift + half_w * 0.7, my - p.lip - 0.12],
                    [shift - half_w * 0.7, my - p.lip - 0.12],
                ],
                hair,
            )
        if p.mole is not None:
            poly(_ellipse(p.mole[0] + shift, p.mole[1] * a, 0.05, 0.05), (50, 30, 25))

        arr = np.asarray(img, dtype=np.float32)
        arr = self._lighting(rng, arr, light, big)
        small = Image.fromarray(arr.clip(0, 255).astype(np.uint8)).resize((res, res), Image.LANCZOS)
        # landmarks in pixel-centre coordinates of the output image
        lm_big = to_img([eyes[0], eyes[1], tip, corners[0], corners[1]])
        lms = (lm_big / _SS - 0.5).astype(np.float32)  # PIL coordinates are pixel corners
        if lms[0, 0] > lms[1, 0]:  # keep image-left first (large roll could swap them)
            lms[[0, 1]] = lms[[1, 0]]
            lms[[3, 4]] = lms[[4, 3]]
        outline = to_img(face) / _SS - 0.5
        box = (
            float(outline[:, 0].min()),
            float(outline[:, 1].min()),
            float(outline[:, 0].max()),
            float(outline[:, 1].max()),
        )
        attrs = self._attributes(p, expression, light, bg_kind, bg_name)
        return SynthIDSample(
            image=small,
            landmarks=lms,
            box=box,
            caption=self._caption(attrs),
            attributes=attrs,
            identity=identity,
            index=index,
            split=self.split_of(identity),
            key=f"id{identity:05d}_{index:04d}",
        )

    @staticmethod
    def _background(rng, big, kind, name) -> Image.Image:
        base = np.array(BACKGROUND[name], dtype=np.float32)
        if kind == "plain":
            arr = np.broadcast_to(base, (big, big, 3)).copy()
        elif kind == "gradient":
            other = np.array(BACKGROUND[_pick(rng, list(BACKGROUND))], dtype=np.float32)
            w = np.linspace(0, 1, big, dtype=np.float32)[:, None, None]
            arr = np.broadcast_to(base * (1 - w) + other * w, (big, big, 3)).copy()
        elif kind == "noisy":
            noise = rng.normal(0, 35, (big // _SS, big // _SS, 3)).astype(np.float32)
            arr = base + np.kron(noise, np.ones((_SS, _SS, 1), dtype=np.float32))
        else:
            period = int(rng.integers(6, 16)) * _SS
            stripes = ((np.arange(big) // period) % 2).astype(np.float32)[None, :, None]
            arr = np.broadcast_to(base * (0.7 + 0.3 * stripes), (big, big, 3)).copy()
        return Image.fromarray(arr.clip(0, 255).astype(np.uint8))

    @staticmethod
    def _lighting(rng, arr, light, big):
        g = np.linspace(-1, 1, big, dtype=np.float32)
        strength = float(rng.uniform(0.15, 0.35))
        if light == "left":
            ramp = np.broadcast_to(-g[None, :], (big, big))
        elif light == "right":
            ramp = np.broadcast_to(g[None, :], (big, big))
        elif light == "top":
            ramp = np.broadcast_to(-g[:, None], (big, big))
        else:
            ramp = np.zeros((big, big), dtype=np.float32)
        gain = float(rng.uniform(0.85, 1.1)) * (1 + strength * ramp)
        return arr * gain[..., None]

    @staticmethod
    def _attributes(p: IdentityParams, expression, light, bg_kind, bg_name) -> dict:
        shape = "round" if p.aspect < 1.25 else ("long" if p.aspect > 1.42 else "oval")
        if p.jaw > 0.7:
            shape = "heart-shaped" if shape != "long" else "narrow"
        return {
            "face_shape": shape,
            "eye_size": "small" if p.eye_size < 0.115 else ("large" if p.eye_size > 0.145 else "medium"),
            "eye_colour": p.eye_colour,
            "eye_spacing": "wide apart"
            if p.eye_spacing > 0.43
            else ("close together" if p.eye_spacing < 0.36 else "medium"),
            "nose_length": "long"
            if p.nose_length > 0.45
            else ("short" if p.nose_length < 0.37 else "medium"),
            "nose_width": "wide" if p.nose_width > 0.16 else ("narrow" if p.nose_width < 0.12 else "medium"),
            "mouth": "wide" if p.mouth_width > 0.75 else ("small" if p.mouth_width < 0.6 else "medium"),
            "brows": ("thick" if p.brow_thickness > 0.065 else "thin")
            + " "
            + ("arched" if abs(p.brow_angle) > 0.12 else "straight"),
            "skin": p.skin,
            "hair_colour": p.hair_colour,
            "hair_style": p.hair_style,
            "facial_hair": p.facial_hair,
            "mole": p.mole is not None,
            "expression": expression,
            "lighting": light,
            "background": f"{bg_kind} {bg_name}",
        }

    @staticmethod
    def _caption(at: dict) -> str:
        eyes = (
            f"{at['eye_size']} {at['eye_colour']} eyes"
            if at["eye_size"] != "medium"
            else f"{at['eye_colour']} eyes"
        )
        if at["eye_spacing"] != "medium":
            eyes += f" set {at['eye_spacing']}"
        nose = " ".join(w for w in (at["nose_length"], at["nose_width"]) if w != "medium") or "medium"
        hair = "a bald head" if at["hair_style"] == "bald" else f"{at['hair_colour']} {at['hair_style']} hair"
        extra = {"beard": ", a beard", "moustache": ", a moustache"}.get(at["facial_hair"], "")
        expr = {
            "neutral": "with a neutral expression",
            "smiling": "smiling",
            "open": "with an open mouth",
            "surprised": "looking surprised",
        }[at["expression"]]
        light = "lit from the front" if at["lighting"] == "front" else f"lit from the {at['lighting']}"
        kind, colour = at["background"].split()
        bg = f"a {colour} {kind} background" if kind != "noisy" else "a noisy background"
        return (
            f"a close-up photo of a person with a {at['face_shape']} face, {at['skin']} skin, {eyes}, "
            f"a {nose} nose, {at['brows']} brows and {hair}{extra}, {expr}, {light}, on {bg}"
        )

    def samples(self, split: str | None = None) -> Iterator[SynthIDSample]:
        if split not in (None, "train", "heldout"):
            raise ValueError(f"split must be None, 'train' or 'heldout', got {split!r}")
        ids = (
            range(self.config.num_identities)
            if split is None
            else (self.train_ids if split == "train" else self.heldout_ids)
        )
        for i in ids:
            for k in range(self.config.images_per_identity):
                yield self.render(i, k)


def write_synthid_folder(config: SynthIDConfig, out_dir: str | Path) -> Path:
    """Write one folder per person (``id00012/id00012_0003.png``) and ``landmarks.jsonl``.

    The JSONL has one record per image: file (relative), landmarks, box, caption, identity, split,
    attributes. Writes are atomic and a re-run skips images already on disk.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    synth = SynthID(config)
    lines = []
    for s in synth.samples():
        rel = f"id{s.identity:05d}/{s.key}.png"
        path = out / rel
        if not path.exists():
            path.parent.mkdir(exist_ok=True)
            tmp = path.with_suffix(".png.tmp")
            s.image.save(tmp, format="PNG")
            os.replace(tmp, path)
        lines.append(
            json.dumps(
                {
                    "file": rel,
                    "landmarks": s.landmarks.round(3).tolist(),
                    "box": [round(v, 3) for v in s.box],
                    "caption": s.caption,
                    "identity": f"id{s.identity:05d}",
                    "split": s.split,
                    "score": s.score,
                    "attributes": s.attributes,
                }
            )
        )
    tmp = out / "landmarks.jsonl.tmp"
    tmp.write_text("\n".join(lines) + "\n")
    os.replace(tmp, out / "landmarks.jsonl")
    (out / "synthid_config.json").write_text(json.dumps(asdict(config), indent=2))
    return out
