"""What a LipNeXt train step costs before it runs: parameters, FLOPs, per-rank
memory under FSDP2 and a step time, so a study can refuse a trial that
cannot fit its resources (`plan(...).fits(bytes)`) before launching it, and
choose the micro-batch and activation checkpointing that fit (`fit`).

    lipscale plan imagenet-1b --world-size 8 --dtype bf16 --batch 1024 --gpu-memory-gib 80

FLOPs count matrix multiplications only (2 per multiply-add), as
torch.utils.flop_counter does; elementwise work (shifts, beta-Abs, pooling,
the loss) is memory-bound and left out. `batch` is the global batch, as the
spec's data.batch_size: each rank takes batch / world_size per step, in
micro-batches of `micro_batch` (gradients accumulated, one optimizer step).

Memory is counted in bytes of tensors, per rank, for one steady-state step
(optimizer state already created, gradients set to None between steps, as
`zero_grad()` does); allocator slack and the CUDA context are not included
(`usable_bytes` takes them off a GPU's memory). As lipnext.train runs it:
FSDP2 at every world size, the torchtitan way, every block its own unit,
then the root: fp32 weights, gradients and optimizer state sharded on dim 0
(ceil(rows / world) rows, the largest shard), weights all-gathered a block at
a time, and each orthogonal matrix gathered whole to an owner rank for its
update (lipnext.owner_exchange; on one rank it is updated in place). bf16 is
autocast's: it casts the fp32 weights as they are used. tests/test_plan.py
checks the total against measured peaks of real steps, on one rank and two,
in both dtypes, with activation checkpointing and micro-batches.
"""

import dataclasses
import math
import time
from dataclasses import dataclass

import torch

from lipnext import LipNeXt, LipNeXtConfig, preset
from lipnext.manifold import ManifoldAdamW, exchange_buckets, param_groups
from lipnext.owner_exchange import assign_owners
from lipnext.train_config import ActivationCheckpointing

DTYPE_BYTES = {"fp32": 4, "bf16": 2}
FP32 = 4
CONTEXT_BYTES = 2**30
"""Taken off a GPU's memory for what is not a tensor of the step: the CUDA context and
cuBLAS workspaces (~0.5 GiB with torch on an H100) and NCCL's buffers (a few hundred MiB
on 8 ranks). An allowance, not measured here (no GPU)."""
SLACK = 0.1
"""Share of the rest left to the caching allocator's fragmentation (torch's allocator
typically reserves 5-10% above what is allocated at a steady peak)."""


# --- FLOPs -------------------------------------------------------------------------------


def step_flops(config: LipNeXtConfig, batch: int) -> tuple[int, int]:
    """(forward, forward + backward) matmul FLOPs of one pass over `batch` samples.

    Per block, on T = B grid^2 tokens of width W: R (2TW^2), then, when T > W,
    the fused M R^T (2W^3, once per step whatever the batch: why FLOPs per
    sample fall as the batch grows) and its product with the tokens (2TW^2);
    otherwise R^T and M one after the other (2 x 2TW^2), as LipNeXtBlock
    does. Backward costs twice each forward matmul (the gradients of both
    operands), except the stem's: its input is the images, which need no gradient.
    """
    stem, blocks, head = _forward_flops(config, batch)
    forward = stem + blocks + head
    return forward, forward + stem + 2 * (blocks + head)


