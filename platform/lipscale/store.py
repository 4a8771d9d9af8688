"""The study's Optuna store, the source of truth for which trials exist: the study
(a new one records the spec's identity, everything that changes its results; a
continued one must match it), the user attrs the platform sets on its trials,
how a trial's end is told, and `reconcile` after a dead driver or a storage outage.

We hold our own handle on the storage, an RDBStorage (optuna.Study keeps its
own private): picklable, so Ray Tune saves and restores what holds it with the
experiment. On a database server it waits out an outage (lipscale.retry), as
the MLflow calls do: without that, a PostgreSQL restart mid-study failed
whatever the driver asked of Optuna at that moment, and Ray's OptunaSearch
logs a failed `tell` as a warning only, leaving the trial RUNNING, its row lost.
"""

import functools
import inspect
import json
import logging
import threading
import warnings
from dataclasses import dataclass

import optuna
import sqlalchemy
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.trial import FrozenTrial, TrialState

from lipnext.metrics import EPOCH, STOPPED, is_metric
from lipscale import retry, uris
from lipscale.keys import (
    FAIL_REASON_ATTR, IDENTITY_ATTR, METRICS_ATTR, OBJECTIVE_ATTR, REQUEUED_ATTR, RETRY_OF_ATTR, RUN_ATTR,
)  # fmt: skip
from lipscale.space import is_int
from lipscale.sections import RUNNER_OWNED
from lipscale.spec import Spec, SpecError
from lipscale.tracking import flatten

log = logging.getLogger("lipscale.store")
RESOURCES = {"max_concurrent", "cpus_per_worker", "gpus_per_worker", "memory_per_worker_gib", "max_failures",
             "launcher"}  # fmt: skip
"""Budget fields that say where and how fast trials run, not what they compute: a study may
continue on another cluster. (workers_per_trial is not one: it splits the batch, and the
FLOPs per sample follow the per-rank batch.)"""


def distributions(spec: Spec) -> dict[str, optuna.distributions.BaseDistribution]:
    """The search space as Optuna distributions, by dotted path."""
    space = {}
    for path, values in spec.params.items():
        if isinstance(values, list):
            space[path] = CategoricalDistribution(values)
        elif is_int(path):
            space[path] = IntDistribution(
                values["low"], values["high"], log=values["log"], step=values.get("step") or 1
            )
        else:
            space[path] = FloatDistribution(values["low"], values["high"], log=values["log"], step=values.get("step"))
    return space


def identity(spec: Spec) -> dict:
    """Everything that changes a study's results, as JSON values by section: the design and
    its space, the objective, every fixed setting, the budget less RESOURCES, the scheduler,
    the dataset and the seed. A fit never mixes trials trained differently."""
    sections = {
        "design": spec.design.model_dump(by_alias=True, exclude_none=True),
        "space": None if spec.space is None else spec.space.model_dump(by_alias=True, exclude_none=True),
        "objective": [o.model_dump() for o in spec.objective],
        "fixed": spec.fixed.model_dump(by_alias=True, exclude_none=True, exclude=RUNNER_OWNED["fixed"]),
        "budget": spec.budget.model_dump(exclude=RESOURCES),
        "scheduler": spec.scheduler.model_dump(),
        "dataset": spec.dataset.model_dump(),
        "seed": spec.seed,
    }
    return json.loads(json.dumps(sections, sort_keys=True))  # tuples as lists: as the storage gives it back


def changes(began: dict, now: dict) -> dict[str, tuple]:
    """Dotted field -> (value the study began with, value now) of every field that differs;
    a list is one value (the space's choices, the design's sizes)."""
    before, after = flatten(began), flatten(now)
    return {k: (before.get(k), after.get(k)) for k in dict.fromkeys([*before, *after]) if before.get(k) != after.get(k)}


# --- our handle on the storage -------------------------------------------------------------------


def _unanswered(error: Exception) -> bool:
    """A database server that did not answer: a connection refused or cut (SQLAlchemy's
    OperationalError or InterfaceError, which Optuna wraps in StorageInternalError)."""
    while error is not None:
        if isinstance(error, (sqlalchemy.exc.OperationalError, sqlalchemy.exc.InterfaceError)):
            return True
        error = error.__cause__ or error.__context__
    return False


