"""The driver's side of each trial (Bookkeeping, a Ray Tune callback): every report
into the trial's MLflow run, its checkpoint into its Optuna trial; when it ends,
its run closed and the results table rewritten.
"""

from concurrent.futures import ThreadPoolExecutor

import ray
from ray import tune

from lipscale import results, uris
from lipscale.keys import CHECKPOINT_ATTR, FAIL_REASON_ATTR, NUMBER_KEY, RUN_ATTR, STORAGE_FULL_KEY, TRIAL_KEY
from lipscale.spec import Spec
from lipscale.store import Store
from lipscale.tracking import Tracking
from lipscale.trial import StorageFull, in_process


class Bookkeeping(tune.Callback):
    """A trial's next epoch waits until the driver has taken its report, so reports are logged
    from a background thread (~20 ms each on SQLite, against digits epochs of 0.1-1 s). The
    thread is drained before a report's checkpoint can become the point that a resumed trial
    restarts from, so no epoch before it is ever lost: Tune records an in-process trial's
    checkpoint after this callback returns; Ray Train records its own before reporting, so
    those trials (large, with long epochs) are logged as they report."""

    def __init__(self, spec: Spec, store: Store, tracking: Tracking):
        self.root, self.store, self.tracking = spec.root, store, tracking
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
        if STORAGE_FULL_KEY in result:  # stop here: the trial is not told FAIL, and resumes later
            raise StorageFull(result[STORAGE_FULL_KEY])
        self._last = self._writer.submit(self.tracking.log_result, trial.config[TRIAL_KEY][RUN_ATTR], dict(result))
        if result.get("checkpoint_dir_name") or not self.in_process:
            self.flush()
        if "checkpoint_path" in result:  # a Ray Train trial: TuneReportCallback passes its checkpoint's path
            self._checkpointed(trial, ray.train.Checkpoint(result["checkpoint_path"]))

    def on_checkpoint(self, iteration, trials, trial, checkpoint, **info):
        self._checkpointed(trial, checkpoint)

    def _checkpointed(self, trial, checkpoint) -> None:
        uri = uris.with_protocol(checkpoint.path, like=self.root)  # Ray keeps the filesystem apart from the path
        self.store.set_trial_attrs(trial.config[TRIAL_KEY][NUMBER_KEY], {CHECKPOINT_ATTR: uri})

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._finished(trial)

    def on_trial_error(self, iteration, trials, trial, **info):
        self._finished(trial)

    def _finished(self, trial):
        self.flush()
        frozen = self.store.study.trials[trial.config[TRIAL_KEY][NUMBER_KEY]]
        reason = frozen.user_attrs.get(FAIL_REASON_ATTR)
        self.tracking.finish(trial.config[TRIAL_KEY][RUN_ATTR], frozen.state.name, reason)
        results.write(self.store.study, self.root)

    def on_experiment_end(self, trials, **info):
        self.flush()
