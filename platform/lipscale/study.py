"""Running a study: Ray Tune trials, sampled by Optuna, tracked in MLflow.

    lipscale run studies/specs/digits.yaml       # start, or continue the study of that name
    lipscale resume studies/specs/digits.yaml    # continue only; refuses a changed search space
    lipscale status studies/specs/digits.yaml    # the trials in the Optuna storage

The Optuna storage is the source of truth for which trials exist. Each trial
is a Tune trial whose config carries its Optuna trial number and MLflow run
id (StudySearch links them when it asks Optuna for the trial). A one-worker
trial trains inside its Tune trial process; a larger one runs a Ray Train
TorchTrainer from it. The driver logs every report to MLflow and keeps the
results table (Bookkeeping).

Resume: Ray Tune's experiment state under <root>/tune is restored
(`Tuner.restore`): finished trials stay finished, unfinished ones resume from
their last checkpoint, and the search continues to the budget. A trial that
Optuna had handed out but Tune's last experiment snapshot did not hold (the
driver died in between) is marked FAIL and its params queued again, carrying
its MLflow run (`reconcile`); Optuna cannot do this itself, its stale-trial
handling only runs inside Study.optimize.
"""

import argparse
import errno
import json
import logging
import os
import socket
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import optuna
import ray
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution, distribution_to_json
from optuna.trial import TrialState
from ray import tune
from ray.tune.search.optuna import OptunaSearch

from lipnext.data import DataError, open_dataset
from lipnext.metrics import DIVERGED
from lipnext.train_config import TrainConfig
from lipscale import results
from lipscale.spec import DIGITS, GIB, SEARCHABLE, Spec, SpecError, check_storage, load_spec, plan_trial, redact
from lipscale.tracking import NAMESPACES, RUN_ATTR, SERVERS, Tracking

log = logging.getLogger("lipscale.study")
TUNE_DIR = "tune"
"""Ray Tune's experiment under the study root."""
COORDINATOR_CPUS = 0.01
"""CPUs of a Ray Train trial's own process, which only coordinates (Tune refuses a trial of none)."""
IDENTITY = {"space": "space", "objective": "objective", "trials": "budget.trials"}
"""What a continued study must share with the one that began: Optuna study user attr -> spec field."""
STORAGE_FULL = "storage_full"
"""Key of a trial's last report when the study's storage ran out of space: the error."""


class StorageFull(Exception):
    """The study's storage is full: the study stops, to continue once space is freed."""


def storage_full(error: BaseException | None) -> BaseException | None:
    """The innermost error, among `error` and those it came from, that says a disk (or an
    SQLite file on it) is full; None if none does."""
    found = None
    while error is not None:
        if (
            isinstance(error, StorageFull)  # a trial's report of it, which carries only the message
            or getattr(error, "errno", None) == errno.ENOSPC
            or "database or disk is full" in str(error)
        ):
            found = error
        error = error.__cause__ or error.__context__
    return found


# --- the Optuna study ---------------------------------------------------------------------


def distributions(spec: Spec) -> dict[str, optuna.distributions.BaseDistribution]:
    """The search space as Optuna distributions, by dotted path."""
    space = {}
    for path, values in spec.params.items():
        if isinstance(values, list):
            space[path] = CategoricalDistribution(values)
        elif SEARCHABLE[path] is int:
            space[path] = IntDistribution(
                values["low"], values["high"], log=values["log"], step=values.get("step") or 1
            )
        else:
            space[path] = FloatDistribution(values["low"], values["high"], log=values["log"], step=values.get("step"))
    return space


def identity(spec: Spec) -> dict[str, str]:
    """Canonical JSON of what must not change while a study continues."""
    space = {path: json.loads(distribution_to_json(d)) for path, d in distributions(spec).items()}
    objective = [o.model_dump() for o in spec.objective]
    return {k: json.dumps(v, sort_keys=True) for k, v in zip(IDENTITY, (space, objective, spec.budget.trials))}


