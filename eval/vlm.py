"""VLM yes/no score (FlowID eq. (6), SPEC sec. 8): VLMScore = sigmoid(l_Yes - l_No).

A chat vision-language model is asked one question per image ("Is this person's face injured? Only
answer with yes or no.", or a template with ``{concept}``); one forward pass gives the next-token
logits after the assistant turn opens, and the score is the sigmoid of the "Yes" logit minus the
"No" logit. FlowID reads an edit as successful when the score is below 0.5 (paper 000 sec. 4.1).

The model loads through transformers' generic classes (``AutoProcessor`` +
``AutoModelForImageTextToText``, or ``AutoModelForVision2Seq`` on older transformers) from a local
folder, or a hub name already in the Hugging Face cache (``local_files_only``: idforge never
downloads). The papers do not name FlowID's judge; FINEdits labels with Qwen2-VL, so
``Qwen/Qwen2-VL-7B-Instruct`` (downloaded beforehand with ``huggingface-cli download``) is a
natural choice. The tests use the tiny random LLaVA of :func:`idforge.models.zoo.build_tiny_vlm`.

Tokens: each answer word is encoded as written and with a leading space ("Yes", " Yes"); the
distinct single-token encodings are its tokens (Llama-style tokenizers give one, GPT-2-style BPE
may give two, "Yes" and "ĠYes"), and with several the word's logit is their logsumexp (the log of
the summed probability). A word no variant encodes as one token is an error naming the option.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

log = logging.getLogger(__name__)

FLOWID_QUESTION = "Is this person's face injured? Only answer with yes or no."


def _auto_model_class():
    import transformers

    for name in ("AutoModelForImageTextToText", "AutoModelForVision2Seq"):
        if hasattr(transformers, name):
            return getattr(transformers, name)
    raise ImportError(  # pragma: no cover - depends on the install
        f"transformers {transformers.__version__} has neither AutoModelForImageTextToText nor "
        "AutoModelForVision2Seq; upgrade it (pip install -U transformers)"
    )


def answer_token_ids(tokenizer, word: str, option: str = "yes") -> list[int]:
    """Distinct single-token encodings of ``word`` and `` word``; an error when there is none."""
    ids = []
    for variant in (word, " " + word):
        enc = tokenizer.encode(variant, add_special_tokens=False)
        if len(enc) == 1 and enc[0] not in ids:
            ids.append(enc[0])
    if not ids:
        pieces = tokenizer.tokenize(word)
        raise ValueError(
            f"vlm {option}={word!r}: the tokenizer splits it into {len(pieces)} tokens {pieces}, "
            f"not one; set {option} to a word it encodes as a single token"
        )
    return ids


class VlmJudge:
    """sigmoid(l_yes - l_no) per image from a local chat VLM (see the module docstring).

    Args:
        model: a local model folder, or a hub name already in the Hugging Face cache.
        question: the question; ``{concept}`` in it is filled per image from ``score(concepts=...)``.
        yes, no: the answer words whose next-token logits are compared.
        prompt: a format string with ``{image}`` (the processor's image token) and ``{question}``
            for models without a chat template; None: the processor's chat template.
        batch_size: images per forward pass (images with the same question only, so no padding).
    """

    def __init__(
        self,
        model: str | Path,
        question: str = FLOWID_QUESTION,
        yes: str = "Yes",
        no: str = "No",
        prompt: str | None = None,
        batch_size: int = 8,
        device: str | torch.device = "cpu",
        dtype: torch.dtype | None = None,
    ):
        from transformers import AutoProcessor

        self.name, self.question, self.prompt, self.batch_size = str(model), question, prompt, batch_size
        self.device = torch.device(device)
        from idforge.models.zoo import looks_local

        path = Path(str(model)).expanduser()
        if not path.exists() and looks_local(str(model)):
            raise FileNotFoundError(
                f"vlm_model {model}: no such folder; pass a local VLM folder (or a hub name already downloaded)"
            )
        source = str(path) if path.exists() else str(model)
        try:
            self.processor = AutoProcessor.from_pretrained(source, local_files_only=True)
            self.model = _auto_model_class().from_pretrained(source, local_files_only=True)
        except OSError as e:
            raise FileNotFoundError(
                f"vlm_model {model}: not a loadable local VLM ({str(e).splitlines()[0]}); pass a folder "
                f"with config.json + processor files, or run `huggingface-cli download {model}` first"
            ) from e
        self.model = self.model.to(self.device, dtype).eval()
        self.tokenizer = self.processor.tokenizer
        self.tokenizer.padding_side = "left"  # the next-token logits are at the last position
        self.yes_ids = answer_token_ids(self.tokenizer, yes, "yes")
        self.no_ids = answer_token_ids(self.tokenizer, no, "no")
        if set(self.yes_ids) & set(self.no_ids):
            raise ValueError(f"vlm: yes={yes!r} and no={no!r} share a token; pick two different words")

    def text(self, concept: str | None = None) -> str:
        """The full prompt (chat template or ``prompt``) for one question."""
        q = self.question.format(concept=concept) if concept is not None else self.question
        if self.prompt is not None:
            image_token = getattr(self.processor, "image_token", "<image>")
            return self.prompt.format(image=image_token, question=q)
        if getattr(self.processor, "chat_template", None) is None:
            raise ValueError(
                f"vlm_model {self.name}: the processor has no chat template; set vlm_prompt "
                "(e.g. '{image}{question}') to say how image and question are laid out"
            )
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": q}]}]
        return self.processor.apply_chat_template(messages, add_generation_prompt=True)

    def inputs(self, images: torch.Tensor, text: str) -> dict:
        """Processor outputs for images (B, 3, H, W) in [-1, 1] sharing one prompt."""
        from PIL import Image

        arr = ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1)
        pil = [Image.fromarray(a.numpy()) for a in arr.cpu()]
        batch = self.processor(images=pil, text=[text] * len(pil), return_tensors="pt", padding=True)
        return batch.to(self.device)

    def logits(self, batch: dict) -> torch.Tensor:
        """(B, 2): the yes and no logits (logsumexp over each word's tokens) at the next position."""
        nxt = self.model(**batch).logits[:, -1].float()  # (B, V)
        return torch.stack(
            [nxt[:, self.yes_ids].logsumexp(-1), nxt[:, self.no_ids].logsumexp(-1)], dim=-1
        )  # (B, 2)

    @torch.no_grad()
    def score(
        self,
        images: torch.Tensor,
        concepts: Sequence[str] | None = None,
        progress: Callable[[int], None] | None = None,
    ) -> torch.Tensor:
        """VLMScore (N,) in (0, 1) of images (N, 3, H, W) in [-1, 1]; ``concepts`` fill ``{concept}``."""
        if concepts is not None and len(concepts) != images.shape[0]:
            raise ValueError(f"vlm: {len(concepts)} concepts for {images.shape[0]} images")
        by_text: dict[str, list[int]] = defaultdict(list)
        for i in range(images.shape[0]):
            by_text[self.text(concepts[i] if concepts is not None else None)].append(i)
        out = torch.empty(images.shape[0], dtype=torch.float64)
        for text, idx in by_text.items():
            for s in range(0, len(idx), self.batch_size):
                chunk = idx[s : s + self.batch_size]
                lg = self.logits(self.inputs(images[chunk], text))
                out[chunk] = torch.sigmoid(lg[:, 0] - lg[:, 1]).double().cpu()  # eq. (6)
                if progress:
                    progress(len(chunk))
        return out
