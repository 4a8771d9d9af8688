"""The study's Optuna store, the source of truth for which trials exist: the study
(a new one records the spec's identity, everything that changes its results; a
continued one must match it), the user attrs the platform sets on its trials,
and `reconcile` after a dead driver.

We hold our own handle on the storage, an RDBStorage (optuna.Study keeps its
own private): picklable, so Ray Tune saves and restores what holds it with the
experiment.
"""

import json
import logging
from dataclasses import dataclass

import optuna
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.trial import TrialState

from lipscale import uris
from lipscale.keys import IDENTITY_ATTR, OBJECTIVE_ATTR, REQUEUED_ATTR, RETRY_OF_ATTR, RUN_ATTR
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
        return Store(storage, study)
    study = optuna.create_study(storage=storage, study_name=spec.name, directions=spec.directions, load_if_exists=True)
    study.set_user_attr(IDENTITY_ATTR, wanted)
    study.set_user_attr(OBJECTIVE_ATTR, json.dumps(wanted["objective"], sort_keys=True))
    return Store(storage, study)
