"""Process groups: one of a single rank for a lone process, and N local CPU ranks
(gloo, real processes) that run a function and return what each returns.

Training always shards with FSDP2 (lipnext.train), which needs a process group
even for one process (`python -m lipnext.train`, a Tune trial in its own
process, a test): `process_group` makes one when none exists. `run_ranks` is
for trying FSDP2 code paths without a cluster: the tests compare sharded runs
with one process, and benchmarks/worker_step.py times them.

    from lipnext.ranks import run_ranks
    per_rank = run_ranks(fn, 2, arg)      # fn(arg) on ranks 0 and 1; [result_0, result_1]
"""

import contextlib
import os
import tempfile

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.distributed.elastic.utils.distributed import get_free_port


def rank() -> int:
    """This process's rank; 0 without a process group."""
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    """The ranks of the process group; 1 without one."""
    return dist.get_world_size() if dist.is_initialized() else 1


@contextlib.contextmanager
def process_group(device: torch.device):
    """The default process group as it is (torchrun's, Ray Train's, run_ranks'), or one
    of this process alone for the duration (nccl on a GPU, gloo on the CPU), in an
    in-process store: no port or file to find, so trials in concurrent processes
    cannot collide."""
    if dist.is_initialized():
        yield
        return
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def _entry(rank, world, port, out_dir, threads, fn, args):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(threads)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.save(fn(*args), os.path.join(out_dir, f"{rank}.pt"))
    # Every rank past its last collective before any closes its connections: a rank that
    # tore its group down while a peer still used it aborted that peer (SIGABRT, "terminate
    # called without an active exception", about 1 run in 15 of a DCP test). A rank whose fn
    # raised just exits: spawn reports its error and stops the others (torchtitan likewise
    # destroys its group only on success, pytorch/torchtitan#1342).
    dist.barrier()
    dist.destroy_process_group()


def run_ranks(fn, world: int, *args, threads: int = 1) -> list:
    """fn(*args) on `world` gloo ranks of `threads` torch threads each; returns each rank's
    return value (fn and its results must pickle: fn is a module-level function)."""
    with tempfile.TemporaryDirectory() as out_dir:
        mp.spawn(_entry, args=(world, get_free_port(), out_dir, threads, fn, args), nprocs=world)
        return [torch.load(os.path.join(out_dir, f"{r}.pt"), weights_only=False) for r in range(world)]
