"""The 1-Lipschitz building blocks of LipNeXt, each plain PyTorch.

Feature maps are channels-last, (N, H, W, C), so every channel map is one
matmul over the last dimension. Every module with weights owns an
`init_weights(generator)` (orthogonal initialisation lives there, not in
__init__) that draws only from the generator it is given, so a model built
on the meta device and sharded can be initialised part by part exactly as an
unsharded one (lipnext.parallelize).
"""

import torch
import torch.nn.functional as F
from torch import nn


class Normalize(nn.Module):
    """(x - mean) / std per input channel, for images (N, C, H, W) in [0, 1].

    Its Lipschitz constant is 1 / min(std); the certificate folds it in.
    """

    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...]):
        super().__init__()
        self.mean_values, self.std_values = mean, std
        # Not persistent: they come from the config, so a checkpoint need not hold them.
        self.register_buffer("mean", torch.empty(len(mean), 1, 1), persistent=False)
        self.register_buffer("std", torch.empty(len(std), 1, 1), persistent=False)

    def init_weights(self, generator=None):
        self.mean.copy_(torch.tensor(self.mean_values).view(-1, 1, 1))
        self.std.copy_(torch.tensor(self.std_values).view(-1, 1, 1))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return (images - self.mean) / self.std


class OrthogonalLinear(nn.Module):
    """y = x W^T (+ b) with W orthogonal, or semi-orthogonal when rectangular.

    W is an ordinary Parameter: the manifold optimizer keeps it on the
    orthogonal group (square) or the Stiefel manifold (rectangular), and the
    certificate measures how far it has drifted. With out >= in the columns are
    orthonormal and the map is an isometry; with out < in the rows are and the
    map is a contraction.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = False):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self.bias = nn.Parameter(torch.empty(out_features)) if bias else None

    def init_weights(self, generator=None):
        nn.init.orthogonal_(self.weight, generator=generator)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


class PatchStem(nn.Module):
    """Cuts (N, C, H, W) into non-overlapping p x p patches and embeds each flat
    patch with a semi-orthogonal map, giving tokens (N, H/p, W/p, width).

    Cutting patches only permutes pixels, so the stem's Lipschitz constant is
    that of its projection (<= 1).
    """

    def __init__(self, in_channels: int, patch_size: int, width: int):
        super().__init__()
        self.patch_size = patch_size
        self.proj = OrthogonalLinear(in_channels * patch_size**2, width)

    def init_weights(self, generator=None):
        self.proj.init_weights(generator)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        n, c, h, w = images.shape
        p = self.patch_size
        patches = images.reshape(n, c, h // p, p, w // p, p).permute(0, 2, 4, 1, 3, 5)
        return self.proj(patches.reshape(n, h // p, w // p, c * p * p))


def shift_channels(x: torch.Tensor, group: int, distance: int) -> torch.Tensor:
    """Rolls four groups of `group` channels of (N, H, W, C) up, down, left and
    right by `distance`, circularly; the remaining channels stay put."""
    g, d = group, distance
    return torch.cat(
        [
            x[..., 0 * g : 1 * g].roll(-d, dims=1),  # up: row h takes row h + d
            x[..., 1 * g : 2 * g].roll(d, dims=1),  # down
            x[..., 2 * g : 3 * g].roll(-d, dims=2),  # left
            x[..., 3 * g : 4 * g].roll(d, dims=2),  # right
            x[..., 4 * g :],
        ],
        dim=-1,
    )


class _Shift(torch.autograd.Function):
    """A permutation's gradient is the inverse permutation: shifting the
    gradient back costs one pass, where autograd through slice + cat would
    allocate and zero a full-size tensor per slice (~7% of a width-1024 step)."""

    @staticmethod
    def forward(ctx, x, group, distance):
        ctx.group, ctx.distance = group, distance
        return shift_channels(x, group, distance)

    @staticmethod
    def backward(ctx, grad):
        return shift_channels(grad, ctx.group, -ctx.distance), None, None


class SpatialShift(nn.Module):
    """Circularly shifts four groups of channels up, down, left and right.

    By the paper's Theorem 1 a shift is the only norm-preserving depthwise
    convolution with circular padding. The map is a permutation of the
    entries, so it is exactly 1-Lipschitz. Built out of place (roll + cat):
    overlapping in-place slice copies would corrupt the data.
    """

    def __init__(self, width: int, shift_ratio: float, distance: int):
        super().__init__()
        self.group = round(width * shift_ratio) if distance else 0
        self.distance = distance

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.group == 0:
            return x
        return _Shift.apply(x, self.group, self.distance)


class BetaAbs(nn.Module):
    """|x| on the first beta * C channels, identity on the rest (1-Lipschitz,
    elementwise; beta = 1/2 with suitable orthogonal maps reproduces MinMax)."""

    def __init__(self, width: int, beta: float):
        super().__init__()
        self.folded = round(width * beta)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # One where() instead of abs-of-a-slice + cat: no per-slice zero-filled gradients.
        folded = torch.arange(x.shape[-1], device=x.device) < self.folded
        return torch.where(folded, x.abs(), x)


class L2SpatialPool(nn.Module):
    """(N, H, W, C) -> (N, C) with out_c = sqrt(sum_hw x_hwc^2): by the reverse
    triangle inequality per channel, this is 1-Lipschitz."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.linalg.vector_norm(x, dim=(1, 2))


def unit_rows(weight: torch.Tensor) -> torch.Tensor:
    """The rows of `weight` scaled to unit L2 norm: the head's class vectors, for the
    head, its certificate (lipnext.certify) and the margin losses (lipnext.loss)."""
    return F.normalize(weight, dim=1)


class UnitNormHead(nn.Module):
    """Logits z_j = <w_j / ||w_j||, x>: class vectors of unit length ("LLN" of
    LiResNet++), so z_y - z_j has Lipschitz constant ||w_y - w_j|| <= 2 in the
    features and gives the tighter per-pair certificate."""

    def __init__(self, width: int, num_classes: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_classes, width))

    def init_weights(self, generator=None):
        nn.init.normal_(self.weight, std=self.weight.shape[1] ** -0.5, generator=generator)

    def class_vectors(self) -> torch.Tensor:
        return unit_rows(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.class_vectors())
