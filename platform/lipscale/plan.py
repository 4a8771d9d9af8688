"""What a LipNeXt train step costs before it runs: parameters, FLOPs, per-rank
memory under FSDP2 and a step time, so a study can refuse a trial that
cannot fit its resources (`plan(...).fits(bytes)`) before launching it.

    lipscale plan imagenet-1b --world-size 8 --dtype bf16 --batch 32

FLOPs count matrix multiplications only (2 per multiply-add), as
torch.utils.flop_counter does; elementwise work (shifts, beta-Abs, pooling,
the loss) is memory-bound and left out. `batch` is the samples each rank
takes per step.

Memory is counted in bytes of tensors, per rank, for one steady-state step
(optimizer state already created, gradients set to None between steps, as
`zero_grad()` does); allocator slack and the CUDA context are not included.
As lipnext.train runs it: world size 1 is one unsharded process; above it
FSDP2 shards the model the torchtitan way, every block its own unit, then
the root: fp32 weights, gradients and optimizer state sharded on dim 0
(ceil(rows / world) rows, the largest shard), weights all-gathered a block at
a time, and each orthogonal matrix gathered whole to an owner rank for its
update (lipnext.owner_exchange). bf16 is autocast's: it casts the fp32
weights as they are used. tests/test_plan.py checks the total against
measured peaks of real steps, both ways and in both dtypes.
"""

import math
import time
from dataclasses import dataclass

import torch

from lipnext import LipNeXt, LipNeXtConfig, preset
from lipnext.manifold import ManifoldAdamW, exchange_buckets, param_groups
from lipnext.owner_exchange import assign_owners

DTYPE_BYTES = {"fp32": 4, "bf16": 2}
FP32 = 4


# --- FLOPs -------------------------------------------------------------------------------


def step_flops(config: LipNeXtConfig, batch: int) -> tuple[int, int]:
    """(forward, forward + backward) matmul FLOPs of one step on `batch` samples.

    Per block, on T = B grid^2 tokens of width W: R (2TW^2), then, when T > W,
    the fused M R^T (2W^3, once per step whatever the batch: why FLOPs per
    sample fall as the batch grows) and its product with the tokens (2TW^2);
    otherwise R^T and M one after the other (2 x 2TW^2), as LipNeXtBlock
    does. Backward costs twice each forward matmul (the gradients of both
    operands), except the stem's: its input is the images, which need no gradient.
    """
    tokens = batch * config.grid_size**2
    w = config.width
    stem = 2 * tokens * config.patch_dim * w
    mix = 2 * tokens * w * w + 2 * w**3 if tokens > w else 2 * 2 * tokens * w * w
    blocks = config.depth * (2 * tokens * w * w + mix)
    head = 2 * batch * w * config.num_classes
    forward = stem + blocks + head
    return forward, forward + stem + 2 * (blocks + head)


def _update_flops(shape: tuple[int, int]) -> int:
    """ManifoldAdamW's matmuls for one (out, in) orthogonal matrix, n = max(out, in):
    the direction skew(W^T G) (2 out in n), FastExp at order 2 (one n x n
    square, 2n^3) and the retraction W exp(A) (2 out in n). Larger steps use
    FastExp's higher orders (up to 3 squares) or matrix_exp: this is the least."""
    out, inp = shape
    n = max(shape)
    return 4 * out * inp * n + 2 * n**3


