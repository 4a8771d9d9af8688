"""What a study spec's trial costs on its GPUs, from the planner (lipscale.plan.plan):

    lipscale plan --spec studies/specs/paper/cifar10-l32w1024.yaml --flops-per-s 4e14

GPU-hours = epochs x steps per epoch x the planned step time x the trial's workers, for the
spec's largest trial (its widest, deepest shape: lipscale.spec.Spec.largest). The step time is
the planner's: matmul FLOPs (train step and manifold update) over a sustained FLOP/s per GPU,
so elementwise work, communication and input are not in it; 4e14 FLOP/s is 40% of an H100's
dense bf16 peak (989 TFLOP/s). Steps per epoch come from the dataset's train split (TRAIN_SPLITS),
scaled to the model's classes for a class subset (ImageNet's classes are near equal in size:
an estimate there, exact for CIFAR).
"""

import dataclasses
from dataclasses import dataclass

from lipnext.train_config import TrainConfig
from lipscale.plan import Plan, format_plan
from lipscale.spec import Spec, load_spec, plan_trial

TRAIN_SPLITS = {"cifar10": (50_000, 10), "cifar100": (50_000, 100), "tinyimagenet": (100_000, 200),
                "imagenet": (1_281_167, 1000)}  # fmt: skip
"""Train images and classes of each dataset the paper reports."""
H100_SUSTAINED = 4e14
"""FLOP/s per GPU that the cost assumes unless told: 40% of an H100's dense bf16 peak."""


@dataclass(frozen=True)
class TrialCost:
    plan: Plan
    """The planner's step on one worker of the largest trial."""
    workers: int
    steps_per_epoch: int
    epochs: int

    @property
    def gpu_hours(self) -> float:
        return self.epochs * self.steps_per_epoch * self.plan.step_time_s * self.workers / 3600


def trial_cost(spec: Spec, flops_per_s: float = H100_SUSTAINED, config: TrainConfig | None = None) -> TrialCost:
    """The cost of a trial of the spec (default its largest) at `flops_per_s` per GPU."""
    if spec.dataset.name not in TRAIN_SPLITS:
        raise ValueError(f"dataset.name: no train split size known for {spec.dataset.name!r} ({', '.join(TRAIN_SPLITS)})")
    config = config or spec.largest()
    samples, classes = TRAIN_SPLITS[spec.dataset.name]
    samples = samples * config.model.num_classes // classes
    workers = spec.budget.workers_per_trial
    plan = dataclasses.replace(plan_trial(config, workers), flops_per_s=flops_per_s)
    return TrialCost(plan, workers, samples // config.data.batch_size, spec.budget.epochs)


def format_cost(cost: TrialCost) -> str:
    p = cost.plan
    lines = [
        format_plan(p),
        f"steps per epoch  {cost.steps_per_epoch:,} (global batch {p.batch * cost.workers})",
        f"epochs           {cost.epochs}",
        f"GPU-hours        {cost.gpu_hours:,.0f} ({cost.workers} GPUs x {cost.gpu_hours / cost.workers:,.1f} h)",
    ]
    return "\n".join(lines)


def plan_command(args) -> None:
    """`lipscale plan`: a preset's step (lipscale.plan), or with --spec the spec's trial and its GPU-hours."""
    if args.spec is None:
        from lipscale.plan import plan_command as preset_plan

        if args.preset is None or args.batch is None:
            raise SystemExit("error: lipscale plan needs PRESET and --batch, or --spec")
        return preset_plan(args)
    print(format_cost(trial_cost(load_spec(args.spec), args.flops_per_s or H100_SUSTAINED)))
