"""The training worker on CPU ranks (gloo, FSDP2), as lipnext.train runs it: its
build_model, build_optimizer and train_step (clipping and the finiteness check included).

  scaling   global samples/s of 1 vs 2 ranks on `tiny` and `cifar-l8w256`
            (the same global batch; 2 ranks x 1 thread vs 1 rank x 2 threads);
  memory    per-rank bytes of parameters + optimizer state, sharded on 2 ranks
            vs unsharded (target <= 0.55x);
  1b        one full train step (forward, backward, clipping, manifold step) of
            imagenet-1b with FSDP2 on 2 CPU ranks at batch 1 per rank: time and
            peak RSS per rank. Lookahead off: its slow copy and step sum would
            add 2 x 4.3 GB to the 24 GB machine.

    python benchmarks/worker_step.py                       # all sections
    python benchmarks/worker_step.py --sections scaling memory
    python benchmarks/worker_step.py --smoke --sections scaling memory --steps 1   # seconds: checks it runs
"""

import argparse
import os
import resource
import statistics
import sys
import time

import torch
import torch.distributed as dist
from harness import StepPhases, write_result
from torch.distributed.device_mesh import init_device_mesh

from lipnext import preset
from lipnext.ranks import run_ranks
from lipnext.train import build_model, build_optimizer, train_step
from lipnext.train_config import OptimConfig, TrainConfig

SCALING = {"tiny": 256, "cifar-l8w256": 32}  # preset -> global batch
EPS = 36 / 255


def _build(config, world, **optim):
    mesh = init_device_mesh("cpu", (world,)) if world > 1 else None
    model = build_model(config, torch.device("cpu"), mesh=mesh)
    run = TrainConfig(model=config, optim=OptimConfig(lr=1e-4, **optim))
    return model, build_optimizer(model, run.optim), run


def _local_bytes(model, opt) -> int:
    tensors = list(model.parameters()) + [t for s in opt.state.values() for t in s.values() if torch.is_tensor(t)]
    return sum((t.to_local() if hasattr(t, "to_local") else t).numel() * t.element_size() for t in tensors)


def _scaling(name, global_batch, steps):
    world, rank = dist.get_world_size(), dist.get_rank()
    config = preset(name)
    model, opt, run = _build(config, world)
    g = torch.Generator().manual_seed(rank)
    batch = global_batch // world
    x = torch.rand(batch, config.in_channels, config.image_size, config.image_size, generator=g)
    y = torch.randint(0, config.num_classes, (batch,), generator=g)
    times = []
    for i in range(steps + 3):
        dist.barrier()
        start = time.perf_counter()
        train_step(model, opt, x, y, EPS, run)
        dist.barrier()
        if i >= 3:  # warm-up
            times.append(time.perf_counter() - start)
    return {"samples_per_s": global_batch / statistics.median(times), "bytes": _local_bytes(model, opt)}


def _one_billion():
    world = dist.get_world_size()
    config = preset("imagenet-1b")
    start = time.perf_counter()
    model, opt, run = _build(config, world, lookahead_steps=0)
    built = time.perf_counter() - start
    phases = StepPhases(model, opt)
    x = torch.rand(1, 3, 224, 224)
    y = torch.randint(0, 1000, (1,))
    start = time.perf_counter()
    train_step(model, opt, x, y, EPS, run)
    step = time.perf_counter() - start
    return {
        **phases.steps[0],
        "step_s": step,
        "build_and_init_s": built,
        "param_and_state_bytes": _local_bytes(model, opt),
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    }


def on_ranks(fn, world: int, *args) -> list:
    """fn on `world` ranks that share the machine's cores between them."""
    return run_ranks(fn, world, *args, threads=max(1, (os.cpu_count() or 1) // world))


def main(sections, steps, smoke=False):
    result = {}
    runs = {}
    scaling = {"tiny": 32} if smoke else SCALING
    if {"scaling", "memory"} & set(sections):
        for name, batch in scaling.items():
            runs[name] = {world: on_ranks(_scaling, world, name, batch, steps) for world in (1, 2)}
    if "scaling" in sections:
        result["scaling"] = {
            name: {
                "global_batch": scaling[name],
                "samples_per_s_1_rank": r[1][0]["samples_per_s"],
                "samples_per_s_2_ranks": r[2][0]["samples_per_s"],
                "speedup_2_over_1": r[2][0]["samples_per_s"] / r[1][0]["samples_per_s"],
            }
            for name, r in runs.items()
        }
    if "memory" in sections:
        result["memory"] = {
            name: {
                "unsharded_bytes": r[1][0]["bytes"],
                "per_rank_bytes_2_ranks": [x["bytes"] for x in r[2]],
                "max_rank_over_unsharded": max(x["bytes"] for x in r[2]) / r[1][0]["bytes"],
                "target": 0.55,
            }
            for name, r in runs.items()
        }
    if "1b" in sections:
        result["imagenet_1b_fsdp2_2_ranks"] = on_ranks(_one_billion, 2)
    name = "worker_step" if len(sections) == 3 else "worker_step_" + "_".join(sections)
    write_result(f"{name}_smoke" if smoke else name, result)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sections", nargs="+", choices=["scaling", "memory", "1b"], default=["scaling", "memory", "1b"])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--smoke", action="store_true", help="seconds: `tiny` at batch 32 only, written to *_smoke.json")
    args = parser.parse_args()
    main(args.sections, args.steps, args.smoke)
    sys.exit(0)
