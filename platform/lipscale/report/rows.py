"""The rows a report is made of: one per finished trial, by trial number, with its
searched params, final metrics and what the laws need of it (its size, compute,
the epochs of its full budget, why it is left out of a law), and the envelope:
each size's best trial among those that trained to their full budget."""

import ast
from dataclasses import dataclass

import numpy as np
import pandas as pd
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

from lipnext.metrics import EPOCH, FLOPS_PER_SAMPLE, TRAIN_LOSS, TRAIN_SAMPLES
from lipscale import design, results, uris
from lipscale.keys import FAIL_REASON_ATTR, PARENT_ATTR, RUN_ATTR, STATE_TAG, TRIAL_TAG
from lipscale.spec import Spec
from lipscale.store import open_store

TRAINED = ("COMPLETE", "PRUNED")
"""States of the trials that are plotted (a FAILed trial's metrics say nothing of its shape)."""
COMPUTE = "compute"
"""Column of a trial's training FLOPs: model/flops_per_sample x train/samples."""
SIZE, WIDTH, DEPTH = "model", "width", "depth"
"""Columns of a trial's size (L4W64) and its shape, from its config."""
EPOCHS = "epochs"
"""Column of the epochs of a trial's full budget (an IsoFLOP point's own, or budget.epochs)."""
BUDGET = "flops_budget"
"""Column of an IsoFLOP trial's FLOP budget (the design's budget its compute trained for)."""
LEFT_OUT = "left_out"
"""Column of why a trial is not in the envelope; empty for the trials that are."""


class ReportError(RuntimeError):
    """A study that cannot be reported: not run yet, or its rows cannot be read."""


@dataclass(frozen=True)
class Trials:
    frame: pd.DataFrame
    """One row per finished trial, by trial number: searched params, final metrics, and the
    derived columns SIZE, WIDTH, DEPTH, EPOCHS, COMPUTE (NaN where a trial did not report
    train/samples: studies run before the loop reported it), BUDGET (IsoFLOP) and LEFT_OUT."""
    params: list[str]
    """The searched parameters' columns."""
    objective: tuple[str, str]
    """(metric, direction) that picks each size's best: the study's first objective."""
    design: str
    """The study's design: search, ladder or isoflop."""
    source: str
    """Where the rows came from."""
    parent_run: str
    """The study's MLflow parent run."""

    @property
    def envelope(self) -> pd.DataFrame:
        """Each size's best trial that trained to its full budget (by the objective), by size;
        for an IsoFLOP study, each size's best at each budget."""
        return self.frame[self.frame[LEFT_OUT] == ""]


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
    objective = (spec.objective[0].metric, spec.objective[0].direction)
    return Trials(frame, list(spec.params), objective, spec.design.kind, source, parent)


def _rows_from_mlflow(spec: Spec, parent: str) -> pd.DataFrame:
    """The results table's columns rebuilt from the child runs of `parent`: those
    tagged with a final state (a run without one has not finished)."""
    client = MlflowClient(spec.mlflow_uri)
    experiment = client.get_run(parent).info.experiment_id
    found = client.search_runs([experiment], f"tags.`{MLFLOW_PARENT_RUN_ID}` = '{parent}'", max_results=50_000)
    rows = []
    searched = [*spec.params, design.EPOCHS] if spec.design.kind == "isoflop" else list(spec.params)
    for run in found:
        tags, run_id = run.data.tags, run.info.run_id
        if STATE_TAG not in tags:
            continue
        epochs = max((m.step for m in client.get_metric_history(run_id, TRAIN_LOSS)), default=0)
        params = {p: _literal(run.data.params[p]) for p in searched if p in run.data.params}
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
    """`frame` with the columns SIZE, WIDTH, DEPTH, EPOCHS and COMPUTE from each trial's config
    and report, BUDGET for an IsoFLOP study, and LEFT_OUT."""
    searched = [p for p in [*spec.params, design.EPOCHS] if p in frame]
    configs = [spec.train_config(params) for params in frame[searched].to_dict("records")]  # Python scalars
    frame[WIDTH] = [c.model.width for c in configs]
    frame[DEPTH] = [c.model.depth for c in configs]
    frame[SIZE] = [design.size_label(c.model.width, c.model.depth) for c in configs]
    frame[EPOCHS] = [c.epochs for c in configs]
    frame[COMPUTE] = column(frame, FLOPS_PER_SAMPLE) * column(frame, TRAIN_SAMPLES)
    if spec.design.kind == "isoflop":
        finite = np.isfinite(frame[COMPUTE])
        frame[BUDGET] = np.nan
        frame.loc[finite, BUDGET] = design.nominal_budget(frame.loc[finite, COMPUTE], spec.design.budgets)
    frame[LEFT_OUT] = left_out(frame, spec.objective[0].metric, spec.objective[0].direction)
    return frame


def left_out(frame: pd.DataFrame, metric: str, direction: str) -> list[str]:
    """Why each trial is not in the envelope ("" for those that are): it failed, it was stopped
    before its full budget, it has no value of the objective, or a trial of its size (at its
    budget) did better; of equals, the first."""
    reasons = []
    for _, row in frame.iterrows():
        epoch = pd.to_numeric(row.get(EPOCH), errors="coerce")
        if row["state"] == "FAIL":
            why = row.get(FAIL_REASON_ATTR)
            reasons.append("FAIL" + (f": {why}" if isinstance(why, str) and why else ""))
        elif row["state"] != "COMPLETE" or not epoch >= row[EPOCHS]:
            reasons.append(f"{row['state']} at epoch {_int(epoch)} of {row[EPOCHS]}")
        elif not np.isfinite(pd.to_numeric(row.get(metric), errors="coerce")):
            reasons.append(f"no {metric}")
        else:
            reasons.append("")
    value = column(frame, metric) * (1 if direction == "maximize" else -1)
    keys = list(zip(frame[SIZE], frame[BUDGET] if BUDGET in frame else [None] * len(frame)))
    eligible = [i for i, why in enumerate(reasons) if not why]
    best: dict[tuple, int] = {}
    for i in eligible:
        if keys[i] not in best or value[i] > value[best[keys[i]]]:
            best[keys[i]] = i
    for i in eligible:
        if best[keys[i]] != i:
            size, budget = keys[i]
            reasons[i] = f"not the best {size}" + ("" if budget is None else f" at {budget:.3g} FLOPs")
    return reasons


def _int(value: float) -> str:
    return "?" if not np.isfinite(value) else str(int(value))


def column(frame: pd.DataFrame, name: str) -> np.ndarray:
    """A column as floats (NaN where missing or not a number); all NaN when there is no such column."""
    if name not in frame:
        return np.full(len(frame), np.nan)
    return pd.to_numeric(frame[name], errors="coerce").to_numpy(dtype=float)
