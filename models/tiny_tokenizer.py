"""A small CLIP-format BPE vocabulary built offline, for the tiny text encoder of the model zoo.

SD1.5's CLIP tokenizer ships a 49,408-entry vocabulary that cannot be downloaded here. The tiny
zoo needs a tokenizer in the *same* format (``vocab.json`` + ``merges.txt`` with CLIP's ``</w>``
end-of-word marker) so that ``transformers.CLIPTokenizer.from_pretrained`` loads it through the
same code path as the real one. The vocabulary holds the 256 byte-level symbols (with and without
``</w>``) and one merge chain per word of a word list, so listed words become single tokens and any
other text still tokenizes (into smaller pieces).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable

# Words of attribute captions (SynthID, CelebA-style sentences) and common English.
DEFAULT_WORDS = [
    "a",
    "an",
    "the",
    "of",
    "with",
    "and",
    "or",
    "on",
    "in",
    "at",
    "to",
    "from",
    "by",
    "for",
    "is",
    "are",
    "photo",
    "close-up",
    "portrait",
    "picture",
    "image",
    "face",
    "person",
    "man",
    "woman",
    "people",
    "his",
    "her",
    "their",
    "this",
    "that",
    "round",
    "oval",
    "long",
    "square",
    "narrow",
    "wide",
    "heart-shaped",
    "broad",
    "slim",
    "large",
    "small",
    "big",
    "tiny",
    "medium",
    "eyes",
    "eye",
    "set",
    "apart",
    "close",
    "together",
    "nose",
    "mouth",
    "lips",
    "lip",
    "thin",
    "thick",
    "full",
    "brows",
    "brow",
    "eyebrows",
    "straight",
    "arched",
    "angled",
    "raised",
    "hair",
    "short",
    "bald",
    "fringe",
    "bun",
    "curly",
    "wavy",
    "black",
    "brown",
    "blonde",
    "red",
    "grey",
    "gray",
    "white",
    "dark",
    "light",
    "blue",
    "green",
    "hazel",
    "amber",
    "violet",
    "skin",
    "pale",
    "tan",
    "olive",
    "deep",
    "fair",
    "smiling",
    "smile",
    "neutral",
    "open",
    "mouthed",
    "surprised",
    "expression",
    "lit",
    "left",
    "right",
    "top",
    "bottom",
    "front",
    "side",
    "lighting",
    "bright",
    "dim",
    "soft",
    "plain",
    "gradient",
    "noisy",
    "striped",
    "stripes",
    "background",
    "colour",
    "color",
    "yellow",
    "orange",
    "purple",
    "pink",
    "teal",
    "beard",
    "moustache",
    "mustache",
    "freckles",
    "mole",
    "glasses",
    "sunglasses",
    "hat",
    "cap",
    "mask",
    "wearing",
    "young",
    "old",
    "looking",
    "head",
    "tilted",
    "turned",
    "slightly",
    "camera",
    "studio",
    "outdoor",
    "indoor",
    "high",
    "cheekbones",
    "jaw",
    "chin",
    "pointy",
    "double",
    "attractive",
    "bags",
    "under",
    "bangs",
    "receding",
    "hairline",
    "rosy",
    "cheeks",
    "sideburns",
    "heavy",
    "makeup",
    "mouth",
    "five",
    "o'clock",
    "shadow",
    "earrings",
    "necklace",
    "necktie",
    "lipstick",
    "chubby",
    "goatee",
    "no",
    "up",
]

_SPECIALS = ("<|startoftext|>", "<|endoftext|>")


def _bytes_to_unicode() -> dict[int, str]:
    """CLIP/GPT-2 byte -> printable unicode character table (the reversible byte-level alphabet)."""
    bs = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def _apply_bpe(symbols: list[str], ranks: dict[tuple[str, str], int]) -> list[str]:
    """Greedy lowest-rank-first BPE, as CLIP's tokenizer applies it."""
    pieces = list(symbols)
    while len(pieces) > 1:
        pairs = [(ranks.get((a, b)), i) for i, (a, b) in enumerate(itertools.pairwise(pieces))]
        best = (
            min((r, i) for r, i in pairs if r is not None) if any(r is not None for r, _ in pairs) else None
        )
        if best is None:
            break
        i = best[1]
        pieces = pieces[:i] + [pieces[i] + pieces[i + 1]] + pieces[i + 2 :]
    return pieces


def build_clip_bpe(words: Iterable[str] = DEFAULT_WORDS) -> tuple[dict[str, int], list[str]]:
    """Return ``(vocab, merges)`` in CLIP's format.

    Every intermediate merge result is itself in the vocabulary, so BPE always ends on known
    tokens whatever order the merges fire in.
    """
    alphabet = list(_bytes_to_unicode().values())
    tokens: list[str] = alphabet + [c + "</w>" for c in alphabet]
    seen = set(tokens)
    merges: list[str] = []
    byte_table = _bytes_to_unicode()
    ranks: dict[tuple[str, str], int] = {}
    for word in dict.fromkeys(w.lower() for w in words):  # ordered, unique
        symbols = [byte_table[b] for b in word.encode("utf-8")]
        if not symbols:
            continue
        symbols[-1] += "</w>"
        # Add merges until the word is one token; each added merge has the highest rank so far, so
        # it cannot change how earlier (already single-token) words are split.
        pieces = _apply_bpe(symbols, ranks)
        while len(pieces) > 1:
            pair = (pieces[0], pieces[1])
            ranks[pair] = len(merges)
            merges.append(f"{pair[0]} {pair[1]}")
            merged = pair[0] + pair[1]
            if merged not in seen:
                seen.add(merged)
                tokens.append(merged)
            pieces = _apply_bpe(symbols, ranks)
    tokens.extend(_SPECIALS)
    vocab = {tok: i for i, tok in enumerate(tokens)}
    return vocab, merges
