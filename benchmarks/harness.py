"""Shared timing for the ratio benchmarks: the machines are noisy, so variants
are timed interleaved (A, B, A, B, ...) after a warm-up, and medians compared."""

import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).parent / "results"
torch.set_flush_denormal(True)  # as lipnext.train.train does on the CPU: the benchmarks time its step


def time_interleaved(fns: dict, repeats: int, warmup: int = 2) -> dict[str, float]:
    """Median seconds per call of each fn, calls alternating between fns."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


class StepPhases:
    """Seconds in each phase of every lipnext.train.train_step, from hooks on the model
    and its optimizer: forward (the model's forward, summed over a step's micro-batches),
    backward (the rest until the optimizer: losses, backwards, gradient norm and
    clipping) and optimizer (its step). `sync` runs at each boundary
    (torch.cuda.synchronize on a GPU)."""

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, sync=lambda: None):
        self.sync, self.marks, self.steps = sync, {}, []
        self.forward_s = 0.0
        model.register_forward_pre_hook(lambda *_: self._forward_starts())
        model.register_forward_hook(lambda *_: self._forward_ends())
        optimizer.register_step_pre_hook(lambda *_: self._mark("backward"))
        optimizer.register_step_post_hook(lambda *_: self._end())

    def _mark(self, name: str) -> None:
        self.sync()
        self.marks[name] = time.perf_counter()

    def _forward_starts(self) -> None:
        self._mark("forward")
        self.marks.setdefault("start", self.marks["forward"])  # the step's first micro-batch

    def _forward_ends(self) -> None:
        self.sync()
        self.forward_s += time.perf_counter() - self.marks["forward"]

    def _end(self) -> None:
        self._mark("optimizer")
        m = self.marks
        self.steps.append(
            {"forward_s": self.forward_s, "backward_s": m["backward"] - m["start"] - self.forward_s,
             "optimizer_s": m["optimizer"] - m["backward"]}
        )  # fmt: skip
        self.marks, self.forward_s = {}, 0.0


def mm_flops_per_s(n: int = 1024, dtype=torch.float32, repeats: int = 10) -> float:
    """Measured dense torch.mm throughput on this machine: the roofline to compare with."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    seconds = time_interleaved({"mm": lambda: torch.mm(a, b)}, repeats)["mm"]
    return 2 * n**3 / seconds


def write_result(name: str, result: dict) -> Path:
    result["machine"] = {
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "processor": platform.processor() or platform.machine(),
    }
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return path
