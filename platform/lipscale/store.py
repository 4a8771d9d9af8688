"""The study's Optuna store, the source of truth for which trials exist: the study
(a new one records the spec's identity, a continued one must match it), the user
attrs the platform sets on its trials, and `reconcile` after a dead driver.

We hold our own handle on the storage, an RDBStorage (optuna.Study keeps its
own private): picklable, so Ray Tune saves and restores what holds it with the
experiment.
"""

import json
import logging
from dataclasses import dataclass

import optuna
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution, distribution_to_json
from optuna.trial import TrialState

from lipscale import uris
from lipscale.keys import OBJECTIVE_ATTR, REQUEUED_ATTR, RETRY_OF_ATTR, RUN_ATTR, SPACE_ATTR, TRIALS_ATTR
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


@dataclass(frozen=True)
class Store:
    """A study and our handle on its storage (`open_store`)."""

    storage: optuna.storages.RDBStorage
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

    def reconcile(self, resumed: set[int]) -> None:
        """Optuna trials left RUNNING by a dead driver that Tune will not resume (not in
        `resumed`): marked FAIL, their params queued again with their MLflow run."""
        study = self.study
        for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            if t.number in resumed:
                continue
            attrs = {RETRY_OF_ATTR: t.number}
            if RUN_ATTR in t.user_attrs:
                attrs[RUN_ATTR] = t.user_attrs[RUN_ATTR]
            self.set_trial_attrs(t.number, {REQUEUED_ATTR: len(study.trials)})
            study.tell(t.number, state=TrialState.FAIL)
            study.enqueue_trial(t.params, user_attrs=attrs)
            log.info("trial %d was orphaned by a stopped driver: queued again", t.number)


def open_store(spec: Spec, *, create: bool) -> Store:
    """The spec's Optuna study. A new one records the spec's identity; an existing one
    must match it. With create=False, a missing study is an error and nothing is created."""
    url = spec.optuna_url
    if (db := uris.sqlite_path(url)) is not None:
        if not create and not db.exists():
            raise SpecError(f"storage.optuna: no study {spec.name!r} to continue: {uris.redact(url)} does not exist")
        db.parent.mkdir(parents=True, exist_ok=True)
    storage = optuna.storages.RDBStorage(url)
    exists = spec.name in optuna.get_all_study_names(storage)
    if not exists and not create:
        raise SpecError(f"name: no study {spec.name!r} in {uris.redact(url)} to continue")
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
    return Store(storage, study)
