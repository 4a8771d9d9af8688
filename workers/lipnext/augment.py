"""Batch augmentations in plain torch (no torchvision), on float images
(N, C, H, W) in [0, 1]. Each takes the generator that owns its randomness, so
a resumed loader redraws exactly the same crops."""

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


AUGMENTATIONS = {"crop_flip": crop_flip, "random_resized_crop": random_resized_crop}
"""By name, for configs: crop_flip for CIFAR-like 32x32 sets, random_resized_crop for ImageNet-like sets."""
Augmentation = Literal[tuple(AUGMENTATIONS)]  # type: ignore[valid-type]
"""The names a config may give (DataConfig.augment): the registry's keys."""
