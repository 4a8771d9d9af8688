"""The one typed configuration of a training run (model + optimisation + data
+ evaluation + checkpoints), validated once when it is built.

Each field is declared once, here: its type (Literal for a choice, so the
platform's JSON Schema lists the values), its default, and in __post_init__
its bounds, with an error that names the field. The platform's spec validates
these dataclasses through pydantic, so these checks are the spec's too.
"""

from dataclasses import asdict, dataclass, field, fields
from typing import Literal

from lipnext.augment import Augmentation
from lipnext.config import LipNeXtConfig, require, require_choice
from lipnext.orthogonal import ExpSizing

Precision = Literal["fp32", "bf16"]
IncrementDtype = Literal["bfloat16", "float32"]
"""Dtype of the manifold step's matmuls (lipnext.manifold); the weights stay fp32."""
Device = Literal["auto", "cpu", "cuda"]


def _require_count(name: str, value, low: int) -> None:
    """An integer field of at least `low`: 1 (a count) or 0 (a period, where 0 disables)."""
    rule = "be a positive integer" if low == 1 else "be a non-negative integer"
    require(isinstance(value, int) and value >= low, name, rule, value)


@dataclass(frozen=True)
class OptimConfig:
    lr: float = 3e-3
    """Peak learning rate of every parameter group."""
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.0
    """Decoupled weight decay of the non-orthogonal parameters (the reference uses none)."""
    warmup_fraction: float = 0.05
    """Share of the steps with a linear warm-up, the rest a cosine decay to 0."""
    grad_clip: float = 3.0
    """Max global gradient norm (LiResNet++ clips at 3); 0 disables."""
    lookahead_steps: int = 6
    """Manifold Lookahead period in steps (LiResNet++: 6); 0 disables."""
    lookahead_alpha: float = 0.5
    """Fraction of the fast weights' path the slow weights move by at each sync."""
    reorthogonalize_every: int = 100
    """Polar re-projection period in steps; 0 disables."""
    ema_decay: float = 0.0
    """Decay of an exponential moving average of the weights, kept on the
    manifold and used for evaluation; 0 disables."""
    increment_dtype: IncrementDtype = "bfloat16"
    """Dtype of the orthogonal updates' matmuls (direction, powers of exp(A)); the weights,
    moments and the accumulation W + W (exp(A) - I) stay fp32, and project() at every epoch
    end makes them exact again. bf16: 3x faster steps at width 1024 on these CPUs
    (benchmarks/results/manifold_step.json); float32: every matmul in fp32."""
    exp_sizing: ExpSizing = "rho"
    """FastExp's Taylor order rule: 'rho' (by sqrt(||A^2||_F), ours) or 'frobenius' (the paper's,
    by ||A||_F at 0.05 / 0.25 / 1), lipnext.orthogonal.exp_order."""

    def __post_init__(self):
        require(self.lr > 0, "lr", "be positive", self.lr)
        betas_ok = len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas)
        require(betas_ok, "betas", "be two values in [0, 1)", self.betas)
        require(self.weight_decay >= 0, "weight_decay", "not be negative", self.weight_decay)
        require(0 <= self.warmup_fraction < 1, "warmup_fraction", "lie in [0, 1)", self.warmup_fraction)
        require(self.grad_clip >= 0, "grad_clip", "not be negative (0 disables)", self.grad_clip)
        _require_count("lookahead_steps", self.lookahead_steps, 0)
        require(0 < self.lookahead_alpha <= 1, "lookahead_alpha", "lie in (0, 1]", self.lookahead_alpha)
        _require_count("reorthogonalize_every", self.reorthogonalize_every, 0)
        require(0 <= self.ema_decay < 1, "ema_decay", "lie in [0, 1)", self.ema_decay)
        require_choice("increment_dtype", self.increment_dtype, IncrementDtype)
        require_choice("exp_sizing", self.exp_sizing, ExpSizing)

    def optimizer_kwargs(self) -> dict:
        """ManifoldAdamW's keyword arguments (lipnext.manifold), the one copy of them."""
        return dict(
            lr=self.lr, betas=self.betas, weight_decay=self.weight_decay, lookahead_steps=self.lookahead_steps,
            lookahead_alpha=self.lookahead_alpha, reorthogonalize_every=self.reorthogonalize_every,
            ema_decay=self.ema_decay, increment_dtype=self.increment_dtype, exp_sizing=self.exp_sizing,
        )  # fmt: skip