def open_study(spec: Spec, *, create: bool) -> optuna.Study:
    """The spec's Optuna study. A new one records the spec's identity; an existing one
    must match it. With create=False, a missing study is an error and nothing is created."""
    url = spec.optuna_url
    if url.startswith("sqlite:///"):
        db = Path(url.removeprefix("sqlite:///"))
        if not create and not db.exists():
            raise SpecError(f"storage.optuna: no study {spec.name!r} to continue: {redact(url)} does not exist")
        db.parent.mkdir(parents=True, exist_ok=True)
    storage = optuna.storages.RDBStorage(url)
    exists = spec.name in optuna.get_all_study_names(storage)
    if not exists and not create:
        raise SpecError(f"name: no study {spec.name!r} in {redact(url)} to continue")
    study = optuna.create_study(storage=storage, study_name=spec.name, directions=spec.directions, load_if_exists=True)
    wanted = identity(spec)
    if not exists:
        for key, value in wanted.items():
            study.set_user_attr(key, value)
    for key, value in wanted.items():
        if study.user_attrs.get(key) != value:
            raise SpecError(
                f"{IDENTITY[key]}: changed since study {spec.name!r} began ({study.user_attrs.get(key)} -> {value}); "
                "continue it with the spec it began with, or give the new one another name"
            )
    return study


def set_trial_attrs(study: optuna.Study, number: int, attrs: dict) -> None:
    """User attrs on a trial the caller holds no Trial object of, unless it has finished
    (Optuna refuses changes then; a trial Tune resumed after its end reports again)."""
    storage = study._storage  # Study has no public handle on its storage
    trial_id = storage.get_trial_id_from_study_id_trial_number(storage.get_study_id_from_name(study.study_name), number)
    if storage.get_trial(trial_id).state.is_finished():
        return
    for key, value in attrs.items():
        storage.set_trial_user_attr(trial_id, key, value)


# --- searcher and driver-side bookkeeping ------------------------------------------------


class StudySearch(OptunaSearch):
    """OptunaSearch over the study's persistent storage that links each trial it asks for to
    its MLflow child run: number and run id go into the trial's Tune config, the run id into
    the Optuna trial. Also: a report without the objective (not an eval epoch) is skipped,
    a finished trial's last metrics go into its user attrs before it is told (Optuna refuses
    changes after), one stopped early by the scheduler is told PRUNED, not COMPLETE, and one
    that diverged is told FAIL with the reason in its user attrs."""

    def __init__(
        self, spec: Spec, storage: optuna.storages.BaseStorage, tracking: Tracking, parent_run: str, seed: int
    ):
        metrics, modes = [o.metric for o in spec.objective], [o.direction[:3] for o in spec.objective]
        single = len(metrics) == 1
        super().__init__(
            space=distributions(spec),
            metric=metrics[0] if single else metrics,
            mode=modes[0] if single else modes,
            study_name=spec.name,
            storage=storage,
            seed=seed,
        )
        self.spec, self.tracking, self.parent_run = spec, tracking, parent_run

    def suggest(self, trial_id: str) -> dict | None:
        params = super().suggest(trial_id)
        ot_trial = self._ot_trials[trial_id]
        config = self.spec.train_config(params)
        run_id = self.tracking.child_run(self.parent_run, ot_trial.number, config, ot_trial.user_attrs.get(RUN_ATTR))
        ot_trial.set_user_attr(RUN_ATTR, run_id)
        return {"params": params, "trial": {"number": ot_trial.number, RUN_ATTR: run_id}}

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        if isinstance(self.metric, str) and self.metric not in result:
            return
        super().on_trial_result(trial_id, result)

    def restore(self, checkpoint_path: str) -> None:
        super().restore(checkpoint_path)
        # The pickled sampler would replay the draws it made after this snapshot, for trials
        # that the dead driver asked for and `reconcile` has queued again: seed it afresh.
        self._ot_study.sampler = optuna.samplers.TPESampler(seed=self.spec.seed + len(self._ot_study.trials))

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        if trial_id in self._completed_trials:
            return
        ot_trial = self._ot_trials[trial_id]
        if result:
            metrics = {k: v for k, v in result.items() if k.startswith(NAMESPACES + ("epoch",))}
            set_trial_attrs(self._ot_study, ot_trial.number, {results.METRICS_ATTR: metrics})
        if result and DIVERGED in result:
            set_trial_attrs(self._ot_study, ot_trial.number, {results.FAIL_REASON_ATTR: result[DIVERGED]})
            self._ot_study.tell(ot_trial, state=TrialState.FAIL, skip_if_finished=True)
            self._completed_trials.add(trial_id)
            return
        if result and not error and result.get("epoch", 0) < self.spec.budget.epochs:
            self._ot_study.tell(ot_trial, state=TrialState.PRUNED, skip_if_finished=True)
            self._completed_trials.add(trial_id)
            return
        super().on_trial_complete(trial_id, result, error)


