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
MLflow itself (7 times, backoff doubling from 2 s: ~2 min), and every call
the driver makes (a report, a run's creation, tags, its closing) beyond that
with lipscale.retry's policy; every retry is idempotent. A report's metrics
keep their timestamp across retries (MLflow keeps one row per key, step,
timestamp and value), a run whose creation reached the server but whose
answer was lost (MLflow then creates it again) is found by its tag and the
younger twin deleted, and so is an experiment.

MLflow 3's UI opens an experiment as a GenAI one (traces, "No data
available") unless told otherwise: the experiment is tagged a model-training
one, carries a view of its trials (`view_url`: CRA, throughput and the swept
params as columns, best first), and the parent run holds the best trial's
final metrics, so its row shows them before it is expanded.
"""

import contextlib
import functools
import json
import logging
import tempfile
import time

import fsspec
from mlflow.entities import Metric, Param, RunStatus
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

from lipnext.checkpoint import EXPORT, MODEL
from lipnext.metrics import CLEAN_ACC, EPOCH, PARAMS, TRAIN_LOSS, TRAIN_SAMPLES_PER_S, cra, is_metric
from lipnext.train_config import TrainConfig
from lipscale import retry, uris
from lipscale.keys import FAIL_REASON_TAG, PARENT_ATTR, STATE_TAG, STUDY_TAG, TRIAL_TAG, trial_name
from lipscale.spec import Spec

TRANSIENT = ("INTERNAL_ERROR", "TEMPORARILY_UNAVAILABLE")
"""MLflow error codes of a server that did not answer (MLflow reports a refused connection as
INTERNAL_ERROR) or failed inside; a refused request (INVALID_PARAMETER_VALUE, ...) is not retried."""
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}
"""The experiment tag that MLflow 3 reads to open an experiment as model training, not GenAI."""
VIEW = "lipscale"
"""The experiment's shared view of its trials: tag mlflow.sharedViewState.<VIEW>, URL ?viewStateShareKey=<VIEW>."""
SUMMARY = (cra(36), CLEAN_ACC, TRAIN_SAMPLES_PER_S, PARAMS)
"""Columns of that view after the objectives, before the swept params."""

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


class RetriedClient:
    """An MlflowClient whose every call waits out a tracking server's outage (lipscale.retry).
    A local store is not retried: its errors (a full disk) do not pass by themselves."""

    def __init__(self, uri: str):
        self._client, self._server = MlflowClient(uri), uris.is_server(uri)

    def _transient(self, error: Exception) -> bool:
        return self._server and isinstance(error, MlflowException) and error.error_code in TRANSIENT

    def __getattr__(self, name: str):
        found = getattr(self._client, name)
        if not callable(found):
            return found

        @functools.wraps(found)
        def call(*args, **kwargs):
            return retry.retried(lambda: found(*args, **kwargs), self._transient, "MLflow")

        return call


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
    def client(self) -> RetriedClient:
        return RetriedClient(self.uri)

    def experiment_id(self) -> str:
        found = self.client.get_experiment_by_name(self.experiment)
        if found is not None:
            return found.experiment_id
        try:
            return self.client.create_experiment(self.experiment, artifact_location=self.artifact_location)
        except MlflowException as e:  # a retried create that the server had done: it exists now
            if e.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
            return self.client.get_experiment_by_name(self.experiment).experiment_id

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
        self._describe_experiment(spec)
        if study.user_attrs.get(PARENT_ATTR) != run_id:
            study.set_user_attr(PARENT_ATTR, run_id)
        return run_id

    def _describe_experiment(self, spec: Spec) -> None:
        """Tags the experiment a model-training one with a view of its trials: the objectives,
        CRA, throughput and size, then every swept param, as columns; best first."""
        metrics = list(dict.fromkeys([o.metric for o in spec.objective] + list(SUMMARY)))
        first = spec.objective[0]
        view = {
            "selectedColumns": [f"metrics.`{m}`" for m in metrics] + [f"params.`{p}`" for p in spec.params],
            "orderByKey": f"metrics.`{first.metric}`",
            "orderByAsc": first.direction == "minimize",
        }
        experiment = self.experiment_id()
        for key, value in {**EXPERIMENT_KIND, f"mlflow.sharedViewState.{VIEW}": json.dumps(view)}.items():
            self.client.set_experiment_tag(experiment, key, value)

    def log_summary(self, run_id: str, metrics: dict) -> None:
        """The best trial's final metrics on the parent run: its row in the runs table shows them."""
        now = int(time.time() * 1000)
        rows = [Metric(k, float(v), now, 0) for k, v in metrics.items() if is_metric(k) and isinstance(v, (int, float))]
        self.client.log_batch(run_id, metrics=rows)

    def view_url(self, ui: str) -> str:
        """The experiment's page of trials in the MLflow UI at `ui`, as model training (MLflow 3.17
        takes the kind from the page's workflowType, not from the experiment's tag), in its view;
        the UI's front page before the study has run."""
        found = self.client.get_experiment_by_name(self.experiment)
        if found is None:
            return ui
        query = f"workflowType=machine_learning&viewStateShareKey={VIEW}"
        return f"{ui.rstrip('/')}/#/experiments/{found.experiment_id}/runs?{query}"

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
        """A trial's report as metrics at step = epoch, unless that epoch is logged already."""
        epoch = int(result[EPOCH])
        if run_id not in self._logged:
            history = self.client.get_metric_history(run_id, TRAIN_LOSS)
            self._logged[run_id] = max((m.step for m in history), default=0)
        if epoch <= self._logged[run_id]:
            return
        now = int(time.time() * 1000)  # once: a retry must write the same rows
        metrics = [
            Metric(k, float(v), now, epoch)
            for k, v in result.items()
            if is_metric(k) and isinstance(v, (int, float))
        ]
        self.client.log_batch(run_id, metrics=metrics)
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
