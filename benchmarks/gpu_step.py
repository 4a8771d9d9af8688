"""bf16 train-step throughput and peak memory of imagenet-1b, width/depth
slices of it and imagenet-2b on one GPU, with model FLOP utilisation (MFU).

Each case: the training worker's own build_model (meta, then materialised
on the GPU), build_optimizer (ManifoldAdamW) and train_step, with bf16
autocast (fp32 weights and optimizer state), gradient clipping and the
finiteness check included; steps timed after warm-up, with a CUDA sync at each
end. MFU = model FLOPs (forward + backward, FlopCounterMode) per second / the
GPU's dense bf16 peak; the optimizer's matmuls are reported separately (timed
by hooks around its step) as overhead, not counted as useful work. The
measured torch.mm bf16 rate is recorded beside the nominal peak.

    python benchmarks/gpu_step.py                   # on a GPU machine: writes results/gpu_step.json
    python benchmarks/gpu_step.py --smoke           # CPU, tiny, seconds: checks the script runs
"""

import argparse
import statistics
import time

import torch
from harness import StepPhases, write_result

from lipnext import preset
from lipnext.model import train_flops_per_sample
from lipnext.train import build_model, build_optimizer, train_step
from lipnext.train_config import OptimConfig, TrainConfig

NOMINAL_BF16_FLOPS = {"H100": 989e12, "H200": 989e12}  # dense, SXM
CASES = [  # (label, preset, overrides, batch): slices of imagenet-1b, the whole, then 2B
    ("L8W4096", "imagenet-1b", dict(depth=8), 64),
    ("L32W1024", "imagenet-1b", dict(width=1024), 64),
    ("L32W2048", "imagenet-1b", dict(width=2048), 64),
    ("imagenet-1b", "imagenet-1b", {}, 32),
    ("imagenet-1b", "imagenet-1b", {}, 64),
    ("imagenet-2b", "imagenet-2b", {}, 32),
]


def _timer(device):
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter()


def measure(config, batch, device, steps, warmup=3) -> dict:
    run = TrainConfig(model=config, optim=OptimConfig(lr=1e-4), precision="bf16")
    model = build_model(config, device)
    opt = build_optimizer(model, run.optim)
    phases = StepPhases(model, opt, sync=lambda: _timer(device))
    x = torch.rand(batch, config.in_channels, config.image_size, config.image_size, device=device)
    y = torch.randint(0, config.num_classes, (batch,), device=device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    step_times = []
    for i in range(warmup + steps):
        start = _timer(device)
        train_step(model, opt, x, y, 36 / 255, run)
        if i >= warmup:
            step_times.append(_timer(device) - start)
    step = statistics.median(step_times)
    flops = train_flops_per_sample(config, batch) * batch
    return {
        "batch": batch,
        "params": sum(p.numel() for p in model.parameters()),
        "step_s": step,
        "optimizer_s": statistics.median(p["optimizer_s"] for p in phases.steps[warmup:]),
        "samples_per_s": batch / step,
        "model_flops_per_step": flops,
        "model_flops_per_s": flops / step,
        "peak_memory_bytes": torch.cuda.max_memory_allocated() if device.type == "cuda" else None,
    }


def mm_rate(device, n=8192) -> float:
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    start = _timer(device)
    for _ in range(10):
        a @ b
    return 10 * 2 * n**3 / (_timer(device) - start)


def main(smoke: bool, steps: int):
    device = torch.device("cpu" if smoke else "cuda")
    cases = [("tiny", "tiny", {}, 64)] if smoke else CASES
    device_name = "cpu" if smoke else torch.cuda.get_device_name()
    nominal = next((v for k, v in NOMINAL_BF16_FLOPS.items() if k in device_name), None)
    result = {"device": device_name, "nominal_bf16_flops_per_s": nominal, "mm_bf16_flops_per_s": mm_rate(device, 256 if smoke else 8192)}
    result["cases"] = []
    for label, name, overrides, batch in cases:
        config = preset(name, **overrides)
        try:
            case = measure(config, batch, device, steps)
        except torch.OutOfMemoryError as e:  # a size that does not fit is a result too
            case = {"batch": batch, "out_of_memory": str(e).splitlines()[0]}
        if nominal and "model_flops_per_s" in case:
            case["mfu"] = case["model_flops_per_s"] / nominal
            # the optimizer's cost is per step, not per sample, and split over ranks by owner
            forward_backward_s = case["step_s"] - case["optimizer_s"]
            case["mfu_forward_backward"] = case["model_flops_per_step"] / forward_backward_s / nominal
        result["cases"].append({"case": label, **case})
        print(label, {k: case[k] for k in ("batch", "samples_per_s", "mfu", "peak_memory_bytes", "out_of_memory") if k in case}, flush=True)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    write_result("gpu_step_smoke" if smoke else "gpu_step", result)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="CPU, tiny preset: checks the script runs")
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args()
    main(args.smoke, args.steps)
