"""Captioners: CelebA attributes -> fluent sentences, provided captions, BLIP through transformers on a
tiny random model saved and loaded from a folder, the lavis file round trip, BLIP fine-tuning."""

from __future__ import annotations

import json

import numpy as np
import pytest
from idforge.data_pipeline.caption import (
    CELEBA_ATTRIBUTES,
    build_tiny_blip,
    celeba_sentence,
    export_caption_requests,
    import_captions,
    make_captioner,
    read_celeba_attributes,
    write_lavis_script,
)
from PIL import Image


def _attrs(*on):
    return {a: (1 if a in on else -1) for a in CELEBA_ATTRIBUTES}


def test_celeba_sentences_are_fluent_and_follow_the_attributes():
    s = celeba_sentence(
        _attrs(
            "Young",
            "Wavy_Hair",
            "Blond_Hair",
            "Arched_Eyebrows",
            "Smiling",
            "Wearing_Earrings",
            "Wearing_Lipstick",
            "No_Beard",
        )
    )
    assert s == (
        "a photo of a young woman with wavy blond hair and arched eyebrows, smiling, "
        "wearing earrings and lipstick."
    )
    m = celeba_sentence(_attrs("Male", "Bald", "Goatee", "Eyeglasses", "Mouth_Slightly_Open"))
    assert (
        m
        == "a photo of an older man with a bald head and a goatee, with the mouth slightly open, wearing eyeglasses."
    )
    assert celeba_sentence(_attrs("Male", "Young")) == "a photo of a young man, with a beard."
    assert celeba_sentence({"Male": True, "Young": np.int8(1)}) == "a photo of a young man."
    with pytest.raises(ValueError, match="CelebA attribute"):
        celeba_sentence({"Sunglasses": 1})


def test_different_attribute_vectors_give_different_captions():
    rng = np.random.default_rng(0)
    caps = {
        celeba_sentence({a: int(v) for a, v in zip(CELEBA_ATTRIBUTES, rng.choice([-1, 1], 40))})
        for _ in range(50)
    }
    assert len(caps) == 50


def test_read_celeba_attribute_file(tmp_path):
    f = tmp_path / "list_attr_celeba.txt"
    f.write_text(
        "2\n"
        + " ".join(CELEBA_ATTRIBUTES)
        + "\n000001.jpg "
        + " ".join(["-1"] * 39 + ["1"])
        + "\n000002.jpg "
        + " ".join(["1"] * 40)
        + "\n"
    )
    attrs = read_celeba_attributes(f)
    assert set(attrs) == {"000001.jpg", "000002.jpg"} and attrs["000001.jpg"]["Young"] == 1
    assert make_captioner("celeba").caption([None], [{"attributes": attrs["000001.jpg"]}]) == [
        "a photo of a young woman."
    ]


def test_provided_captioner_falls_back_to_attributes_then_default():
    cap = make_captioner("provided")
    out = cap.caption([None] * 3, [{"caption": "a red face"}, {"attributes": _attrs("Male")}, {}])
    assert (
        out[0] == "a red face"
        and out[1].startswith("a photo of an older man")
        and out[2] == "a photo of a person."
    )
    with pytest.raises(ValueError, match="attributes"):
        make_captioner("celeba").caption([None], [{}])
    with pytest.raises(ValueError, match="provided, celeba, blip or lavis"):
        make_captioner("git")


@pytest.fixture(scope="module")
def tiny_blip(tmp_path_factory):
    return build_tiny_blip(tmp_path_factory.mktemp("blip") / "tiny")


def _images(n, seed=0):
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)) for _ in range(n)]


def test_blip_captioner_loads_a_saved_folder_and_captions_in_batches(tiny_blip):
    cap = make_captioner("blip", model=str(tiny_blip), batch_size=2, max_new_tokens=6)
    out = cap.caption(_images(5))
    assert len(out) == 5 and all(isinstance(c, str) for c in out)
    prompted = make_captioner(
        "blip", model=str(tiny_blip), batch_size=4, prompt="a photo of", max_new_tokens=4
    )
    assert all(c.startswith("a photo of") for c in prompted.caption(_images(3)))
    with pytest.raises(OSError, match="cannot load"):
        make_captioner("blip", model=str(tiny_blip.parent / "missing"))