_outermost = threading.local()


def _waits_out_outages(method):
    """`method` retried while the server does not answer; only the outermost call of a thread
    retries (Optuna's calls call each other: nested retries would multiply the wait)."""

    @functools.wraps(method)
    def call(self, *args, **kwargs):
        if not self.server or getattr(_outermost, "inside", False):
            return method(self, *args, **kwargs)
        _outermost.inside = True
        try:
            return retry.retried(lambda: method(self, *args, **kwargs), _unanswered, "the Optuna storage")
        finally:
            _outermost.inside = False

    return call


class Storage(optuna.storages.RDBStorage):
    """The study's RDBStorage. On a database server (not SQLite, whose errors are the disk's),
    every call waits out the server's outage, and a pooled connection is checked before use
    (pool_pre_ping: a restarted server has closed them all). A call is retried whole, in a
    new transaction; one whose commit reached the server but whose answer was lost is made
    twice: harmless for attrs, skipped for a finished trial's tell (`Store.tell`)."""

    def __init__(self, url: str, **kwargs):
        self.server = uris.scheme(url) != "sqlite"
        super().__init__(url, engine_kwargs={"pool_pre_ping": True} if self.server else None, **kwargs)


# Every method, private ones too: the study's _CachedStorage calls _get_trials, _create_new_trial and
# others of ours directly, and a PostgreSQL restart stopped the driver in _get_trials. A method that
# runs inside another (a ..._without_commit helper) is not retried on its own (_waits_out_outages).
for _name, _method in vars(optuna.storages.RDBStorage).items():
    if inspect.isfunction(_method) and not _name.startswith("__"):
        setattr(Storage, _name, _waits_out_outages(_method))


# --- the study ------------------------------------------------------------------------------------


ENDED = ("TERMINATED", "ERROR")
"""Ray Tune's statuses of a trial it will not run again."""


@dataclass(frozen=True)
class Store:
    """A study and our handle on its storage (`open_store`)."""

    spec: Spec
    storage: Storage
    study: optuna.Study

    def trial_id(self, number: int) -> int:
        """Trial `number`'s id in the storage."""
        study_id = self.storage.get_study_id_from_name(self.study.study_name)
        return self.storage.get_trial_id_from_study_id_trial_number(study_id, number)

    def trial(self, number: int) -> FrozenTrial:
        """Trial `number` as the storage has it now (the study's own list is a cached copy)."""
        return self.storage.get_trial(self.trial_id(number))

    def stopped_early(self, number: int, result: dict) -> bool:
        """Whether a trial's last report came before its own epochs (the budget's, or an
        IsoFLOP point's): the scheduler stopped it."""
        return result.get(EPOCH, 0) < self.spec.train_config(self.trial(number).params).epochs

    def set_trial_attrs(self, number: int, attrs: dict) -> None:
        """User attrs on a trial the caller holds no Trial object of, unless it has finished
        (Optuna refuses changes then; a trial Tune resumed after its end reports again)."""
        trial_id = self.trial_id(number)
        if self.storage.get_trial(trial_id).state.is_finished():
            return
        for key, value in attrs.items():
            self.storage.set_trial_user_attr(trial_id, key, value)

    def tell(self, number: int, result: dict | None, error: bool = False) -> None:
        """Tells Optuna how trial `number` ended, from its last report: its metrics into its user
        attrs first (Optuna refuses changes after); FAIL with the reason if the trial stopped itself
        (lipnext.metrics.STOPPED: it diverged, or its certificate failed the audit), PRUNED if it
        ended before its epochs (`stopped_early`), else COMPLETE with the
        objective(s), or FAIL after an error without them. A finished trial is left as it is."""
        attrs = {METRICS_ATTR: {k: v for k, v in result.items() if is_metric(k) or k == EPOCH}} if result else {}
        values = [result.get(o.metric) for o in self.spec.objective] if result else [None]
        if reason := next((result[k] for k in STOPPED if k in result), None) if result else None:
            state, values, attrs[FAIL_REASON_ATTR] = TrialState.FAIL, None, reason
        elif result and not error and self.stopped_early(number, result):
            state, values = TrialState.PRUNED, None
        elif None in values:  # Ray's OptunaSearch told a list with a None in it: refused, left RUNNING
            state, values = TrialState.FAIL if error else TrialState.PRUNED, None
        else:
            state = TrialState.COMPLETE
        self.set_trial_attrs(number, attrs)
        self.study.tell(number, values, state=state, skip_if_finished=True)

    def reconcile(self, tune_trials: dict[int, tuple[str, dict | None]]) -> list[optuna.trial.FrozenTrial]:
        """Optuna trials left RUNNING, against Ray Tune's experiment state (`tune_trials`: Optuna
        number -> Tune's status and last result). One Tune finished is told from its last result:
        its tell failed (a storage outage longer than the retries) or never came (the driver died
        between the two); Tune's state is the record of how it ended, written to the study root
        whatever the Optuna storage did, and Tune will not run it again. One Tune will resume is
        left to it. One Tune never held (the driver died after Optuna handed it out) is marked
        FAIL and its params queued again with its MLflow run. Returns the trials told."""
        study, told = self.study, []
        for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            if t.number in tune_trials:
                status, result = tune_trials[t.number]
                if status in ENDED:
                    self.tell(t.number, result, error=status == "ERROR")
                    told.append(study.trials[t.number])
                    log.info("trial %d ended in Ray Tune as %s but Optuna had it RUNNING: told", t.number, status)
                continue
            attrs = {RETRY_OF_ATTR: t.number}
            if RUN_ATTR in t.user_attrs:
                attrs[RUN_ATTR] = t.user_attrs[RUN_ATTR]
            self.set_trial_attrs(t.number, {REQUEUED_ATTR: len(study.trials)})
            study.tell(t.number, state=TrialState.FAIL)
            study.enqueue_trial(t.params, user_attrs=attrs)
            log.info("trial %d was orphaned by a stopped driver: queued again", t.number)
        return told


