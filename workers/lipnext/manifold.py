"""Optimisation directly on the orthogonal manifold (LipNeXt, section 3).

Orthogonal weights are neither constrained nor re-parametrised: each step
moves them along the manifold, W <- W exp(A) with A skew-symmetric, so they
stay orthogonal up to the truncation of the exponential and rounding, which
the polar projection removes (`ManifoldAdamW.project()`, at every epoch end
and before every evaluation and checkpoint). Low precision is for the
increments only: the direction and the powers of A in bfloat16, the step
W + W (exp(A) - I) accumulated in the weights' fp32. Geometry lives in manifold
objects (Euclidean, Stiefel); `ManifoldAdamW` is generic over them: Adam
moments of the manifold's direction, a retraction, Manifold Lookahead and
re-projection are the same code for every parameter.

Orthogonal matrices of one shape are updated together, as stacks (k, n, m):
batched matmuls, and one host sync per stack where a size picks the
algorithm (lipnext.orthogonal). Under FSDP2 they are DTensor row shards; a
matrix function of a shard is meaningless, so each matrix is gathered whole
to one owner rank, straight into its stack, updated there and scattered
back (lipnext.owner_exchange).
"""

import contextlib
import functools
from typing import get_args

import torch
from torch import nn

from lipnext.layers import OrthogonalLinear
from lipnext.orthogonal import EXP_SIZINGS, expm1, newton_schulz_step, polar, skew
from lipnext.owner_exchange import assign_owners, gather_to_owners, scatter_from_owners
from lipnext.train_config import IncrementDtype, OptimConfig

INCREMENT_DTYPES = get_args(IncrementDtype)


class Euclidean:
    """Unconstrained parameters: the direction is the gradient, steps add."""

    name = "euclidean"

    def algebra_shape(self, shape) -> tuple[int, ...]:
        return tuple(shape)

    def direction(self, w, grad):
        return grad

    def retract(self, w, step):
        return w + step

    def toward(self, x, y):
        """The step from x that reaches y."""
        return y - x

    def correct(self, w):
        return w

    def project(self, w):
        return w


class Stiefel:
    """W (out, in) with orthonormal rows (out <= in; square W is the
    orthogonal group) or orthonormal columns (out > in).

    W moves by the action of an orthogonal group, which keeps its Gram matrix
    exactly I: W <- W exp(A), A in so(in), when the rows are orthonormal (the
    reference's update, with direction skew(W^T G)); W <- exp(A) W, A in
    so(out), when the columns are (direction skew(G W^T)). Both are steepest
    descent: d/dt loss(W exp(tA)) = <skew(W^T G), A>.

    The matmuls of the directions and of the powers of A run in
    `increment_dtype` (None: the weights' own); the retraction adds the
    increment W (exp(A) - I) to W in W's dtype. `exp_sizing` picks FastExp's
    rule (lipnext.orthogonal.exp_order). Every operation takes one matrix or
    a stack of them.
    """

    name = "stiefel"

    def __init__(self, shape, increment_dtype: torch.dtype | None = None, exp_sizing: str = "rho"):
        self.left = shape[0] > shape[1]
        self.increment_dtype, self.exp_sizing = increment_dtype, exp_sizing

    def algebra_shape(self, shape) -> tuple[int, int]:
        return (max(shape), max(shape))

    def _low(self, t: torch.Tensor) -> torch.Tensor:
        return t if self.increment_dtype is None else t.to(self.increment_dtype)

    def direction(self, w, grad):
        """In w's dtype (exactly skew: the skew part is taken in the low one)."""
        low_w, grad = self._low(w), self._low(grad)
        return (skew(grad @ low_w.mT) if self.left else skew(low_w.mT @ grad)).to(w.dtype)

    def retract(self, w, step):
        increment = expm1(step, self.increment_dtype, self.exp_sizing).to(w.dtype)
        return _plus_product(w, increment, w) if self.left else _plus_product(w, w, increment)

    def toward(self, x, y):
        """First-order log: the step A with R_x(A) = y + O(||A||^3) for y near x
        (x^T y = exp(A) = I + A + A^2/2 + ..., whose skew part is A + O(A^3)),
        from x^T (y - x), which has that skew part too (x^T x is symmetric) but
        no identity to cancel, so low precision costs it nothing."""
        low_x, d = self._low(x), self._low(y - x)
        return (skew(d @ low_x.mT) if self.left else skew(low_x.mT @ d)).to(x.dtype)

    def correct(self, w):
        """A step back toward the manifold that bounds drift cheaply (one Newton-Schulz step)."""
        return newton_schulz_step(w, self.increment_dtype)

    def project(self, w):
        """The nearest point of the manifold, certificate-grade (polar)."""
        return polar(w)


