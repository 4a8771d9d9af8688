"""The planner's FLOPs and memory agree with what torch counts and measures.

FLOPs are checked against torch.utils.flop_counter on the meta device, so
the 1B and 2B presets cost nothing. Memory is checked against the measured
peak of real train steps (forward, backward, ManifoldAdamW step), unsharded
and under FSDP2.
"""

import pytest
import torch
import torch.nn.functional as F
from torch.distributed._tools.mem_tracker import MemTracker
from torch.distributed.fsdp import fully_shard
from torch.utils.flop_counter import FlopCounterMode

from lipnext import PRESETS, LipNeXt, preset
from lipnext.manifold import ManifoldAdamW, param_groups
from lipnext.ranks import run_ranks
from lipscale.cli import main
from lipscale.plan import format_plan, measure_flops_per_s, plan


@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread: on a busy 2-core machine torch's waiting OpenMP
    threads made these train steps 5-10x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# --- FLOPs -------------------------------------------------------------------------------


def _counted_flops(config, batch: int) -> tuple[int, int]:
    """(forward, forward + backward) FLOPs that FlopCounterMode sees, all on meta."""
    with torch.device("meta"):
        model = LipNeXt(config)
        images = torch.empty(batch, config.in_channels, config.image_size, config.image_size)
        labels = torch.zeros(batch, dtype=torch.long)
    with FlopCounterMode(display=False) as forward:
        model(images)
    with FlopCounterMode(display=False) as train:
        F.cross_entropy(model(images), labels).backward()
    return forward.get_total_flops(), train.get_total_flops()


@pytest.mark.parametrize("batch", [1, 32])  # batch 1: fewer tokens than channels, M R^T not formed
@pytest.mark.parametrize("name", PRESETS)
def test_flops_match_torch_flop_counter_for_every_preset(name, batch):
    config = preset(name)
    forward, train = _counted_flops(config, batch=batch)
    planned = plan(config, batch=batch)
    assert forward > 0  # FlopCounterMode does count on meta tensors
    assert planned.forward_flops == pytest.approx(forward, rel=0.05)
    assert planned.train_flops == pytest.approx(train, rel=0.05)
    assert train == pytest.approx(3 * forward, rel=0.05)  # backward ~ 2x forward


def test_flops_per_sample_fall_with_the_batch_by_the_fused_matrix():
    """Once formed (more tokens than channels: batch >= 17 here), M R^T costs
    2 W^3 per block per pass (6 W^3 with backward) whatever the batch."""
    config = preset("cifar-l32w1024")
    small, large = (plan(config, batch=b).train_flops_per_sample for b in (32, 64))
    assert small - large == pytest.approx(6 * config.depth * config.width**3 * (1 / 32 - 1 / 64))


def _optimizer_step_flops(config, lr: float) -> int:
    torch.manual_seed(0)
    model = LipNeXt(config)
    opt = ManifoldAdamW(param_groups(model), lr=lr)
    images = torch.rand(8, config.in_channels, config.image_size, config.image_size)
    F.cross_entropy(model(images), torch.zeros(8, dtype=torch.long)).backward()
    with FlopCounterMode(display=False) as counter:
        opt.step()
    return counter.get_total_flops()


def test_optimizer_flops_are_exact_for_small_steps_and_a_lower_bound_for_larger():
    # tiny: ||A||_F ~ lr * 32 < 0.05, FastExp at order 2 as counted
    assert _optimizer_step_flops(preset("tiny"), lr=1e-3) == plan(preset("tiny"), batch=8).optimizer_flops
    # width 256: ||A||_F ~ 0.26 takes FastExp's higher orders
    cifar = preset("cifar-l8w256")
    assert _optimizer_step_flops(cifar, lr=1e-3) > plan(cifar, batch=8).optimizer_flops


def test_sharding_spreads_the_optimizer_flops_over_owner_ranks():
    config = preset("imagenet-1b")
    alone, eight = (plan(config, batch=32, world_size=w).optimizer_flops for w in (1, 8))
    assert alone / 8 <= eight < alone / 7  # 65 matrices over 8 owners: 9 on the busiest


# --- memory ------------------------------------------------------------------------------


def _train_step(model, opt, images, labels, dtype: str) -> None:
    """One step as lipnext.train takes it: bf16 by autocast over fp32 weights."""
    opt.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bf16"):
        loss = F.cross_entropy(model(images), labels)
    loss.backward()
    opt.step()


def _measured_peak(name: str, batch: int, dtype: str = "fp32", shard: bool = False) -> int:
    """Peak bytes of tensors alive during one steady-state train step.

    torch's CPU allocations are invisible to tracemalloc, and RSS only shows
    them in a fresh process with glibc's MALLOC_MMAP_THRESHOLD_ pinned so
    freed blocks go back to the OS (then its growth agreed with this to 1%
    for cifar-l8w256 at batch 64 and 128). MemTracker (private torch API) is
    a dispatch mode that sees every storage each op allocates and frees:
    exact, in-process, and it sees through FSDP2's DTensors.
    """
    config = preset(name)
    torch.manual_seed(0)
    model = LipNeXt(config)
    if shard:
        for block in model.blocks:
            fully_shard(block)
        fully_shard(model)
    opt = ManifoldAdamW(param_groups(model), lr=1e-3)
    images = torch.rand(batch, config.in_channels, config.image_size, config.image_size)
    labels = torch.randint(0, config.num_classes, (batch,))
    _train_step(model, opt, images, labels, dtype)  # creates the optimizer state
    tracker = MemTracker()
    tracker.track_external(model, opt, images, labels)
    with tracker:
        _train_step(model, opt, images, labels, dtype)
    (peak,) = tracker.get_tracker_snapshot("peak").values()
    return peak["Total"]