def test_lavis_round_trip_through_files(tmp_path):
    req = export_caption_requests(
        [{"key": "a/1.jpg", "image": _images(1)[0]}, {"key": "b/2.jpg", "image_path": __file__}],
        tmp_path / "req.jsonl",
    )
    rows = [json.loads(x) for x in req.read_text().splitlines()]
    assert [r["key"] for r in rows] == ["a/1.jpg", "b/2.jpg"] and Image.open(rows[0]["image"]).size == (
        48,
        40,
    )
    script = write_lavis_script(tmp_path / "lavis_caption.py")
    compile(script.read_text(), str(script), "exec")  # valid Python; lavis itself is not installed here
    # what the script writes in the lavis environment:
    (tmp_path / "caps.jsonl").write_text(
        "".join(json.dumps({"key": r["key"], "caption": f"cap {i}"}) + "\n" for i, r in enumerate(rows))
    )
    assert import_captions(tmp_path / "caps.jsonl") == {"a/1.jpg": "cap 0", "b/2.jpg": "cap 1"}
    cap = make_captioner("lavis", captions_file=tmp_path / "caps.jsonl")
    assert cap.caption([None, None], [{"source": "b/2.jpg"}, {"key": "a/1.jpg"}]) == ["cap 1", "cap 0"]
    with pytest.raises(KeyError, match="c/3.jpg"):
        cap.caption([None], [{"key": "c/3.jpg"}])
    with pytest.raises(FileNotFoundError, match="lavis"):
        make_captioner("lavis", captions_file=tmp_path / "none.jsonl")


def test_finetune_lowers_the_caption_loss_and_the_result_captions(tiny_blip, tmp_path):
    from idforge.data_pipeline.caption_finetune import finetune_blip

    rng = np.random.default_rng(1)
    images, captions = [], []
    for k in range(8):
        colour = rng.integers(0, 255, 3)
        images.append(Image.fromarray(np.full((32, 32, 3), colour, np.uint8)))
        captions.append(celeba_sentence(_attrs("Male" if k % 2 else "Young", "Smiling")))
    out, hist = finetune_blip(
        tiny_blip,
        images,
        captions,
        tmp_path / "ft",
        epochs=10,
        lr=5e-3,
        batch_size=4,
        warmup_steps=1,
        train_vision=True,
    )
    loss = hist["loss"]
    assert len(loss) == 20 and np.mean(loss[-3:]) < 0.5 * np.mean(loss[:3])
    cap = make_captioner("blip", model=str(out), max_new_tokens=20)
    text = cap.caption(images[:2])
    assert all("photo" in t for t in text), text


def test_finetune_data_loads_from_a_celeba_folder_and_jsonl(tmp_path):
    from idforge.data_pipeline.caption_finetune import load_pairs

    (tmp_path / "img_align_celeba").mkdir()
    for name in ("000001.jpg", "000002.jpg"):
        _images(1)[0].save(tmp_path / "img_align_celeba" / name)
    (tmp_path / "list_attr_celeba.txt").write_text(
        "3\n"
        + " ".join(CELEBA_ATTRIBUTES)
        + "\n"
        + "".join(f"{n} " + " ".join(["1"] * 40) + "\n" for n in ("000001.jpg", "000002.jpg", "000003.jpg"))
    )
    images, captions = load_pairs(tmp_path)
    assert len(images) == 2 and captions[0].startswith("a photo of a young man")  # missing file skipped
    (tmp_path / "pairs.jsonl").write_text(
        json.dumps({"image": "img_align_celeba/000001.jpg", "caption": "hi"}) + "\n"
    )
    assert load_pairs(tmp_path / "pairs.jsonl")[1] == ["hi"]
    with pytest.raises(FileNotFoundError, match="list_attr_celeba"):
        load_pairs(tmp_path / "img_align_celeba")
