"""Batch augmentations in plain torch (no torchvision: the wheel served here is a
CUDA build that does not import beside the CPU torch), on whole batches
(N, C, H, W). Each takes the generator that owns its randomness (the loader's,
one per batch), so a resumed loader redraws exactly the same crops and ops.

crop_flip works on any dtype, rand_augment on uint8 (as torchvision's ops on
uint8 tensors), random_resized_crop on float images in [0, 1]. The registry's
pipelines take the stored uint8 pixels and return float images in [0, 1]."""

import math
from typing import Literal

import torch
import torch.nn.functional as F


def crop_flip(images: torch.Tensor, generator: torch.Generator, padding: int = 4) -> torch.Tensor:
    """The CIFAR recipe: zero-pad by `padding`, crop back to H x W at a random
    offset, flip half the images left-right. One gather over the flattened
    padded images (2.5x faster than indexing rows and columns)."""
    n, c, h, w = images.shape
    padded = F.pad(images, (padding,) * 4)
    dy = torch.randint(0, 2 * padding + 1, (n, 1), generator=generator)
    dx = torch.randint(0, 2 * padding + 1, (n, 1), generator=generator)
    flip = torch.rand(n, 1, generator=generator) < 0.5
    cols = torch.where(flip, torch.arange(w - 1, -1, -1), torch.arange(w)) + dx  # (N, W)
    rows = torch.arange(h) + dy  # (N, H)
    index = (rows[:, :, None] * (w + 2 * padding) + cols[:, None, :]).view(n, 1, h * w)
    return padded.view(n, c, -1).gather(2, index.expand(n, c, h * w)).view(n, c, h, w)


def random_resized_crop(
    images: torch.Tensor,
    generator: torch.Generator,
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    attempts: int = 10,
) -> torch.Tensor:
    """The ImageNet recipe: a crop of random area (fraction `scale` of the
    image) and aspect ratio, resized back to H x W (bilinear), flipped half the
    time. Boxes are drawn as torchvision draws them: `attempts` tries per image,
    then a centre crop with the ratio clamped. No antialiasing: with the image
    stored at the model's size the box is only ever enlarged."""
    n, _, h, w = images.shape
    area = h * w * torch.empty(n, attempts).uniform_(*scale, generator=generator)
    log_ratio = torch.empty(n, attempts).uniform_(math.log(ratio[0]), math.log(ratio[1]), generator=generator)
    aspect = log_ratio.exp()
    cw = (area * aspect).sqrt().round()
    ch = (area / aspect).sqrt().round()
    fits = (cw > 0) & (cw <= w) & (ch > 0) & (ch <= h)
    first = fits.float().argmax(dim=1, keepdim=True)  # first attempt that fits
    cw, ch = cw.gather(1, first).squeeze(1), ch.gather(1, first).squeeze(1)
    # No attempt fits: torchvision's fallback, the largest centred box whose ratio lies in `ratio`.
    fallback = ~fits.any(dim=1)
    full_w, full_h = _clamped_box(h, w, ratio)
    cw = torch.where(fallback, float(full_w), cw)
    ch = torch.where(fallback, float(full_h), ch)
    u = torch.rand(n, 2, generator=generator)
    top = torch.where(fallback, ((h - ch) / 2).floor(), (u[:, 0] * (h - ch + 1)).floor())
    left = torch.where(fallback, ((w - cw) / 2).floor(), (u[:, 1] * (w - cw + 1)).floor())
    flip = torch.rand(n, generator=generator) < 0.5
    # affine_grid maps the output's [-1, 1] square onto the box, in the input's
    # normalised coordinates (align_corners=False: pixel edges at +-1).
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0] = torch.where(flip, -cw / w, cw / w)
    theta[:, 0, 2] = (2 * left + cw) / w - 1
    theta[:, 1, 1] = ch / h
    theta[:, 1, 2] = (2 * top + ch) / h - 1
    grid = F.affine_grid(theta.to(images.dtype), list(images.shape), align_corners=False)
    # Sample only inside the box, between its outer pixel centres, as crop-then-resize does.
    for axis, start, length, size in ((0, left, cw, w), (1, top, ch, h)):
        low, high = (2 * start + 1) / size - 1, (2 * (start + length) - 1) / size - 1
        grid[..., axis].clamp_(low[:, None, None].to(grid.dtype), high[:, None, None].to(grid.dtype))
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)


def _clamped_box(h: int, w: int, ratio: tuple[float, float]) -> tuple[int, int]:
    if w / h < ratio[0]:
        return w, round(w / ratio[0])
    if w / h > ratio[1]:
        return round(h * ratio[1]), h
    return w, h


def to_unit(pixels: torch.Tensor) -> torch.Tensor:
    """uint8 pixels -> float32 in [0, 1]."""
    return pixels.float().div_(255)