def _uri(checkpoint, root: str) -> str:
    """A Ray checkpoint's location as a URI (Ray keeps the filesystem apart from the path)."""
    return f"s3://{checkpoint.path}" if root.startswith("s3://") else checkpoint.path


class Bookkeeping(tune.Callback):
    """The driver's side of each trial: every report into its MLflow run, its checkpoint into
    its Optuna trial; when it ends, its run closed and the results table rewritten.

    A trial's next epoch waits until the driver has taken its report, so reports are logged
    from a background thread (~20 ms each on SQLite, against digits epochs of 0.1-1 s). The
    thread is drained before a report's checkpoint can become the point that a resumed trial
    restarts from, so no epoch before it is ever lost: Tune records an in-process trial's
    checkpoint after this callback returns; Ray Train records its own before reporting, so
    those trials (large, with long epochs) are logged as they report."""

    def __init__(self, spec: Spec, study: optuna.Study, tracking: Tracking):
        self.root, self.study, self.tracking = spec.root, study, tracking
        self.in_process = in_process(spec)
        self._start_writer()

    def _start_writer(self):
        self._writer, self._last = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mlflow-metrics"), None

    def __getstate__(self) -> dict:  # Tune pickles its callbacks with the experiment
        return {k: v for k, v in self.__dict__.items() if k not in ("_writer", "_last")}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._start_writer()

    def flush(self) -> None:
        """Returns once every report queued so far is in MLflow (raising what its writing raised)."""
        if self._last is not None:
            self._last.result()

    def on_trial_result(self, iteration, trials, trial, result, **info):
        if STORAGE_FULL in result:  # stop here: the trial is not told FAIL, and resumes later
            raise StorageFull(result[STORAGE_FULL])
        self._last = self._writer.submit(self.tracking.log_result, trial.config["trial"][RUN_ATTR], dict(result))
        if result.get("checkpoint_dir_name") or not self.in_process:
            self.flush()
        if "checkpoint_path" in result:  # a Ray Train trial: TuneReportCallback passes its checkpoint's path
            uri = _uri(ray.train.Checkpoint(result["checkpoint_path"]), self.root)
            set_trial_attrs(self.study, trial.config["trial"]["number"], {results.CHECKPOINT_ATTR: uri})

    def on_checkpoint(self, iteration, trials, trial, checkpoint, **info):
        uri = _uri(checkpoint, self.root)
        set_trial_attrs(self.study, trial.config["trial"]["number"], {results.CHECKPOINT_ATTR: uri})

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._finished(trial)

    def on_trial_error(self, iteration, trials, trial, **info):
        self._finished(trial)

    def _finished(self, trial):
        self.flush()
        frozen = self.study.trials[trial.config["trial"]["number"]]
        reason = frozen.user_attrs.get(results.FAIL_REASON_ATTR)
        self.tracking.finish(trial.config["trial"][RUN_ATTR], frozen.state.name, reason)
        results.write(self.study, self.root)

    def on_experiment_end(self, trials, **info):
        self.flush()


# --- a trial ------------------------------------------------------------------------------


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


