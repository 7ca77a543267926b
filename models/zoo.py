"""Model zoo: where every component comes from, real or tiny, loaded by one code path.

Each component has a *real* source (hub name or local folder) and a *tiny* twin with random
weights. :func:`build_tiny` writes the tiny twins in their own libraries' formats (a diffusers
folder with ``unet/ vae/ text_encoder/ tokenizer/ scheduler/`` and ``model_index.json``, an
open_clip ``local-dir`` folder, an idforge face-encoder folder) and returns a :class:`ZooSpec`
pointing at them. The ``load_*`` functions below then load tiny and real components alike, so
tests exercise the loading code that real runs use, without a download. The in-memory builders
:func:`tiny_unet`, :func:`tiny_vae` and :func:`tiny_face_encoder` make the same random-weight
components from a :class:`TinyConfig`; ``build_tiny`` writes what they return, and tests that need
one component (not a whole zoo folder) build it through them.

Real defaults (override any field with a local path for offline machines):

=================  =====================================================================
component          real source
=================  =====================================================================
UNet, VAE, text    ``stable-diffusion-v1-5/stable-diffusion-v1-5`` (subfolders), SD1.5
CLIP image         ``hf-hub:laion/CLIP-ViT-H-14-laion2B-s32B-b79K`` (open_clip, 1024-d)
face (ArcFace)     ``~/.insightface/models/antelopev2/glintr100.onnx`` (converted to torch)
VLM judge (eval)   e.g. ``Qwen/Qwen2-VL-7B-Instruct``; tiny twin: :func:`build_tiny_vlm` (LLaVA)
=================  =====================================================================
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

log = logging.getLogger(__name__)

SD15 = "stable-diffusion-v1-5/stable-diffusion-v1-5"
CLIP_VIT_H = "hf-hub:laion/CLIP-ViT-H-14-laion2B-s32B-b79K"
ANTELOPEV2_ARCFACE = "~/.insightface/models/antelopev2/glintr100.onnx"
BLIP_LARGE = "Salesforce/blip-image-captioning-large"


@dataclass
class ZooSpec:
    """Sources of the generator's components.

    ``base`` is a diffusers model folder or hub name with ``unet/ vae/ text_encoder/ tokenizer/
    scheduler/`` subfolders; each per-component field overrides it with its own folder.
    """

    base: str | None = SD15
    unet: str | None = None
    vae: str | None = None
    text_encoder: str | None = None
    tokenizer: str | None = None
    scheduler: str | None = None
    image_encoder: str = CLIP_VIT_H
    image_tokens: str = "pooled"
    face_encoder: str = ANTELOPEV2_ARCFACE

    def source(self, component: str) -> tuple[str, str | None]:
        """(path, subfolder) for a diffusers/transformers component."""
        own = getattr(self, component)
        if own:
            return _local_or_hub(component, own), None
        if not self.base:
            raise ValueError(
                f"zoo.{component}: ZooSpec has neither `{component}` nor `base`; set one of them"
            )
        return _local_or_hub("base", self.base), component

    def validate(self) -> None:
        """Check every source without loading anything: a value written as a local path (``/``, ``./``,
        ``../``, ``~``) must exist; raises naming the field (``zoo.<field>``)."""
        for name in ("base", "unet", "vae", "text_encoder", "tokenizer", "scheduler"):
            value = getattr(self, name)
            if value:
                _local_or_hub(name, value)
        image = self.image_encoder
        if image.startswith(LOCAL_DIR):
            _local_or_hub("image_encoder", image[len(LOCAL_DIR) :], must_be_local=True)
        elif not image.startswith("hf-hub:"):
            _local_or_hub("image_encoder", image)
        if self.image_tokens not in ("pooled", "patch"):
            raise ValueError(f"zoo.image_tokens: must be 'pooled' or 'patch', got {self.image_tokens!r}")
        _local_or_hub("face_encoder", self.face_encoder, must_be_local=True)

    def to_dict(self) -> dict:
        return asdict(self)


LOCAL_DIR = "local-dir:"  # open_clip's prefix for a local model folder
_LOCAL_PREFIXES = ("/", "./", "../", "~")


def looks_local(value: str) -> bool:
    """True for values written as filesystem paths rather than hub names (``org/name``)."""
    return value.startswith(_LOCAL_PREFIXES) or value in (".", "..")


def _local_or_hub(field_name: str, value: str, must_be_local: bool = False) -> str:
    """The expanded path when ``value`` exists locally; ``value`` itself when it is a hub name.

    A value that looks like a local path but does not exist is reported as a missing path (not as a
    hub error from a later download attempt).
    """
    path = Path(value).expanduser()
    if path.exists():
        return str(path)
    if must_be_local or looks_local(value):
        raise FileNotFoundError(
            f"zoo.{field_name}: {value} does not exist (a local path, not a hub name); fix the path "
            "or put the model there (idforge never downloads to a local path)"
        )
    return value


def load_unet(spec: ZooSpec, **kwargs):
    from diffusers import UNet2DConditionModel

    path, sub = spec.source("unet")
    return UNet2DConditionModel.from_pretrained(path, subfolder=sub, **kwargs)


def load_codec(spec: ZooSpec):
    from diffusers import AutoencoderKL

    from .codec import VaeCodec

    path, sub = spec.source("vae")
    return VaeCodec(AutoencoderKL.from_pretrained(path, subfolder=sub))


def load_text_encoder(spec: ZooSpec):
    from transformers import CLIPTextModel

    path, sub = spec.source("text_encoder")
    model = CLIPTextModel.from_pretrained(path, subfolder=sub) if sub else CLIPTextModel.from_pretrained(path)
    return model


def load_tokenizer(spec: ZooSpec):
    from transformers import CLIPTokenizer

    path, sub = spec.source("tokenizer")
    return CLIPTokenizer.from_pretrained(path, subfolder=sub) if sub else CLIPTokenizer.from_pretrained(path)


def load_scheduler(spec: ZooSpec):
    from diffusers import DDPMScheduler

    path, sub = spec.source("scheduler")
    return DDPMScheduler.from_pretrained(path, subfolder=sub)


def load_image_encoder(spec: ZooSpec):
    from .image_encoder import ClipImageEncoder

    return ClipImageEncoder.from_pretrained(spec.image_encoder, tokens=spec.image_tokens)


def load_face_encoder(spec: ZooSpec):
    from .face.face_encoder import FaceEncoder

    return FaceEncoder.from_pretrained(str(Path(spec.face_encoder).expanduser()))


@dataclass
class TinyConfig:
    """Sizes of the tiny random-weight zoo (a few hundred thousand parameters per component)."""

    resolution: int = 32
    unet_channels: tuple[int, ...] = (32, 64)
    unet_layers_per_block: int = 1
    unet_attention: tuple[bool, ...] | None = None
    """Cross-attention per UNet level (None: every level); dropping it at the full-resolution level
    makes CPU training several times faster."""
    attention_head_dim: int = 8
    cross_attention_dim: int = 32
    text_hidden: int = 32
    text_layers: int = 2
    clip_width: int = 32
    clip_embed_dim: int = 32
    vae_channels: tuple[int, ...] = (16, 32)
    """AutoencoderKL block widths; n levels downsample 2^(n-1) x (two: 2x, as the tests' zoo; three:
    4x, the demo's 64 px faces on 16 x 16 latents)."""
    vae_attention: bool = True
    """Self-attention in the VAE's mid block (SD's VAE has it; the demo drops it for speed)."""
    vae_norm_groups: int = 8
    """GroupNorm groups of the VAE. Each group normalises away its channels' mean, so a flat colour
    survives only as the pattern across a group's channels: SD's VAE has 4-16 channels per group; a
    trained small VAE needs as many (the demo: 2 groups)."""
    face_widths: tuple[int, ...] = (8, 16, 32, 64)
    face_layers: tuple[int, ...] = (1, 1, 1, 1)
    beta_schedule: str = "scaled_linear"
    prediction_type: str = "epsilon"
    seed: int = 0
    words: list[str] | None = field(default=None)

    def __post_init__(self):
        if len(self.vae_channels) < 2:
            raise ValueError(
                f"TinyConfig.vae_channels needs at least 2 levels (2x downsampling), got {self.vae_channels}"
            )
        if self.resolution % (2 ** (len(self.unet_channels) - 1) * self.vae_downsample):
            raise ValueError(f"resolution {self.resolution} is not divisible by the UNet/VAE downsampling")

    @property
    def vae_downsample(self) -> int:
        """Pixels per latent."""
        return 2 ** (len(self.vae_channels) - 1)


def _seed(seed: int | None) -> None:
    if seed is not None:
        torch.manual_seed(seed)


def tiny_unet(config: TinyConfig | None = None, *, seed: int | None = None):
    """A random-weight ``UNet2DConditionModel`` with ``config``'s widths, attention levels and sizes.

    Latent input: 4 channels, ``resolution / vae_downsample`` pixels. ``seed`` seeds torch's global
    generator first;
    ``None`` draws from it as it stands (:func:`build_tiny` seeds once for the whole zoo).
    """
    from diffusers import UNet2DConditionModel

    cfg = config or TinyConfig()
    in_channels = 4
    n = len(cfg.unet_channels)
    attn = tuple(cfg.unet_attention) if cfg.unet_attention is not None else (True,) * n
    if len(attn) != n:
        raise ValueError(f"unet_attention has {len(attn)} entries for {n} UNet levels")
    down = tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attn)
    up = tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn))
    _seed(seed)
    return UNet2DConditionModel(
        sample_size=cfg.resolution // cfg.vae_downsample,
        in_channels=in_channels,
        out_channels=in_channels,
        block_out_channels=tuple(cfg.unet_channels),
        layers_per_block=cfg.unet_layers_per_block,
        down_block_types=down,
        up_block_types=up,
        cross_attention_dim=cfg.cross_attention_dim,
        attention_head_dim=cfg.attention_head_dim,
        norm_num_groups=min(8, cfg.unet_channels[0]),
    )