def _forward_flops(config: LipNeXtConfig, batch: int) -> tuple[int, int, int]:
    """Forward FLOPs of the stem, the blocks and the head on `batch` samples."""
    tokens = batch * config.grid_size**2
    w = config.width
    stem = 2 * tokens * config.patch_dim * w
    mix = 2 * tokens * w * w + 2 * w**3 if tokens > w else 2 * 2 * tokens * w * w
    blocks = config.depth * (2 * tokens * w * w + mix)
    head = 2 * batch * w * config.num_classes
    return stem, blocks, head


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
    """Tensors saved for backward at the micro-batch, in the compute dtype (with
    activation checkpointing: every block's input, and one block's recomputed
    tensors in its backward), and backward's gradients in flight."""
    gathered: int
    """Whole weights during forward and backward: FSDP2's gathered blocks and
    root (and a block's unsharded gradients), and in bf16 autocast's cast of
    every weight."""
    optimizer_step: int
    """Transient of the optimizer step: the whole matrices (weight, gradient,
    state) that this rank owns, the exchange buffers that carry them and
    the temporaries of one update."""
    accumulated: int
    """With more than one micro-batch: the whole fp32 gradients that FSDP2 keeps
    between micro-batches (it reduce-scatters them after the last one only)."""
    inputs: int
    """The fp32 images of the per-rank batch: the loader's batch, whose micro-batches
    are views, alive for the whole step (the optimizer's included)."""

    @property
    def peak(self) -> int:
        # Backward frees activations block by block while it fills the
        # gradients; both change linearly with the blocks done, so the peak is
        # at one end: all activations and no gradients, or the reverse, which
        # the optimizer step then adds to. A later micro-batch's activations
        # come on top of the gradients accumulated whole.
        return self.params + self.optimizer + self.inputs + max(
            self.accumulated + self.activations + self.gathered, self.grads + self.optimizer_step
        )


@dataclass(frozen=True)
class Plan:
    config: LipNeXtConfig
    batch: int
    """Global batch: samples per step over all ranks."""
    world_size: int
    micro_batch: int
    """Samples per rank per forward and backward."""
    activation_checkpointing: ActivationCheckpointing
    dtype: str
    """Compute dtype: 'fp32' or 'bf16'."""
    params: int
    forward_flops: int
    """Matmul FLOPs of one rank's forward passes per step."""
    train_flops: int
    """Forward + backward FLOPs per rank per step (and the blocks' forward again, recomputed
    in backward, with activation checkpointing)."""
    optimizer_flops: int
    """Matmul FLOPs of the optimizer step on the busiest owner rank (a lower bound, see _update_flops)."""
    memory: Memory
    flops_per_s: float | None
    """Sustained FLOP/s of one rank, given or measured (`measure_flops_per_s`)."""

    @property
    def per_rank_batch(self) -> int:
        return self.batch // self.world_size

    @property
    def micro_batches(self) -> int:
        """Forward and backward passes per rank per step."""
        return self.per_rank_batch // self.micro_batch

    @property
    def forward_flops_per_sample(self) -> float:
        return self.forward_flops / self.per_rank_batch

    @property
    def train_flops_per_sample(self) -> float:
        return self.train_flops / self.per_rank_batch

    @property
    def optimizer_share(self) -> float:
        """The optimizer's share of the step's FLOPs on the busiest owner rank (of its time,
        at one FLOP rate)."""
        return self.optimizer_flops / (self.train_flops + self.optimizer_flops)

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
    micro_batch: int | None = None,
    activation_checkpointing: ActivationCheckpointing = "none",
    dtype: str = "fp32",
    flops_per_s: float | None = None,
    optimizer: dict | None = None,
) -> Plan:
    """The plan of one train step on a global `batch` over `world_size` ranks, in
    micro-batches of `micro_batch` per rank (None: the per-rank batch at once);
    `optimizer` holds ManifoldAdamW's keyword arguments (e.g. lookahead_steps=0),
    which decide the state it keeps."""
    if dtype not in DTYPE_BYTES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPE_BYTES)}, got {dtype!r}")
    if batch < 1 or world_size < 1:
        raise ValueError(f"batch and world_size must be positive, got {batch} and {world_size}")
    if batch % world_size:
        raise ValueError(f"batch {batch} does not split over {world_size} ranks")
    per_rank = batch // world_size
    micro = micro_batch or per_rank
    if micro < 1 or per_rank % micro:
        raise ValueError(f"micro_batch {micro} does not divide the batch per rank, {per_rank}")
    with torch.device("meta"):
        model = LipNeXt(config)
        opt = ManifoldAdamW(param_groups(model), **(optimizer or {}))
    k = per_rank // micro
    forward, train = step_flops(config, micro)
    recomputed = _forward_flops(config, micro)[1] if activation_checkpointing == "block" else 0
    owned = _owned_matrices(opt, world_size)
    memory = _memory(config, model, opt, owned, micro, per_rank, world_size, DTYPE_BYTES[dtype], activation_checkpointing)
    return Plan(
        config=config, batch=batch, world_size=world_size, micro_batch=micro,
        activation_checkpointing=activation_checkpointing, dtype=dtype,
        params=sum(p.numel() for p in model.parameters()),
        forward_flops=k * forward, train_flops=k * (train + recomputed),
        optimizer_flops=max(
            sum(_update_flops(shape) for bucket in owned for shape, _ in bucket[rank]) for rank in range(world_size)
        ),
        memory=memory,
        flops_per_s=flops_per_s,
    )  # fmt: skip