def in_process(spec: Spec) -> bool:
    """Whether trials train in their Tune trial process instead of a Ray Train worker group."""
    return spec.budget.workers_per_trial == 1 and spec.budget.launcher == "auto"


def run_trial(config: dict, spec: Spec) -> None:
    """Tune's trainable: config holds the sampled params and the trial's number and run id."""
    from lipnext.train import RaySession, train_in_ray

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    number, run_id = config["trial"]["number"], config["trial"][RUN_ATTR]
    train_config = spec.train_config(config["params"])
    _refuse_if_too_big(spec, train_config)
    with Tracking(spec).system_metrics(run_id):
        try:
            if in_process(spec):
                train_in_ray(train_config, RaySession(tune))
            else:
                _ray_train(spec, train_config, number)
        except Exception as e:
            if (full := storage_full(e)) is None:
                raise
            # Not the trial's failure: Tune would retry it and then tell Optuna FAIL, losing
            # it. The driver stops the study on this report instead (Bookkeeping).
            tune.report({STORAGE_FULL: str(full).splitlines()[0]})
            raise


def _ray_train(spec: Spec, config: TrainConfig, number: int) -> None:
    """The trial as a TorchTrainer; a rerun with the same storage path and name resumes
    from its latest checkpoint (Ray Train V2)."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    from lipnext.train import train_loop_per_worker

    b = spec.budget
    TorchTrainer(
        train_loop_per_worker,
        train_loop_config=config.to_dict(),
        scaling_config=ScalingConfig(
            num_workers=b.workers_per_trial,
            use_gpu=b.gpus_per_worker > 0,
            resources_per_worker={"CPU": b.cpus_per_worker, "GPU": b.gpus_per_worker},
        ),
        run_config=RunConfig(
            name=f"trial-{number:04d}",
            storage_path=f"{spec.root}/train",
            callbacks=[TuneReportCallback()],  # every report goes on to Tune, and so to the driver
            checkpoint_config=CheckpointConfig(num_to_keep=config.checkpoint.keep),
            failure_config=FailureConfig(max_failures=b.max_failures),
        ),
    ).fit()


def trainable(spec: Spec):
    b = spec.budget
    # A Ray Train trial's workers hold its resources, in placement groups outside Tune's
    # accounting (hence max_concurrent_trials, always set).
    resources = {"CPU": b.cpus_per_worker, "GPU": b.gpus_per_worker} if in_process(spec) else {"CPU": COORDINATOR_CPUS}
    return tune.with_resources(tune.with_parameters(run_trial, spec=spec), resources)


def _trial_name(trial) -> str:
    return f"trial-{trial.config['trial']['number']:04d}"


# --- the study ----------------------------------------------------------------------------


def reconcile(study: optuna.Study, resumed: set[int], tracking: Tracking) -> None:
    """Optuna trials left RUNNING by a dead driver that Tune will not resume (not in
    `resumed`): marked FAIL, their params queued again with their MLflow run."""
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if t.number in resumed:
            continue
        attrs = {"retry_of": t.number}
        if RUN_ATTR in t.user_attrs:
            attrs[RUN_ATTR] = t.user_attrs[RUN_ATTR]
        set_trial_attrs(study, t.number, {results.REQUEUED_ATTR: len(study.trials)})
        study.tell(t.number, state=TrialState.FAIL)
        study.enqueue_trial(t.params, user_attrs=attrs)
        log.info("trial %d was orphaned by a stopped driver: queued again", t.number)


def _resumed_numbers(experiment: str) -> set[int]:
    """Optuna numbers of the trials in Tune's experiment state (what Tuner.restore resumes)."""
    analysis = tune.ExperimentAnalysis(experiment)
    return {t.config["trial"]["number"] for t in analysis.trials}


def ensure_data(spec: Spec) -> None:
    """Converts digits (offline, once) where the spec's data should be."""
    if spec.dataset.name != DIGITS:
        return
    try:
        open_dataset(spec.data_uri)
    except (DataError, OSError):
        from lipscale.data.convert import convert

        log.info("converting digits to %s", spec.data_uri)
        convert(DIGITS, None, spec.data_uri)