def tiny_vae(config: TinyConfig | None = None, *, seed: int | None = None):
    """A random-weight ``AutoencoderKL`` (RGB <-> 4 latent channels, ``vae_downsample`` x smaller)."""
    from diffusers import AutoencoderKL

    cfg = config or TinyConfig()
    levels = len(cfg.vae_channels)
    _seed(seed)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * levels,
        up_block_types=("UpDecoderBlock2D",) * levels,
        block_out_channels=tuple(cfg.vae_channels),
        latent_channels=4,
        norm_num_groups=cfg.vae_norm_groups,
        layers_per_block=1,
        mid_block_add_attention=cfg.vae_attention,
        sample_size=cfg.resolution,
    )


def tiny_face_encoder(config: TinyConfig | None = None, *, seed: int | None = None):
    """A random-weight :class:`~idforge.models.face.face_encoder.FaceEncoder` (IResNet with
    ``face_layers`` / ``face_widths``; 112 x 112 input, 512-d output), not frozen."""
    from .face.face_encoder import FaceEncoder
    from .face.iresnet import IResNet, IResNetConfig

    cfg = config or TinyConfig()
    _seed(seed)
    return FaceEncoder(IResNet(IResNetConfig(layers=tuple(cfg.face_layers), widths=tuple(cfg.face_widths))))