@pytest.mark.parametrize(
    "name,batch,dtype",
    [
        ("tiny", 128, "fp32"),
        ("tiny", 1, "fp32"),  # the optimizer step is the peak
        ("cifar-l8w256", 64, "fp32"),
        ("cifar-l8w256", 1, "fp32"),
        ("cifar-l8w256", 64, "bf16"),  # autocast: bf16 activations and weight casts
    ],
)
def test_memory_matches_the_measured_peak_of_a_train_step(name, batch, dtype):
    planned = plan(preset(name), batch=batch, dtype=dtype).memory.peak
    assert planned == pytest.approx(_measured_peak(name, batch, dtype), rel=0.1)


def test_optimizer_state_is_what_manifold_adamw_keeps():
    """Stiefel matrices keep Lie-algebra moments (n x n), the rest param-shaped ones."""
    config = preset("tiny")
    model = LipNeXt(config)
    for kwargs in ({}, {"lookahead_steps": 0}):
        opt = ManifoldAdamW(param_groups(model), **kwargs)
        _train_step(model, opt, torch.rand(4, 1, 8, 8), torch.zeros(4, dtype=torch.long), "fp32")
        kept = sum(t.nbytes for state in opt.state.values() for t in state.values() if t.dim() > 0)
        assert plan(config, batch=4, optimizer=kwargs).memory.optimizer == kept


CASES_SHARDED = [(8, "fp32"), (64, "fp32"), (64, "bf16")]


def _measured_sharded() -> list[int]:
    return [_measured_peak("cifar-l8w256", batch, dtype, shard=True) for batch, dtype in CASES_SHARDED]


def test_fsdp2_memory_per_rank_matches_the_measured_peak():
    """Two gloo ranks: at batch 8 the owner exchange of the optimizer step is
    the peak, at batch 64 the activations are."""
    measured = [max(per_rank) for per_rank in zip(*run_ranks(_measured_sharded, 2))]
    for (batch, dtype), peak in zip(CASES_SHARDED, measured):
        planned = plan(preset("cifar-l8w256"), batch=batch, world_size=2, dtype=dtype)
        assert planned.memory.peak == pytest.approx(peak, rel=0.1)


def test_sharding_divides_the_persistent_memory():
    config = preset("imagenet-1b")
    one, eight = (plan(config, batch=32, world_size=w, dtype="bf16").memory for w in (1, 8))
    for field in ("params", "grads", "optimizer"):
        assert getattr(eight, field) == pytest.approx(getattr(one, field) / 8, rel=0.01)
    assert eight.activations == one.activations  # each rank runs its own batch of 32


def test_fits_refuses_a_trial_whose_peak_exceeds_the_memory():
    big = plan(preset("imagenet-2b"), batch=128, dtype="bf16")
    assert not big.fits(80 * 2**30)  # one 80 GB GPU
    assert plan(preset("imagenet-2b"), batch=128, dtype="bf16", world_size=16).fits(80 * 2**30)
    assert big.fits(big.memory.peak) and not big.fits(big.memory.peak - 1)


@pytest.mark.parametrize("kwargs,match", [(dict(dtype="fp16"), "dtype"), (dict(batch=0), "batch")])
def test_impossible_plans_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        plan(preset("tiny"), **{"batch": 8, **kwargs})


# --- step time and the command line --------------------------------------------------------


def test_step_time_is_the_step_flops_at_the_given_rate():
    p = plan(preset("imagenet-1b"), batch=32, world_size=8, dtype="bf16", flops_per_s=4e14)
    assert p.step_time_s == (p.train_flops + p.optimizer_flops) / 4e14
    assert plan(preset("tiny"), batch=8).step_time_s is None
    assert measure_flops_per_s(n=256, repeats=2) > 1e8  # even a busy CPU core does 0.1 GFLOP/s


def test_cli_plans_imagenet_1b_on_8_ranks(capsys):
    argv = "plan imagenet-1b --world-size 8 --dtype bf16 --batch 32 --flops-per-s 4e14"
    assert main(argv.split()) == 0
    out = capsys.readouterr().out
    expected = plan(preset("imagenet-1b"), batch=32, world_size=8, dtype="bf16", flops_per_s=4e14)
    assert out.strip() == format_plan(expected)
    assert "1,081,120,896" in out and "8 x 32 = 256" in out and "step time" in out


def test_cli_measures_the_flop_rate_when_none_is_given(capsys):
    assert main(["plan", "tiny", "--batch", "8"]) == 0
    out = capsys.readouterr().out
    assert "step time" in out and "measured on this machine" in out


def test_the_exchange_buckets_bound_the_optimizer_step_transient():
    """A 1B model's matrices go to their owners a bucket at a time: a smaller
    bucket budget means a smaller transient of the optimizer step."""
    config = preset("imagenet-1b")
    small, large = (
        plan(config, batch=8, world_size=8, optimizer=dict(exchange_bucket_mb=mb)).memory.optimizer_step
        for mb in (64, 4096)
    )
    assert small < large / 4
