"""Views of a study's Optuna storage, the source of truth for which trials exist:
the results table (`<root>/results.parquet`) and `lipscale status`.

One row per finished trial: number, state, every searched param, the final
metrics of its last report, the objective value(s), its MLflow run, its
checkpoint (the best trials': the others' are deleted, lipscale.callbacks),
and its times. A trial orphaned by a killed driver and re-run
under a new number (`REQUEUED`) is left out: its row is its retry's.
"""

import datetime
import json

import fsspec
import optuna
import pyarrow as pa
import pyarrow.parquet as pq
from optuna.trial import TrialState

from lipscale.keys import CHECKPOINT_ATTR, FAIL_REASON_ATTR, METRICS_ATTR, OBJECTIVE_ATTR, REQUEUED_ATTR, RUN_ATTR

FINISHED = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)


def finished_trials(study: optuna.Study, *, running: bool = False) -> list[optuna.trial.FrozenTrial]:
    """The trials that count against the budget: finished (and running, if asked), orphans that
    were re-queued excepted."""
    states = FINISHED + (TrialState.RUNNING,) if running else FINISHED
    return [t for t in study.get_trials(deepcopy=False, states=states) if not t.user_attrs.get(REQUEUED_ATTR)]


def _objective_columns(study: optuna.Study) -> list[str]:
    """The objective metrics, as the study recorded them when it began (lipscale.store.identity)."""
    return [o["metric"] for o in json.loads(study.user_attrs[OBJECTIVE_ATTR])]


def rows(study: optuna.Study) -> list[dict]:
    out, best = [], {t.number for t in best_trials(study)}
    for t in finished_trials(study):
        row = {"trial": t.number, "state": t.state.name}
        row |= t.params
        row |= t.user_attrs.get(METRICS_ATTR, {})
        for name, value in zip(_objective_columns(study), t.values or []):
            row[f"objective/{name}"] = value
        row |= {
            FAIL_REASON_ATTR: t.user_attrs.get(FAIL_REASON_ATTR),
            RUN_ATTR: t.user_attrs.get(RUN_ATTR),
            CHECKPOINT_ATTR: t.user_attrs.get(CHECKPOINT_ATTR) if t.number in best else None,  # the others' are deleted
            "started": t.datetime_start,
            "completed": t.datetime_complete,
            "duration_s": (t.datetime_complete - t.datetime_start).total_seconds() if t.datetime_start else None,
        }
        out.append(row)
    return out


def write(study: optuna.Study, root: str) -> str:
    """Rewrites <root>/results.parquet from the storage (through a temporary name, so a
    reader never sees half a file); returns its URI."""
    table = rows(study)
    columns = list(dict.fromkeys(k for row in table for k in row))  # rows differ: failed trials lack metrics
    uri = f"{root.rstrip('/')}/results.parquet"
    fs, path = fsspec.core.url_to_fs(uri)
    with fs.open(f"{path}.tmp", "wb") as f:
        pq.write_table(pa.table({c: [row.get(c) for row in table] for c in columns}), f)
    fs.mv(f"{path}.tmp", path)
    return uri


def read(root: str) -> pa.Table:
    fs, path = fsspec.core.url_to_fs(f"{root.rstrip('/')}/results.parquet")
    with fs.open(path, "rb") as f:
        return pq.read_table(f)


def best_trials(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    """The best trial, or the Pareto front of a multi-objective study; none before one completes."""
    if not study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        return []
    return study.best_trials if len(study.directions) > 1 else [study.best_trial]


def best_metrics(study: optuna.Study) -> dict:
    """The final metrics of the best trial (the first of a Pareto front's); none before one completes."""
    best = best_trials(study)
    return best[0].user_attrs.get(METRICS_ATTR, {}) if best else {}


def _cell(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, datetime.datetime):
        return value.strftime("%H:%M:%S")
    return "" if value is None else str(value)


def status_table(study: optuna.Study) -> str:
    """Every trial of the study (queued and running ones too), best marked with *."""
    trials = study.get_trials(deepcopy=False)
    best = {t.number for t in best_trials(study)}
    params = list(dict.fromkeys(k for t in trials for k in t.params))
    objectives = _objective_columns(study)
    header = ["", "#", "state", *params, *objectives, "mlflow run"]
    lines = [header]
    for t in trials:
        state = t.state.name + (f" (re-run as {t.user_attrs[REQUEUED_ATTR]})" if REQUEUED_ATTR in t.user_attrs else "")
        values = list(t.values or [None] * len(objectives))
        cells = ["*" if t.number in best else "", t.number, state, *(t.params.get(p) for p in params), *values]
        lines.append([_cell(c) for c in cells] + [t.user_attrs.get(RUN_ATTR, "")])
    widths = [max(len(str(line[i])) for line in lines) for i in range(len(header))]
    counts = ", ".join(f"{n} {s.name}" for s in TrialState if (n := sum(t.state == s for t in trials)))
    title = f"study {study.study_name}: {len(trials)} trials ({counts or 'none yet'})"
    return "\n".join([title, *("  ".join(str(c).ljust(w) for c, w in zip(line, widths)).rstrip() for line in lines)])
