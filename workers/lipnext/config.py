"""LipNeXt model configuration and the named presets.

Names follow the paper: L32W1024 = 32 blocks of width 1024. Choices the paper
does not publish (stem, patch size, head, normalisation) are ours and are
marked so; see ../shared/reference/lipnext.md.
"""

from dataclasses import asdict, dataclass, replace
from typing import Literal, get_args

ShiftPattern = Literal["four", "dilated", "none"]


def require(ok: bool, field: str, rule: str, value) -> None:
    """Raises ValueError("<field> must <rule>, got <value>") unless ok. Every config check
    names its field this way, and the platform's spec (pydantic) shows the error at the
    field's place in the spec."""
    if not ok:
        raise ValueError(f"{field} must {rule}, got {value!r}")


def require_choice(field: str, value, kind, optional: bool = False) -> None:
    """`value` must be one of the values of the Literal type `kind` (or None, if optional)."""
    choices = get_args(kind) + ((None,) if optional else ())
    require(value in choices, field, f"be one of {choices}", value)


@dataclass(frozen=True)
class LipNeXtConfig:
    width: int
    """Channels C of every block; the block weights are 2 * depth * width**2."""
    depth: int
    """Number of LipNeXt blocks L."""
    image_size: int
    """Side of the square input image in pixels."""
    in_channels: int
    """Colour channels of the input image."""
    patch_size: int
    """Side of the non-overlapping patches that the stem embeds (ours)."""
    num_classes: int
    """Number of logits."""
    beta: float = 0.5
    """Fraction of channels that beta-Abs folds with |x|; the rest pass through."""
    shift_ratio: float = 1 / 8
    """Fraction of channels shifted in each of the four directions."""
    shift_pattern: ShiftPattern = "four"
    """'four': distance 1 in every block; 'dilated': distance 1 and 2 in
    alternate blocks; 'none': no spatial mixing (ablation)."""
    input_mean: tuple[float, ...] = (0.5,)
    """Per-channel mean subtracted from raw [0, 1] pixels (one value broadcasts)."""
    input_std: tuple[float, ...] = (1.0,)
    """Per-channel std the pixels are divided by; it scales the certified
    Lipschitz bound by 1 / min(std), so presets keep 1.0 (ours)."""

    def __post_init__(self):
        for name in ("width", "depth", "image_size", "in_channels", "patch_size", "num_classes"):
            value = getattr(self, name)
            require(isinstance(value, int) and value >= 1, name, "be a positive integer", value)
        if self.image_size % self.patch_size:
            raise ValueError(f"patch_size: {self.patch_size} does not divide image_size {self.image_size}")
        require(0.0 <= self.beta <= 1.0, "beta", "lie in [0, 1]", self.beta)
        require_choice("shift_pattern", self.shift_pattern, ShiftPattern)
        if self.shift_pattern != "none":
            require(0.0 < self.shift_ratio <= 0.25, "shift_ratio", "lie in (0, 1/4]", self.shift_ratio)
            if (self.width * self.shift_ratio) % 1:
                raise ValueError(
                    f"width: {self.width} channels cannot be split into shift groups of ratio {self.shift_ratio}"
                )
        if (self.width * self.beta) % 1:
            raise ValueError(f"beta: {self.beta} * width {self.width} is not a whole number of channels")
        for name in ("input_mean", "input_std"):
            values = getattr(self, name)
            if len(values) not in (1, self.in_channels):
                raise ValueError(f"{name} needs 1 or in_channels={self.in_channels} values, got {len(values)}")
        require(min(self.input_std) > 0, "input_std", "be positive", self.input_std)

    @property
    def grid_size(self) -> int:
        """Side of the token grid after the patch stem."""
        return self.image_size // self.patch_size

    @property
    def patch_dim(self) -> int:
        """Length of one flattened patch: the stem's input size."""
        return self.in_channels * self.patch_size**2

    def data_mismatch(self, shape: tuple[int, int, int], classes: int) -> str | None:
        """Why a dataset of (C, H, W) images in `classes` classes cannot feed this model; None if it can."""
        wanted = (self.in_channels, self.image_size, self.image_size)
        if tuple(shape) == wanted and classes == self.num_classes:
            return None
        return f"holds {tuple(shape)} images of {classes} classes; the model takes {wanted} and {self.num_classes}"

    def to_dict(self) -> dict:
        return asdict(self)

    def replace(self, **changes) -> "LipNeXtConfig":
        return replace(self, **changes)


_CIFAR = dict(image_size=32, in_channels=3, patch_size=4, input_mean=(0.4914, 0.4822, 0.4465))
_TINY_IMAGENET = dict(image_size=64, in_channels=3, patch_size=8, num_classes=200, input_mean=(0.480, 0.448, 0.398))
_IMAGENET = dict(image_size=224, in_channels=3, patch_size=16, num_classes=1000, input_mean=(0.485, 0.456, 0.406))
_DIGITS = dict(image_size=8, in_channels=1, patch_size=2, num_classes=10, input_mean=(0.3,))

PRESETS: dict[str, LipNeXtConfig] = {
    # CPU-sized: the tests and the default study (scikit-learn digits, 8x8 grey).
    "tiny": LipNeXtConfig(width=32, depth=2, **_DIGITS),
    "digits": LipNeXtConfig(width=64, depth=4, **_DIGITS),
    # A mid-size CIFAR model that a 2-core machine can still step: benchmarks.
    "cifar-l8w256": LipNeXtConfig(width=256, depth=8, num_classes=10, **_CIFAR),
    # The paper's models.
    "cifar-l32w1024": LipNeXtConfig(width=1024, depth=32, num_classes=10, **_CIFAR),
    "cifar-l32w2048": LipNeXtConfig(width=2048, depth=32, num_classes=10, **_CIFAR),
    "tinyimagenet-l32w2048": LipNeXtConfig(width=2048, depth=32, **_TINY_IMAGENET),
    "imagenet-1b": LipNeXtConfig(width=4096, depth=32, **_IMAGENET),
    "imagenet-2b": LipNeXtConfig(width=4096, depth=64, **_IMAGENET),  # the paper's 2B shape is unknown (ours)
}


def preset(name: str, **overrides) -> LipNeXtConfig:
    """The named preset, optionally with some fields replaced."""
    if name not in PRESETS:
        raise KeyError(f"unknown preset {name!r}; known: {', '.join(PRESETS)}")
    return PRESETS[name].replace(**overrides)
