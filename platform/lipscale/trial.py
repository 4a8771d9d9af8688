"""A trial: what Ray Tune runs for each one (`trainable`). A one-worker trial trains
inside its Tune trial process (no worker group to start); a larger one, or any with
`launcher: ray_train`, runs a Ray Train TorchTrainer from there, sharded with FSDP2.

A full disk is not the trial's failure: Tune would retry it and then tell Optuna
FAIL, losing it. The trial reports it instead, and the driver stops the study on
that report (lipscale.callbacks); rerun once space is freed, it continues.
"""

import errno
import logging
from pathlib import Path

from ray import tune

from lipnext.train_config import TrainConfig
from lipscale.keys import NUMBER_KEY, PARAMS_KEY, RUN_ATTR, STORAGE_FULL_KEY, TRIAL_KEY, trial_name
from lipscale.spec import GIB, Spec, plan_trial
from lipscale.tracking import Tracking

COORDINATOR_CPUS = 0.01
"""CPUs of a Ray Train trial's own process, which only coordinates (Tune refuses a trial of none)."""


class StorageFull(Exception):
    """The study's storage is full: the study stops, to continue once space is freed."""


def caused_by(error: BaseException | None, test) -> BaseException | None:
    """The innermost error, among `error` and those it came from (Tune wraps what a callback
    raised), that passes `test`; None if none does."""
    found = None
    while error is not None:
        if test(error):
            found = error
        error = error.__cause__ or error.__context__
    return found


def storage_full(error: BaseException | None) -> BaseException | None:
    """The innermost error that says a disk (or an SQLite file on it) is full; None if none does."""
    return caused_by(
        error,
        lambda e: isinstance(e, StorageFull)  # a trial's report of it, which carries only the message
        or getattr(e, "errno", None) == errno.ENOSPC
        or "database or disk is full" in str(e),
    )


def in_process(spec: Spec) -> bool:
    """Whether trials train in their Tune trial process instead of a Ray Train worker group."""
    return spec.budget.workers_per_trial == 1 and spec.budget.launcher == "auto"


def _refuse_if_too_big(spec: Spec, config: TrainConfig) -> None:
    """The planner's check of this trial against its worker's memory: the spec's figure, or
    the GPU this process holds. Raises before any training starts."""
    import torch

    if spec.budget.memory_per_worker_gib is not None:
        memory = int(spec.budget.memory_per_worker_gib * GIB)
    elif torch.cuda.is_available() and in_process(spec):
        memory = torch.cuda.mem_get_info()[1]
    else:
        return
    peak = plan_trial(config, spec.budget.workers_per_trial).memory.peak
    if peak > memory:
        raise MemoryError(f"trial needs {peak / GIB:.3g} GiB per worker (`lipscale plan`), has {memory / GIB:.3g}")


def run_trial(config: dict, spec: Spec) -> None:
    """Tune's trainable: config holds the sampled params and the trial's number and run id
    (lipscale.search.StudySearch)."""
    from lipnext.train import RaySession, train_in_ray

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    number, run_id = config[TRIAL_KEY][NUMBER_KEY], config[TRIAL_KEY][RUN_ATTR]
    train_config = spec.fitted(spec.train_config(config[PARAMS_KEY]))
    _refuse_if_too_big(spec, train_config)
    with Tracking(spec).system_metrics(run_id):
        try:
            if in_process(spec):
                train_in_ray(train_config, RaySession(tune, Path(tune.get_context().get_trial_dir())))
            else:
                _ray_train(spec, train_config, number)
        except Exception as e:
            if (full := storage_full(e)) is None:
                raise
            tune.report({STORAGE_FULL_KEY: str(full).splitlines()[0]})
            raise


def _ray_train(spec: Spec, config: TrainConfig, number: int) -> None:
    """The trial as a TorchTrainer; a rerun with the same storage path and name resumes
    from its latest checkpoint (Ray Train V2)."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    from lipnext.train import train_loop_per_worker

    b = spec.budget
    TorchTrainer(
        train_loop_per_worker,
        train_loop_config=config.to_dict(),
        # Ray's default follows use_gpu (nccl); a rehearsal's workers hold GPUs that are Ray
        # resources only, and train on the CPU (lipscale.rehearse).
        torch_config=TorchConfig(backend="gloo" if config.device == "cpu" else None),
        scaling_config=ScalingConfig(
            num_workers=b.workers_per_trial,
            use_gpu=b.gpus_per_worker > 0,
            resources_per_worker={"CPU": b.cpus_per_worker, "GPU": b.gpus_per_worker},
        ),
        run_config=RunConfig(
            name=trial_name(number),
            storage_path=f"{spec.root}/train",
            callbacks=[TuneReportCallback()],  # every report goes on to Tune, and so to the driver
            checkpoint_config=CheckpointConfig(num_to_keep=config.checkpoint.keep),
            failure_config=FailureConfig(max_failures=b.max_failures),
        ),
    ).fit()


def trainable(spec: Spec):
    """run_trial with the spec, holding its resources: a Ray Train trial's workers hold theirs
    in placement groups outside Tune's accounting (hence max_concurrent_trials, always set)."""
    b = spec.budget
    resources = {"CPU": b.cpus_per_worker, "GPU": b.gpus_per_worker} if in_process(spec) else {"CPU": COORDINATOR_CPUS}
    return tune.with_resources(tune.with_parameters(run_trial, spec=spec), resources)
