"""The search: Optuna's sampler behind Ray Tune (StudySearch) and the scheduler that
stops trials early (ASHA).

StudySearch asks the study's own Optuna storage for each trial, and links the
trial to its MLflow child run there: the Optuna number and the run id go into
the Tune trial's config, the run id into the Optuna trial.
"""

import logging

import optuna
from ray import tune
from ray.tune.search.optuna import OptunaSearch

from lipnext.metrics import EPOCH
from lipscale.keys import NUMBER_KEY, PARAMS_KEY, RUN_ATTR, TRIAL_KEY
from lipscale.spec import Spec
from lipscale.store import Store, distributions
from lipscale.tracking import Tracking

log = logging.getLogger("lipscale.search")


class StudySearch(OptunaSearch):
    """OptunaSearch over the study's persistent storage that links each trial it asks for to
    its MLflow child run. Also: a report without the objective (not an eval epoch) is skipped,
    and a finished trial is told by the study's store (`Store.tell`: PRUNED when the scheduler
    stopped it, FAIL with the reason when it stopped itself, its last metrics in its user attrs)."""

    def __init__(self, spec: Spec, store: Store, tracking: Tracking, parent_run: str, seed: int):
        metrics, modes = [o.metric for o in spec.objective], [o.direction[:3] for o in spec.objective]
        single = len(metrics) == 1
        super().__init__(
            space=distributions(spec),
            metric=metrics[0] if single else metrics,
            mode=modes[0] if single else modes,
            study_name=spec.name,
            storage=store.storage,
            seed=seed,
        )
        self.spec, self.store, self.tracking, self.parent_run = spec, store, tracking, parent_run

    def suggest(self, trial_id: str) -> dict | None:
        params = super().suggest(trial_id)
        ot_trial = self._ot_trials[trial_id]
        config = self.spec.train_config(params)
        run_id = self.tracking.child_run(self.parent_run, ot_trial.number, config, ot_trial.user_attrs.get(RUN_ATTR))
        ot_trial.set_user_attr(RUN_ATTR, run_id)
        return {PARAMS_KEY: params, TRIAL_KEY: {NUMBER_KEY: ot_trial.number, RUN_ATTR: run_id}}

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
        # Ray's OptunaSearch logs a failed tell as a warning and counts the trial done, leaving it
        # RUNNING in Optuna for good. Here the storage waits out an outage (lipscale.store); a tell
        # that fails even so is logged, and `reconcile` tells it from Ray Tune's experiment state
        # once the study's run ends, or on the next. Not raised: Tune would take the trial for
        # failed and retry it, or tell it FAIL.
        if trial_id in self._completed_trials:
            return
        self._completed_trials.add(trial_id)
        number = self._ot_trials[trial_id].number
        try:
            self.store.tell(number, result, error)
        except Exception:
            log.exception("trial %d: its end could not be told to the Optuna storage; told when the run ends", number)


def scheduler(spec: Spec) -> tune.schedulers.TrialScheduler:
    """ASHA on the spec's scheduler metric, its rungs in epochs; or FIFO: every trial to the end."""
    if spec.scheduler.kind == "fifo":
        return tune.schedulers.FIFOScheduler()
    metric, mode = spec.scheduler_metric
    return tune.schedulers.ASHAScheduler(
        time_attr=EPOCH,
        metric=metric,
        mode=mode,
        max_t=spec.budget.epochs,
        grace_period=spec.scheduler.grace_period,
        reduction_factor=spec.scheduler.reduction_factor,
    )
