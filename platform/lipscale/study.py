"""Running a study: Ray Tune trials, sampled by Optuna, tracked in MLflow.

    lipscale run studies/specs/digits.yaml       # start, or continue the study of that name
    lipscale resume studies/specs/digits.yaml    # continue only; refuses a spec that trains otherwise
    lipscale status studies/specs/digits.yaml    # the trials in the Optuna storage

The Optuna storage is the source of truth for which trials exist (lipscale.store).
Each trial is a Tune trial (lipscale.trial) whose config carries its Optuna trial
number and MLflow run id (lipscale.search.StudySearch links them when it asks
Optuna for the trial). The driver logs every report to MLflow and keeps the
results table (lipscale.callbacks.Bookkeeping).

Resume: Ray Tune's experiment state under <root>/tune is restored
(`Tuner.restore`): finished trials stay finished, unfinished ones resume from
their last checkpoint, and the search continues to the budget. A trial that
Optuna had handed out but Tune's last experiment snapshot did not hold (the
driver died in between) is marked FAIL and its params queued again, carrying
its MLflow run (`Store.reconcile`); Optuna cannot do this itself, its
stale-trial handling only runs inside Study.optimize.
"""

import logging
import os
import socket
import sys
import time

import optuna
import ray
from ray import tune

from lipnext.data import DataError, open_dataset
from lipscale import design, results, uris
from lipscale.callbacks import Bookkeeping
from lipscale.keys import BEST_TRIALS_TAG, CHECKPOINT_ATTR, NUMBER_KEY, RUN_ATTR, TRIAL_KEY, trial_name
from lipscale.preflight import check_storage
from lipscale.search import StudySearch, scheduler
from lipscale.data.catalog import GENERATED
from lipscale.spec import Spec, SpecError, load_spec
from lipscale.store import Store, open_store
from lipscale.tracking import Tracking
from lipscale.trial import COORDINATOR_CPUS, in_process, storage_full, trainable

log = logging.getLogger("lipscale.study")
TUNE_DIR = "tune"
"""Ray Tune's experiment under the study root."""


def run(spec: Spec, *, resume: bool = False) -> optuna.Study:
    """Runs (or continues) the study to its budget; returns the Optuna study."""
    check_storage(spec)
    if not ray.is_initialized():
        check_ray_address(os.environ.get("RAY_ADDRESS"))
    store = open_store(spec, create=not resume)
    if (root := uris.local_path(spec.root)) is not None:
        root.mkdir(parents=True, exist_ok=True)
    if (db := uris.sqlite_path(spec.mlflow_uri)) is not None:
        db.parent.mkdir(parents=True, exist_ok=True)
    tracking = Tracking(spec)
    parent_run = tracking.parent_run(store.study, spec)
    ensure_data(spec)
    # Eval metrics come on eval epochs only; Tune's check that every report holds the
    # objective would stop the study on the others.
    os.environ["TUNE_DISABLE_STRICT_METRIC_CHECKING"] = "1"
    if not ray.is_initialized():
        ray.init()  # RAY_ADDRESS, a `ray start` cluster on this machine, or a new local instance
    _warn_if_a_trial_does_not_fit(spec)
    tuner = _tuner(spec, store, tracking, parent_run)
    try:
        if tuner is not None:
            tuner.fit()
    except BaseException as e:
        if storage_full(e) is None:  # on a full disk, the parent run's store may be full too
            tracking.end(parent_run, "KILLED")
        raise
    _finish(spec, store.study, tracking, parent_run)
    return store.study


