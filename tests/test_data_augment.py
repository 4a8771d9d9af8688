"""Augmentations: every output image is one of the crops the recipe allows."""

import pytest
import torch
import torch.nn.functional as F

from lipnext.augment import (
    RAND_AUGMENT_OPS,
    SIGNED,
    apply_op,
    crop_flip,
    rand_augment,
    rand_augment_magnitudes,
    random_resized_crop,
)


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


# --- RandAugment: each op against hand-computed results on uint8 images --------------------


def _u8(rows) -> torch.Tensor:
    """One grey image (1, 1, H, W) from a list of rows."""
    return torch.tensor(rows, dtype=torch.uint8)[None, None]


RAMP = _u8([[0, 10, 20], [30, 40, 50], [60, 70, 80]])


@pytest.mark.parametrize(
    "op,value,expected",
    [
        ("identity", 0.0, [[0, 10, 20], [30, 40, 50], [60, 70, 80]]),
        ("translate_x", 1.7, [[0, 0, 10], [0, 30, 40], [0, 60, 70]]),  # whole pixels, zero fill
        ("translate_y", -1.0, [[30, 40, 50], [60, 70, 80], [0, 0, 0]]),
        ("shear_x", 1.0, [[0, 10, 20], [40, 50, 0], [80, 0, 0]]),  # out(x, y) = in(x + y, y)
        ("shear_y", 1.0, [[0, 40, 80], [30, 70, 0], [60, 0, 0]]),
        ("rotate", 90.0, [[20, 50, 80], [10, 40, 70], [0, 30, 60]]),  # about the centre
        ("brightness", 0.5, [[0, 15, 30], [45, 60, 75], [90, 105, 120]]),
        ("brightness", -0.27, [[0, 7, 14], [21, 29, 36], [43, 51, 58]]),  # truncated: 7.3 -> 7
        ("contrast", 1.0, [[0, 0, 0], [20, 40, 60], [80, 100, 120]]),  # 2 x - mean 40, clamped
        ("solarize", 45.0, [[0, 10, 20], [30, 40, 205], [195, 185, 175]]),  # 255 - x where x >= 45
        ("posterize", 4.0, [[0, 0, 16], [16, 32, 48], [48, 64, 80]]),  # the top 4 bits
        ("autocontrast", 0.0, [[0, 31, 63], [95, 127, 159], [191, 223, 255]]),  # (x - 0) * 255 / 80
    ],
)
def test_each_rand_augment_op_on_a_ramp(op, value, expected):
    assert torch.equal(apply_op(op, RAMP, torch.tensor([value])), _u8(expected))


def test_color_blends_toward_the_luma():
    image = torch.tensor([[[[200]], [[100]], [[0]]]], dtype=torch.uint8)  # one RGB pixel
    luma = int(0.2989 * 200 + 0.587 * 100)  # 118
    out = apply_op("color", image, torch.tensor([-1.0]))  # factor 0: the grey image
    assert out.flatten().tolist() == [luma] * 3
    out = apply_op("color", image, torch.tensor([0.5]))  # 1.5 x - 0.5 luma, clamped, truncated
    assert out.flatten().tolist() == [int(1.5 * 200 - 0.5 * luma), int(1.5 * 100 - 0.5 * luma), 0]


def test_sharpness_sharpens_the_inside_against_its_blur_and_keeps_the_border():
    image = _u8([[0] * 4, [0, 130, 0, 0], [0, 0, 0, 0], [0] * 4])
    out = apply_op("sharpness", image, torch.tensor([1.0]))  # 2 x - blur
    blur = torch.tensor([[50.0, 10.0], [10.0, 10.0]])  # (5 * 130) / 13 at the peak, 130 / 13 beside it
    expected = image.clone()
    expected[0, 0, 1:3, 1:3] = (2 * image[0, 0, 1:3, 1:3].float() - blur).clamp(0, 255).to(torch.uint8)
    assert torch.equal(out, expected) and out[0, 0, 1, 1] == 210


def test_equalize_spreads_the_levels_as_pil_does():
    # Levels 10 (x4), 20 (x4), 30 (x8) in 16 pixels: step = (16 - 8) // 255 = 0 -> unchanged.
    few = _u8([[10] * 4, [20] * 4, [30] * 4, [30] * 4])
    assert torch.equal(apply_op("equalize", few, torch.tensor([0.0])), few)
    # 512 pixels, 256 at level 0 and 256 at level 1: step = (512 - 256) // 255 = 1, lut[1] = (256 + 0) // 1.
    two = torch.cat([torch.zeros(256), torch.ones(256)]).to(torch.uint8).view(1, 1, 16, 32)
    out = apply_op("equalize", two, torch.tensor([0.0]))
    assert set(out.flatten().tolist()) == {0, 255}  # lut[1] = 256, clamped to 255


def test_rand_augment_draws_two_ops_per_image_from_its_generator_alone():
    images = (torch.rand(64, 3, 8, 8, generator=torch.Generator().manual_seed(0)) * 255).to(torch.uint8)
    a = rand_augment(images, torch.Generator().manual_seed(1))
    assert a.dtype == torch.uint8 and a.shape == images.shape
    assert torch.equal(a, rand_augment(images, torch.Generator().manual_seed(1)))
    assert not torch.equal(a, rand_augment(images, torch.Generator().manual_seed(2)))
    changed = (a != images).flatten(1).any(1).float().mean()
    assert changed > 0.9  # only two identities (1 in 196) or two ops without effect leave an image as it was


def test_rand_augment_runs_each_op_on_the_images_that_drew_it():
    """An image augmented in a batch equals the two ops it drew applied to it alone."""
    images = (torch.rand(32, 1, 6, 6, generator=torch.Generator().manual_seed(0)) * 255).to(torch.uint8)
    g = torch.Generator().manual_seed(3)
    out = rand_augment(images, torch.Generator().manual_seed(3))
    magnitudes = rand_augment_magnitudes(6)
    expected = images.clone()
    for _ in range(2):
        ops = torch.randint(0, len(RAND_AUGMENT_OPS), (32,), generator=g)
        signs = torch.where(torch.rand(32, generator=g) < 0.5, -1.0, 1.0)
        for i in range(32):
            op = RAND_AUGMENT_OPS[ops[i]]
            value = magnitudes.get(op, 0.0) * (signs[i].item() if op in SIGNED else 1.0)
            expected[i : i + 1] = apply_op(op, expected[i : i + 1], torch.tensor([value]))
    assert torch.equal(out, expected)


def test_rand_augment_magnitudes_are_torchvisions_at_bin_9():
    m = rand_augment_magnitudes(32)
    assert m["shear_x"] == pytest.approx(0.09) and m["rotate"] == pytest.approx(9.0)
    assert m["translate_x"] == pytest.approx(150 / 331 * 32 * 0.3) and m["brightness"] == pytest.approx(0.27)
    assert m["posterize"] == 7 and m["solarize"] == pytest.approx(178.5)