# --- memory ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Memory:
    """Bytes per rank of one train step, by what holds them."""

    params: int
    """fp32 master weights (this rank's shard)."""
    grads: int
    """fp32 gradients, sharded like the weights."""
    optimizer: int
    """ManifoldAdamW state (moments, lookahead), fp32, sharded like the weights."""
    activations: int
    """Tensors saved for backward at the step's batch, in the compute dtype,
    plus the fp32 input images and backward's gradients in flight."""
    gathered: int
    """Whole weights during forward and backward: FSDP2's gathered blocks and
    root (and a block's unsharded gradients), and in bf16 autocast's cast of
    every weight."""
    optimizer_step: int
    """Transient of the optimizer step: the whole matrices (weight, gradient,
    state) that this rank owns, the exchange buffers that carry them and
    the temporaries of one update."""

    @property
    def peak(self) -> int:
        # Backward frees activations block by block while it fills the
        # gradients; both change linearly with the blocks done, so the peak is
        # at one end: all activations and no gradients, or the reverse, which
        # the optimizer step then adds to.
        return self.params + self.optimizer + max(self.activations + self.gathered, self.grads + self.optimizer_step)


@dataclass(frozen=True)
class Plan:
    config: LipNeXtConfig
    batch: int
    """Samples per rank per step."""
    world_size: int
    dtype: str
    """Compute dtype: 'fp32' or 'bf16'."""
    params: int
    forward_flops: int
    """Matmul FLOPs of one rank's forward pass per step."""
    train_flops: int
    """Forward + backward FLOPs per rank per step."""
    optimizer_flops: int
    """Matmul FLOPs of the optimizer step on the busiest owner rank (a lower bound, see _update_flops)."""
    memory: Memory
    flops_per_s: float | None
    """Sustained FLOP/s of one rank, given or measured (`measure_flops_per_s`)."""

    @property
    def forward_flops_per_sample(self) -> float:
        return self.forward_flops / self.batch

    @property
    def train_flops_per_sample(self) -> float:
        return self.train_flops / self.batch

    @property
    def step_time_s(self) -> float | None:
        if self.flops_per_s is None:
            return None
        return (self.train_flops + self.optimizer_flops) / self.flops_per_s

    def fits(self, memory_bytes: int) -> bool:
        """Whether the step's peak fits in `memory_bytes` per rank. Pass what the
        step may use: the device's memory less the CUDA context and allocator slack."""
        return self.memory.peak <= memory_bytes


def plan(
    config: LipNeXtConfig,
    *,
    batch: int,
    world_size: int = 1,
    dtype: str = "fp32",
    flops_per_s: float | None = None,
    optimizer: dict | None = None,
) -> Plan:
    """The plan of one train step; `optimizer` holds ManifoldAdamW's keyword
    arguments (e.g. lookahead_steps=0), which decide the state it keeps."""
    if dtype not in DTYPE_BYTES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPE_BYTES)}, got {dtype!r}")
    if batch < 1 or world_size < 1:
        raise ValueError(f"batch and world_size must be positive, got {batch} and {world_size}")
    with torch.device("meta"):
        model = LipNeXt(config)
        opt = ManifoldAdamW(param_groups(model), **(optimizer or {}))
    forward, train = step_flops(config, batch)
    owned = _owned_matrices(opt, world_size)
    return Plan(
        config=config, batch=batch, world_size=world_size, dtype=dtype,
        params=sum(p.numel() for p in model.parameters()),
        forward_flops=forward, train_flops=train,
        optimizer_flops=max(
            sum(_update_flops(shape) for bucket in owned for shape, _ in bucket[rank]) for rank in range(world_size)
        ),
        memory=_memory(config, model, opt, owned, batch, world_size, DTYPE_BYTES[dtype]),
        flops_per_s=flops_per_s,
    )


def _shard(shape, world: int) -> int:
    """Elements of the largest dim-0 shard, as FSDP2 (torch.chunk) cuts it."""
    if not shape:
        return 1
    return math.ceil(shape[0] / world) * math.prod(shape[1:])


def _state_shapes(opt: ManifoldAdamW, p: torch.Tensor, group: dict) -> list[tuple[int, ...]]:
    """Shapes of the tensors the optimizer keeps for p, read off its own state
    built on the meta device, so new state (say an EMA) is counted unasked."""
    return [tuple(t.shape) for t in opt._state(p, group).values() if t.dim() > 0]