def _write_tokenizer_and_text_encoder(cfg: TinyConfig, folder: Path) -> None:
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from .tiny_tokenizer import DEFAULT_WORDS, build_clip_bpe

    vocab, merges = build_clip_bpe(cfg.words or DEFAULT_WORDS)
    tok_dir = folder / "tokenizer"
    tok_dir.mkdir(parents=True, exist_ok=True)
    (tok_dir / "vocab.json").write_text(json.dumps(vocab))
    (tok_dir / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    tokenizer = CLIPTokenizer(
        vocab=str(tok_dir / "vocab.json"), merges=str(tok_dir / "merges.txt"), model_max_length=77
    )
    tokenizer.save_pretrained(tok_dir)
    text_cfg = CLIPTextConfig(
        vocab_size=len(vocab),
        hidden_size=cfg.text_hidden,
        intermediate_size=cfg.text_hidden * 2,
        num_hidden_layers=cfg.text_layers,
        num_attention_heads=4,
        max_position_embeddings=77,
        projection_dim=cfg.text_hidden,
        bos_token_id=vocab["<|startoftext|>"],
        eos_token_id=vocab["<|endoftext|>"],
        pad_token_id=vocab["<|endoftext|>"],
    )
    CLIPTextModel(text_cfg).save_pretrained(folder / "text_encoder")


def _write_open_clip(cfg: TinyConfig, folder: Path, image_size: int) -> None:
    import open_clip
    from safetensors.torch import save_file

    model_cfg = {
        "embed_dim": cfg.clip_embed_dim,
        "vision_cfg": {
            "image_size": image_size,
            "layers": 2,
            "width": cfg.clip_width,
            "patch_size": 8,
            "head_width": 16,
        },
        "text_cfg": {
            "context_length": 77,
            "vocab_size": 49408,
            "width": cfg.clip_width,
            "heads": 2,
            "layers": 1,
        },
    }
    model = open_clip.CLIP(**model_cfg)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "open_clip_config.json").write_text(
        json.dumps(
            {
                "model_cfg": model_cfg,
                "preprocess_cfg": {
                    "mean": list(open_clip.OPENAI_DATASET_MEAN),
                    "std": list(open_clip.OPENAI_DATASET_STD),
                },
            },
            indent=2,
        )
    )
    save_file(
        {k: v.contiguous() for k, v in model.state_dict().items()}, folder / "open_clip_model.safetensors"
    )


