"""VLM yes/no score (FlowID eq. 6) through a tiny random LLaVA written by the zoo and loaded back."""

from __future__ import annotations

import pytest
import torch
from idforge.eval.vlm import VlmJudge, answer_token_ids
from idforge.models.zoo import build_tiny_vlm


@pytest.fixture(scope="module")
def tiny_vlm(tmp_path_factory):
    return build_tiny_vlm(tmp_path_factory.mktemp("vlm") / "tiny-llava", seed=0)


def _images(n, seed=0):
    return torch.rand(n, 3, 40, 40, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_score_is_sigmoid_of_yes_minus_no_logit_of_the_model_forward(tiny_vlm):
    judge = VlmJudge(tiny_vlm, question="Is this person's face injured? Only answer with yes or no.")
    yes = judge.tokenizer.convert_tokens_to_ids("▁Yes")
    no = judge.tokenizer.convert_tokens_to_ids("▁No")
    assert judge.yes_ids == [yes] and judge.no_ids == [no]  # "Yes" and " Yes" are one token here
    text = judge.text()
    assert text.startswith("USER: <image>\nIs this person's face injured?") and text.endswith("ASSISTANT:")
    imgs = _images(3)
    scores = judge.score(imgs)
    with torch.no_grad():
        logits = judge.model(**judge.inputs(imgs, text)).logits[:, -1]  # (3, V)
    expected = torch.sigmoid(logits[:, yes] - logits[:, no]).double()
    torch.testing.assert_close(scores, expected, rtol=0, atol=1e-6)
    assert scores.std() > 0  # the images matter


def test_batched_scores_equal_one_by_one_and_concepts_fill_the_template(tiny_vlm):
    judge = VlmJudge(tiny_vlm, question="Does this image show {concept}? Answer yes or no.", batch_size=4)
    imgs = _images(5, seed=1)
    concepts = ["a face", "a hat", "a face", "a hat", "a face"]
    batched = judge.score(imgs, concepts)
    judge.batch_size = 1
    single = torch.cat([judge.score(imgs[i : i + 1], concepts[i : i + 1]) for i in range(5)])
    torch.testing.assert_close(batched, single, rtol=0, atol=1e-5)
    same = judge.score(imgs[:1].expand(2, -1, -1, -1), ["a face", "a hat"])
    assert same[0] != same[1]  # the question reaches the model


def test_prompt_format_replaces_the_chat_template(tiny_vlm):
    judge = VlmJudge(tiny_vlm, question="is this a face?", prompt="{image}\n{question} answer:")
    assert judge.text() == "<image>\nis this a face? answer:"
    assert judge.score(_images(2)).shape == (2,)


def test_answer_words_that_are_not_one_token_and_missing_models_are_clear_errors(tiny_vlm, tmp_path):
    judge = VlmJudge(tiny_vlm)
    with pytest.raises(ValueError, match=r"yes='Definitely'.*not one; set yes"):
        answer_token_ids(judge.tokenizer, "Definitely", "yes")
    with pytest.raises(ValueError, match="share a token"):
        VlmJudge(tiny_vlm, yes="Yes", no=" Yes")
    with pytest.raises(FileNotFoundError, match=r"vlm_model .*no-such-vlm: no such folder"):
        VlmJudge(str(tmp_path / "no-such-vlm"))
    with pytest.raises(
        FileNotFoundError, match=r"vlm_model someone/not-downloaded: not a loadable local VLM"
    ):
        VlmJudge("someone/not-downloaded")
