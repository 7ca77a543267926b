"""SynthID: deterministic identities, correct landmarks, stable splits, resumable folder export."""

from __future__ import annotations

import json

import numpy as np
import pytest
from idforge.data_pipeline.align import align_face, template_for, transform_points
from idforge.data_pipeline.synthid import SynthID, SynthIDConfig, write_synthid_folder

CFG = SynthIDConfig(num_identities=12, images_per_identity=4, resolution=64, heldout_identities=4, seed=3)


def test_rendering_is_deterministic_and_independent_of_order():
    a = SynthID(CFG).render(5, 2)
    b = SynthID(CFG).render(5, 2)
    assert np.array_equal(np.asarray(a.image), np.asarray(b.image))
    in_pass = next(s for s in SynthID(CFG).samples() if s.identity == 5 and s.index == 2)
    assert np.array_equal(np.asarray(a.image), np.asarray(in_pass.image))
    assert np.allclose(a.landmarks, in_pass.landmarks) and a.caption == in_pass.caption


def test_a_different_seed_gives_different_people():
    a = SynthID(CFG).render(0, 0)
    b = SynthID(SynthIDConfig(**{**CFG.__dict__, "seed": 4})).render(0, 0)
    assert not np.array_equal(np.asarray(a.image), np.asarray(b.image))


def test_identity_parameters_fixed_per_person_and_differ_between_people():
    s = SynthID(CFG)
    assert s.identity_params(3) == s.identity_params(3)
    params = [s.identity_params(i) for i in range(CFG.num_identities)]
    assert len({(p.aspect, p.eye_spacing) for p in params}) == CFG.num_identities
    imgs = [np.asarray(s.render(3, k).image) for k in range(CFG.images_per_identity)]
    assert any(not np.array_equal(imgs[0], im) for im in imgs[1:])  # photos vary


def test_split_is_disjoint_complete_and_stable():
    s = SynthID(CFG)
    train, held = set(s.train_ids), set(s.heldout_ids)
    assert not train & held and train | held == set(range(CFG.num_identities))
    assert len(held) == CFG.heldout_identities
    assert all(s.split_of(i) == "heldout" for i in held)
    assert {x.split for x in s.samples("heldout")} == {"heldout"}


def test_landmarks_lie_inside_box_and_image():
    for smp in SynthID(CFG).samples():
        x0, y0, x1, y1 = smp.box
        assert 0 <= x0 < x1 <= CFG.resolution and 0 <= y0 < y1 <= CFG.resolution
        assert (smp.landmarks[:, 0] > x0).all() and (smp.landmarks[:, 0] < x1).all()
        assert (smp.landmarks[:, 1] > y0).all() and (smp.landmarks[:, 1] < y1).all()
        assert smp.landmarks[0, 0] < smp.landmarks[1, 0]  # image-left eye first


def _dark_centroid(img: np.ndarray, around, radius: int) -> np.ndarray:
    """Darkness-weighted centroid near ``around``: the pupil and iris are drawn concentric."""
    x, y = np.round(around).astype(int)
    win = img[y - radius : y + radius + 1, x - radius : x + radius + 1].astype(np.float32).mean(-1)
    w = np.clip(win.max() - win, 0, None) ** 2
    assert w.sum() > 0, "no dark eye found near the landmark"
    ys, xs = np.mgrid[-radius : radius + 1, -radius : radius + 1]
    return np.array([(w * xs).sum() / w.sum() + x, (w * ys).sum() / w.sum() + y])


@pytest.mark.parametrize("identity", [0, 3, 7, 10])
def test_aligned_crop_puts_the_eyes_where_the_arcface_template_says(identity):
    synth = SynthID(
        SynthIDConfig(num_identities=12, images_per_identity=4, resolution=128, heldout_identities=4)
    )
    for k in range(4):
        smp = synth.render(identity, k)
        crop, matrix = align_face(np.asarray(smp.image), smp.landmarks, size=112)
        tpl = template_for(112)
        mapped = transform_points(smp.landmarks, matrix)
        for eye in (0, 1):
            centre = _dark_centroid(crop, mapped[eye], radius=4)
            # the recorded landmark is where the pupil was drawn ...
            assert np.abs(centre - mapped[eye]).max() < 1.5, (identity, k, eye, centre, mapped[eye])
            # ... and the 5-point fit puts it near the ArcFace template's eye (faces differ in proportions)
            assert np.abs(centre - tpl[eye]).max() < 6.0, (identity, k, eye, centre, tpl[eye])


def test_captions_follow_attributes():
    s = SynthID(SynthIDConfig(num_identities=40, images_per_identity=1, heldout_identities=0))
    by_hair = {}
    for i in range(40):
        p = s.identity_params(i)
        if p.hair_style != "bald":
            by_hair.setdefault(p.hair_colour, s.render(i, 0).caption)
    assert len(by_hair) >= 2
    for colour, caption in by_hair.items():
        assert f"{colour} " in caption and "hair" in caption


def test_folder_export_writes_images_and_landmarks_and_resumes(tmp_path):
    cfg = SynthIDConfig(num_identities=3, images_per_identity=2, heldout_identities=1)
    out = write_synthid_folder(cfg, tmp_path / "s")
    lines = [json.loads(x) for x in (out / "landmarks.jsonl").read_text().splitlines()]
    assert len(lines) == 6 and all((out / r["file"]).is_file() for r in lines)
    assert {r["split"] for r in lines} == {"train", "heldout"}
    first = out / lines[0]["file"]
    mtime = first.stat().st_mtime_ns
    first.with_name("other.png").write_bytes(b"")  # unrelated files are left alone
    write_synthid_folder(cfg, tmp_path / "s")
    assert first.stat().st_mtime_ns == mtime


def test_config_is_validated():
    with pytest.raises(ValueError, match="heldout"):
        SynthIDConfig(num_identities=4, heldout_identities=4)