def build_tiny(folder: str | Path, config: TinyConfig | None = None) -> ZooSpec:
    """Write every component with random weights under ``folder`` and return the spec that loads them."""
    import diffusers
    from diffusers import DDPMScheduler

    cfg = config or TinyConfig()
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tiny_unet(cfg, seed=cfg.seed).save_pretrained(folder / "unet")  # later components continue the stream
    tiny_vae(cfg).save_pretrained(folder / "vae")
    _write_tokenizer_and_text_encoder(cfg, folder)
    DDPMScheduler(
        num_train_timesteps=1000,
        beta_schedule=cfg.beta_schedule,
        beta_start=0.00085,
        beta_end=0.012,
        prediction_type=cfg.prediction_type,
        clip_sample=False,
    ).save_pretrained(folder / "scheduler")
    _write_open_clip(cfg, folder / "clip_image_encoder", image_size=max(32, cfg.resolution))
    tiny_face_encoder(cfg).save_pretrained(folder / "face_encoder")
    (folder / "model_index.json").write_text(
        json.dumps(
            {
                "_class_name": "StableDiffusionPipeline",
                "_diffusers_version": diffusers.__version__,
                "unet": ["diffusers", "UNet2DConditionModel"],
                "vae": ["diffusers", "AutoencoderKL"],
                "text_encoder": ["transformers", "CLIPTextModel"],
                "tokenizer": ["transformers", "CLIPTokenizer"],
                "scheduler": ["diffusers", "DDPMScheduler"],
                "safety_checker": [None, None],
                "feature_extractor": [None, None],
                "image_encoder": [None, None],
                "requires_safety_checker": False,
            },
            indent=2,
        )
    )
    spec = ZooSpec(
        base=str(folder),
        image_encoder=f"local-dir:{folder / 'clip_image_encoder'}",
        face_encoder=str(folder / "face_encoder"),
    )
    (folder / "zoo_spec.json").write_text(json.dumps(spec.to_dict(), indent=2))
    log.info("wrote tiny zoo to %s", folder)
    return spec