def _plus_product(c: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """c + a @ b in one call (for one matrix or a stack)."""
    return torch.addmm(c, a, b) if c.dim() == 2 else torch.baddbmm(c, a, b)


def manifold_of(group: dict, shape) -> Euclidean | Stiefel:
    if group["manifold"] == "euclidean":
        return Euclidean()
    return Stiefel(shape, getattr(torch, group["increment_dtype"]), group["exp_sizing"])


def param_groups(model: nn.Module) -> list[dict]:
    """Orthogonal matrices (the weights of OrthogonalLinear layers) in a
    Stiefel group, everything else in a Euclidean one. Derived from module
    types, not from marks on the Parameters, so it works before and after
    FSDP2 has swapped the Parameters for DTensors."""
    orthogonal = [m.weight for m in model.modules() if isinstance(m, OrthogonalLinear)]
    ids = {id(p) for p in orthogonal}
    rest = [p for p in model.parameters() if id(p) not in ids]
    return [{"params": orthogonal, "manifold": "stiefel"}, {"params": rest, "manifold": "euclidean"}]


def _is_sharded(t: torch.Tensor) -> bool:
    return hasattr(t, "device_mesh")


def _zeros(p: torch.Tensor, shape) -> torch.Tensor:
    """Optimizer state of `shape`, sharded like p when p is a DTensor so every
    rank holds the same structure and DCP can save and reshard it."""
    if _is_sharded(p):
        from torch.distributed.tensor import zeros

        return zeros(shape, device_mesh=p.device_mesh, placements=p.placements, dtype=torch.float32)
    return torch.zeros(shape, dtype=torch.float32, device=p.device)


STATE_FIELDS = ("exp_avg", "exp_avg_sq", "slow", "lookahead_sum", "ema")
"""ManifoldAdamW's matrix-shaped state, in the order it travels."""

def _stacks_by_copy(device: torch.device) -> bool:
    """Whether whole (unsharded) matrices on `device` share stacks, which
    copies every field in and out: 11 passes over them, and their memory twice.

    On these CPUs that costs more than the per-matrix calls it saves but for
    small matrices (interleaved, one thread: 4 x 1024^2 took 1.12x the time of
    one by one, 8 x 256^2 1.13x, 16 x 128^2 0.78x) and doubles the peak of a
    step that the optimizer dominates (batch 1, tests/test_plan.py). On GPUs
    the copies run at HBM speed and stacks save kernel launches and host
    syncs (~30 launches and one sync per stack instead of per matrix).
    Sharded matrices always share stacks: they are gathered straight into them.
    """
    return device.type != "cpu"


def exchange_buckets(sizes: list[int], budget_bytes: float) -> list[list[int]]:
    """Consecutive groups of matrices whose whole tensors (`sizes` in bytes,
    all fields) add up to at most budget_bytes; a larger matrix goes alone."""
    buckets, total = [[]], 0
    for i, nbytes in enumerate(sizes):
        if buckets[-1] and total + nbytes > budget_bytes:
            buckets.append([])
            total = 0
        buckets[-1].append(i)
        total += nbytes
    return buckets


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if _is_sharded(t) else t


def _stack(tensors) -> torch.Tensor:
    """A copy of the tensors stacked, or a view of a lone one."""
    return torch.stack(tensors) if len(tensors) > 1 else tensors[0].unsqueeze(0)


def _without_autocast(method):
    """Runs method with autocast off: under it the fp32 accumulation
    W + W (exp(A) - I) would run in bf16 (~3e-3 off the manifold per step)."""

    @functools.wraps(method)
    def run(*args, **kwargs):
        with torch.autocast("cpu", enabled=False), torch.autocast("cuda", enabled=False):
            return method(*args, **kwargs)

    return run


class ManifoldAdamW(torch.optim.Optimizer):
    """Adam on manifolds: moments of the manifold's direction, bias-corrected
    step A = -lr m / (sqrt(v) + eps), retraction W <- R_W(A).

    For Stiefel matrices the direction lives in a Lie algebra (skew), so the
    step is skew too. `weight_decay` (decoupled, as AdamW) applies to
    Euclidean parameters only. Every `lookahead_steps` steps the slow weights
    move by `lookahead_alpha` times the sum of the fast steps - along the
    manifold, X_slow <- X_slow exp(alpha * sum A) - and the fast weights
    restart from them (0 disables; `sync_lookahead()` does it on demand).
    Every `reorthogonalize_every` steps (0 disables) the orthogonal matrices
    take one Newton-Schulz step back toward the manifold (to ~1e-5 at
    n = 1024), which bounds their drift between two `project()` calls.
    Sharded matrices travel to their owners in buckets of about
    `exchange_bucket_mb` of whole tensors per rank, which bounds the memory
    the exchange (and stacking) adds. With `ema_decay` > 0 an exponential
    moving average of the weights moves toward them along the manifold each
    step (`ema_weights()` swaps it in, e.g. for evaluation).

    `increment_dtype` is the dtype of the orthogonal updates' matmuls: the
    direction skew(W^T G) and the powers of A in exp(A) - I; the weights,
    the moments, the step A and the accumulation W + W (exp(A) - I) stay
    fp32. "bfloat16" (AMX on CPUs, tensor cores on GPUs; never TF32) or
    "float32" (every matmul in fp32). `exp_sizing` picks FastExp's order
    rule: "rho" (ours) or "frobenius" (the reference's), see
    lipnext.orthogonal.exp_order. State is fp32 whatever the compute dtype.

    The training loop calls, at every epoch end, `sync_lookahead()` then
    `project()`, and `project()` again before an evaluation or a checkpoint
    that does not follow an epoch end: certificates are computed on
    re-projected weights. The defaults are OptimConfig's (a trial passes
    OptimConfig.optimizer_kwargs()); eps and the bucket size are the optimizer's own.
    """

    def __init__(
        self,
        params,
        lr: float = OptimConfig.lr,
        betas: tuple[float, float] = OptimConfig.betas,
        eps: float = 1e-8,
        weight_decay: float = OptimConfig.weight_decay,
        lookahead_steps: int = OptimConfig.lookahead_steps,
        lookahead_alpha: float = OptimConfig.lookahead_alpha,
        reorthogonalize_every: int = OptimConfig.reorthogonalize_every,
        ema_decay: float = OptimConfig.ema_decay,
        exchange_bucket_mb: float = 256,
        increment_dtype: str = OptimConfig.increment_dtype,
        exp_sizing: str = OptimConfig.exp_sizing,
    ):
        defaults = dict(
            lr=lr,
            betas=betas,
            eps=eps,
            weight_decay=weight_decay,
            lookahead_steps=lookahead_steps,
            lookahead_alpha=lookahead_alpha,
            reorthogonalize_every=reorthogonalize_every,
            ema_decay=ema_decay,
            exchange_bucket_mb=exchange_bucket_mb,
            increment_dtype=increment_dtype,
            exp_sizing=exp_sizing,
            manifold="euclidean",
        )
        super().__init__(params, defaults)

    def add_param_group(self, group: dict) -> None:
        manifold = group.get("manifold", "euclidean")
        if manifold not in ("euclidean", "stiefel"):
            raise ValueError(f"manifold must be 'euclidean' or 'stiefel', got {manifold!r}")
        for key, allowed in (("increment_dtype", INCREMENT_DTYPES), ("exp_sizing", EXP_SIZINGS)):
            value = group.get(key, self.defaults[key])
            if value not in allowed:
                raise ValueError(f"{key} must be one of {allowed}, got {value!r}")
        if manifold == "stiefel":  # the default weight_decay is for Euclidean groups only
            if group.get("weight_decay"):
                raise ValueError("weight_decay would pull orthogonal matrices off their manifold")
            group["weight_decay"] = 0.0
        super().add_param_group(group)

    def _state(self, p: torch.Tensor, group: dict) -> dict:
        state = self.state[p]
        if not state:
            algebra = manifold_of(group, p.shape).algebra_shape(p.shape)
            state["step"] = torch.tensor(0.0, device="cpu")  # a host count: no device sync to read it
            state["exp_avg"] = _zeros(p, algebra)
            state["exp_avg_sq"] = _zeros(p, algebra)
            if group["lookahead_steps"]:
                state["slow"] = p.detach().clone()
                state["lookahead_sum"] = _zeros(p, algebra)
            if group["ema_decay"]:
                state["ema"] = p.detach().clone()
        return state

    @staticmethod
    def _fields(p: torch.Tensor, state: dict, names=STATE_FIELDS) -> dict[str, torch.Tensor]:
        """The weight and the matrix-shaped state tensors among `names`, by name."""
        return {"w": p, **{k: state[k] for k in names if k in state}}

    @staticmethod
    def _update(
        manifold, group: dict, step: int, grad, w, exp_avg, exp_avg_sq, slow=None, lookahead_sum=None, ema=None
    ):
        """One step of one parameter, in place, on whole (or elementwise) tensors."""
        beta1, beta2 = group["betas"]
        d = manifold.direction(w, grad).to(exp_avg.dtype)
        exp_avg.lerp_(d, 1 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(d, d, value=1 - beta2)
        denom = (exp_avg_sq / (1 - beta2**step)).sqrt_().add_(group["eps"])
        update = torch.div(exp_avg, denom, out=denom).mul_(-group["lr"] / (1 - beta1**step))
        if group["weight_decay"]:
            update -= group["lr"] * group["weight_decay"] * w
        w.copy_(manifold.retract(w, update))
        if slow is not None:
            lookahead_sum += update
            if step % group["lookahead_steps"] == 0:
                ManifoldAdamW._sync(manifold, group, w, slow, lookahead_sum)
        if ema is not None:
            ema.copy_(manifold.retract(ema, (1 - group["ema_decay"]) * manifold.toward(ema, w)))
        every = group["reorthogonalize_every"]
        if every and step % every == 0:
            for t in (w, slow, ema):
                if t is not None:
                    t.copy_(manifold.correct(t))

    @staticmethod
    def _sync(manifold, group: dict, w, slow, lookahead_sum, **_):
        slow.copy_(manifold.retract(slow, group["lookahead_alpha"] * lookahead_sum))
        w.copy_(slow)
        lookahead_sum.zero_()

    @staticmethod
    def _project(manifold, w, slow=None, ema=None, **_):
        for t in (w, slow, ema):
            if t is not None:
                t.copy_(manifold.project(t))

    def _for_each_stack(self, group: dict, params: list, fn, names=STATE_FIELDS, with_grad: bool = False) -> None:
        """fn(manifold, step, grad, **fields) on stacks (k, *shape) of whole
        matrices that share a shape and a step count, after which the fields
        (not the gradient) go back to the parameters and their state.

        Sharded matrices are gathered to their owner ranks straight into the
        stacks and scattered back after; whole ones are stacked by copying,
        except on CPUs (_stacks_by_copy), where each is a stack of one, a view.
        Either way about `exchange_bucket_mb` of whole tensors per rank exist
        at a time.
        """
        if not params:
            return
        states = [self._state(p, group) for p in params]
        fields = [self._fields(p, s, names) for p, s in zip(params, states)]
        sent = [[*f.values(), p.grad] if with_grad else list(f.values()) for p, f in zip(params, fields)]
        n = len(fields[0])  # the gradient (last) does not go back
        sharded = _is_sharded(params[0])
        pg = params[0].device_mesh.get_group() if sharded else None
        world, rank = (torch.distributed.get_world_size(pg), torch.distributed.get_rank(pg)) if sharded else (1, 0)
        # Owners balance the work over all matrices; buckets only bound memory.
        all_owners = assign_owners([max(p.shape) for p in params], world)
        sizes = [4 * sum(t.numel() for t in tensors) for tensors in sent]  # fp32, global shapes
        for bucket in exchange_buckets(sizes, group["exchange_bucket_mb"] * 2**20 * world):
            by_key = {}
            for j, i in enumerate(bucket):
                if all_owners[i] == rank:
                    by_key.setdefault((tuple(params[i].shape), int(states[i]["step"])), []).append(j)
            stacked = list(by_key.items())  # (shape, step), positions in the bucket
            if sharded:
                shapes = [[tuple(t.shape) for t in sent[i]] for i in bucket]
                device = _local(params[bucket[0]]).device
                stacks = [
                    [torch.empty((len(js), *shape), dtype=torch.float32, device=device) for shape in shapes[js[0]]]
                    for _, js in stacked
                ]
                out = {j: [t[m] for t in stack] for (_, js), stack in zip(stacked, stacks) for m, j in enumerate(js)}
                owners = [all_owners[i] for i in bucket]
                local = [[_local(t).float() for t in sent[i]] for i in bucket]
                gather_to_owners(local, shapes, owners, group=pg, out=out)
            else:
                if not _stacks_by_copy(params[0].device):
                    stacked = [(key, [j]) for key, js in stacked for j in js]
                stacks = [[_stack(ts) for ts in zip(*[sent[bucket[j]] for j in js])] for _, js in stacked]
            for ((shape, step), _), stack in zip(stacked, stacks):
                grad = stack[-1] if with_grad else None
                fn(manifold_of(group, shape), step, grad, **dict(zip(fields[bucket[0]], stack[:n])))
            if sharded:
                back = {j: tensors[:n] for j, tensors in out.items()}
                returned = scatter_from_owners(back, [s[:n] for s in shapes], owners, torch.float32, device, group=pg)
                for i, shards in zip(bucket, returned):
                    for target, shard in zip(fields[i].values(), shards):
                        _local(target).copy_(shard)
            else:
                for (_, js), stack in zip(stacked, stacks):
                    if len(js) > 1:
                        for m, j in enumerate(js):
                            for target, new in zip(fields[bucket[j]].values(), stack):
                                target.copy_(new[m])

    @_without_autocast
    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            for p in params:
                self._state(p, group)["step"] += 1

            def update(manifold, step, grad, **fields):
                self._update(manifold, group, step, grad, **fields)

            if group["manifold"] == "euclidean":  # elementwise: shards update in place
                for p in params:
                    fields = {k: _local(t) for k, t in self._fields(p, self.state[p]).items()}
                    update(Euclidean(), int(self.state[p]["step"]), _local(p.grad), **fields)
            else:
                self._for_each_stack(group, params, update, with_grad=True)
        return loss

    @contextlib.contextmanager
    def ema_weights(self):
        """Within the block the parameters hold their moving averages."""
        with torch.no_grad():
            swaps = [
                (_local(p), _local(self.state[p]["ema"]), _local(p).clone())
                for group in self.param_groups
                for p in group["params"]
                if "ema" in self.state[p]
            ]
            for weight, ema, _ in swaps:
                weight.copy_(ema)
        try:
            yield
        finally:
            with torch.no_grad():
                for weight, _, saved in swaps:
                    weight.copy_(saved)

    @_without_autocast
    @torch.no_grad()
    def sync_lookahead(self) -> None:
        """Manifold Lookahead's sync, now: every slow copy moves by
        lookahead_alpha times the sum of the fast steps since the last sync,
        along its manifold (X_slow <- X_slow exp(alpha sum A)); the fast
        weights restart from it and the sum is reset. The step does this every
        lookahead_steps steps; LiResNet++ also syncs at every epoch end, which
        is when the training loop calls this (before project()). A no-op
        without Lookahead. Under FSDP2 every rank must call it."""
        for group in self.param_groups:
            if not group["lookahead_steps"]:
                continue
            if group["manifold"] == "euclidean":  # elementwise: shards sync in place
                for p in group["params"]:
                    fields = self._fields(p, self._state(p, group), names=("slow", "lookahead_sum"))
                    self._sync(Euclidean(), group, **{k: _local(t) for k, t in fields.items()})
            else:
                def sync(manifold, step, grad, **fields):
                    self._sync(manifold, group, **fields)

                self._for_each_stack(group, list(group["params"]), sync, names=("slow", "lookahead_sum"))

    @_without_autocast
    @torch.no_grad()
    def project(self) -> None:
        """Projects every orthogonal matrix - the weights, Lookahead's slow
        copies, the EMA - onto its manifold: the polar factor, computed in
        float64 (lipnext.orthogonal.polar).

        Afterwards every float32 matrix W of n columns (rows, if wide) is at
        the float32 floor, ||W^T W - I||_F ~ 1.9e-8 sqrt(n): <= 1e-6 up to
        n = 2048 (6.1e-7 at 1024, 8.5e-7 at 2048; 1.2e-6 at 4096), so the
        certificate's bound on ||W||_2, sqrt(1 + ||W^T W - I||_F), is within
        3.1e-7 of 1 per matrix at n = 1024 (tests/test_manifold.py). It
        converges from any drift (Newton-Schulz, or an SVD beyond 0.5). Call it
        at every epoch end and before every evaluation and checkpoint; under
        FSDP2 every rank must call it."""
        for group in self.param_groups:
            if group["manifold"] == "stiefel":
                self._for_each_stack(
                    group, list(group["params"]), lambda manifold, step, grad, **f: self._project(manifold, **f),
                    names=("slow", "ema"),
                )
