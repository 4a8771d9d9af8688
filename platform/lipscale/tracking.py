"""MLflow bookkeeping of a study, through MlflowClient and explicit run ids.

Not Ray's MLflowLoggerCallback: it keeps its trial-to-run map in driver memory,
so every restore would open new runs, and it has no parent runs
(../shared/reference/ecosystem.md). Here:

- one experiment per study (artifacts under the study root for local stores);
- one parent run per study, found again by its tag, its id in the Optuna
  study's user attrs;
- one child run per trial (tag mlflow.parentRunId), found again by the tag
  `lipscale.trial` (the Optuna trial number) and its id kept in the trial's
  user attrs, so a retried or resumed trial continues its own run;
- params logged once (MLflow refuses a changed value); metrics at
  step = epoch, from the driver, skipping epochs already logged (a trial
  resumed from an earlier checkpoint reports them again);
- system metrics sampled in the trial's own process.

A tracking server that goes away loses nothing: each request is retried by
MLflow itself (7 times, backoff doubling from 2 s: ~2 min), a report is
retried beyond that until RETRY_FOR_S, and every retry is idempotent. A
report's metrics keep their timestamp across retries (MLflow keeps one row
per key, step, timestamp and value), and a run whose creation reached the
server but whose answer was lost (MLflow then creates it again) is found by
its tag and the younger twin deleted.
"""

import contextlib
import logging
import tempfile
import time

import fsspec
from mlflow.entities import Metric, Param, RunStatus
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

from lipnext.checkpoint import EXPORT, MODEL
from lipnext.metrics import EPOCH, TRAIN_LOSS, is_metric
from lipnext.train_config import TrainConfig
from lipscale import uris
from lipscale.keys import FAIL_REASON_TAG, PARENT_ATTR, STATE_TAG, STUDY_TAG, TRIAL_TAG, trial_name
from lipscale.spec import Spec

RETRY_FOR_S = 1800
"""How long a report waits out a tracking-server outage (a restart by hand or by Kubernetes
can take minutes), after MLflow's own ~2 min of retries of each request."""
RETRY_PAUSE_S = 5
TRANSIENT = ("INTERNAL_ERROR", "TEMPORARILY_UNAVAILABLE")
"""MLflow error codes of a server that did not answer (MLflow reports a refused connection as
INTERNAL_ERROR) or failed inside; a refused request (INVALID_PARAMETER_VALUE, ...) is not retried."""

log = logging.getLogger("lipscale.tracking")


def flatten(tree: dict, prefix: str = "") -> dict[str, object]:
    """{'model': {'width': 64}} -> {'model.width': 64}"""
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _retried(uri: str, write, *args, **kwargs):
    """write(*args, **kwargs), again every RETRY_PAUSE_S while the tracking server does not answer.
    A local store is not retried: its errors (a full disk) do not pass by themselves."""
    deadline = time.monotonic() + RETRY_FOR_S
    while True:
        try:
            return write(*args, **kwargs)
        except MlflowException as e:
            if not uris.is_server(uri) or e.error_code not in TRANSIENT or time.monotonic() > deadline:
                raise
            log.warning("MLflow did not answer, retrying in %d s: %s", RETRY_PAUSE_S, e)
            time.sleep(RETRY_PAUSE_S)