def _scheduler(spec: Spec):
    if spec.scheduler.kind == "fifo":
        return tune.schedulers.FIFOScheduler()
    metric, mode = spec.scheduler_metric
    return tune.schedulers.ASHAScheduler(
        time_attr="epoch",
        metric=metric,
        mode=mode,
        max_t=spec.budget.epochs,
        grace_period=spec.scheduler.grace_period,
        reduction_factor=spec.scheduler.reduction_factor,
    )


def _tuner(spec: Spec, study: optuna.Study, tracking: Tracking, parent_run: str) -> tune.Tuner | None:
    experiment = f"{spec.root}/{TUNE_DIR}"
    if tune.Tuner.can_restore(experiment):
        reconcile(study, _resumed_numbers(experiment), tracking)
        log.info("continuing study %s from %s", spec.name, experiment)
        return tune.Tuner.restore(experiment, trainable(spec), resume_unfinished=True, resume_errored=False)
    reconcile(study, set(), tracking)
    left = spec.budget.trials - len(results.finished_trials(study))
    if left <= 0:
        return None
    # The sampler's state is not stored: seed it past the trials already sampled so a new
    # searcher over an old study does not repeat their start-up configurations.
    searcher = StudySearch(spec, study._storage, tracking, parent_run, seed=spec.seed + len(study.trials))
    b = spec.budget
    return tune.Tuner(
        trainable(spec),
        tune_config=tune.TuneConfig(
            search_alg=searcher,
            scheduler=_scheduler(spec),
            num_samples=left,
            max_concurrent_trials=b.max_concurrent,
            reuse_actors=True,
            trial_name_creator=_trial_name,
            trial_dirname_creator=_trial_name,
        ),
        run_config=tune.RunConfig(
            name=TUNE_DIR,
            storage_path=spec.root,
            callbacks=[Bookkeeping(spec, study, tracking)],
            checkpoint_config=tune.CheckpointConfig(num_to_keep=spec.fixed.checkpoint.keep),
            # Ray Train retries its own workers; Tune retries a trial that trains in-process.
            failure_config=tune.FailureConfig(max_failures=b.max_failures if in_process(spec) else 0),
        ),
    )