def fit(
    config: LipNeXtConfig, *, batch: int, world_size: int, memory_bytes: int,
    activation_checkpointing: ActivationCheckpointing | None = None, **kwargs,
) -> Plan:  # fmt: skip
    """The plan with the largest micro-batch (a divisor of the per-rank batch) whose step
    fits in `memory_bytes` per rank; at one micro-batch, without activation checkpointing
    if that fits (it costs another forward of the blocks), else with it. A given
    `activation_checkpointing` is kept. If nothing fits, the plan that needs the least:
    micro-batches of 1 (check `.fits`). kwargs: plan's (dtype, optimizer, flops_per_s)."""
    per_rank = batch // world_size if batch % world_size == 0 else batch
    choices = ["none", "block"] if activation_checkpointing is None else [activation_checkpointing]
    for micro in (m for m in range(per_rank, 0, -1) if per_rank % m == 0):
        for ac in choices:
            candidate = plan(
                config, batch=batch, world_size=world_size, micro_batch=micro, activation_checkpointing=ac, **kwargs
            )
            if candidate.fits(memory_bytes):
                return candidate
    return candidate


def usable_bytes(gpu_memory_bytes: int) -> int:
    """What a train step may use of a GPU's memory: less CONTEXT_BYTES, then SLACK of the rest."""
    return int((gpu_memory_bytes - CONTEXT_BYTES) * (1 - SLACK))


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


