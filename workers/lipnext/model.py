"""LipNeXt: an exactly 1-Lipschitz, convolution-free image classifier.

    tokens = stem(normalize(images))                 patch embedding, semi-orthogonal
    x <- beta_abs(M R^T S(R (x + p)) + b)            L blocks
    logits = head(l2_pool(x))                        unit-norm class vectors

Plain PyTorch: sharding, mixed precision and checkpointing are applied from
outside (lipnext.parallelize, lipnext.checkpoint).
"""

import torch
import torch.nn.functional as F
from torch import nn

from lipnext.config import LipNeXtConfig
from lipnext.layers import (
    BetaAbs,
    L2SpatialPool,
    Normalize,
    OrthogonalLinear,
    PatchStem,
    SpatialShift,
    UnitNormHead,
)


def shift_distance(config: LipNeXtConfig, block_index: int) -> int:
    if config.shift_pattern == "none":
        return 0
    if config.shift_pattern == "dilated":
        return 1 + block_index % 2
    return 1


class LipNeXtBlock(nn.Module):
    """Z = beta_abs(M R^T S(R(X + p)) + b) on tokens (N, H, W, C)."""

    def __init__(self, config: LipNeXtConfig, block_index: int):
        super().__init__()
        c, g = config.width, config.grid_size
        # Circular shifts carry no position, so every block adds a learned map (H, W, 1).
        self.pos = nn.Parameter(torch.empty(g, g, 1))
        self.basis = OrthogonalLinear(c, c)  # R: the basis in which channels are shifted
        self.shift = SpatialShift(c, config.shift_ratio, shift_distance(config, block_index))
        self.mix = OrthogonalLinear(c, c, bias=True)  # M and b
        self.act = BetaAbs(c, config.beta)

    def init_weights(self, generator=None):
        nn.init.normal_(self.pos, std=0.02, generator=generator)
        self.basis.init_weights(generator)
        self.mix.init_weights(generator)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.shift(self.basis(x + self.pos))
        # With T tokens per step, forming M R^T costs 2C^3 FLOPs and saves
        # applying R^T, 2TC^2 (a third of the block's matmuls): worth it, in
        # backward too, exactly when T > C.
        if x.numel() // x.shape[-1] > x.shape[-1]:
            mixed = F.linear(x, self.mix.weight @ self.basis.weight.T, self.mix.bias)
        else:
            mixed = self.mix(F.linear(x, self.basis.weight.T))
        return self.act(mixed)


class LipNeXt(nn.Module):
    def __init__(self, config: LipNeXtConfig):
        super().__init__()
        self.config = config
        self.normalize = Normalize(config.input_mean, config.input_std)
        self.stem = PatchStem(config.in_channels, config.patch_size, config.width)
        self.blocks = nn.ModuleList(LipNeXtBlock(config, i) for i in range(config.depth))
        self.pool = L2SpatialPool()
        self.head = UnitNormHead(config.width, config.num_classes)
        self.init_weights()

    def parts(self) -> list[nn.Module]:
        """The modules that initialise themselves, each from its own generator."""
        return [self.normalize, self.stem, *self.blocks, self.head]

    @staticmethod
    def part_generator(seed: int, index: int) -> torch.Generator:
        return torch.Generator().manual_seed(seed * 100_003 + index)

    @torch.no_grad()
    def init_weights(self, seed: int | None = None):
        """(Re)initialise every parameter and buffer in place. Part i draws from
        its own generator seeded by (seed, i), so a sharded model initialised
        part by part (lipnext.parallelize) gets the same weights. Without a
        seed, one is drawn from torch's global generator."""
        if seed is None:
            seed = int(torch.randint(0, 2**31, (), device="cpu"))
        for i, part in enumerate(self.parts()):
            part.init_weights(self.part_generator(seed, i))

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """The 1-Lipschitz feature map (with std = 1): raw images -> (N, width)."""
        x = self.stem(self.normalize(images))
        for block in self.blocks:
            x = block(x)
        return self.pool(x)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Raw images (N, C, H, W) in [0, 1] -> logits (N, num_classes)."""
        return self.head(self.features(images))


def param_counts(config: LipNeXtConfig) -> dict[str, int]:
    """Parameters by part, counted on the meta device (nothing is allocated).

    `block_weights` are the R and M matrices, exactly 2 * depth * width**2;
    `block_other` holds the blocks' biases and positional maps.
    """
    with torch.device("meta"):
        model = LipNeXt(config)
    counts = {"stem": model.stem.proj.weight.numel(), "head": model.head.weight.numel()}
    counts["block_weights"] = sum(b.basis.weight.numel() + b.mix.weight.numel() for b in model.blocks)
    counts["block_other"] = sum(b.pos.numel() + b.mix.bias.numel() for b in model.blocks)
    counts["total"] = sum(p.numel() for p in model.parameters())
    return counts


def train_flops_per_sample(config: LipNeXtConfig, batch: int) -> float:
    """Forward + backward FLOPs per sample at a given batch, counted by
    FlopCounterMode on the meta device (nothing runs, nothing is allocated).
    It depends on the batch: once a step has more tokens than channels, M R^T
    is formed for 2 W^3 per block per step, shared by the batch."""
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):
        model = LipNeXt(config)
        images = torch.empty(batch, config.in_channels, config.image_size, config.image_size)
        with FlopCounterMode(display=False) as counter:
            model(images).sum().backward()
    return counter.get_total_flops() / batch
