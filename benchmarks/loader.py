"""Loader throughput against the train step it has to feed, in one run.

    python benchmarks/loader.py            # ~1-2 minutes on 2 CPU cores
    python benchmarks/loader.py --smoke    # seconds, a small dataset and model: checks the script runs

Writes benchmarks/results/loader.json: samples/s of ShardLoader (shuffled,
crop+flip augmented, from freshly generated `shapes` shards) and of the
training worker's train_step (lipnext.train) on the mid-size preset
cifar-l8w256 at the same batch size, their ratio (target >= 5), and how long
the step waited for the loader when the two run together.
"""

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

from lipnext import preset
from lipnext.loader import ShardLoader
from lipnext.train import build_model, build_optimizer, train_step
from lipnext.train_config import TrainConfig
from lipscale.data.shapes import ShapesConfig, shapes_plan
from lipscale.data.shards import write_dataset

RESULTS = Path(__file__).parent / "results" / "loader.json"
EPS = 36 / 255


def loader_samples_per_s(loader: ShardLoader, epochs: int) -> list[float]:
    """Samples/s of whole epochs (shard reads, shuffling, augmentation included)."""
    rates = []
    for _ in range(epochs):
        start, samples = time.perf_counter(), 0
        for _, labels in loader:
            samples += len(labels)
        rates.append(samples / (time.perf_counter() - start))
    return rates


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=20_000, help="shapes train samples to generate")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=5, help="timed train steps")
    parser.add_argument("--smoke", action="store_true", help="1000 samples, batch 32, a 1-block model")
    args = parser.parse_args()
    if args.smoke:
        args.samples, args.batch_size, args.steps = 1000, 32, 2
    load_before = os.getloadavg()[0]  # the machines are shared: record how busy this one was

    with tempfile.TemporaryDirectory() as root:
        config = ShapesConfig(train=args.samples, test=args.batch_size)
        write_dataset(shapes_plan(config, shard_size=5_000), root)

        def loader():
            return ShardLoader(root, "train", args.batch_size, drop_last=True, augment="crop_flip")

        loader_rates = loader_samples_per_s(loader(), epochs=6)[1:]  # the first epoch warms up

        run = TrainConfig(model=preset("cifar-l8w256", **(dict(width=32, depth=1) if args.smoke else {})))
        model = build_model(run.model, torch.device("cpu"))
        opt = build_optimizer(model, run.optim)
        x, y = next(iter(loader()))
        for _ in range(2):  # warm-up
            train_step(model, opt, x, y, EPS, run)
        step_times = []
        for _ in range(args.steps):
            start = time.perf_counter()
            train_step(model, opt, x, y, EPS, run)
            step_times.append(time.perf_counter() - start)

        # Both together: how long does each step wait for its batch?
        waits, fed_steps = [], []
        batches = iter(loader())
        for _ in range(args.steps):
            start = time.perf_counter()
            x, y = next(batches)
            waits.append(time.perf_counter() - start)
            train_step(model, opt, x, y, EPS, run)
            fed_steps.append(time.perf_counter() - start)

    loader_rate = statistics.median(loader_rates)
    train_rate = args.batch_size / statistics.median(step_times)
    result = dict(
        loader_samples_per_s=round(loader_rate),
        train_step_samples_per_s=round(train_rate, 1),
        ratio=round(loader_rate / train_rate, 1),
        target_ratio=5,
        fed_step_wait_fraction=round(sum(waits[1:]) / sum(fed_steps[1:]), 4),
        loader_epoch_samples_per_s=[round(r) for r in loader_rates],
        train_step_s=[round(t, 3) for t in step_times],
        preset="cifar-l8w256",
        batch_size=args.batch_size,
        dataset=f"shapes, {args.samples} train samples in shards of 5000, raw uint8 3x32x32",
        loader="ShardLoader(shuffle=True, drop_last=True, augment='crop_flip', prefetch=4, threads=4)",
        torch=torch.__version__,
        torch_threads=torch.get_num_threads(),
        cpus=os.cpu_count(),
        load_average_1m=[round(load_before, 2), round(os.getloadavg()[0], 2)],
        machine=platform.processor() or platform.machine(),
    )
    path = RESULTS.with_name("loader_smoke.json") if args.smoke else RESULTS
    path.parent.mkdir(exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
