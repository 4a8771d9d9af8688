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
their last checkpoint, and the search continues to the budget; the search's own
state is the Optuna storage (`StudySearch.restore_from_dir`). A trial that
Optuna had handed out but Tune's last experiment snapshot did not hold (the
driver died in between) is marked FAIL and its params queued again, carrying
its MLflow run (`Store.reconcile`); Optuna cannot do this itself, its
stale-trial handling only runs inside Study.optimize.
"""

import json
import logging
import os
import socket
import sys
import time

import fsspec
import optuna
import ray
from ray import tune

from lipnext.data import DataError, open_dataset
from lipscale import design, results, uris
from lipscale.callbacks import Bookkeeping, ReportNotLogged
from lipscale.keys import (
    BEST_TRIALS_TAG, CHECKPOINT_ATTR, FAIL_REASON_ATTR, NUMBER_KEY, RUN_ATTR, TRIAL_KEY, trial_name,
)  # fmt: skip
from lipscale.lease import Lease, holder
from lipscale.preflight import check_storage
from lipscale.search import StudySearch, scheduler
from lipscale.data.catalog import GENERATED
from lipscale.spec import Spec, SpecError, load_spec
from lipscale.store import ENDED, Store, open_store
from lipscale.tracking import Tracking
from lipscale.trial import COORDINATOR_CPUS, caused_by, in_process, storage_full, trainable

log = logging.getLogger("lipscale.study")
TUNE_DIR = "tune"
"""Ray Tune's experiment under the study root."""
LOCAL_UI = "http://127.0.0.1:5000"
"""Where `mlflow ui` (and dashboards/mlflow_ui.sh) serves by default."""


def run(spec: Spec, *, resume: bool = False) -> optuna.Study:
    """Runs (or continues) the study to its budget; returns the Optuna study. Refuses
    (StudyBusy) while another driver runs it."""
    check_storage(spec)
    if not ray.is_initialized():
        check_ray_address(os.environ.get("RAY_ADDRESS"))
    store = open_store(spec, create=not resume)
    with Lease(store.storage.engine, spec.name):
        return _run(spec, store)


def _run(spec: Spec, store: Store) -> optuna.Study:
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
    _reconcile(spec, store, tracking)  # a tell that failed during the run, told now
    _finish(spec, store.study, tracking, parent_run)
    return store.study


def _tuner(spec: Spec, store: Store, tracking: Tracking, parent_run: str) -> tune.Tuner | None:
    # Ray Tune snapshots the experiment whenever a trial has written num_to_keep checkpoints since
    # the last snapshot (so that a resume never points at a checkpoint it deleted), and warns each
    # time two snapshots come within 5 s: with the default study's keep 1 and two trials
    # checkpointing every few seconds, 41 warnings in one log. On a local root a snapshot is a
    # write of ~90 kB of experiment state (the default study: 0.08 s median, 0.7 s at most on 2
    # busy cores, against trials of up to 2 minutes): the warning is for cloud storage, where each
    # is an upload, and stays on there.
    if uris.local_path(spec.root) is not None:
        os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    points = design.points(spec, open_dataset(spec.data_uri).manifest.count("train"))
    experiment = _reconcile(spec, store, tracking)
    if experiment is not None:
        log.info("continuing study %s from %s", spec.name, experiment)
        return tune.Tuner.restore(experiment, trainable(spec), resume_unfinished=True, resume_errored=False)
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
            num_samples=-1,  # StudySearch ends the search at the budget, and keeps max_concurrent
            # Tune reuses a trial's process for the next only once the last one's function has
            # returned, and errors the next trial if that takes over 2 s: a Ray Train trial tearing
            # down its 8 workers took longer on 2 busy cores (seen in `lipscale rehearse`), and
            # its coordinator process is light to start anyway.
            reuse_actors=in_process(spec),
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
    return trial_name(_number(trial))


def _reconcile(spec: Spec, store: Store, tracking: Tracking) -> str | None:
    """`Store.reconcile` against Ray Tune's experiment state; the trials it tells get their MLflow
    runs closed and their rows. Returns the experiment to restore, if there is one."""
    experiment = f"{spec.root}/{TUNE_DIR}"
    if not tune.Tuner.can_restore(experiment):
        store.reconcile({})
        return None
    analysis = tune.ExperimentAnalysis(experiment)
    told = store.reconcile({_number(t): (t.status, t.last_result) for t in analysis.trials})
    for t in told:
        tracking.finish(t.user_attrs[RUN_ATTR], t.state.name, t.user_attrs.get(FAIL_REASON_ATTR))
    if told:
        results.write(store.study, spec.root)
    finished = {t.number for t in store.study.get_trials(deepcopy=False, states=results.FINISHED)}
    if lagging := [t.trial_id for t in analysis.trials if t.status not in ENDED and _number(t) in finished]:
        _mark_ended(experiment, lagging)
    return experiment


