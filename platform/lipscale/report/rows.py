"""The rows a report is made of: one per finished trial, by trial number, with its
searched params, final metrics, and the accuracies at the common epoch (the last
epoch that every fitted trial was evaluated at, from the MLflow histories)."""

import ast
from dataclasses import dataclass

import numpy as np
import pandas as pd
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

from lipnext.metrics import ACCURACIES, CLEAN_ACC, EPOCH, FLOPS_PER_SAMPLE, TRAIN_LOSS, TRAIN_SAMPLES
from lipscale import results, uris
from lipscale.keys import PARENT_ATTR, RUN_ATTR, STATE_TAG, TRIAL_TAG
from lipscale.spec import Spec
from lipscale.store import open_store

TRAINED = ("COMPLETE", "PRUNED")
"""States of the trials that are fitted and plotted (a FAILed trial's metrics say nothing of its shape)."""
AT_COMMON_EPOCH = "@common"
"""Suffix of the accuracy columns at the common epoch (Trials.common_epoch)."""
COMPUTE = "compute"
"""Column of a trial's training FLOPs: model/flops_per_sample x train/samples."""


class ReportError(RuntimeError):
    """A study that cannot be reported: not run yet, or its rows cannot be read."""


@dataclass(frozen=True)
class Trials:
    frame: pd.DataFrame
    """One row per finished trial, by trial number: searched params, final metrics,
    and the derived columns model (LxWy) and compute (NaN where a trial did not
    report train/samples: studies run before the loop reported it)."""
    params: list[str]
    """The searched parameters' columns."""
    common_epoch: int | None
    """The last epoch that every TRAINED trial was evaluated at (None: no such epoch); the
    accuracies there are the columns <metric>@common."""
    source: str
    """Where the rows came from."""
    parent_run: str
    """The study's MLflow parent run."""


def load_trials(spec: Spec) -> Trials:
    study = open_store(spec, create=False).study
    parent = study.user_attrs.get(PARENT_ATTR)
    if parent is None:
        raise ReportError(f"study {spec.name!r} has no MLflow parent run ({PARENT_ATTR}): it never started")
    try:
        frame = results.read(spec.root).to_pandas()
        source = f"{spec.root}/results.parquet"
    except FileNotFoundError:
        frame = _rows_from_mlflow(spec, parent)
        source = f"MLflow child runs of run {parent} ({uris.redact(spec.mlflow_uri)}): no {spec.root}/results.parquet"
    if frame.empty:
        raise ReportError(f"study {spec.name!r} has no finished trials ({source})")
    frame = with_derived(spec, frame.sort_values("trial").reset_index(drop=True))
    epoch = _add_common_epoch(spec, frame)
    return Trials(frame, list(spec.params), epoch, source, parent)


def _rows_from_mlflow(spec: Spec, parent: str) -> pd.DataFrame:
    """The results table's columns rebuilt from the child runs of `parent`: those
    tagged with a final state (a run without one has not finished)."""
    client = MlflowClient(spec.mlflow_uri)
    experiment = client.get_run(parent).info.experiment_id
    found = client.search_runs([experiment], f"tags.`{MLFLOW_PARENT_RUN_ID}` = '{parent}'", max_results=50_000)
    rows = []
    for run in found:
        tags, run_id = run.data.tags, run.info.run_id
        if STATE_TAG not in tags:
            continue
        epochs = max((m.step for m in client.get_metric_history(run_id, TRAIN_LOSS)), default=0)
        params = {p: _literal(run.data.params[p]) for p in spec.params if p in run.data.params}
        rows.append({"trial": int(tags[TRIAL_TAG]), "state": tags[STATE_TAG], **params, **run.data.metrics,
                     EPOCH: epochs, RUN_ATTR: run_id})  # fmt: skip
    return pd.DataFrame(rows)


def _literal(text: str):
    """An MLflow param (always a string) as the value it was: '64' -> 64, 'four' -> 'four'."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def with_derived(spec: Spec, frame: pd.DataFrame) -> pd.DataFrame:
    """`frame` with the columns model (LxWy, from each trial's config) and compute."""
    searched = frame[[p for p in spec.params if p in frame]].to_dict("records")  # Python scalars, not numpy's
    models = [spec.train_config(params).model for params in searched]
    frame["model"] = [f"L{m.depth}W{m.width}" for m in models]
    frame[COMPUTE] = column(frame, FLOPS_PER_SAMPLE) * column(frame, TRAIN_SAMPLES)
    return frame


def _add_common_epoch(spec: Spec, frame: pd.DataFrame) -> int | None:
    """Adds each TRAINED trial's accuracies at the common epoch, from its run's history; returns that epoch."""
    client = MlflowClient(spec.mlflow_uri)
    trained = frame.index[frame["state"].isin(TRAINED)]
    histories = {
        metric: {
            i: {m.step: m.value for m in client.get_metric_history(frame.at[i, RUN_ATTR], metric)} for i in trained
        }
        for metric in ACCURACIES
    }
    epoch = common_epoch(histories[CLEAN_ACC].values())
    for metric, history in histories.items():
        frame[metric + AT_COMMON_EPOCH] = [
            history[i].get(epoch, np.nan) if i in history else np.nan for i in frame.index
        ]
    return epoch


def common_epoch(evaluated) -> int | None:
    """The last epoch (MLflow step) that every one of the `evaluated` {epoch: value} histories holds."""
    epochs = [set(history) for history in evaluated]
    shared = set.intersection(*epochs) if epochs else set()
    return max(shared) if shared else None


def column(frame: pd.DataFrame, name: str) -> np.ndarray:
    """A column as floats (NaN where missing or not a number); all NaN when there is no such column."""
    if name not in frame:
        return np.full(len(frame), np.nan)
    return pd.to_numeric(frame[name], errors="coerce").to_numpy(dtype=float)