def _tuner(spec: Spec, store: Store, tracking: Tracking, parent_run: str) -> tune.Tuner | None:
    experiment = f"{spec.root}/{TUNE_DIR}"
    points = design.points(spec, open_dataset(spec.data_uri).manifest.count("train"))
    if tune.Tuner.can_restore(experiment):
        store.reconcile(_resumed_numbers(experiment))
        log.info("continuing study %s from %s", spec.name, experiment)
        return tune.Tuner.restore(experiment, trainable(spec), resume_unfinished=True, resume_errored=False)
    store.reconcile(set())
    if points and (queued := design.queue_points(store.study, points)):
        log.info("study %s: %d of its %d %s trials queued", spec.name, queued, len(points), spec.design.kind)
    trials = len(points) if points else spec.budget.trials
    left = trials - len(results.finished_trials(store.study))
    if left <= 0:
        return None
    # The sampler's state is not stored: seed it past the trials already sampled so a new
    # searcher over an old study does not repeat their start-up configurations.
    searcher = StudySearch(spec, store, tracking, parent_run, seed=spec.seed + len(store.study.trials), points=points)
    b = spec.budget
    return tune.Tuner(
        trainable(spec),
        tune_config=tune.TuneConfig(
            search_alg=searcher,
            scheduler=scheduler(spec),
            num_samples=left,
            max_concurrent_trials=b.max_concurrent,
            reuse_actors=True,
            trial_name_creator=_trial_name,
            trial_dirname_creator=_trial_name,
        ),
        run_config=tune.RunConfig(
            name=TUNE_DIR,
            storage_path=spec.root,
            callbacks=[Bookkeeping(spec, store, tracking)],
            checkpoint_config=tune.CheckpointConfig(num_to_keep=spec.fixed.checkpoint.keep),
            # Ray Train retries its own workers; Tune retries a trial that trains in-process.
            failure_config=tune.FailureConfig(max_failures=b.max_failures if in_process(spec) else 0),
        ),
    )


def _trial_name(trial) -> str:
    return trial_name(trial.config[TRIAL_KEY][NUMBER_KEY])


def _resumed_numbers(experiment: str) -> set[int]:
    """Optuna numbers of the trials in Tune's experiment state (what Tuner.restore resumes)."""
    analysis = tune.ExperimentAnalysis(experiment)
    return {t.config[TRIAL_KEY][NUMBER_KEY] for t in analysis.trials}


def ensure_data(spec: Spec) -> None:
    """Converts a generated dataset (digits, shapes: offline, once) where the spec's data should be."""
    name = spec.dataset.name
    if name not in GENERATED:
        return
    try:
        open_dataset(spec.data_uri)
    except (DataError, OSError):
        from lipscale.data.convert import convert

        log.info("converting %s to %s", name, spec.data_uri)
        convert(name, None, spec.data_uri, **spec.dataset.options)


def check_ray_address(address: str | None) -> None:
    """That a cluster answers at RAY_ADDRESS, before anything is created: ray.init() would
    retry an address where nothing listens for minutes (5 s per attempt, then again)."""
    if address in (None, "", "auto", "local"):
        return
    host, port = uris.host_port(address)
    if not host or port is None:
        raise SpecError(f"RAY_ADDRESS: {address!r} is not HOST:PORT, ray://HOST:PORT, 'auto' or 'local'")
    try:
        socket.create_connection((host, port), timeout=5).close()
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
        if CHECKPOINT_ATTR in t.user_attrs:
            tracking.log_checkpoint(t.user_attrs[RUN_ATTR], t.user_attrs[CHECKPOINT_ATTR])
    tracking.client.set_tag(parent_run, BEST_TRIALS_TAG, ",".join(str(t.number) for t in best))
    tracking.end(parent_run)


# --- command line (declared in lipscale.cli) ------------------------------------------------


def _load(args) -> Spec:
    spec = load_spec(args.spec)
    if args.smoke_test:
        spec = spec.smoke_test()
    return spec.with_root(args.root) if args.root else spec


def run_command(args) -> int:
    """`lipscale run`, `lipscale resume` and studies/scaling_law.py."""
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
    uri = uris.redact(spec.mlflow_uri)
    print(f"MLflow: {uri}" if uris.is_server(uri) else f"MLflow: mlflow ui --backend-store-uri {uri}")
    return 0


def status_command(args) -> int:
    """`lipscale status`."""
    try:
        study = open_store(_load(args), create=False).study
    except SpecError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(results.status_table(study))
    return 0


def main(argv: list[str] | None = None, default_spec: str | None = None, doc: str | None = None) -> int:
    """studies/scaling_law.py's command line."""
    from lipscale.cli import entry_parser

    return run_command(entry_parser(default_spec, doc).parse_args(argv))
