"""The study's Optuna store, the source of truth for which trials exist: the study
(a new one records the spec's identity, a continued one must match it), the user
attrs the platform sets on its trials, how a trial's end is told, and `reconcile`
after a dead driver or a storage outage.

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
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution, distribution_to_json
from optuna.trial import TrialState

from lipnext.metrics import EPOCH, STOPPED, is_metric
from lipscale import retry, uris
from lipscale.keys import (
    FAIL_REASON_ATTR, METRICS_ATTR, OBJECTIVE_ATTR, REQUEUED_ATTR, RETRY_OF_ATTR, RUN_ATTR, SPACE_ATTR, TRIALS_ATTR,
)  # fmt: skip
from lipscale.space import is_int
from lipscale.spec import Spec, SpecError

log = logging.getLogger("lipscale.store")
IDENTITY = {SPACE_ATTR: "space", OBJECTIVE_ATTR: "objective", TRIALS_ATTR: "budget.trials"}
"""What a continued study must share with the one that began: Optuna study user attr -> spec field."""


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


def identity(spec: Spec) -> dict[str, str]:
    """Canonical JSON of what must not change while a study continues."""
    space = {path: json.loads(distribution_to_json(d)) for path, d in distributions(spec).items()}
    objective = [o.model_dump() for o in spec.objective]
    return {k: json.dumps(v, sort_keys=True) for k, v in zip(IDENTITY, (space, objective, spec.budget.trials))}


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


@dataclass(frozen=True)
class Store:
    """A study and our handle on its storage (`open_store`)."""

    spec: Spec
    storage: Storage
    study: optuna.Study

    def set_trial_attrs(self, number: int, attrs: dict) -> None:
        """User attrs on a trial the caller holds no Trial object of, unless it has finished
        (Optuna refuses changes then; a trial Tune resumed after its end reports again)."""
        study_id = self.storage.get_study_id_from_name(self.study.study_name)
        trial_id = self.storage.get_trial_id_from_study_id_trial_number(study_id, number)
        if self.storage.get_trial(trial_id).state.is_finished():
            return
        for key, value in attrs.items():
            self.storage.set_trial_user_attr(trial_id, key, value)

    def tell(self, number: int, result: dict | None, error: bool = False) -> None:
        """Tells Optuna how trial `number` ended, from its last report: its metrics into its user
        attrs first (Optuna refuses changes after); FAIL with the reason if the trial stopped itself
        (lipnext.metrics.STOPPED: it diverged, or its certificate failed the audit), PRUNED if it
        ended before the budget's epochs (the scheduler stopped it), else COMPLETE with the
        objective(s), or FAIL after an error without them. A finished trial is left as it is."""
        attrs = {METRICS_ATTR: {k: v for k, v in result.items() if is_metric(k) or k == EPOCH}} if result else {}
        values = [result.get(o.metric) for o in self.spec.objective] if result else [None]
        if reason := next((result[k] for k in STOPPED if k in result), None) if result else None:
            state, values, attrs[FAIL_REASON_ATTR] = TrialState.FAIL, None, reason
        elif result and not error and result.get(EPOCH, 0) < self.spec.budget.epochs:
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
                if status in ("TERMINATED", "ERROR"):
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


def _readable(space: str) -> dict[str, dict]:
    """A space's identity JSON as {path: {kind, choices or low/high/log/step}}."""
    return {p: {"kind": d["name"], **d["attributes"]} for p, d in json.loads(space).items()}


def _what_changed(key: str, before: str | None, after: str) -> str:
    """The change of an identity attr: the space's, path by path (the whole of it is a
    thousand characters of JSON); the others' as they were and are."""
    if key != SPACE_ATTR or before is None:
        return f"{before} -> {after}"
    old, new = _readable(before), _readable(after)
    changes = []
    for path in dict.fromkeys([*old, *new]):
        if path not in new:
            changes.append(f"{path} removed")
        elif path not in old:
            changes.append(f"{path} added ({', '.join(f'{k} {v}' for k, v in new[path].items())})")
        elif old[path] != new[path]:
            fields = dict.fromkeys([*old[path], *new[path]])
            changes.append(f"{path}: " + ", ".join(
                f"{k} {old[path].get(k)} -> {new[path].get(k)}" for k in fields if old[path].get(k) != new[path].get(k)
            ))  # fmt: skip
    return "; ".join(changes)


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
    study = optuna.create_study(storage=storage, study_name=spec.name, directions=spec.directions, load_if_exists=True)
    wanted = identity(spec)
    if not exists:
        for key, value in wanted.items():
            study.set_user_attr(key, value)
        with warnings.catch_warnings(category=optuna.exceptions.ExperimentalWarning, action="ignore"):  # since 3.2
            study.set_metric_names([o.metric for o in spec.objective])
    for key, value in wanted.items():
        if (began := study.user_attrs.get(key)) != value:
            raise SpecError(
                f"{IDENTITY[key]}: changed since study {spec.name!r} began ({_what_changed(key, began, value)}); "
                "continue it with the spec it began with, or give the new one another name"
            )
    return Store(spec, storage, study)
