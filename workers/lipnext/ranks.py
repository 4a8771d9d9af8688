"""Runs a function on N local CPU ranks (gloo, real processes) and collects what each returns.

For trying FSDP2 code paths without a cluster: the tests compare sharded runs
with one process, and benchmarks/worker_step.py times them.

    from lipnext.ranks import run_ranks
    per_rank = run_ranks(fn, 2, arg)      # fn(arg) on ranks 0 and 1; [result_0, result_1]
"""

import os
import tempfile

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.distributed.elastic.utils.distributed import get_free_port


def _entry(rank, world, port, out_dir, threads, fn, args):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(threads)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.save(fn(*args), os.path.join(out_dir, f"{rank}.pt"))
    finally:
        dist.destroy_process_group()


def run_ranks(fn, world: int, *args, threads: int = 1) -> list:
    """fn(*args) on `world` gloo ranks of `threads` torch threads each; returns each rank's
    return value (fn and its results must pickle: fn is a module-level function)."""
    with tempfile.TemporaryDirectory() as out_dir:
        mp.spawn(_entry, args=(world, get_free_port(), out_dir, threads, fn, args), nprocs=world)
        return [torch.load(os.path.join(out_dir, f"{r}.pt"), weights_only=False) for r in range(world)]
