"""Activation checkpointing, compilation, sharding and materialisation of a
LipNeXt built on the meta device.

The model file knows nothing of this (torchtitan's split): build on meta,
`parallelize`, then `materialize` on the target device. Each block's forward
is wrapped in place (module.forward), so the module tree and the state dict's
names are those of the plain model: checkpoints load either way.
"""

import contextlib
import functools

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.distributed.tensor import DTensor, distribute_tensor
from torch.utils.checkpoint import checkpoint

from lipnext.model import LipNeXt
from lipnext.train_config import ActivationCheckpointing


def parallelize(
    model: LipNeXt, mesh: DeviceMesh | None, activation_checkpointing: ActivationCheckpointing = "none",
    compile: bool = False,
) -> None:  # fmt: skip
    """torchtitan's order: activation checkpointing, then compile, then fully_shard per
    block and the root (none with no `mesh`: an unsharded reference). Checkpointing first
    so that compile traces the recomputation with the block (one graph); both inside
    fully_shard, whose hooks around each block's call gather its weights before the
    forward runs and again before backward recomputes it."""
    if activation_checkpointing == "block":
        apply_activation_checkpointing(model)
    if compile:
        apply_compile(model)
    if mesh is not None:
        apply_fsdp(model, mesh)


def apply_activation_checkpointing(model: LipNeXt) -> None:
    """Each block keeps only its input for backward, which recomputes the rest: per block
    3 token-sized tensors and M R^T fewer saved (lipscale.plan), for one more forward.
    Non-reentrant (torch's recommended form, which FSDP2 and compile support); no RNG
    state saved, as no block draws random numbers."""
    for block in model.blocks:
        block.forward = functools.partial(checkpoint, block.forward, use_reentrant=False, preserve_rng_state=False)


def apply_compile(model: LipNeXt) -> None:
    """torch.compile each block's forward (all blocks share one graph: same code, same
    shapes). The forward, not the module's call: FSDP2's hooks around the call stay eager."""
    for block in model.blocks:
        block.forward = torch.compile(block.forward)


def micro_batch_sync(model: nn.Module, last: bool) -> None:
    """Before a micro-batch's backward: FSDP2 reduce-scatters the gradients only after the
    last micro-batch of a step (the earlier ones accumulate whole, unsharded, on every
    rank: one reduce-scatter per step instead of one per micro-batch, for whole
    gradients held; lipscale.plan counts them), and finishes the backward only then."""
    if isinstance(model, FSDPModule):
        model.set_requires_gradient_sync(last)
        model.set_is_last_backward(last)


def apply_fsdp(model: LipNeXt, mesh: DeviceMesh) -> None:
    """fully_shard every block, then the root (normalisation, stem, head).

    Per-block units so only one block's weights are gathered at a time - a
    1B model never exists whole on a rank; the root last, as it owns what is
    left. Weights are gathered in fp32: bf16 compute comes from autocast,
    so that certification can run the same model in fp32 (a bf16
    MixedPrecisionPolicy would make every forward bf16, off the manifold by
    ~1e-2 per matrix).
    """
    for block in model.blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)


@contextlib.contextmanager
def _on_cpu_in_full(part: nn.Module):
    """Temporarily replaces every parameter and buffer of `part` by a whole
    CPU tensor of its global shape; yields {(module, name): (original, whole)}."""
    swapped = {}
    for module in part.modules():
        for store in (module._parameters, module._buffers):
            for name, t in store.items():
                if t is not None:
                    whole = torch.empty(t.shape, dtype=t.dtype)
                    store[name] = nn.Parameter(whole, requires_grad=False) if store is module._parameters else whole
                    swapped[(module, name, id(store))] = (store, t, whole)
    try:
        yield swapped
    finally:
        for (module, name, _), (store, original, _) in swapped.items():
            store[name] = original


@torch.no_grad()
def materialize(model: LipNeXt, device: torch.device, seed: int) -> None:
    """Allocates the (possibly sharded) model on `device` and initialises it
    to exactly the weights `LipNeXt.init_weights(seed)` gives an unsharded model.

    QR cannot run on a row shard, so each part is initialised whole on the
    CPU from its own generator, one part at a time (peak: one block). A
    sharded part is initialised by one rank, round-robin, which scatters the
    rows to the others: the QRs of a 1B model are split over the ranks
    instead of repeated on each.
    """
    model.to_empty(device=device)
    for i, part in enumerate(model.parts()):
        with _on_cpu_in_full(part) as swapped:
            sharded = [o for _, o, _ in swapped.values() if isinstance(o, DTensor)]
            # Only a part that is sharded throughout can leave its init to one rank.
            mesh = sharded[0].device_mesh if len(sharded) == len(swapped) else None
            owner = i % mesh.size() if mesh else None
            if mesh is None or mesh.get_local_rank() == owner:
                part.init_weights(model.part_generator(seed, i))
            for store, original, whole in swapped.values():
                if isinstance(original, DTensor):
                    local = distribute_tensor(whole, original.device_mesh, original.placements, src_data_rank=owner)
                    original.to_local().copy_(local.to_local())
                else:
                    original.copy_(whole)