def _owned_matrices(opt: ManifoldAdamW, world: int) -> list[list[list]]:
    """Per exchange bucket, per rank, [(weight shape, state shapes)] of the
    orthogonal matrices it updates: the optimizer's own bucketing and owner
    assignment (one bucket when unsharded)."""
    group = next(g for g in opt.param_groups if g["manifold"] == "stiefel")
    matrices = [(tuple(p.shape), _state_shapes(opt, p, group)) for p in group["params"]]
    if world == 1:
        return [[matrices]]
    # Whole fp32 fields per matrix: weight, state and gradient.
    sizes = [FP32 * sum(math.prod(s) for s in [shape, *states, shape]) for shape, states in matrices]
    owners = assign_owners([max(shape) for shape, _ in matrices], world)
    buckets = exchange_buckets(sizes, group["exchange_bucket_mb"] * 2**20 * world)
    return [[[matrices[i] for i in bucket if owners[i] == rank] for rank in range(world)] for bucket in buckets]


def _memory(config, model, opt, owned, batch, world, c) -> Memory:
    params = [p for g in opt.param_groups for p in g["params"]]
    state = sum(_shard(s, world) for g in opt.param_groups for p in g["params"] for s in _state_shapes(opt, p, g))
    weights = FP32 * sum(_shard(p.shape, world) for p in params)

    t, w, k = config.grid_size**2, config.width, config.num_classes
    tokens = batch * t * w
    # Saved per block (checked against torch's MemTracker): the input to R
    # (x + p), the shifted tokens, the pre-activation that beta-Abs's |x| keeps
    # whole, and the fused M R^T.
    per_block = 3 * tokens + w * w
    # Around the blocks: the stem's patches, the pooled map and pooled
    # features, the logits and log-softmax, the unit class vectors.
    ends = batch * t * config.patch_dim + tokens + batch * w + 2 * batch * k + k * w
    # Measured: the last block's backward holds four block-sized gradients at
    # once (autograd pads the shift's channel slices' gradients to full size)
    # after the pooled map is freed: three more than saved.
    in_flight = 3 * tokens
    images = FP32 * batch * config.in_channels * config.image_size**2
    activations = c * (config.depth * per_block + ends + in_flight) + images

    # autocast's cast of each weight is saved for backward (the matmuls need it)
    gathered = 0 if c == FP32 else c * sum(p.numel() for p in params)
    if world > 1:
        block = max(sum(p.numel() for p in b.parameters()) for b in model.blocks)
        root = sum(p.numel() for p in model.parameters()) - sum(p.numel() for p in model.blocks.parameters())
        # The root stays gathered; the block in use and the next one (FSDP2
        # prefetches it), and in backward the block's unsharded gradients and
        # the buffer they are reduce-scattered from.
        gathered += FP32 * (root + 4 * block)
    return Memory(
        params=weights, grads=weights, optimizer=FP32 * state, activations=activations, gathered=gathered,
        optimizer_step=FP32 * max(_optimizer_step(bucket, world) for bucket in owned),
    )


def _optimizer_step(owned: list[list], world: int) -> int:
    """Elements held for the manifold update of one exchange bucket (`owned`:
    its matrices per rank) beyond the persistent state, on the rank that
    holds the most.

    One update's temporaries: the direction, denominator, step and FastExp's
    powers, about 8 n x n for the largest matrix. Sharded, every rank also
    packs its rows of every matrix's fields (weight, state, gradient) in the
    bucket for one all_to_all to the owners and concatenates them, receives the rows of the
    matrices it owns and assembles them whole; after the update it packs and
    concatenates their rows for the way back while receiving its own.
    """
    temporaries = 8 * max(max(shape) ** 2 for mine in owned for shape, _ in mine)
    if world == 1:
        return temporaries

    def rows(mine, with_grad: bool) -> int:  # this rank's padded rows of each field
        return sum(_shard(s, world) for shape, states in mine for s in [shape, *states] + [shape] * with_grad)

    everything = [m for mine in owned for m in mine]
    sent, returned = rows(everything, True), rows(everything, False)
    return max(
        max(
            2 * sent + world * rows(mine, True),  # during the first all_to_all
            sent + 2 * world * rows(mine, True),  # assembling the owned matrices
            world * rows(mine, True) + temporaries,  # the update
            world * (rows(mine, True) + 2 * rows(mine, False)) + returned,  # the way back
        )
        for mine in owned
    )