class Tracking:
    """The study's MLflow experiment. Holds URIs only (it travels pickled in Ray
    Tune's experiment state); a client is made per use (MLflow caches the store)."""

    def __init__(self, spec: Spec):
        self.uri = spec.mlflow_uri
        self.experiment = spec.name
        self.artifact_location = None if uris.is_server(self.uri) else f"{spec.root}/mlartifacts"
        self._logged: dict[str, int] = {}

    def __setstate__(self, state: dict):
        # Epochs logged are re-read from MLflow after a restore, never taken from a stale pickle.
        self.__dict__.update(state, _logged={})

    @property
    def client(self) -> MlflowClient:
        return MlflowClient(self.uri)

    def experiment_id(self) -> str:
        found = self.client.get_experiment_by_name(self.experiment)
        if found is not None:
            return found.experiment_id
        return self.client.create_experiment(self.experiment, artifact_location=self.artifact_location)

    def _find(self, tags: dict[str, str]) -> list[str]:
        """Runs with these tags, oldest first."""
        query = " and ".join(f"tags.`{k}` = '{v}'" for k, v in tags.items())
        runs = self.client.search_runs([self.experiment_id()], query, order_by=["attributes.start_time ASC"])
        return [r.info.run_id for r in runs]

    def _get_or_create(self, tags: dict[str, str], name: str, more_tags: dict[str, str]) -> str:
        found = self._find(tags)
        if not found:
            self.client.create_run(self.experiment_id(), run_name=name, tags={**tags, **more_tags})
            # Only the driver creates runs, so any twin is a create that MLflow retried after
            # the server had done it: the oldest is the run, the others go.
            found = self._find(tags)
            for twin in found[1:]:
                log.warning("deleting run %s: a second copy of run %s (%s)", twin, found[0], tags)
                self.client.delete_run(twin)
        return found[0]

    # --- the study's parent run ---

    def parent_run(self, study, spec: Spec) -> str:
        """Get or create the study's run, marked RUNNING; its id goes into the Optuna study."""
        run_id = self._get_or_create({STUDY_TAG: spec.name}, spec.name, {})
        self._log_params_once(run_id, flatten(spec.model_dump(by_alias=True, exclude_none=True)))
        self.client.update_run(run_id, status=RunStatus.to_string(RunStatus.RUNNING))
        if study.user_attrs.get(PARENT_ATTR) != run_id:
            study.set_user_attr(PARENT_ATTR, run_id)
        return run_id

    # --- a trial's child run ---

    def child_run(self, parent_id: str, number: int, config: TrainConfig, run_id: str | None = None) -> str:
        """The run of Optuna trial `number`: `run_id` (a retry carries its first run's), the
        run tagged with the number, or a new one; its params are the trial's whole config."""
        tags = {TRIAL_TAG: str(number)}
        if run_id is None:
            run_id = self._get_or_create(tags, trial_name(number), {MLFLOW_PARENT_RUN_ID: parent_id})
        else:
            self.client.set_tag(run_id, TRIAL_TAG, str(number))
        self._log_params_once(run_id, flatten(config.to_dict()))
        return run_id

    def _log_params_once(self, run_id: str, params: dict) -> None:
        """Params (a URL among them with its password redacted), unless the run has some."""
        if not self.client.get_run(run_id).data.params:
            self.client.log_batch(run_id, params=[Param(k, uris.redact(str(v))) for k, v in params.items()])

    def log_result(self, run_id: str, result: dict) -> None:
        """A trial's report as metrics at step = epoch, unless that epoch is logged already;
        retried through a server outage."""
        epoch = int(result[EPOCH])
        if run_id not in self._logged:
            history = _retried(self.uri, self.client.get_metric_history, run_id, TRAIN_LOSS)
            self._logged[run_id] = max((m.step for m in history), default=0)
        if epoch <= self._logged[run_id]:
            return
        now = int(time.time() * 1000)  # once: a retry must write the same rows
        metrics = [
            Metric(k, float(v), now, epoch)
            for k, v in result.items()
            if is_metric(k) and isinstance(v, (int, float))
        ]
        _retried(self.uri, self.client.log_batch, run_id, metrics=metrics)
        self._logged[run_id] = epoch

    def finish(self, run_id: str, state: str, reason: str | None = None) -> None:
        """Closes a trial's run with its Optuna state (COMPLETE, PRUNED or FAIL) and the reason
        it failed, if known; once."""
        if self.client.get_run(run_id).info.status != "RUNNING":
            return
        self.client.set_tag(run_id, STATE_TAG, state)
        if reason:
            self.client.set_tag(run_id, FAIL_REASON_TAG, reason)
        self.client.set_terminated(run_id, "FAILED" if state == "FAIL" else "FINISHED")

    def end(self, run_id: str, status: str = "FINISHED") -> None:
        self.client.set_terminated(run_id, status)

    def log_checkpoint(self, run_id: str, uri: str) -> None:
        """Copies the files of a final checkpoint (a local path or s3:// URI) that rebuild
        its model (lipnext.checkpoint.EXPORT: the config and the fp32 weights, ~1/5 of
        the whole checkpoint, which also holds the optimizer's state) into the run's
        artifacts, once. A checkpoint without the weights (not a final one) is skipped."""
        if self.client.list_artifacts(run_id, "checkpoint"):
            return
        fs, path = fsspec.core.url_to_fs(uri)
        if not fs.exists(f"{path.rstrip('/')}/{MODEL}"):
            log.warning("run %s: %s holds no %s (not a final checkpoint); no model logged", run_id, uri, MODEL)
            return
        with tempfile.TemporaryDirectory(prefix="lipscale-checkpoint-") as local:
            for name in EXPORT:
                fs.get(f"{path.rstrip('/')}/{name}", f"{local}/{name}")
            self.client.log_artifacts(run_id, local, "checkpoint")

    @contextlib.contextmanager
    def system_metrics(self, run_id: str):
        """Samples CPU, memory, disk, network (and GPU) into the run while the block runs."""
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        monitor = SystemMetricsMonitor(run_id, resume_logging=True, tracking_uri=self.uri)
        monitor.start()
        try:
            yield
        finally:
            monitor.finish()
