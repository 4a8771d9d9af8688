"""The search: Optuna's sampler behind Ray Tune (StudySearch) and the scheduler that
stops trials early (ASHA; within each size for a ladder, SizeBrackets).

StudySearch asks the study's own Optuna storage for each trial, and links the
trial to its MLflow child run there: the Optuna number and the run id go into
the Tune trial's config, the run id into the Optuna trial. A grid design's
trials are queued in that storage (lipscale.design), and handed out first.
"""

import logging

import optuna
from ray import tune
from ray.tune.schedulers import FIFOScheduler, TrialScheduler
from ray.tune.search import Searcher
from ray.tune.search.optuna import OptunaSearch

from lipnext.metrics import EPOCH
from lipscale import design, results
from lipscale.keys import NUMBER_KEY, PARAMS_KEY, RUN_ATTR, TRIAL_KEY, TUNE_ID_ATTR
from lipscale.spec import Spec
from lipscale.store import Store, distributions
from lipscale.tracking import Tracking

log = logging.getLogger("lipscale.search")


class StudySearch(OptunaSearch):
    """OptunaSearch over the study's persistent storage that links each trial it asks for to
    its MLflow child run. Also: a report without the objective (not an eval epoch) is skipped,
    and a finished trial is told by the study's store (`Store.tell`: PRUNED when the scheduler
    stopped it, with its last evaluated objective as its value, the one its results row shows;
    FAIL with the reason when it stopped itself; its last metrics in its user attrs).

    The search keeps the budget and the concurrency itself, from the Optuna storage, and keeps
    no state anywhere else: Ray pickles a search's state (its SearchGenerator's trial count, its
    ConcurrencyLimiter's live trials, the searcher) beside the experiment state and copies them
    from a staging folder to the study root one by one, so a driver killed mid-copy left them
    from different snapshots (seen in the driver-kill test: a count of 2 beside 3 trials, and a
    fifth trial ran; in CI, a 0-byte searcher pickle, and Ray started the experiment over)."""

    def __init__(
        self, spec: Spec, store: Store, tracking: Tracking, parent_run: str, seed: int,
        points: list[design.Point] | None = None,
    ):  # fmt: skip
        metrics, modes = [o.metric for o in spec.objective], [o.direction[:3] for o in spec.objective]
        single = len(metrics) == 1
        super().__init__(
            space=design.search_space(points) if points else distributions(spec),
            metric=metrics[0] if single else metrics,
            mode=modes[0] if single else modes,
            study_name=spec.name,
            storage=store.storage,
            seed=seed,
        )
        self.spec, self.store, self.tracking, self.parent_run = spec, store, tracking, parent_run
        self.budget = len(points) if points else spec.budget.trials

    def suggest(self, trial_id: str) -> dict | str | None:
        if len(self._ot_trials.keys() - self._completed_trials) >= self.spec.budget.max_concurrent:
            return None  # every slot taken: Tune asks again later
        if len(results.finished_trials(self._ot_study, running=True)) >= self.budget:
            return Searcher.FINISHED
        params = super().suggest(trial_id)
        ot_trial = self._ot_trials[trial_id]
        config = self.spec.train_config(params)
        run_id = self.tracking.child_run(self.parent_run, ot_trial.number, config, ot_trial.user_attrs.get(RUN_ATTR))
        ot_trial.set_user_attr(RUN_ATTR, run_id)
        ot_trial.set_user_attr(TUNE_ID_ATTR, trial_id)
        return {PARAMS_KEY: params, TRIAL_KEY: {NUMBER_KEY: ot_trial.number, RUN_ATTR: run_id}}

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        if isinstance(self.metric, str) and self.metric not in result:
            return
        super().on_trial_result(trial_id, result)

    def save_to_dir(self, checkpoint_dir: str, session_str: str = "default") -> None:
        """Nothing to save: the search's state is the Optuna storage (`restore_from_dir`)."""

    def restore_from_dir(self, checkpoint_dir: str) -> None:
        """The trials Tune may resume, from the Optuna storage: RUNNING ones, by Tune trial id.
        Ray's own pickle of this state is copied from a staging folder to the study root beside
        the experiment state, and a driver killed during the copy left it truncated (0 bytes, seen
        in CI): Ray then failed the restore and started the experiment over with only the trials
        it had left to sample. The pickled sampler would also replay the draws it made after the
        snapshot, for trials that the dead driver asked for and `reconcile` has queued again: the
        sampler is seeded afresh."""
        study = self._ot_study
        for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
            if TUNE_ID_ATTR in t.user_attrs:
                self._ot_trials[t.user_attrs[TUNE_ID_ATTR]] = optuna.Trial(study, self.store.trial_id(t.number))
        study.sampler = optuna.samplers.TPESampler(seed=self.spec.seed + len(study.trials))

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        # Ray's OptunaSearch logs a failed tell as a warning and counts the trial done, leaving it
        # RUNNING in Optuna for good. Here the storage waits out an outage (lipscale.store); a tell
        # that fails even so is logged, and `reconcile` tells it from Ray Tune's experiment state
        # once the study's run ends, or on the next. Not raised: Tune would take the trial for
        # failed and retry it, or tell it FAIL.
        if trial_id in self._completed_trials:
            return
        number = self._ot_trials[trial_id].number
        try:
            if result and not error and self.store.stopped_early(number, result):
                # Tune does not pass the result that made the scheduler stop a trial to on_trial_result,
                # so Optuna's last intermediate value (its PRUNED value) would be the evaluation before.
                self.on_trial_result(trial_id, result)
            self.store.tell(number, result, error)
        except Exception:
            log.exception("trial %d: its end could not be told to the Optuna storage; told when the run ends", number)
        finally:
            self._completed_trials.add(trial_id)