def run(spec: Spec, *, resume: bool = False) -> optuna.Study:
    """Runs (or continues) the study to its budget; returns the Optuna study."""
    check_storage(spec)
    if not ray.is_initialized():
        check_ray_address(os.environ.get("RAY_ADDRESS"))
    study = open_study(spec, create=not resume)
    if "://" not in spec.root:
        Path(spec.root).mkdir(parents=True, exist_ok=True)
    if spec.mlflow_uri.startswith("sqlite:///"):
        Path(spec.mlflow_uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    tracking = Tracking(spec)
    parent_run = tracking.parent_run(study, spec)
    ensure_data(spec)
    # Eval metrics come on eval epochs only; Tune's check that every report holds the
    # objective would stop the study on the others.
    os.environ["TUNE_DISABLE_STRICT_METRIC_CHECKING"] = "1"
    if not ray.is_initialized():
        ray.init()  # RAY_ADDRESS, a `ray start` cluster on this machine, or a new local instance
    _warn_if_a_trial_does_not_fit(spec)
    tuner = _tuner(spec, study, tracking, parent_run)
    try:
        if tuner is not None:
            tuner.fit()
    except BaseException as e:
        if storage_full(e) is None:  # on a full disk, the parent run's store may be full too
            tracking.end(parent_run, "KILLED")
        raise
    _finish(spec, study, tracking, parent_run)
    return study


def check_ray_address(address: str | None) -> None:
    """That a cluster answers at RAY_ADDRESS, before anything is created: ray.init() would
    retry an address where nothing listens for minutes (5 s per attempt, then again)."""
    if address in (None, "", "auto", "local"):
        return
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        raise SpecError(f"RAY_ADDRESS: {address!r} is not HOST:PORT, ray://HOST:PORT, 'auto' or 'local'")
    try:
        socket.create_connection((host, int(port)), timeout=5).close()
    except OSError as e:
        raise SpecError(f"RAY_ADDRESS: nothing answers at {address} ({e.strerror or e})") from None


def _warn_if_a_trial_does_not_fit(spec: Spec) -> None:
    """A trial larger than the cluster waits for an autoscaler that may never come."""
    b, cluster = spec.budget, ray.cluster_resources()
    for resource, per_worker in (("CPU", b.cpus_per_worker), ("GPU", b.gpus_per_worker)):
        needed = b.workers_per_trial * per_worker + (
            COORDINATOR_CPUS if resource == "CPU" and not in_process(spec) else 0
        )
        if needed > cluster.get(resource, 0):
            log.warning("a trial needs %g %ss, the cluster has %g: trials wait for more nodes", needed, resource,
                        cluster.get(resource, 0))  # fmt: skip


def _finish(spec: Spec, study: optuna.Study, tracking: Tracking, parent_run: str) -> None:
    results.write(study, spec.root)
    best = results.best_trials(study)
    for t in best:
        if results.CHECKPOINT_ATTR in t.user_attrs:
            tracking.log_checkpoint(t.user_attrs[RUN_ATTR], t.user_attrs[results.CHECKPOINT_ATTR])
    tracking.client.set_tag(parent_run, "best_trials", ",".join(str(t.number) for t in best))
    tracking.end(parent_run)


# --- command line -------------------------------------------------------------------------


def _load(args) -> Spec:
    spec = load_spec(args.spec)
    if args.smoke_test:
        spec = spec.smoke_test()
    return spec.with_root(args.root) if args.root else spec


def _run(args) -> int:
    try:
        spec = _load(args)
        start = time.perf_counter()
        study = run(spec, resume=args.resume)
    except SpecError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except Exception as e:
        if (full := storage_full(e)) is None:
            raise
        print(
            f"error: the study's storage is full ({str(full).splitlines()[0]}); free space under {spec.root} "
            "and run the same command again: the study continues from its last checkpoints", file=sys.stderr,
        )  # fmt: skip
        return 1
    print(results.status_table(study))
    print(f"\n{time.perf_counter() - start:.0f} s; results: {spec.root}/results.parquet")
    uri = redact(spec.mlflow_uri)
    print(f"MLflow: {uri}" if uri.split(":", 1)[0] in SERVERS else f"MLflow: mlflow ui --backend-store-uri {uri}")
    return 0


def _status(args) -> int:
    try:
        spec = _load(args)
        study = open_study(spec, create=False)
    except SpecError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(results.status_table(study))
    return 0


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--root", help="study root (path or s3:// URI) in place of the spec's storage.root")
    parser.add_argument("--smoke-test", action="store_true", help="two one-epoch trials of the spec, as <name>-smoke")


def add_parser(subparsers) -> None:
    for name, help, resume in (
        ("run", "run a study (continues it when it exists)", False),
        ("resume", "continue a study; refuses a spec whose search space changed", True),
    ):
        p = subparsers.add_parser(name, help=help, description=__doc__.split("\n\n")[0])
        p.add_argument("spec", metavar="SPEC", help="study spec (YAML)")
        _common(p)
        p.set_defaults(run=_run, resume=resume)
    p = subparsers.add_parser("status", help="the trials of a study, from its Optuna storage")
    p.add_argument("spec", metavar="SPEC", help="study spec (YAML)")
    _common(p)
    p.set_defaults(run=_status)


def main(argv: list[str] | None = None, default_spec: str | None = None, doc: str | None = None) -> int:
    """studies/scaling_law.py's command line."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--spec", default=default_spec, help=f"study spec (YAML); default {default_spec}")
    parser.add_argument("--resume", action="store_true", help="continue the study; refuses a changed search space")
    _common(parser)
    return _run(parser.parse_args(argv))