# --- RandAugment -------------------------------------------------------------------------
# torchvision's RandAugment (num_ops=2, magnitude=9 of 31 bins): each image draws two ops of
# the 14 (repeats allowed) and a sign for each signed one; every op runs once per batch, on
# the images that drew it. Magnitudes are torchvision's at bin 9 of 0..30 (fraction 0.3):
# shear 0.09, translate 0.3 x 150/331 of the side (4.35 px at 32), rotate 9 degrees, colour
# factors 1 +- 0.27, posterize 7 bits, solarize at 178.5. Geometric ops sample the nearest
# pixel and fill with 0, as torchvision's defaults do.

RAND_AUGMENT_OPS = (
    "identity", "shear_x", "shear_y", "translate_x", "translate_y", "rotate", "brightness", "color",
    "contrast", "sharpness", "posterize", "solarize", "autocontrast", "equalize",
)  # fmt: skip


def rand_augment_magnitudes(size: int, magnitude: int = 9, bins: int = 31) -> dict[str, float]:
    """Each op's magnitude at `magnitude` of `bins` for images `size` pixels wide (torchvision's table)."""
    t = magnitude / (bins - 1)
    return {
        "shear_x": 0.3 * t, "shear_y": 0.3 * t,
        "translate_x": 150 / 331 * size * t, "translate_y": 150 / 331 * size * t,
        "rotate": 30.0 * t,
        "brightness": 0.9 * t, "color": 0.9 * t, "contrast": 0.9 * t, "sharpness": 0.9 * t,
        "posterize": float(8 - round(magnitude / ((bins - 1) / 4))),
        "solarize": 255.0 * (1 - t),
    }  # fmt: skip


def _affine(images: torch.Tensor, matrix: torch.Tensor) -> torch.Tensor:
    """out[y, x] = in[round(M (x, y, 1))] for each image's 2 x 3 inverse map M (pixel centres
    at integers), 0 where that falls outside: nearest-neighbour resampling, zero fill."""
    n, c, h, w = images.shape
    ys, xs = torch.meshgrid(torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32), indexing="ij")
    points = torch.stack([xs.flatten(), ys.flatten(), torch.ones(h * w)])  # (3, HW): whole numbers, exact
    source = (matrix.float() @ points).round_().long()  # (N, 2, HW)
    sx, sy = source[:, 0], source[:, 1]
    inside = (sx >= 0) & (sx < w) & (sy >= 0) & (sy < h)
    index = (sy.clamp(0, h - 1) * w + sx.clamp(0, w - 1))[:, None].expand(n, c, h * w)
    out = images.reshape(n, c, h * w).gather(2, index) * inside[:, None]
    return out.view(n, c, h, w).to(images.dtype)


