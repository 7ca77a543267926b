"""Warps and resizes low-pass where they minify: no aliasing into the 112 px ArcFace crop or the CLIP input."""

from __future__ import annotations

import torch
from idforge.models.face.align_torch import crop_corners, minification, warp_to_template

LMS = torch.tensor(
    [[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366], [41.5493, 92.3655], [70.7299, 92.2041]]
)


def _checkerboard(size: int, period: int = 2) -> torch.Tensor:
    idx = torch.arange(size) // (period // 2)
    board = ((idx[:, None] + idx[None, :]) % 2).float() * 2 - 1  # +-1, finest pattern
    return board.expand(1, 3, size, size).clone()


def test_minified_warp_of_a_fine_pattern_is_grey_with_antialias_and_aliased_without():
    size, zoom = 448, 4.0  # the face is 4x larger than in the template: the warp minifies 4x
    lms = (LMS * zoom)[None]
    assert torch.allclose(minification(lms), torch.tensor([zoom]), rtol=1e-4)
    img = _checkerboard(size)
    plain = warp_to_template(img, lms)
    smooth = warp_to_template(img, lms, antialias=True)
    # bilinear sampling of the +-1 pattern at 4 px steps lands on one colour: aliased to a false -1 or +1
    assert plain.abs().mean() > 0.5
    assert smooth.abs().mean() < 0.05  # the pattern's mean (0), as a low-pass crop should show


def test_antialias_keeps_smooth_content_and_is_a_no_op_when_magnifying():
    g = torch.Generator().manual_seed(0)
    smooth = torch.nn.functional.interpolate(torch.rand(1, 3, 7, 7, generator=g), size=448, mode="bicubic")
    lms = (LMS * 4.0)[None]
    a, b = warp_to_template(smooth, lms), warp_to_template(smooth, lms, antialias=True)
    assert (a - b).abs().mean() < 0.01
    small = torch.rand(2, 3, 56, 56, generator=g)
    lms_small = (LMS * 0.5).expand(2, 5, 2)
    assert torch.equal(warp_to_template(small, lms_small), warp_to_template(small, lms_small, antialias=True))


def test_crop_corners_map_back_to_the_template_square():
    corners = crop_corners((LMS * 2.0 + 10.0)[None])  # image = 2 x crop + 10
    expected = torch.tensor(
        [[9.0, 9.0], [233.0, 9.0], [233.0, 233.0], [9.0, 233.0]]
    )  # crop edges -0.5, 111.5
    assert torch.allclose(corners[0], expected, atol=1e-3)


def test_clip_resize_low_passes_a_fine_pattern(tiny_zoo):
    from idforge.models.image_encoder import ClipImageEncoder

    enc = ClipImageEncoder.from_pretrained(f"local-dir:{tiny_zoo / 'clip_image_encoder'}")
    size = round(enc.image_size * 3.7)  # minified 3.7x, like an 830 px face for a 224 px CLIP
    x = enc.preprocess(_checkerboard(size)) * enc.std + enc.mean  # back to [0, 1]
    assert (x - 0.5).abs().max() < 0.05  # grey; without antialias bicubic picks one colour per pixel