TINY_PREFIX = "tiny"


def resolve(spec: ZooSpec) -> ZooSpec:
    """Resolve ``base="tiny"`` / ``"tiny:/folder"`` to a built tiny zoo.

    Tiny twins of real configs name the zoo this way; it is built once (random weights, seconds)
    under ``$IDFORGE_CACHE`` (default ``~/.cache/idforge``) or the given folder, then loaded from
    disk like any real component.
    """
    import os

    base = spec.base or ""
    if not (base == TINY_PREFIX or base.startswith((TINY_PREFIX + "-", TINY_PREFIX + ":"))):
        return spec
    name, _, folder = base.partition(":")
    if name != TINY_PREFIX:
        raise ValueError(f"unknown tiny zoo {name!r}: use 'tiny' or 'tiny:/folder'")
    root = (
        Path(folder)
        if folder
        else Path(os.environ.get("IDFORGE_CACHE", "~/.cache/idforge")).expanduser() / name
    )
    marker = root / "zoo_spec.json"
    if marker.is_file():
        built = ZooSpec(**json.loads(marker.read_text()))
    else:
        built = build_tiny(root, TinyConfig())
    return ZooSpec(**{**built.to_dict(), "image_tokens": spec.image_tokens})


# ------------------------------------------------------------------------------------------------
# Tiny SD3 (rectified flow; the FlowID / FINEdits backbone), for the edit path's tests.

SD3_MEDIUM = "stabilityai/stable-diffusion-3-medium-diffusers"


@dataclass
class TinySD3Config:
    """Sizes of a tiny random-weight SD3 (``SD3Transformer2DModel`` + ``AutoencoderKL`` + two CLIP
    text encoders with projection + a T5 encoder with an offline sentencepiece-style tokenizer)."""

    resolution: int = 32
    """Pixels; the VAE downsamples 2x and the transformer patches 2x2, so 8 x 8 image tokens."""
    layers: int = 2
    heads: int = 2
    head_dim: int = 8
    text_hidden: int = 16
    """Width of each CLIP encoder; their pooled projections concatenate to ``2 * text_hidden``."""
    joint_attention_dim: int = 32
    """T5 width = width the CLIP states are zero-padded to; must be >= ``2 * text_hidden``."""
    latent_channels: int = 4
    t5: bool = True
    seed: int = 0
    words: list[str] | None = field(default=None)

    def __post_init__(self):
        if self.joint_attention_dim < 2 * self.text_hidden:
            raise ValueError(
                f"TinySD3Config.joint_attention_dim {self.joint_attention_dim} < 2 * text_hidden "
                f"{2 * self.text_hidden}: SD3 pads the CLIP states up to the T5 width; raise it"
            )