@dataclass(frozen=True)
class LossConfig:
    eps_train: float = 36 / 255
    """Radius (raw pixels) the offset cross-entropy asks every sample to be certified at."""
    eps_ramp_fraction: float = 0.5
    """Share of training over which eps_train ramps up linearly from 0 (the reference: half)."""
    temperature: float = 0.25

    def __post_init__(self):
        require(self.eps_train >= 0, "eps_train", "not be negative", self.eps_train)
        require(0 <= self.eps_ramp_fraction <= 1, "eps_ramp_fraction", "lie in [0, 1]", self.eps_ramp_fraction)
        # The logits are divided by the temperature: 0 makes the first loss NaN.
        require(self.temperature > 0, "temperature", "be positive", self.temperature)


@dataclass(frozen=True)
class DataConfig:
    uri: str = "data/digits"
    """A dataset in the Parquet shard format (`lipscale data convert`): a path, file:// or s3://."""
    batch_size: int = 128
    """Global batch: split evenly over the workers."""
    augment: Augmentation | None = None
    """'crop_flip' (CIFAR-like), 'random_resized_crop' (ImageNet) or None (lipnext.augment)."""
    prefetch: int = 4
    """Batches the loader keeps ready."""

    def __post_init__(self):
        require(isinstance(self.batch_size, int) and self.batch_size >= 1, "batch_size", "be positive", self.batch_size)
        require_choice("augment", self.augment, Augmentation, optional=True)
        _require_count("prefetch", self.prefetch, 1)


@dataclass(frozen=True)
class CheckpointConfig:
    every_epochs: int = 1
    """Checkpoint period in epochs; 0 checkpoints only at the end."""
    keep: int = 2
    """Checkpoints kept (Ray's num_to_keep, or local directories without Ray)."""
    dir: str | None = None
    """Local directory for checkpoints when running without Ray; None disables."""

    def __post_init__(self):
        _require_count("every_epochs", self.every_epochs, 0)
        _require_count("keep", self.keep, 1)


@dataclass(frozen=True)
class TrainConfig:
    model: LipNeXtConfig
    optim: OptimConfig = field(default_factory=OptimConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    data: DataConfig = field(default_factory=DataConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    epochs: int = 10
    eval_every_epochs: int = 1
    """Evaluate on the test split every k epochs, and always after the last."""
    audit_points: int = 64
    """Test points whose certificates every evaluation attacks with PGD (lipnext.audit); 0 disables."""
    seed: int = 0
    precision: Precision = "fp32"
    """'fp32' or 'bf16' (bf16 compute; fp32 weights, gradient reduction and optimizer state)."""
    device: Device = "auto"
    """'cpu', 'cuda' or 'auto' (cuda when available)."""

    def __post_init__(self):
        require(isinstance(self.epochs, int) and self.epochs >= 1, "epochs", "be positive", self.epochs)
        _require_count("eval_every_epochs", self.eval_every_epochs, 1)
        _require_count("audit_points", self.audit_points, 0)
        require_choice("precision", self.precision, Precision)
        require_choice("device", self.device, Device)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        parts = {"model": LipNeXtConfig, "optim": OptimConfig, "loss": LossConfig, "data": DataConfig}
        parts["checkpoint"] = CheckpointConfig
        kwargs = {k: v for k, v in d.items() if k not in parts}
        for name, kind in parts.items():
            if name in d:
                kwargs[name] = kind(**_tuples(kind, d[name]))
        return cls(**kwargs)


def _tuples(kind, values: dict) -> dict:
    """JSON and YAML give lists where the dataclasses hold tuples."""
    tuple_fields = {f.name for f in fields(kind) if str(f.type).startswith("tuple")}
    return {k: tuple(v) if k in tuple_fields and isinstance(v, list) else v for k, v in values.items()}