def scheduler(spec: Spec) -> TrialScheduler:
    """ASHA on the spec's scheduler metric, its rungs in epochs (a ladder's within each size);
    or FIFO: every trial to the end."""
    if spec.scheduler.kind == "fifo":
        return FIFOScheduler()
    asha = _asha(spec)
    return SizeBrackets(asha) if spec.design.kind == "ladder" else asha()


class _asha:
    """Makes the spec's ASHA scheduler; a class, not a closure, so that Tune can pickle it."""

    def __init__(self, spec: Spec):
        metric, mode = spec.scheduler_metric
        s = spec.scheduler
        self.kwargs = dict(time_attr=EPOCH, metric=metric, mode=mode, max_t=spec.budget.epochs,
                           grace_period=s.grace_period, reduction_factor=s.reduction_factor)  # fmt: skip

    def __call__(self) -> tune.schedulers.ASHAScheduler:
        return tune.schedulers.ASHAScheduler(**self.kwargs)


def size_of(trial) -> tuple:
    """A Tune trial's model size: its (width, depth) params."""
    params = trial.config[PARAMS_KEY]
    return tuple(params[path] for path in design.SIZE_PARAMS)


class SizeBrackets(FIFOScheduler):
    """ASHA within each size of a ladder: a trial meets, at each rung, only the trials of its own
    size (the other points of its sweep). One ASHA over all sizes would stop the small models at
    the first rung for being small, so the envelope would lose them; pruning is for settings."""

    def __init__(self, make: _asha):
        super().__init__()
        self.make, self.brackets = make, {}

    def _of(self, trial) -> tune.schedulers.ASHAScheduler:
        size = size_of(trial)
        if size not in self.brackets:
            self.brackets[size] = self.make()
        return self.brackets[size]

    def set_search_properties(self, metric, mode, **spec) -> bool:
        return True  # every bracket has the spec's metric and mode

    def on_trial_add(self, tune_controller, trial):
        self._of(trial).on_trial_add(tune_controller, trial)

    def on_trial_result(self, tune_controller, trial, result) -> str:
        return self._of(trial).on_trial_result(tune_controller, trial, result)

    def on_trial_complete(self, tune_controller, trial, result):
        self._of(trial).on_trial_complete(tune_controller, trial, result)

    def on_trial_remove(self, tune_controller, trial):
        self._of(trial).on_trial_remove(tune_controller, trial)

    def debug_string(self) -> str:
        return "ASHA within each size: " + "; ".join(
            f"{design.size_label(*size)}: {asha.debug_string()}" for size, asha in self.brackets.items()
        )
