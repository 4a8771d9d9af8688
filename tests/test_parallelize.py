"""The one parallel path: FSDP2 at every world size, activation checkpointing and
gradient accumulation over micro-batches, against an unsharded model that takes
the whole batch at once.

The manifold steps here take float32 increments: the default bf16 ones round
each direction to 2^-8 of itself, and a difference of 1e-7 in a gradient (the
order in which micro-batches and ranks add it up) may round to another bf16
value; what is checked is that the parallel path computes the same step.
"""

import dataclasses

import pytest
import torch
import torch.distributed as dist
from torch.distributed.fsdp import FSDPModule

from lipnext import preset
from lipnext.parallelize import micro_batch_sync
from lipnext.ranks import process_group, run_ranks
from lipnext.train import build_model, build_optimizer, build_training_model, train_step, warmup_cosine
from lipnext.train_config import DataConfig, OptimConfig, TrainConfig

CONFIG = TrainConfig(
    model=preset("tiny", width=40, shift_ratio=1 / 8),  # 40 rows: uneven shards on 3 ranks
    optim=OptimConfig(increment_dtype="float32"),
    data=DataConfig(batch_size=32),
)
STEPS = 20


def _batches(steps: int = STEPS, batch: int = 32):
    g = torch.Generator().manual_seed(0)
    return [(torch.rand(batch, 1, 8, 8, generator=g), torch.randint(0, 10, (batch,), generator=g)) for _ in range(steps)]


def _train(model, config: TrainConfig, batches, rank: int = 0, world: int = 1) -> list[float]:
    """STEPS steps of train_step with a warm-up and cosine schedule; each rank takes its
    contiguous share of every global batch. Returns the losses (this rank's)."""
    optimizer = build_optimizer(model, config.optim)
    # 20 steps as 5 epochs of 4: a one-epoch warm-up, then the cosine
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(config.optim, len(batches) // 5, 5))
    losses = []
    for x, y in batches:
        share = slice(rank * len(y) // world, (rank + 1) * len(y) // world)
        losses.append(train_step(model, optimizer, x[share], y[share], 36 / 255, config).item())
        schedule.step()
    optimizer.sync_lookahead()
    optimizer.project()
    return losses


def _whole(model) -> dict[str, torch.Tensor]:
    return {k: v.full_tensor() if hasattr(v, "full_tensor") else v for k, v in model.state_dict().items()}


def test_accumulation_over_micro_batches_equals_one_step_on_the_whole_batch():
    """4 micro-batches of 8 against the batch of 32 at once: the same weights after 20
    steps to 1e-5, and the same loss each step (the micro-batches' losses weighted by
    their share of the batch)."""
    results = {}
    for micro in (None, 8):
        config = dataclasses.replace(CONFIG, data=DataConfig(batch_size=32, micro_batch_size=micro))
        model = build_model(config.model, torch.device("cpu"), seed=0)
        results[micro] = _train(model, config, _batches()), _whole(model)
    (whole_losses, whole), (micro_losses, accumulated) = results[None], results[8]
    assert micro_losses == pytest.approx(whole_losses, abs=1e-6)
    for name, tensor in whole.items():
        torch.testing.assert_close(accumulated[name], tensor, rtol=0, atol=1e-5, msg=name)
    assert any(not torch.equal(accumulated[k], whole[k]) for k in whole)  # two summation orders, not one run twice


def test_activation_checkpointing_recomputes_the_same_gradients():
    """Backward recomputes each block from its input: the same gradients, to the bit."""
    x, y = _batches(1)[0]
    grads = {}
    for ac in ("none", "block"):
        model = build_model(CONFIG.model, torch.device("cpu"), seed=0, activation_checkpointing=ac)
        train_step(model, build_optimizer(model, CONFIG.optim), x, y, 36 / 255, CONFIG)
        grads[ac] = [p.grad for p in model.parameters()]
    assert all(torch.equal(a, b) for a, b in zip(grads["none"], grads["block"]))


PARALLEL = dataclasses.replace(
    CONFIG, data=DataConfig(batch_size=32, micro_batch_size=4), activation_checkpointing="block"
)


def _sharded_run() -> tuple[list[float], dict, dict]:
    """On every rank: the model `train` builds (FSDP2 over all ranks) with checkpointing
    and micro-batches of 4, 20 steps; on rank 0 also the unsharded reference, one
    process, the whole batch at once (compared in the same process: LAPACK's QR rounds
    differently with another thread count)."""
    rank, world = dist.get_rank(), dist.get_world_size()
    model = build_training_model(PARALLEL, torch.device("cpu"))
    assert isinstance(model, FSDPModule) and all(isinstance(b, FSDPModule) for b in model.blocks)
    losses = _train(model, PARALLEL, _batches(), rank, world)
    weights = _whole(model)
    reference = {}
    if rank == 0:
        unsharded = build_model(CONFIG.model, torch.device("cpu"), seed=PARALLEL.seed)
        reference = {"losses": _train(unsharded, CONFIG, _batches()), "weights": _whole(unsharded)}
    return losses, weights, reference


@pytest.mark.parametrize("world", [1, 2])
def test_fsdp2_with_accumulation_and_checkpointing_matches_the_unsharded_reference(world):
    """20 steps (Lookahead syncs, clipping, warm-up included) with 2 micro-batches of 4 per
    rank on 2 ranks, 8 on one: every weight within 1e-5 of the unsharded model's."""
    per_rank = run_ranks(_sharded_run, world)
    reference = per_rank[0][2]
    mean_losses = [sum(losses) / world for losses in zip(*(r[0] for r in per_rank))]
    assert mean_losses == pytest.approx(reference["losses"], abs=1e-5)
    for _, weights, _ in per_rank:
        for name, tensor in reference["weights"].items():
            torch.testing.assert_close(weights[name], tensor, rtol=0, atol=1e-5, msg=name)


def test_a_lone_process_trains_in_a_process_group_of_its_own_that_goes_with_it():
    assert not dist.is_initialized()
    with process_group(torch.device("cpu")):
        assert dist.get_world_size() == 1
        model = build_training_model(CONFIG, torch.device("cpu"))
        assert isinstance(model, FSDPModule)
        micro_batch_sync(model, last=False)  # FSDP2 keeps the gradients whole until the last micro-batch
        assert not any(group.reduce_grads for group in _param_groups(model))
        micro_batch_sync(model, last=True)
        assert all(group.reduce_grads for group in _param_groups(model))
    assert not dist.is_initialized()


def _param_groups(model):
    """FSDP2's units (private API: what set_requires_gradient_sync sets)."""
    return [g for m in model.modules() if isinstance(m, FSDPModule) for g in m._get_fsdp_state()._fsdp_param_groups]


def test_micro_batches_that_do_not_divide_the_batch_per_worker_are_refused_naming_the_field():
    config = dataclasses.replace(CONFIG, data=DataConfig(batch_size=96, micro_batch_size=32))
    assert config.per_rank_batch(1) == (96, 3) and config.per_rank_batch(3) == (32, 1)
    with pytest.raises(ValueError, match=r"^data\.micro_batch_size=32 does not divide the batch per worker, 48 "):
        config.per_rank_batch(2)
    with pytest.raises(ValueError, match=r"^data\.batch_size=96 does not split over 5 workers$"):
        config.per_rank_batch(5)
