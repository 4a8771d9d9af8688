"""The training worker on CPU ranks (gloo, FSDP2), as lipnext.train runs it.

  scaling   global samples/s of 1 vs 2 ranks on `tiny` and `cifar-l8w256`
            (the same global batch; 2 ranks x 1 thread vs 1 rank x 2 threads);
  memory    per-rank bytes of parameters + optimizer state, sharded on 2 ranks
            vs unsharded (target <= 0.55x);
  1b        one full train step (forward, backward, manifold step) of
            imagenet-1b with FSDP2 on 2 CPU ranks at batch 1 per rank: time and
            peak RSS per rank. Lookahead off: its slow copy and step sum would
            add 2 x 4.3 GB to the 24 GB machine.

    python benchmarks/worker_step.py                       # all sections
    python benchmarks/worker_step.py --sections scaling memory
"""

import argparse
import os
import resource
import statistics
import sys
import time

import torch
import torch.distributed as dist
from harness import write_result
from torch.distributed.device_mesh import init_device_mesh

from lipnext import LipNeXt, preset
from lipnext.certify import offset_cross_entropy
from lipnext.manifold import ManifoldAdamW, param_groups
from lipnext.parallelize import apply_fsdp, materialize
from lipnext.ranks import run_ranks

SCALING = {"tiny": 256, "cifar-l8w256": 32}  # preset -> global batch


def _build(config, world, **optim):
    with torch.device("meta"):
        model = LipNeXt(config)
    if world > 1:
        apply_fsdp(model, init_device_mesh("cpu", (world,)))
    materialize(model, torch.device("cpu"), seed=0)
    return model, ManifoldAdamW(param_groups(model), lr=1e-4, **optim)


def _step(model, opt, x, y):
    loss = offset_cross_entropy(model(x), y, eps=36 / 255)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()


def _local_bytes(model, opt) -> int:
    tensors = list(model.parameters()) + [t for s in opt.state.values() for t in s.values() if torch.is_tensor(t)]
    return sum((t.to_local() if hasattr(t, "to_local") else t).numel() * t.element_size() for t in tensors)


def _scaling(name, global_batch, steps):
    world, rank = dist.get_world_size(), dist.get_rank()
    config = preset(name)
    model, opt = _build(config, world)
    g = torch.Generator().manual_seed(rank)
    batch = global_batch // world
    x = torch.rand(batch, config.in_channels, config.image_size, config.image_size, generator=g)
    y = torch.randint(0, config.num_classes, (batch,), generator=g)
    times = []
    for i in range(steps + 3):
        dist.barrier()
        start = time.perf_counter()
        _step(model, opt, x, y)
        dist.barrier()
        if i >= 3:  # warm-up
            times.append(time.perf_counter() - start)
    return {"samples_per_s": global_batch / statistics.median(times), "bytes": _local_bytes(model, opt)}


def _one_billion():
    world = dist.get_world_size()
    config = preset("imagenet-1b")
    start = time.perf_counter()
    model, opt = _build(config, world, lookahead_steps=0)
    built = time.perf_counter() - start
    x = torch.rand(1, 3, 224, 224)
    y = torch.randint(0, 1000, (1,))
    timings = {}
    start = time.perf_counter()
    loss = offset_cross_entropy(model(x), y, eps=36 / 255)
    timings["forward_s"] = time.perf_counter() - start
    start = time.perf_counter()
    loss.backward()
    timings["backward_s"] = time.perf_counter() - start
    start = time.perf_counter()
    opt.step()
    timings["optimizer_s"] = time.perf_counter() - start
    timings["step_s"] = sum(timings.values())
    return {
        **timings,
        "build_and_init_s": built,
        "param_and_state_bytes": _local_bytes(model, opt),
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    }


def on_ranks(fn, world: int, *args) -> list:
    """fn on `world` ranks that share the machine's cores between them."""
    return run_ranks(fn, world, *args, threads=max(1, (os.cpu_count() or 1) // world))


def main(sections, steps):
    result = {}
    runs = {}
    if {"scaling", "memory"} & set(sections):
        for name, batch in SCALING.items():
            runs[name] = {world: on_ranks(_scaling, world, name, batch, steps) for world in (1, 2)}
    if "scaling" in sections:
        result["scaling"] = {
            name: {
                "global_batch": SCALING[name],
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
    write_result("worker_step" if len(sections) == 3 else "worker_step_" + "_".join(sections), result)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sections", nargs="+", choices=["scaling", "memory", "1b"], default=["scaling", "memory", "1b"])
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args()
    main(args.sections, args.steps)
    sys.exit(0)
