"""Captioning backends of the curation job (Diff-ID sec. 3.1: attribute captions + a fine-tuned BLIP).

``make_captioner(name, **kw)`` returns a captioner with ``caption(images: list[PIL.Image],
metas: list[dict]) -> list[str]``:

- ``provided``: ``meta["caption"]`` (SynthID, LAION text); falls back to the CelebA sentence when
  ``meta["attributes"]`` holds CelebA attributes, else to ``default``.
- ``celeba``: rule-based CelebA 40-attribute -> sentence converter (:func:`celeba_sentence`),
  attribute names as in ``list_attr_celeba.txt`` (values 1 / -1, 1 / 0 or bool).
- ``blip``: :class:`BlipCaptioner`, transformers' ``BlipForConditionalGeneration`` + ``BlipProcessor``
  from a hub name or local folder (e.g. one written by ``idforge caption-finetune``); batched,
  any device and dtype, optional text prompt ("a photo of").
- ``lavis``: captions produced by salesforce-lavis in a SEPARATE environment (its pinned torch /
  transformers clash with this one); the stages talk through files::

      # 1. here: export_caption_requests(records, "req.jsonl")   (one JSON line per image: key, path)
      #          write_lavis_script("lavis_caption.py")            (standalone: lavis + torch + PIL only)
      # 2. in the lavis environment (pip install salesforce-lavis), no idforge needed:
      python lavis_caption.py req.jsonl captions.jsonl --model blip_caption --type large_coco --batch 32
      # 3. here: make_captioner("lavis", captions_file="captions.jsonl") reads them back by key
      #    (meta["key"] or meta["source"]); a missing key is an error naming the file.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

log = logging.getLogger(__name__)

CELEBA_ATTRIBUTES = (
    "5_o_Clock_Shadow",
    "Arched_Eyebrows",
    "Attractive",
    "Bags_Under_Eyes",
    "Bald",
    "Bangs",
    "Big_Lips",
    "Big_Nose",
    "Black_Hair",
    "Blond_Hair",
    "Blurry",
    "Brown_Hair",
    "Bushy_Eyebrows",
    "Chubby",
    "Double_Chin",
    "Eyeglasses",
    "Goatee",
    "Gray_Hair",
    "Heavy_Makeup",
    "High_Cheekbones",
    "Male",
    "Mouth_Slightly_Open",
    "Mustache",
    "Narrow_Eyes",
    "No_Beard",
    "Oval_Face",
    "Pale_Skin",
    "Pointy_Nose",
    "Receding_Hairline",
    "Rosy_Cheeks",
    "Sideburns",
    "Smiling",
    "Straight_Hair",
    "Wavy_Hair",
    "Wearing_Earrings",
    "Wearing_Hat",
    "Wearing_Lipstick",
    "Wearing_Necklace",
    "Wearing_Necktie",
    "Young",
)
_HAIR_COLOUR = (
    ("Black_Hair", "black"),
    ("Blond_Hair", "blond"),
    ("Brown_Hair", "brown"),
    ("Gray_Hair", "gray"),
)
_HAIR_STYLE = (("Wavy_Hair", "wavy"), ("Straight_Hair", "straight"))
_FACE = (
    ("Oval_Face", "an oval face"),
    ("High_Cheekbones", "high cheekbones"),
    ("Rosy_Cheeks", "rosy cheeks"),
    ("Chubby", "a chubby face"),
    ("Double_Chin", "a double chin"),
    ("Pale_Skin", "pale skin"),
)
_FEATURES = (
    ("Arched_Eyebrows", "arched eyebrows"),
    ("Bushy_Eyebrows", "bushy eyebrows"),
    ("Narrow_Eyes", "narrow eyes"),
    ("Bags_Under_Eyes", "bags under the eyes"),
    ("Big_Nose", "a big nose"),
    ("Pointy_Nose", "a pointy nose"),
    ("Big_Lips", "big lips"),
    ("Bangs", "bangs"),
    ("Receding_Hairline", "a receding hairline"),
    ("Sideburns", "sideburns"),
)
_FACIAL_HAIR = (
    ("Goatee", "a goatee"),
    ("Mustache", "a mustache"),
    ("5_o_Clock_Shadow", "a five o'clock shadow"),
)
_WEARING = (
    ("Eyeglasses", "eyeglasses"),
    ("Wearing_Hat", "a hat"),
    ("Wearing_Earrings", "earrings"),
    ("Wearing_Necklace", "a necklace"),
    ("Wearing_Necktie", "a necktie"),
    ("Wearing_Lipstick", "lipstick"),
    ("Heavy_Makeup", "heavy makeup"),
)


def _on(attrs: dict, name: str) -> bool:
    v = attrs.get(name, False)
    if isinstance(v, str):
        return v.strip() in ("1", "true", "True", "yes")
    return bool(v) and float(v) > 0


def _join(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def celeba_sentence(attrs: dict) -> str:
    """A fluent caption from CelebA attributes; subjective/quality ones (Attractive, Blurry) are ignored."""
    unknown = set(attrs) - set(CELEBA_ATTRIBUTES)
    if unknown:
        raise ValueError(f"not CelebA attribute names: {sorted(unknown)} (see list_attr_celeba.txt)")
    male = _on(attrs, "Male")
    noun = ("young " if _on(attrs, "Young") else "older ") + ("man" if male else "woman")
    parts = []
    if _on(attrs, "Bald"):
        parts.append("a bald head")
    else:
        hair = [w for k, w in _HAIR_STYLE if _on(attrs, k)][:1] + [
            w for k, w in _HAIR_COLOUR if _on(attrs, k)
        ][:1]
        if hair:
            parts.append(" ".join(hair) + " hair")
    parts += [w for k, w in _FACE + _FEATURES + _FACIAL_HAIR if _on(attrs, k)]
    sentence = ("a photo of an " if noun[0] in "aeiou" else "a photo of a ") + noun
    if parts:
        sentence += " with " + _join(parts)
    mouth = "smiling" if _on(attrs, "Smiling") else ""
    if _on(attrs, "Mouth_Slightly_Open"):
        mouth = (mouth + " with the mouth slightly open").strip()
    if mouth:
        sentence += ", " + mouth
    wearing = [w for k, w in _WEARING if _on(attrs, k)]
    if wearing:
        sentence += ", wearing " + _join(wearing)
    if (
        male
        and not _on(attrs, "No_Beard")
        and "No_Beard" in attrs
        and not any(_on(attrs, k) for k, _ in _FACIAL_HAIR)
    ):
        sentence += ", with a beard"
    return sentence + "."


def read_celeba_attributes(path: str | Path) -> dict[str, dict[str, int]]:
    """``list_attr_celeba.txt`` (count line, header line, then ``file v1 ... v40``) -> {file: {name: +-1}}."""
    lines = Path(path).read_text().splitlines()
    header_at = 1 if lines and lines[0].strip().isdigit() else 0
    names = lines[header_at].split()
    if set(names) - set(CELEBA_ATTRIBUTES):
        raise ValueError(f"{path}: header is not the CelebA attribute list: {names[:5]}...")
    out = {}
    for line in lines[header_at + 1 :]:
        fields = line.split()
        if len(fields) == len(names) + 1:
            out[fields[0]] = {n: int(v) for n, v in zip(names, fields[1:])}
    return out


class Captioner:
    name = "base"

    def caption(self, images: list, metas: list[dict] | None = None) -> list[str]:
        raise NotImplementedError


class ProvidedCaptioner(Captioner):
    name = "provided"

    def __init__(self, default: str = "a photo of a person."):
        self.default = default

    def caption(self, images, metas=None):
        metas = metas if metas is not None else [{}] * len(images)
        out = []
        for m in metas:
            attrs = m.get("attributes") or {}
            if m.get("caption"):
                out.append(str(m["caption"]))
            elif attrs and set(attrs) <= set(CELEBA_ATTRIBUTES):
                out.append(celeba_sentence(attrs))
            else:
                out.append(self.default)
        return out


class CelebACaptioner(Captioner):
    name = "celeba"

    def caption(self, images, metas=None):
        metas = metas if metas is not None else [{}] * len(images)
        missing = [i for i, m in enumerate(metas) if not m.get("attributes")]
        if missing:
            raise ValueError(
                f"celeba captioner: {len(missing)} images have no meta['attributes'] (first index "
                f"{missing[0]}); use a CelebA source with list_attr_celeba.txt or another captioner"
            )
        return [celeba_sentence(m["attributes"]) for m in metas]


class BlipCaptioner(Captioner):
    """Batched BLIP captioning through transformers (hub name or local folder; never downloads in tests)."""

    name = "blip"

    def __init__(
        self,
        model: str = "Salesforce/blip-image-captioning-large",
        batch_size: int = 16,
        device: str = "cpu",
        dtype: str = "float32",
        prompt: str | None = None,
        max_new_tokens: int = 40,
        num_beams: int = 1,
    ):
        import torch
        from transformers import BlipForConditionalGeneration, BlipProcessor

        if batch_size < 1:
            raise ValueError(f"BlipCaptioner batch_size must be >= 1, got {batch_size}")
        self.dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
        if (str(model).startswith((".", "/", "~")) or Path(model).exists()) and not Path(
            model
        ).expanduser().is_dir():
            raise FileNotFoundError(
                f"BLIP captioner: cannot load {model!r}: no such folder (expected config.json, "
                "model.safetensors and the processor files, e.g. from idforge caption-finetune)"
            )
        model = str(Path(model).expanduser()) if str(model).startswith("~") else model
        try:
            self.processor = BlipProcessor.from_pretrained(model)
            self.model = (
                BlipForConditionalGeneration.from_pretrained(model, dtype=self.dtype).to(device).eval()
            )
        except OSError as exc:
            raise OSError(
                f"BLIP captioner: cannot load {model!r} (a local folder with config.json, "
                "model.safetensors and the processor files, or a cached hub name; offline runs "
                "never download)"
            ) from exc
        self.device, self.batch_size, self.prompt = device, batch_size, prompt
        self.max_new_tokens, self.num_beams = max_new_tokens, num_beams

    def caption(self, images, metas=None):
        import torch

        out: list[str] = []
        for i in range(0, len(images), self.batch_size):
            batch = [im.convert("RGB") for im in images[i : i + self.batch_size]]
            kw = {"text": [self.prompt] * len(batch)} if self.prompt else {}
            inputs = self.processor(images=batch, return_tensors="pt", **kw).to(self.device)
            inputs["pixel_values"] = inputs["pixel_values"].to(self.dtype)
            with torch.no_grad():
                ids = self.model.generate(
                    **inputs, max_new_tokens=self.max_new_tokens, num_beams=self.num_beams
                )
            out += [t.strip() for t in self.processor.batch_decode(ids, skip_special_tokens=True)]
        return out


class LavisCaptioner(Captioner):
    """Reads captions that the lavis script wrote (see the module docstring), by meta key."""

    name = "lavis"

    def __init__(self, captions_file: str | Path):
        self.path = Path(captions_file)
        if not self.path.is_file():
            raise FileNotFoundError(
                f"lavis captions file {self.path} not found: run the exported "
                "lavis_caption.py in the lavis environment first (see idforge.data_pipeline.caption)"
            )
        self.captions = import_captions(self.path)

    def caption(self, images, metas=None):
        metas = metas if metas is not None else [{}] * len(images)
        out = []
        for m in metas:
            key = m.get("key", m.get("source"))
            if key not in self.captions:
                raise KeyError(
                    f"no caption for {key!r} in {self.path}: export requests for every image first"
                )
            out.append(self.captions[key])
        return out


def export_caption_requests(records, path: str | Path) -> Path:
    """Write one JSON line per image: {"key", "image"}; records are dicts with ``key`` and either an
    ``image_path`` or a PIL ``image`` (saved as JPEG beside the request file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    img_dir = path.with_suffix("").with_name(path.stem + "_images")
    lines = []
    for n, rec in enumerate(records):
        if "key" not in rec:
            raise ValueError(f"caption request {n} has no 'key'")
        if rec.get("image_path"):
            image_path = str(Path(rec["image_path"]).resolve())
        elif rec.get("image") is not None:
            img_dir.mkdir(exist_ok=True)
            image_path = str((img_dir / f"{n:08d}.jpg").resolve())
            rec["image"].convert("RGB").save(image_path, quality=95)
        else:
            raise ValueError(f"caption request {rec['key']!r} has neither 'image_path' nor 'image'")
        lines.append(json.dumps({"key": rec["key"], "image": image_path}))
    path.write_text("\n".join(lines) + ("\n" if lines else ""))
    return path


def import_captions(path: str | Path) -> dict[str, str]:
    """Read ``{"key", "caption"}`` JSON lines (the lavis script's output) into {key: caption}."""
    out = {}
    for n, line in enumerate(Path(path).read_text().splitlines()):
        if line.strip():
            rec = json.loads(line)
            if "key" not in rec or "caption" not in rec:
                raise ValueError(f"{path}:{n + 1}: expected keys 'key' and 'caption', got {sorted(rec)}")
            out[rec["key"]] = str(rec["caption"])
    return out


LAVIS_SCRIPT = '''"""Caption images listed in a request JSONL with salesforce-lavis; writes {"key", "caption"} JSONL.

usage: python lavis_caption.py REQUESTS.jsonl OUT.jsonl [--model blip_caption] [--type large_coco] [--batch 32]
"""
import argparse, json

import torch
from lavis.models import load_model_and_preprocess
from PIL import Image

ap = argparse.ArgumentParser()
ap.add_argument("requests"); ap.add_argument("out")
ap.add_argument("--model", default="blip_caption"); ap.add_argument("--type", default="large_coco")
ap.add_argument("--batch", type=int, default=32)
args = ap.parse_args()
device = "cuda" if torch.cuda.is_available() else "cpu"
model, vis, _ = load_model_and_preprocess(name=args.model, model_type=args.type, is_eval=True, device=device)
reqs = [json.loads(l) for l in open(args.requests) if l.strip()]
with open(args.out, "w") as f:
    for i in range(0, len(reqs), args.batch):
        chunk = reqs[i:i + args.batch]
        x = torch.stack([vis["eval"](Image.open(r["image"]).convert("RGB")) for r in chunk]).to(device)
        with torch.no_grad():
            caps = model.generate({"image": x})
        for r, c in zip(chunk, caps):
            f.write(json.dumps({"key": r["key"], "caption": c}) + "\\n")
'''


def write_lavis_script(path: str | Path) -> Path:
    """Write the standalone lavis captioning script (runs without idforge)."""
    path = Path(path)
    path.write_text(LAVIS_SCRIPT)
    return path


def build_tiny_blip(
    folder: str | Path, words: list[str] | None = None, image_size: int = 32, seed: int = 0
) -> Path:
    """A random-weight BLIP captioner (~40k parameters) + word-level BERT tokenizer saved to ``folder``
    in transformers' format, loadable by :class:`BlipCaptioner` (tests and the demo; never downloads)."""
    import torch
    from transformers import (
        BertTokenizer,
        BlipConfig,
        BlipForConditionalGeneration,
        BlipImageProcessor,
        BlipProcessor,
    )

    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]"]
    base = (
        words
        if words is not None
        else (
            "a photo of young older man woman with and wearing smiling the mouth slightly open hair , . "
            + " ".join(w for _, w in _HAIR_COLOUR + _HAIR_STYLE)
            + " "
            + " ".join(w for _, w in _FACE + _FEATURES + _FACIAL_HAIR + _WEARING)
            + " bald head beard"
        ).split()
    )
    for w in base:
        for t in w.lower().replace("'", " ' ").split():
            if t not in vocab:
                vocab.append(t)
    tok = BertTokenizer(vocab={w: i for i, w in enumerate(vocab)}, bos_token="[DEC]")
    proc = BlipProcessor(
        image_processor=BlipImageProcessor(size={"height": image_size, "width": image_size}), tokenizer=tok
    )
    text = {
        "vocab_size": len(vocab),
        "hidden_size": 32,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "intermediate_size": 64,
        "max_position_embeddings": 64,
        "bos_token_id": tok.bos_token_id,
        "pad_token_id": tok.pad_token_id,
        "sep_token_id": tok.sep_token_id,
        "eos_token_id": tok.sep_token_id,
    }
    vision = {
        "hidden_size": 32,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "intermediate_size": 64,
        "image_size": image_size,
        "patch_size": 8,
    }
    torch.manual_seed(seed)
    model = BlipForConditionalGeneration(
        BlipConfig(text_config=text, vision_config=vision, projection_dim=16)
    )
    model.generation_config.eos_token_id = tok.sep_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    folder = Path(folder)
    model.save_pretrained(folder)
    proc.save_pretrained(folder)
    return folder


def make_captioner(name: str, **kwargs) -> Captioner:
    """``provided`` | ``celeba`` | ``blip`` (model=, batch_size=, device=, dtype=, prompt=) | ``lavis`` (captions_file=)."""
    if name == "provided":
        return ProvidedCaptioner(**kwargs)
    if name == "celeba":
        return CelebACaptioner(**kwargs)
    if name == "blip":
        return BlipCaptioner(**kwargs)
    if name == "lavis":
        return LavisCaptioner(**kwargs)
    raise ValueError(f"unknown captioner {name!r}: choose provided, celeba, blip or lavis")
