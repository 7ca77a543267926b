"""Dataset annotation files (CelebA / CelebA-HQ, FFHQ, landmarks.jsonl) reach the curation records."""

from __future__ import annotations

import json

import numpy as np
import pytest
from idforge.data_pipeline.annotations import load_annotations
from idforge.data_pipeline.caption import CELEBA_ATTRIBUTES
from idforge.data_pipeline.curate import run_curation
from idforge.data_pipeline.filters import FilterConfig
from idforge.data_pipeline.job import CurateConfig
from idforge.data_pipeline.sources import open_source
from idforge.data_pipeline.synthid import SynthID, SynthIDConfig


def _attr_file(path, rows):
    lines = [str(len(rows)), " ".join(CELEBA_ATTRIBUTES)]
    lines += [f"{name} " + " ".join(str(v) for v in values) for name, values in rows]
    path.write_text("\n".join(lines) + "\n")


@pytest.fixture()
def celeba_hq(tmp_path):
    """A CelebA-HQ-shaped folder: images in a sub-folder, attribute, identity and HQ mapping files."""
    root = tmp_path / "celebahq"
    (root / "CelebA-HQ-img").mkdir(parents=True)
    synth = SynthID(SynthIDConfig(num_identities=2, images_per_identity=2, heldout_identities=0, seed=3))
    landmarks = []
    for n in range(4):
        s = synth.render(n // 2, n % 2)
        s.image.save(root / "CelebA-HQ-img" / f"{n}.jpg", quality=95)
        landmarks.append((f"{n}.jpg", s.landmarks.reshape(-1)))
    male = CELEBA_ATTRIBUTES.index("Male")
    rows = []
    for n in range(4):
        v = [-1] * 40
        v[male] = 1 if n < 2 else -1
        rows.append((f"{n}.jpg", v))
    _attr_file(root / "CelebAMask-HQ-attribute-anno.txt", rows)
    (root / "CelebA-HQ-to-CelebA-mapping.txt").write_text(
        "idx orig_idx orig_file\n" + "".join(f"{n} {100 + n} {100 + n:06d}.jpg\n" for n in range(4))
    )
    (root / "identity_CelebA.txt").write_text(
        "".join(f"{100 + n:06d}.jpg {7 if n < 2 else 9}\n" for n in range(4))
    )
    # landmarks in CelebA's list_landmarks format (here: of these very images, so the landmarks detector works)
    (root / "list_landmarks_celeba.txt").write_text(
        "4\nlefteye_x lefteye_y righteye_x righteye_y nose_x nose_y leftmouth_x leftmouth_y rightmouth_x rightmouth_y\n"
        + "".join(f"{name} " + " ".join(f"{v:.2f}" for v in pts) + "\n" for name, pts in landmarks)
    )
    return root, landmarks


def test_celeba_hq_files_give_attributes_identities_and_landmarks(celeba_hq):
    root, landmarks = celeba_hq
    items = {it.key: it.meta for it in open_source(root)}
    assert sorted(items) == [f"CelebA-HQ-img/{n}.jpg" for n in range(4)]  # annotation files are not images
    m0, m3 = items["CelebA-HQ-img/0.jpg"], items["CelebA-HQ-img/3.jpg"]
    assert m0["attributes"]["Male"] == 1 and m3["attributes"]["Male"] == -1
    assert m0["identity"] == "celeba-7" and m3["identity"] == "celeba-9"
    np.testing.assert_allclose(np.asarray(m3["landmarks"]).reshape(-1), landmarks[3][1], atol=0.01)


def test_celeba_hq_curation_captions_from_attributes(celeba_hq, tmp_path):
    root, _ = celeba_hq
    out = tmp_path / "shards"
    manifest = run_curation(
        CurateConfig(
            input=str(root),
            output=str(out),
            resolution=32,
            captioner="celeba",
            filters=FilterConfig(min_resolution=32, min_face_px=8),
        )
    )
    assert manifest["images_accepted"] == 4 and manifest["identities"] == {"train": 2}
    import webdataset as wds

    metas = [
        json.loads(s["meta.json"]) for s in wds.WebDataset(str(out / "train-000000.tar"), shardshuffle=False)
    ]
    by_id = {m["identity"]: m for m in metas}
    assert set(by_id) == {"celeba-7", "celeba-9"}
    assert all(" man" in im["caption"] for im in by_id["celeba-7"]["images"])
    assert all(" woman" in im["caption"] for im in by_id["celeba-9"]["images"])


def test_bad_celeba_attribute_file_names_the_file(tmp_path):
    (tmp_path / "list_attr_celeba.txt").write_text("1\nNot_An_Attribute Other\na.jpg 1 -1\n")
    with pytest.raises(ValueError, match="list_attr_celeba.txt"):
        load_annotations(tmp_path)


def test_ffhq_json_landmarks(tmp_path):
    pts = np.stack([np.linspace(10, 50, 68), np.linspace(20, 60, 68)], 1)
    rec = {
        "0": {
            "image": {
                "file_path": "images1024x1024/00000/00000.png",
                "pixel_size": [1024, 1024],
                "face_landmarks": pts.tolist(),
            },
            "thumbnail": {"file_path": "thumbnails128x128/00000/00000.png", "pixel_size": [128, 128]},
            "in_the_wild": {
                "file_path": "in-the-wild-images/00000/00000.png",
                "face_landmarks": (pts * 2).tolist(),
            },
        }
    }
    (tmp_path / "ffhq-dataset-v2.json").write_text(json.dumps(rec))
    ann = load_annotations(tmp_path)
    np.testing.assert_allclose(ann.lookup("images1024x1024/00000/00000.png")["landmarks"], pts)
    np.testing.assert_allclose(ann.lookup("in-the-wild-images/00000/00000.png")["landmarks"], pts * 2)
    np.testing.assert_allclose(ann.lookup("thumbnails128x128/00000/00000.png")["landmarks"], pts / 8)
    bad = {"0": {"image": {"file_path": "a.png", "face_landmarks": [[0, 0]] * 5}}}
    (tmp_path / "ffhq-dataset-v2.json").write_text(json.dumps(bad))
    with pytest.raises(ValueError, match="68"):
        load_annotations(tmp_path)
