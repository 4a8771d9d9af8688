"""The one typed configuration of a training run (model + optimisation + data
+ evaluation + checkpoints), validated once when it is built."""

from dataclasses import asdict, dataclass, field, fields

from lipnext.config import LipNeXtConfig, preset


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
    lookahead_alpha: float = 0.5
    reorthogonalize_every: int = 100
    """Polar re-projection period in steps; 0 disables."""
    ema_decay: float = 0.0
    """Decay of an exponential moving average of the weights, kept on the
    manifold and used for evaluation; 0 disables."""

    def __post_init__(self):
        if self.lr <= 0:
            raise ValueError(f"lr must be positive, got {self.lr}")
        if not 0 <= self.warmup_fraction < 1:
            raise ValueError(f"warmup_fraction must lie in [0, 1), got {self.warmup_fraction}")
        if not 0 <= self.ema_decay < 1:
            raise ValueError(f"ema_decay must lie in [0, 1), got {self.ema_decay}")

    def optimizer_kwargs(self) -> dict:
        """ManifoldAdamW's keyword arguments (lipnext.manifold), the one copy of them."""
        return dict(
            lr=self.lr, betas=self.betas, weight_decay=self.weight_decay, lookahead_steps=self.lookahead_steps,
            lookahead_alpha=self.lookahead_alpha, reorthogonalize_every=self.reorthogonalize_every,
            ema_decay=self.ema_decay,
        )


@dataclass(frozen=True)
class LossConfig:
    eps_train: float = 36 / 255
    """Radius (raw pixels) the offset cross-entropy asks every sample to be certified at."""
    eps_ramp_fraction: float = 0.5
    """Share of training over which eps_train ramps up linearly from 0 (the reference: half)."""
    temperature: float = 0.25

    def __post_init__(self):
        # The logits are divided by the temperature: 0 makes the first loss NaN.
        if self.temperature <= 0:
            raise ValueError(f"temperature must be positive, got {self.temperature}")
        if self.eps_train < 0:
            raise ValueError(f"eps_train must not be negative, got {self.eps_train}")


@dataclass(frozen=True)
class DataConfig:
    uri: str = "data/digits"
    """A dataset in the Parquet shard format (`lipscale data convert`): a path, file:// or s3://."""
    batch_size: int = 128
    """Global batch: split evenly over the workers."""
    augment: str | None = None
    """'crop_flip' (CIFAR-like), 'random_resized_crop' (ImageNet) or None."""
    prefetch: int = 4

    def __post_init__(self):
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {self.batch_size}")


@dataclass(frozen=True)
class CheckpointConfig:
    every_epochs: int = 1
    """Checkpoint period in epochs; 0 checkpoints only at the end."""
    keep: int = 2
    """Checkpoints kept (Ray's num_to_keep, or local directories without Ray)."""
    dir: str | None = None
    """Local directory for checkpoints when running without Ray; None disables."""


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
    seed: int = 0
    precision: str = "fp32"
    """'fp32' or 'bf16' (bf16 compute; fp32 weights, gradient reduction and optimizer state)."""
    device: str = "auto"
    """'cpu', 'cuda' or 'auto' (cuda when available)."""

    def __post_init__(self):
        if self.epochs < 1:
            raise ValueError(f"epochs must be positive, got {self.epochs}")
        if self.precision not in ("fp32", "bf16"):
            raise ValueError(f"precision must be 'fp32' or 'bf16', got {self.precision!r}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"device must be 'auto', 'cpu' or 'cuda', got {self.device!r}")

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


def default_config(preset_name: str = "digits", **changes) -> TrainConfig:
    return TrainConfig(model=preset(preset_name), **changes)