# --- step time -------------------------------------------------------------------------


def measure_flops_per_s(dtype: str = "fp32", device: str = "cpu", n: int = 1024, repeats: int = 5) -> float:
    """Sustained matmul FLOP/s of this device: the best of `repeats` n x n products."""
    a = torch.randn(n, n, dtype={"fp32": torch.float32, "bf16": torch.bfloat16}[dtype], device=device)
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        (a @ a).sum().item()  # .item() waits for an accelerator to finish
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best


# --- report and command line -----------------------------------------------------------


def _si(value: float, unit: str) -> str:
    for scale, prefix in ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= scale:
            return f"{value / scale:.3g} {prefix}{unit}"
    return f"{value:.3g} {unit}"


def _bytes(n: int) -> str:
    for scale, unit in ((2**40, "TiB"), (2**30, "GiB"), (2**20, "MiB"), (2**10, "KiB")):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n} B"


def format_plan(plan: Plan) -> str:
    """The plan as a two-column table."""
    c, m = plan.config, plan.memory
    shard = f"1/{plan.world_size}" if plan.world_size > 1 else "unsharded"
    step = "owned matrices whole, exchange buffers" if plan.world_size > 1 else "update temporaries"
    rows = [
        ("model", f"L{c.depth}W{c.width}, {c.image_size}px in {c.patch_size}px patches, {c.num_classes} classes"),
        ("parameters", f"{plan.params:,}"),
        ("ranks x batch", f"{plan.world_size} x {plan.batch} = {plan.world_size * plan.batch} samples/step"),
        ("compute dtype", plan.dtype),
        ("forward FLOPs/step", _si(plan.forward_flops, "FLOP")),
        ("train FLOPs/step", _si(plan.train_flops, "FLOP") + " (forward + backward, per rank)"),
        ("train FLOPs/sample", _si(plan.train_flops_per_sample, "FLOP")),
        ("optimizer FLOPs/step", ">= " + _si(plan.optimizer_flops, "FLOP") + " (busiest owner rank)"),
        ("memory per rank", ""),
        ("  weights", f"{_bytes(m.params)} (fp32, {shard})"),
        ("  gradients", f"{_bytes(m.grads)} (fp32, {shard})"),
        ("  optimizer state", f"{_bytes(m.optimizer)} (fp32, {shard})"),
        ("  activations", f"{_bytes(m.activations)} ({plan.dtype}, batch {plan.batch})"),
        ("  whole weights", f"{_bytes(m.gathered)} (FSDP2's gathered blocks, autocast's casts)"),
        ("  optimizer step", f"{_bytes(m.optimizer_step)} ({step})"),
        ("  peak", _bytes(m.peak)),
    ]
    if plan.step_time_s is not None:
        rows.append(("step time", f"{plan.step_time_s:.3g} s at {_si(plan.flops_per_s, 'FLOP/s')}"))
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name:<{width}}  {value}".rstrip() for name, value in rows)


def plan_command(args) -> None:
    """`lipscale plan` (its arguments: lipscale.cli)."""
    flops_per_s = args.flops_per_s or measure_flops_per_s(args.dtype)
    result = plan(
        preset(args.preset), batch=args.batch, world_size=args.world_size, dtype=args.dtype, flops_per_s=flops_per_s
    )
    print(format_plan(result))
    if args.flops_per_s is None:
        print(f"(FLOP/s measured on this machine's CPU in {args.dtype}: pass --flops-per-s for the target device)")
