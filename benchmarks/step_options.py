"""What each option of the one parallel path costs a CPU train step, variants
interleaved in one process (lipnext.train's build_model, build_optimizer and
train_step, on the model `train` builds: FSDP2 over a one-rank group):

  unsharded     no FSDP2 (the path world size 1 took before FSDP2 at every size)
  fsdp1         FSDP2 over one rank: what every lone run now trains
  checkpointed  fsdp1 with activation checkpointing per block
  micro4        fsdp1 in 4 micro-batches (gradients accumulated, one step)
  compiled      fsdp1 with torch.compile of each block (inductor, C++ on the CPU)
  bf16          fsdp1 under bf16 autocast (AMX on these Xeons); weights fp32

Seconds per step (median) and each variant's ratio to fsdp1, on one torch thread
(the 2 cores are shared: waiting OpenMP threads made steps 5-10x slower,
tests/test_plan.py).

    python benchmarks/step_options.py                           # digits (width 128, depth 8) and cifar-l8w256
    python benchmarks/step_options.py --smoke --repeats 2       # tiny, seconds: checks it runs
"""

import argparse
import dataclasses

import torch
from harness import time_interleaved, write_result

from lipnext import preset
from lipnext.ranks import process_group
from lipnext.train import build_model, build_optimizer, build_training_model, train_step
from lipnext.train_config import DataConfig, TrainConfig

CASES = {  # label: (preset, overrides, batch)
    "digits-w128-d8": ("digits", dict(width=128, depth=8), 128),
    "cifar-l8w256": ("cifar-l8w256", {}, 64),
}
VARIANTS = {  # label: TrainConfig changes (None: unsharded)
    "unsharded": None,
    "fsdp1": {},
    "checkpointed": dict(activation_checkpointing="block"),
    "micro4": "micro",
    "compiled": dict(compile=True),
    "bf16": dict(precision="bf16"),
}


def _variant(base: TrainConfig, changes, batch: int) -> tuple[TrainConfig, bool]:
    """(config, sharded) of a variant."""
    if changes is None:
        return base, False
    if changes == "micro":
        return dataclasses.replace(base, data=DataConfig(batch_size=batch, micro_batch_size=batch // 4)), True
    return dataclasses.replace(base, **changes), True


def measure(name: str, overrides: dict, batch: int, repeats: int) -> dict:
    model_config = preset(name, **overrides)
    base = TrainConfig(model=model_config, data=DataConfig(batch_size=batch))
    g = torch.Generator().manual_seed(0)
    size = model_config.image_size
    x = torch.rand(batch, model_config.in_channels, size, size, generator=g)
    y = torch.randint(0, model_config.num_classes, (batch,), generator=g)
    steps = {}
    for label, changes in VARIANTS.items():
        config, sharded = _variant(base, changes, batch)
        cpu = torch.device("cpu")
        model = build_training_model(config, cpu) if sharded else build_model(config.model, cpu, config.seed)
        optimizer = build_optimizer(model, config.optim)
        steps[label] = lambda m=model, o=optimizer, c=config: train_step(m, o, x, y, 36 / 255, c)
    seconds = time_interleaved(steps, repeats, warmup=3)  # compile's first calls are warm-up
    return {"batch": batch, "seconds_per_step": seconds, "ratio_to_fsdp1": {k: v / seconds["fsdp1"] for k, v in seconds.items()}}


def main(smoke: bool, repeats: int) -> None:
    torch.set_num_threads(1)
    cases = {"tiny": ("tiny", {}, 32)} if smoke else CASES
    with process_group(torch.device("cpu")):
        result = {"cases": {label: measure(*case, repeats) for label, case in cases.items()}}
    write_result("step_options_smoke" if smoke else "step_options", result)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="the tiny preset: checks the script runs")
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    main(args.smoke, args.repeats)