def _memory(config, model, opt, owned, micro, per_rank, world, c, activation_checkpointing) -> Memory:
    params = [p for g in opt.param_groups for p in g["params"]]
    state = sum(_shard(s, world) for g in opt.param_groups for p in g["params"] for s in _state_shapes(opt, p, g))
    weights = FP32 * sum(_shard(p.shape, world) for p in params)

    t, w, k = config.grid_size**2, config.width, config.num_classes
    tokens = micro * t * w
    # Saved per block (checked against torch's MemTracker): the input to R
    # (x + p), the shifted tokens, the pre-activation that beta-Abs's |x| keeps
    # whole, and the fused M R^T.
    per_block = 3 * tokens + w * w
    # Checkpointed, a block keeps its input alone; its backward recomputes the rest.
    blocks = config.depth * tokens + per_block if activation_checkpointing == "block" else config.depth * per_block
    # Around the blocks: the stem's patches, the pooled map and pooled
    # features, the logits and log-softmax, the unit class vectors.
    ends = micro * t * config.patch_dim + tokens + micro * w + 2 * micro * k + k * w
    # Measured: the last block's backward holds four block-sized gradients at
    # once (autograd pads the shift's channel slices' gradients to full size)
    # after the pooled map is freed: three more than saved.
    in_flight = 3 * tokens
    activations = c * (blocks + ends + in_flight)

    # autocast's cast of each weight is saved for backward (the matmuls need it)
    gathered = 0 if c == FP32 else c * sum(p.numel() for p in params)
    block = max(sum(p.numel() for p in b.parameters()) for b in model.blocks)
    root = sum(p.numel() for p in model.parameters()) - sum(p.numel() for p in model.blocks.parameters())
    # The root stays gathered; the block in use and the next one (FSDP2
    # prefetches it), and in backward the block's unsharded gradients and
    # the buffer they are reduce-scattered from. On one rank FSDP2 adds one
    # block's worth (measured: 0.92 block at cifar-l8w256, 1.2 at tiny).
    gathered += FP32 * (root + 4 * block if world > 1 else block)
    return Memory(
        params=weights, grads=weights, optimizer=FP32 * state, activations=activations, gathered=gathered,
        optimizer_step=FP32 * max(_optimizer_step(bucket, world) for bucket in owned),
        accumulated=FP32 * sum(p.numel() for p in params) if per_rank > micro else 0,
        inputs=FP32 * per_rank * config.in_channels * config.image_size**2,
    )  # fmt: skip


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
    shard = f"1/{plan.world_size}" if plan.world_size > 1 else "one rank"
    step = "owned matrices whole, exchange buffers" if plan.world_size > 1 else "update temporaries"
    checkpointing = "per block (backward recomputes the blocks)" if plan.activation_checkpointing == "block" else "none"
    rows = [
        ("model", f"L{c.depth}W{c.width}, {c.image_size}px in {c.patch_size}px patches, {c.num_classes} classes"),
        ("parameters", f"{plan.params:,}"),
        ("ranks x batch", f"{plan.world_size} x {plan.per_rank_batch} = {plan.batch} samples/step"),
        ("micro-batch", f"{plan.micro_batch} per rank, {plan.micro_batches} per step"),
        ("activation ckpt", checkpointing),
        ("compute dtype", plan.dtype),
        ("forward FLOPs/step", _si(plan.forward_flops, "FLOP")),
        ("train FLOPs/step", _si(plan.train_flops, "FLOP") + " (forward + backward, per rank)"),
        ("train FLOPs/sample", _si(plan.train_flops_per_sample, "FLOP")),
        ("optimizer FLOPs/step", ">= " + _si(plan.optimizer_flops, "FLOP") + " (busiest owner rank)"),
        ("optimizer share", f"{plan.optimizer_share:.1%} of the step's FLOPs"),
        ("memory per rank", ""),
        ("  weights", f"{_bytes(m.params)} (fp32, {shard})"),
        ("  gradients", f"{_bytes(m.grads)} (fp32, {shard})"),
        ("  optimizer state", f"{_bytes(m.optimizer)} (fp32, {shard})"),
        ("  activations", f"{_bytes(m.activations)} ({plan.dtype}, micro-batch {plan.micro_batch})"),
        ("  whole weights", f"{_bytes(m.gathered)} (FSDP2's gathered blocks, autocast's casts)"),
        ("  optimizer step", f"{_bytes(m.optimizer_step)} ({step})"),
        ("  accumulated grads", f"{_bytes(m.accumulated)} (fp32, whole, between micro-batches)"),
        ("  input images", f"{_bytes(m.inputs)} (fp32, batch {plan.per_rank_batch})"),
        ("  peak", _bytes(m.peak)),
    ]
    if plan.step_time_s is not None:
        rows.append(("step time", f"{plan.step_time_s:.3g} s at {_si(plan.flops_per_s, 'FLOP/s')}"))
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name:<{width}}  {value}".rstrip() for name, value in rows)


def plan_command(args) -> None:
    """`lipscale plan` (its arguments: lipscale.cli): the plan as asked, or with
    --gpu-memory-gib and no --micro-batch the micro-batch and checkpointing `fit` chooses."""
    flops_per_s = args.flops_per_s or measure_flops_per_s(args.dtype)
    config, common = preset(args.preset), dict(batch=args.batch, world_size=args.world_size, dtype=args.dtype)
    memory = None if args.gpu_memory_gib is None else usable_bytes(int(args.gpu_memory_gib * 2**30))
    if memory is not None and args.micro_batch is None:
        result = fit(config, memory_bytes=memory, activation_checkpointing=args.activation_checkpointing, **common)
    else:
        checkpointing = args.activation_checkpointing or "none"
        result = plan(config, micro_batch=args.micro_batch, activation_checkpointing=checkpointing, **common)
    print(format_plan(dataclasses.replace(result, flops_per_s=flops_per_s)))
    if args.flops_per_s is None:
        print(f"(FLOP/s measured on this machine's CPU in {args.dtype}: pass --flops-per-s for the target device)")
    if memory is not None:
        print(
            f"{'fits' if result.fits(memory) else 'does not fit'} in {_bytes(memory)} per rank: {args.gpu_memory_gib:g} GiB "
            f"less {_bytes(CONTEXT_BYTES)} (CUDA context, NCCL) and {SLACK:.0%} allocator slack; micro-batch "
            f"{result.micro_batch}, activation checkpointing {result.activation_checkpointing}"
        )