def _inverse_map(op: str, value: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Each image's inverse map (N, 2, 3) for a geometric op of signed magnitude `value` (N,):
    shears and translations about the top-left pixel (torchvision's centre [0, 0] for shears),
    rotations about the image centre."""
    m = torch.zeros(len(value), 2, 3, dtype=torch.float64)
    m[:, 0, 0] = m[:, 1, 1] = 1
    v = value.double()
    if op == "shear_x":  # out(x, y) = in(x + v y, y)
        m[:, 0, 1] = v
    elif op == "shear_y":
        m[:, 1, 0] = v
    elif op == "translate_x":  # whole pixels, as torchvision's int(magnitude)
        m[:, 0, 2] = -v.trunc()
    elif op == "translate_y":
        m[:, 1, 2] = -v.trunc()
    else:  # rotate by v degrees about the centre
        a = torch.deg2rad(v)
        cx, cy = (w - 1) / 2, (h - 1) / 2
        m[:, 0, 0], m[:, 0, 1], m[:, 1, 0], m[:, 1, 1] = a.cos(), -a.sin(), a.sin(), a.cos()
        m[:, 0, 2] = cx - m[:, 0, 0] * cx - m[:, 0, 1] * cy
        m[:, 1, 2] = cy - m[:, 1, 0] * cx - m[:, 1, 1] * cy
    return m


def _blend(images: torch.Tensor, other: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """factor * images + (1 - factor) * other, clamped to [0, 255] and truncated to uint8 (torchvision's _blend)."""
    f = factor.view(-1, 1, 1, 1)
    return (f * images.float() + (1 - f) * other).clamp_(0, 255).to(torch.uint8)


def _grey(images: torch.Tensor) -> torch.Tensor:
    """ITU-R 601-2 luma, truncated to whole levels, (N, 1, H, W) float (torchvision's rgb_to_grayscale on uint8)."""
    if images.shape[1] == 1:
        return images.float()
    r, g, b = images.float().unbind(1)
    return (0.2989 * r + 0.587 * g + 0.114 * b).trunc()[:, None]


def _sharpness_degenerate(images: torch.Tensor) -> torch.Tensor:
    """The image smoothed by [[1, 1, 1], [1, 5, 1], [1, 1, 1]] / 13 and rounded, its border kept
    (all border below 3 x 3: the image itself)."""
    n, c, h, w = images.shape
    if min(h, w) < 3:
        return images.float()
    kernel = torch.ones(3, 3)
    kernel[1, 1] = 5
    kernel = (kernel / 13).expand(c, 1, 3, 3)
    x = images.float()
    smooth = F.conv2d(x, kernel, groups=c).round_()
    out = x.clone()
    out[:, :, 1:-1, 1:-1] = smooth
    return out


def _equalize(images: torch.Tensor) -> torch.Tensor:
    """Per-channel histogram equalisation, torchvision's (PIL's) lookup table, every channel at once."""
    n, c, h, w = images.shape
    flat = images.reshape(n * c, h * w).long()
    hist = torch.zeros(n * c, 256, dtype=torch.int64).scatter_add_(1, flat, torch.ones_like(flat))
    last = hist.gather(1, flat.amax(1, keepdim=True))  # the count of the last non-empty bin
    step = (h * w - last) // 255  # (M, 1)
    safe = step.clamp(min=1)
    lut = (hist.cumsum(1) + safe // 2) // safe
    lut = torch.cat([torch.zeros(n * c, 1, dtype=torch.int64), lut[:, :-1]], dim=1).clamp_(0, 255)
    out = torch.where(step > 0, lut.gather(1, flat), flat)
    return out.view(n, c, h, w).to(torch.uint8)


def _autocontrast(images: torch.Tensor) -> torch.Tensor:
    """Each channel stretched to [0, 255] from its own [min, max] (left alone where min == max)."""
    x = images.float()
    low, high = x.amin(dim=(2, 3), keepdim=True), x.amax(dim=(2, 3), keepdim=True)
    flat = high == low
    scale = torch.where(flat, 1.0, 255 / (high - low).clamp(min=1))
    low = torch.where(flat, 0.0, low)
    return ((x - low) * scale).clamp_(0, 255).to(torch.uint8)


def apply_op(op: str, images: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """RandAugment's op on uint8 images (N, C, H, W), with each image's signed magnitude `value` (N,)."""
    h, w = images.shape[-2:]
    if op == "identity":
        return images
    if op in ("shear_x", "shear_y", "translate_x", "translate_y", "rotate"):
        return _affine(images, _inverse_map(op, value, h, w))
    if op == "brightness":
        return _blend(images, torch.zeros(()), 1 + value)
    if op == "color":
        return _blend(images, _grey(images), 1 + value)
    if op == "contrast":
        return _blend(images, _grey(images).mean(dim=(1, 2, 3), keepdim=True), 1 + value)
    if op == "sharpness":
        return _blend(images, _sharpness_degenerate(images), 1 + value)
    if op == "posterize":  # keep the top `value` bits
        keep = (0xFF << (8 - value.long())).view(-1, 1, 1, 1) & 0xFF
        return (images.long() & keep).to(torch.uint8)
    if op == "solarize":  # invert the levels at or above the threshold
        return torch.where(images.float() >= value.view(-1, 1, 1, 1), 255 - images, images)
    if op == "autocontrast":
        return _autocontrast(images)
    if op == "equalize":
        return _equalize(images)
    raise ValueError(f"unknown RandAugment op {op!r}")


SIGNED = {"shear_x", "shear_y", "translate_x", "translate_y", "rotate", "brightness", "color", "contrast", "sharpness"}


def rand_augment(
    images: torch.Tensor, generator: torch.Generator, num_ops: int = 2, magnitude: int = 9, bins: int = 31
) -> torch.Tensor:
    """RandAugment on uint8 images (N, C, H, W): `num_ops` rounds; in each, every image draws one
    of RAND_AUGMENT_OPS uniformly and a sign, and each op runs once on the images that drew it."""
    n = len(images)
    magnitudes = rand_augment_magnitudes(images.shape[-1], magnitude, bins)
    for _ in range(num_ops):
        ops = torch.randint(0, len(RAND_AUGMENT_OPS), (n,), generator=generator)
        signs = torch.where(torch.rand(n, generator=generator) < 0.5, -1.0, 1.0)
        images = images.clone()
        for k, op in enumerate(RAND_AUGMENT_OPS):
            chosen = (ops == k).nonzero().squeeze(1)
            if op == "identity" or not len(chosen):
                continue
            value = torch.full((len(chosen),), magnitudes.get(op, 0.0))
            if op in SIGNED:
                value = value * signs[chosen]
            images[chosen] = apply_op(op, images[chosen], value)
    return images


AUGMENTATIONS = {
    "crop_flip": lambda pixels, g: to_unit(crop_flip(pixels, g)),
    "crop_flip_randaugment": lambda pixels, g: to_unit(rand_augment(crop_flip(pixels, g), g)),
    "random_resized_crop": lambda pixels, g: random_resized_crop(to_unit(pixels), g),
}
"""By name, for configs, each from the stored uint8 pixels to float images in [0, 1]: crop_flip for
CIFAR-like 32x32 sets, crop_flip_randaugment for them with RandAugment on top (the paper's CIFAR and
Tiny-ImageNet recipe), random_resized_crop for ImageNet-like sets."""
Augmentation = Literal[tuple(AUGMENTATIONS)]  # type: ignore[valid-type]
"""The names a config may give (DataConfig.augment): the registry's keys."""