def open_store(spec: Spec, *, create: bool) -> Store:
    """The spec's Optuna study. A new one records the spec's identity and names its objectives
    (optuna-dashboard shows "Objective 0" otherwise); an existing one must match the identity.
    With create=False, a missing study is an error and nothing is created."""
    url = spec.optuna_url
    if (db := uris.sqlite_path(url)) is not None:
        if not create and not db.exists():
            raise SpecError(f"storage.optuna: no study {spec.name!r} to continue: {uris.redact(url)} does not exist")
        db.parent.mkdir(parents=True, exist_ok=True)
    storage = Storage(url)
    exists = spec.name in optuna.get_all_study_names(storage)
    if not exists and not create:
        raise SpecError(f"name: no study {spec.name!r} in {uris.redact(url)} to continue")
    wanted = identity(spec)
    if exists:  # read, and refused, before anything is written
        study = optuna.load_study(storage=storage, study_name=spec.name)
        if IDENTITY_ATTR not in study.user_attrs:
            raise SpecError(
                f"name: study {spec.name!r} began before LipScale recorded a study's identity; what it was trained "
                "with cannot be checked: give the new study another name"
            )
        if changed := changes(study.user_attrs[IDENTITY_ATTR], wanted):
            fields = "; ".join(f"{field}: {before!r} -> {after!r}" for field, (before, after) in changed.items())
            raise SpecError(
                f"{', '.join(changed)}: changed since study {spec.name!r} began ({fields}); its trials were trained "
                "otherwise: continue it with the spec it began with, or give the new one another name"
            )
        return Store(spec, storage, study)
    study = optuna.create_study(storage=storage, study_name=spec.name, directions=spec.directions, load_if_exists=True)
    study.set_user_attr(IDENTITY_ATTR, wanted)
    study.set_user_attr(OBJECTIVE_ATTR, json.dumps(wanted["objective"], sort_keys=True))
    with warnings.catch_warnings(category=optuna.exceptions.ExperimentalWarning, action="ignore"):  # since 3.2
        study.set_metric_names([o.metric for o in spec.objective])
    return Store(spec, storage, study)