def _write_t5_tokenizer(words: list[str], folder: Path) -> None:
    """A T5-format (sentencepiece Unigram, ``▁`` word marker, ``</s>`` appended) fast tokenizer built
    offline with the ``tokenizers`` library: every listed word is one piece, other text falls back to
    characters. Saved as ``tokenizer.json`` so ``T5TokenizerFast.from_pretrained`` loads it."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import T5TokenizerFast

    chars = sorted({c for w in words for c in w} | set("abcdefghijklmnopqrstuvwxyz0123456789'.,-"))
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    pieces += [("▁" + w, -1.0) for w in dict.fromkeys(words)]
    pieces += [(c, -5.0) for c in chars] + [("▁" + c, -4.0) for c in chars]
    seen, vocab = set(), []
    for p, s in pieces:
        if p not in seen:
            seen.add(p)
            vocab.append((p, s))
    tok = Tokenizer(models.Unigram(vocab, unk_id=2, byte_fallback=False))
    tok.normalizer = normalizers.Sequence([normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    fast = T5TokenizerFast(
        tokenizer_object=tok, eos_token="</s>", unk_token="<unk>", pad_token="<pad>", extra_ids=0
    )
    fast.model_max_length = 77
    fast.save_pretrained(folder)


def build_tiny_sd3(folder: str | Path, config: TinySD3Config | None = None) -> Path:
    """Write a random-weight SD3 pipeline folder (``StableDiffusion3Pipeline.from_pretrained`` loads it).

    Same layout as ``stabilityai/stable-diffusion-3-medium-diffusers``: ``transformer/ vae/
    text_encoder/ text_encoder_2/ text_encoder_3/ tokenizer/ tokenizer_2/ tokenizer_3/ scheduler/``
    (``text_encoder_3``/``tokenizer_3`` omitted when ``t5=False``, which diffusers supports).
    """
    import diffusers
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
    from transformers import (
        CLIPTextConfig,
        CLIPTextModelWithProjection,
        CLIPTokenizer,
        T5Config,
        T5EncoderModel,
    )

    from .tiny_tokenizer import DEFAULT_WORDS, build_clip_bpe

    cfg = config or TinySD3Config()
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    words = list(cfg.words or DEFAULT_WORDS)
    torch.manual_seed(cfg.seed)
    SD3Transformer2DModel(
        sample_size=cfg.resolution // 2,
        patch_size=2,
        in_channels=cfg.latent_channels,
        out_channels=cfg.latent_channels,
        num_layers=cfg.layers,
        attention_head_dim=cfg.head_dim,
        num_attention_heads=cfg.heads,
        joint_attention_dim=cfg.joint_attention_dim,
        caption_projection_dim=cfg.heads * cfg.head_dim,
        pooled_projection_dim=2 * cfg.text_hidden,
        pos_embed_max_size=cfg.resolution,
    ).save_pretrained(folder / "transformer")
    AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(16, 32),
        latent_channels=cfg.latent_channels,
        norm_num_groups=8,
        layers_per_block=1,
        shift_factor=0.0609,
        scaling_factor=1.5305,
    ).save_pretrained(folder / "vae")
    vocab, merges = build_clip_bpe(words)
    for suffix in ("", "_2"):
        tok_dir = folder / f"tokenizer{suffix}"
        tok_dir.mkdir(parents=True, exist_ok=True)
        (tok_dir / "vocab.json").write_text(json.dumps(vocab))
        (tok_dir / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
        CLIPTokenizer(
            vocab=str(tok_dir / "vocab.json"), merges=str(tok_dir / "merges.txt"), model_max_length=77
        ).save_pretrained(tok_dir)
        CLIPTextModelWithProjection(
            CLIPTextConfig(
                vocab_size=len(vocab),
                hidden_size=cfg.text_hidden,
                intermediate_size=cfg.text_hidden * 2,
                num_hidden_layers=2,
                num_attention_heads=2,
                max_position_embeddings=77,
                projection_dim=cfg.text_hidden,
                bos_token_id=vocab["<|startoftext|>"],
                eos_token_id=vocab["<|endoftext|>"],
                pad_token_id=vocab["<|endoftext|>"],
            )
        ).save_pretrained(folder / f"text_encoder{suffix}")
    if cfg.t5:
        _write_t5_tokenizer(words, folder / "tokenizer_3")
        n_vocab = len(json.loads((folder / "tokenizer_3" / "tokenizer.json").read_text())["model"]["vocab"])
        T5EncoderModel(
            T5Config(
                vocab_size=n_vocab,
                d_model=cfg.joint_attention_dim,
                d_kv=8,
                d_ff=cfg.joint_attention_dim * 2,
                num_layers=2,
                num_heads=2,
                pad_token_id=0,
                eos_token_id=1,
            )
        ).save_pretrained(folder / "text_encoder_3")
    FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0).save_pretrained(folder / "scheduler")
    t5 = ["transformers", "T5EncoderModel"] if cfg.t5 else [None, None]
    (folder / "model_index.json").write_text(
        json.dumps(
            {
                "_class_name": "StableDiffusion3Pipeline",
                "_diffusers_version": diffusers.__version__,
                "transformer": ["diffusers", "SD3Transformer2DModel"],
                "vae": ["diffusers", "AutoencoderKL"],
                "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
                "text_encoder": ["transformers", "CLIPTextModelWithProjection"],
                "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
                "text_encoder_3": t5,
                "tokenizer": ["transformers", "CLIPTokenizer"],
                "tokenizer_2": ["transformers", "CLIPTokenizer"],
                "tokenizer_3": ["transformers", "T5TokenizerFast"] if cfg.t5 else [None, None],
                "image_encoder": [None, None],
                "feature_extractor": [None, None],
            },
            indent=2,
        )
    )
    log.info("wrote tiny SD3 to %s", folder)
    return folder


# ------------------------------------------------------------------------------------------------
# Tiny vision-language model (the edit protocol's yes/no judge, idforge.eval.vlm), for its tests.

QWEN2_VL = "Qwen/Qwen2-VL-7B-Instruct"  # FINEdits' VLM family (paper 002 sec. 4); any chat VLM works
VLM_WORDS = "is this person's face injured only answer with yes or no does image show user assistant"
LLAVA_CHAT_TEMPLATE = (  # LLaVA-1.5's "USER: <image>\n... ASSISTANT:" prompt
    "{% for m in messages %}{% if m['role'] == 'user' %}USER: {% for c in m['content'] %}"
    "{% if c['type'] == 'image' %}<image>\n{% else %}{{ c['text'] }}{% endif %}{% endfor %} "
    "{% endif %}{% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)


def build_tiny_vlm(folder: str | Path, image_size: int = 32, seed: int = 0, words: str = VLM_WORDS) -> Path:
    """Write a random-weight LLaVA folder (tiny CLIP vision tower + tiny Llama, ``LlavaProcessor``
    with an offline sentencepiece-style tokenizer and LLaVA-1.5's chat template) that
    ``AutoProcessor`` / ``AutoModelForImageTextToText.from_pretrained`` load like a real VLM.

    Every word of ``words`` (and "Yes" / "No") is one ``▁``-prefixed token, so " Yes" and "Yes" encode
    to the same single token as in Llama's tokenizer; other text falls back to characters.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import (
        CLIPImageProcessor,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
        PreTrainedTokenizerFast,
    )

    folder = Path(folder)
    chars = sorted(set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789'.,-?:!\n"))
    pieces = [("<unk>", 0.0), ("<s>", 0.0), ("</s>", 0.0), ("<pad>", 0.0), ("<image>", 0.0), ("▁", -2.0)]
    pieces += [("▁" + w, -1.0) for w in [*words.split(), "Yes", "No"]]
    pieces += [(c, -5.0) for c in chars] + [("▁" + c, -4.0) for c in chars]
    vocab = list({p: (p, s) for p, s in reversed(pieces)}.values())[::-1]  # first occurrence wins
    tok = Tokenizer(models.Unigram(vocab, unk_id=0, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>"
    )
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})
    patch = image_size // 4  # 4 x 4 image tokens
    vision = CLIPVisionConfig(
        hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
        image_size=image_size, patch_size=patch, projection_dim=16,
    )  # fmt: skip
    text = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=256,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=1, eos_token_id=2,
    )  # fmt: skip
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        vision_feature_select_strategy="default",
        vision_feature_layer=-1,
    )
    _seed(seed)
    LlavaForConditionalGeneration(config).eval().save_pretrained(folder)
    LlavaProcessor(
        image_processor=CLIPImageProcessor(
            size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
        ),
        tokenizer=tokenizer,
        patch_size=patch,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,  # CLIP's class token, dropped by the "default" strategy
        chat_template=LLAVA_CHAT_TEMPLATE,
    ).save_pretrained(folder)
    log.info("wrote tiny LLaVA to %s", folder)
    return folder
