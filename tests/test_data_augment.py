"""Augmentations: every output image is one of the crops the recipe allows."""

import pytest
import torch
import torch.nn.functional as F

from lipnext.augment import crop_flip, random_resized_crop


def _is_one_of(image: torch.Tensor, candidates: list[torch.Tensor], atol: float = 0.0) -> bool:
    return any(torch.allclose(image, c, atol=atol, rtol=0) for c in candidates)


def test_crop_flip_returns_a_padded_crop_or_its_mirror():
    images = torch.rand(64, 3, 8, 8)
    out = crop_flip(images, torch.Generator().manual_seed(0), padding=2)
    assert out.shape == images.shape
    flips = 0
    for image, result in zip(images, out):
        padded = F.pad(image, (2, 2, 2, 2))
        crops = [padded[:, i : i + 8, j : j + 8] for i in range(5) for j in range(5)]
        assert _is_one_of(result, crops) or _is_one_of(result, [c.flip(-1) for c in crops])
        flips += not _is_one_of(result, crops)
    assert 16 < flips < 48  # about half are mirrored


def test_crop_flip_is_a_function_of_the_generator():
    images = torch.rand(16, 3, 8, 8)
    a = crop_flip(images, torch.Generator().manual_seed(1))
    assert torch.equal(a, crop_flip(images, torch.Generator().manual_seed(1)))
    assert not torch.equal(a, crop_flip(images, torch.Generator().manual_seed(2)))


def test_random_resized_crop_of_the_whole_image_is_the_image_or_its_mirror():
    images = torch.rand(32, 3, 16, 16)
    out = random_resized_crop(images, torch.Generator().manual_seed(0), scale=(1, 1), ratio=(1, 1))
    for image, result in zip(images, out):
        assert _is_one_of(result, [image, image.flip(-1)], atol=1e-5)


def test_random_resized_crop_resizes_a_box_of_the_drawn_area():
    # A quarter of a 16x16 image at ratio 1 is an 8x8 box, upsampled bilinearly back to 16x16.
    images = torch.rand(8, 1, 16, 16)
    out = random_resized_crop(images, torch.Generator().manual_seed(0), scale=(0.25, 0.25), ratio=(1, 1))
    for image, result in zip(images, out):
        boxes = [image[None, :, i : i + 8, j : j + 8] for i in range(9) for j in range(9)]
        resized = [F.interpolate(b, size=16, mode="bilinear", align_corners=False)[0] for b in boxes]
        assert _is_one_of(result, resized + [r.flip(-1) for r in resized], atol=1e-5)


@pytest.mark.parametrize("shape", [(16, 16), (12, 40)])
def test_random_resized_crop_falls_back_to_a_centre_crop_when_no_box_fits(shape):
    # Ratios that no attempt can satisfy at full area: torchvision's fallback box.
    images = torch.rand(4, 3, *shape)
    out = random_resized_crop(images, torch.Generator().manual_seed(0), scale=(1, 1), ratio=(2, 2))
    h, w = shape
    ch = round(w / 2) if w / h < 2 else h
    cw = w if w / h < 2 else round(h * 2)
    top, left = (h - ch) // 2, (w - cw) // 2
    expected = F.interpolate(images[:, :, top : top + ch, left : left + cw], size=shape, mode="bilinear")
    for image, result in zip(expected, out):
        assert _is_one_of(result, [image, image.flip(-1)], atol=1e-5)
