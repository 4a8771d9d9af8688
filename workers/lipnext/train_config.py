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
from lipnext.loss import LossKind, training_eps
from lipnext.orthogonal import ExpSizing

Precision = Literal["fp32", "bf16"]
IncrementDtype = Literal["bfloat16", "float32"]
"""Dtype of the manifold step's matmuls (lipnext.manifold); the weights stay fp32."""
Device = Literal["auto", "cpu", "cuda"]
ActivationCheckpointing = Literal["none", "block"]
"""What backward recomputes instead of keeping (lipnext.parallelize)."""
Moments = Literal["adam", "nadam"]
"""The first moment's use in the step: Adam's, or NAdam's Nesterov look-ahead (lipnext.manifold)."""


def _require_count(name: str, value, low: int) -> None:
    """An integer field of at least `low`: 1 (a count) or 0 (a period, where 0 disables)."""
    rule = "be a positive integer" if low == 1 else "be a non-negative integer"
    require(isinstance(value, int) and value >= low, name, rule, value)


@dataclass(frozen=True)
class OptimConfig:
    lr: float = 3e-3
    """Peak learning rate of every parameter group."""
    betas: tuple[float, float] = (0.9, 0.999)
    moments: Moments = "adam"
    """'adam' or 'nadam' (torch.optim.NAdam's rule, LiResNet++'s optimiser), for every parameter:
    on the orthogonal ones in the Lie algebra, as for Euclidean ones."""
    momentum_decay: float = 4e-3
    """NAdam's momentum decay psi (torch's default, LiResNet++'s)."""
    weight_decay: float = 0.0
    """Decoupled weight decay of the non-orthogonal parameters (the reference uses none)."""
    warmup_epochs: float = 1.0
    """Epochs of linear warm-up (LiResNet++: 20 of 800), then a cosine decay to lr_floor."""
    lr_floor: float = 1e-5
    """The learning rate the cosine ends at (LiResNet++: 1e-5)."""
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
    end makes them exact again. bf16: the optimizer step on two width-1024 blocks' four
    matrices 1.9x faster than float32 here (one thread, AMX; benchmarks/manifold_step.py);
    float32: every matmul in fp32."""
    exp_sizing: ExpSizing = "rho"
    """FastExp's Taylor order rule: 'rho' (by sqrt(||A^2||_F), ours) or 'frobenius' (the paper's,
    by ||A||_F at 0.05 / 0.25 / 1), lipnext.orthogonal.exp_order."""

    def __post_init__(self):
        require(self.lr > 0, "lr", "be positive", self.lr)
        betas_ok = len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas)
        require(betas_ok, "betas", "be two values in [0, 1)", self.betas)
        require(self.weight_decay >= 0, "weight_decay", "not be negative", self.weight_decay)
        require_choice("moments", self.moments, Moments)
        require(0 <= self.momentum_decay < 1, "momentum_decay", "lie in [0, 1)", self.momentum_decay)
        require(self.warmup_epochs >= 0, "warmup_epochs", "not be negative", self.warmup_epochs)
        require(0 <= self.lr_floor <= self.lr, "lr_floor", f"lie in [0, lr={self.lr}]", self.lr_floor)
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
            lr=self.lr, betas=self.betas, moments=self.moments, momentum_decay=self.momentum_decay,
            weight_decay=self.weight_decay, lookahead_steps=self.lookahead_steps,
            lookahead_alpha=self.lookahead_alpha, reorthogonalize_every=self.reorthogonalize_every,
            ema_decay=self.ema_decay, increment_dtype=self.increment_dtype, exp_sizing=self.exp_sizing,
        )  # fmt: skip


@dataclass(frozen=True)
class LossConfig:
    kind: LossKind = "emma"
    """'emma' (a margin per class pair, the paper's) or 'offset_ce' (one sqrt(2) L eps margin), lipnext.loss."""
    eps_train: float = 36 / 255
    """The base training radius (raw pixels); epoch t trains at eps_train times a factor
    rising from eps_start to eps_peak over eps_ramp_fraction of training (lipnext.loss.training_eps)."""
    eps_start: float = 0.1
    """The factor at the first epoch (LiResNet++: 0.1, i.e. 3.6/255)."""
    eps_peak: float = 3.0
    """The factor reached at eps_ramp_fraction of training and held: the maximum radius is
    eps_peak * eps_train (LiResNet++: 3, 108/255, on CIFAR and Tiny-ImageNet; 2 on ImageNet)."""
    eps_ramp_fraction: float = 0.5
    """Share of the epochs over which the factor rises (LiResNet++: half); 0: the peak throughout."""
    temperature: float = 0.25
    """The logits (with their margins) are divided by it inside the cross-entropy, the loss
    multiplied by it; the paper's EMMA is plain cross-entropy (1)."""

    def __post_init__(self):
        require_choice("kind", self.kind, LossKind)
        require(self.eps_train >= 0, "eps_train", "not be negative", self.eps_train)
        require(self.eps_start >= 0, "eps_start", "not be negative", self.eps_start)
        require(self.eps_peak >= self.eps_start, "eps_peak", f"be at least eps_start={self.eps_start}", self.eps_peak)
        require(0 <= self.eps_ramp_fraction <= 1, "eps_ramp_fraction", "lie in [0, 1]", self.eps_ramp_fraction)
        # The logits are divided by the temperature: 0 makes the first loss NaN.
        require(self.temperature > 0, "temperature", "be positive", self.temperature)

    def eps(self, epoch: int, epochs: int) -> float:
        """The training radius of `epoch` (0-based) of `epochs`."""
        return training_eps(epoch, epochs, self.eps_train, self.eps_start, self.eps_peak, self.eps_ramp_fraction)


@dataclass(frozen=True)
class DataConfig:
    uri: str = "data/digits"
    """A dataset in the Parquet shard format (`lipscale data convert`): a path, file:// or s3://."""
    batch_size: int = 128
    """Global batch: split evenly over the workers."""
    micro_batch_size: int | None = None
    """Samples per rank in each forward and backward; the per-rank batch (batch_size / workers)
    must be a multiple of it, and one optimizer step takes the whole global batch (gradients
    accumulated over the micro-batches). None: the per-rank batch at once, or in a study with
    budget.memory_per_worker_gib the largest that the planner fits (`lipscale plan`)."""
    augment: Augmentation | None = None
    """'crop_flip' (CIFAR-like), 'crop_flip_randaugment' (the paper's CIFAR and Tiny-ImageNet
    recipe), 'random_resized_crop' (ImageNet) or None (lipnext.augment)."""
    prefetch: int = 4
    """Batches the loader keeps ready."""

    def __post_init__(self):
        require(isinstance(self.batch_size, int) and self.batch_size >= 1, "batch_size", "be positive", self.batch_size)
        if self.micro_batch_size is not None:
            _require_count("micro_batch_size", self.micro_batch_size, 1)
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
    activation_checkpointing: ActivationCheckpointing = "none"
    """'block': backward recomputes each block from its input instead of keeping the block's
    saved tensors (3 token-sized ones and M R^T), for one more forward of the blocks;
    'none' keeps everything."""
    compile: bool = False
    """torch.compile each block's forward (inductor). Off by default: on these CPUs it gained
    nothing measurable (0.94x and 1.08x the eager step at digits width 128 and cifar-l8w256,
    benchmarks/results/step_options.json) for a compile per input shape; on a GPU it is
    untried."""

    def __post_init__(self):
        require(isinstance(self.epochs, int) and self.epochs >= 1, "epochs", "be positive", self.epochs)
        _require_count("eval_every_epochs", self.eval_every_epochs, 1)
        _require_count("audit_points", self.audit_points, 0)
        require_choice("precision", self.precision, Precision)
        require_choice("device", self.device, Device)
        require_choice("activation_checkpointing", self.activation_checkpointing, ActivationCheckpointing)
        require(isinstance(self.compile, bool), "compile", "be true or false", self.compile)

    def per_rank_batch(self, world: int) -> tuple[int, int]:
        """(samples per rank per step, micro-batches per step) on `world` ranks; raises
        ValueError, naming the field, when the batches do not split so."""
        if self.data.batch_size % world:
            raise ValueError(f"data.batch_size={self.data.batch_size} does not split over {world} workers")
        batch = self.data.batch_size // world
        micro = self.data.micro_batch_size or batch
        if batch % micro:
            raise ValueError(
                f"data.micro_batch_size={micro} does not divide the batch per worker, {batch} "
                f"(data.batch_size={self.data.batch_size} over {world})"
            )
        return batch, batch // micro

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
