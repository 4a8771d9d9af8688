"""The driver's side of each trial (Bookkeeping, a Ray Tune callback): every report
into the trial's MLflow run, its checkpoint into its Optuna trial; when it ends,
its run closed, the results table rewritten, the parent run's summary updated and
the checkpoints that no resume and no report needs deleted.
"""

from concurrent import futures

import fsspec
import ray
from ray import tune

from lipnext.metrics import EPOCH, STOPPED
from lipscale import results, retry, uris
from lipscale.keys import (
    CHECKPOINT_ATTR, FAIL_REASON_ATTR, NUMBER_KEY, PARENT_ATTR, RUN_ATTR, STORAGE_FULL_KEY, TRIAL_KEY, trial_name,
)  # fmt: skip
from lipscale.spec import Spec
from lipscale.store import Store
from lipscale.tracking import Tracking
from lipscale.trial import StorageFull, in_process


class ReportNotLogged(Exception):
    """A report that MLflow did not take after all its retries: the study stops, to be run again."""


class Bookkeeping(tune.Callback):
    """A trial's next epoch waits until the driver has taken its report, so reports are logged
    from a background thread (~20 ms each on SQLite, against digits epochs of 0.1-1 s). The
    thread is drained before a report's checkpoint can become the point that a resumed trial
    restarts from, so no epoch before it is ever lost: Tune records an in-process trial's
    checkpoint after this callback returns; Ray Train records its own before reporting, so
    those trials (large, with long epochs) are logged as they report.

    A report that still fails after its retries (lipscale.retry) stops the study with
    ReportNotLogged, raised on the next report (a raise at a trial's end would be taken by Tune
    for the trial's failure), and no report is written after it. Every report after the last
    recorded checkpoint is then made again by the resumed trial; a trial's last report is
    drained before Tune can count the trial done, so none is lost with a finished trial."""

    def __init__(self, spec: Spec, store: Store, tracking: Tracking):
        self.root, self.epochs, self.store, self.tracking = spec.root, spec.budget.epochs, store, tracking
        self.in_process = in_process(spec)
        self._start_writer()

    def _start_writer(self):
        self._writer = futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="mlflow-metrics")
        self._pending: list[futures.Future] = []
        self._failed: ReportNotLogged | None = None
        self._pruned: set[int] = set()

    def __getstate__(self) -> dict:  # Tune pickles its callbacks with the experiment
        return {k: v for k, v in self.__dict__.items() if k not in ("_writer", "_pending", "_failed", "_pruned")}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._start_writer()

    def _write(self, trial, result: dict) -> None:
        if self._failed is not None:  # the study is stopping: an epoch logged after a lost one would hide it
            return
        try:
            self.tracking.log_result(trial.config[TRIAL_KEY][RUN_ATTR], result)
        except Exception as e:
            self._failed = ReportNotLogged(
                f"{trial_name(trial.config[TRIAL_KEY][NUMBER_KEY])}'s report of epoch {result.get(EPOCH)} was not "
                f"logged to MLflow after {retry.RETRY_FOR_S} s of retries ({str(e).partition(chr(10))[0]}); the "
                "study stops: run the same command again once MLflow answers, and the trial resumes from its last "
                "checkpoint, logging it again"
            )
            raise self._failed from e

    def _wait(self) -> None:
        """Returns once every report queued so far is written, or has failed."""
        futures.wait(self._pending)

    def flush(self) -> None:
        """Returns once every report queued so far is in MLflow; raises ReportNotLogged if one is not."""
        self._wait()
        self._surface()

    def _surface(self) -> None:
        self._pending = [f for f in self._pending if not f.done()]
        if self._failed is not None:
            raise self._failed

    def on_trial_result(self, iteration, trials, trial, result, **info):
        if STORAGE_FULL_KEY in result:  # stop here: the trial is not told FAIL, and resumes later
            raise StorageFull(result[STORAGE_FULL_KEY])
        self._surface()
        self._pending.append(self._writer.submit(self._write, trial, dict(result)))
        last = result.get("done") or result.get(EPOCH, 0) >= self.epochs or any(k in result for k in STOPPED)
        if result.get("checkpoint_dir_name") or last or not self.in_process:
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
        self._wait()  # a failure is raised on the next report, not here
        study = self.store.study
        frozen = study.trials[trial.config[TRIAL_KEY][NUMBER_KEY]]
        if frozen.state.is_finished():  # else its tell failed: `reconcile` closes its run when it tells it
            reason = frozen.user_attrs.get(FAIL_REASON_ATTR)
            self.tracking.finish(trial.config[TRIAL_KEY][RUN_ATTR], frozen.state.name, reason)
        results.write(study, self.root)
        self.tracking.log_summary(study.user_attrs[PARENT_ATTR], results.best_metrics(study))
        self._prune_checkpoints()

    def _prune_checkpoints(self) -> None:
        """Deletes the checkpoints of finished trials but the best ones. A resume needs only those
        of unfinished trials (Tune never runs a finished one again) and the report the best ones;
        the default study kept 330 MB under tune/ before."""
        study = self.store.study
        best = {t.number for t in results.best_trials(study)}
        for t in study.get_trials(deepcopy=False, states=results.FINISHED):
            if t.number in best or t.number in self._pruned or CHECKPOINT_ATTR not in t.user_attrs:
                continue
            fs, path = fsspec.core.url_to_fs(t.user_attrs[CHECKPOINT_ATTR])
            for checkpoint in fs.glob(f"{path.rstrip('/').rsplit('/', 1)[0]}/checkpoint_*"):
                fs.rm(checkpoint, recursive=True)
            self._pruned.add(t.number)

    def on_experiment_end(self, trials, **info):
        self.flush()