def _number(tune_trial) -> int:
    return tune_trial.config[TRIAL_KEY][NUMBER_KEY]


def _mark_ended(experiment: str, trial_ids: list[str]) -> None:
    """Marks Tune trials TERMINATED in the experiment's newest snapshot. Ray copies a snapshot
    to the root after the trial's end has been told to the Optuna storage, so a driver killed
    between the two left the trial running in it (seen in the driver-kill test: its last report
    there, epoch 20 of 20); restored as it was, Tune ran it again, from a checkpoint Bookkeeping
    had pruned. The Optuna storage is the record of how a trial ended. Written to a temporary
    file and renamed: a kill mid-write leaves the snapshot as it was."""
    fs, path = fsspec.core.url_to_fs(experiment)
    newest = max(fs.glob(f"{path}/experiment_state-*.json"))
    state = json.loads(fs.cat_file(newest))
    for entry in state["trial_data"]:  # [the trial's JSON, its run metadata's JSON]
        trial = json.loads(entry[0])
        if trial["trial_id"] in trial_ids:
            trial["status"] = "TERMINATED"
            entry[0] = json.dumps(trial, indent=2)
    staged = f"{path}/.{newest.rsplit('/', 1)[1]}.tmp"
    fs.pipe_file(staged, json.dumps(state).encode())
    fs.mv(staged, newest)
    log.info("trials %s had ended in the Optuna storage but not in Ray Tune's last snapshot: marked ended", trial_ids)


def ensure_data(spec: Spec) -> None:
    """Converts a generated dataset (digits, shapes: offline, once) under the root when the spec
    names no uri: a uri it names must hold the data (lipscale.preflight)."""
    name = spec.dataset.name
    if name not in GENERATED or spec.dataset.uri is not None:
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
    tracking.log_summary(parent_run, results.best_metrics(study))
    best = results.best_trials(study)
    for t in best:
        if CHECKPOINT_ATTR in t.user_attrs:
            tracking.log_checkpoint(t.user_attrs[RUN_ATTR], t.user_attrs[CHECKPOINT_ATTR])
    tracking.client.set_tag(parent_run, BEST_TRIALS_TAG, ",".join(str(t.number) for t in best))
    tracking.end(parent_run)


# --- command line (declared in lipscale.cli) ------------------------------------------------


def _load(args) -> Spec:
    spec = load_spec(args.spec, args.root)
    return spec.smoke_test(args.root) if args.smoke_test else spec


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
        if (lost := caused_by(e, lambda c: isinstance(c, ReportNotLogged))) is not None:
            print(f"error: {lost}", file=sys.stderr)
            return 1
        if (full := storage_full(e)) is None:
            raise
        print(
            f"error: the study's storage is full ({str(full).splitlines()[0]}); free space under {spec.root} "
            "and run the same command again: the study continues from its last checkpoints", file=sys.stderr,
        )  # fmt: skip
        return 1
    print(results.status_table(study))
    print(f"\n{time.perf_counter() - start:.0f} s; results: {spec.root}/results.parquet")
    uri, tracking = uris.redact(spec.mlflow_uri), Tracking(spec)
    if uris.is_server(uri):
        print(f"MLflow: {tracking.view_url(uri)}")
    else:
        print(f"MLflow: mlflow ui --backend-store-uri {uri}, then {tracking.view_url(LOCAL_UI)}")
    return 0


def status_command(args) -> int:
    """`lipscale status`: the trials, and whether a driver is running the study."""
    try:
        store = open_store(_load(args), create=False)
    except SpecError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(results.status_table(store.study))
    print(driver_status(store, args))
    return 0


def driver_status(store: Store, args) -> str:
    """Who runs the study: its driver, or none, and then how trials left RUNNING are resumed."""
    now, driver = time.time(), holder(store.storage.engine, store.study.study_name)
    if driver is not None and driver.alive(now):
        return f"running: its driver is {driver.describe(now)}"
    last = f" (its last driver, {driver.describe(now)}, is gone)" if driver is not None else ""
    running = len(store.study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)))
    if not running:
        return f"not running{last}"
    command = " ".join(["lipscale resume", args.spec, *(["--root", args.root] if args.root else []),
                        *(["--smoke-test"] if args.smoke_test else [])])  # fmt: skip
    return (
        f"not running{last}: its {running} RUNNING trials stopped with their driver; "
        f"`{command}` resumes them from their last checkpoints"
    )


def main(argv: list[str] | None = None, default_spec: str | None = None, doc: str | None = None) -> int:
    """studies/scaling_law.py's command line."""
    from lipscale.cli import entry_parser

    args = entry_parser(default_spec, doc).parse_args(argv)
    if args.rehearse:
        from lipscale.rehearse import rehearse_command

        return rehearse_command(args)
    return run_command(args)
