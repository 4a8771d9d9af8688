"""Scaling laws of a finished study, and its report.

    lipscale fit studies/specs/digits.yaml      # the fits, with intervals, and the 1B/2B extrapolation
    lipscale report studies/specs/digits.yaml   # the same, plus plots (PNG, one HTML page) logged to MLflow

Rows: one per finished trial, from <root>/results.parquet, or from the study's
MLflow child runs where that table is missing (the parent run's id is in the
Optuna study's user attrs).

Fitted over the COMPLETE and PRUNED trials, each with lipscale.scaling's
saturating power law err = E + A x^-alpha, for err = 1 - eval/cra_{36,72,108,255}
and 1 - eval/clean_acc:

- against N = model/params (every parameter: stem, blocks and head), with every
  trial's errors at one epoch: the last that all of them were evaluated at,
  read from their MLflow runs' histories. ASHA stops most trials early (the
  default study: 6 of 8 at epoch 10), and a stopped trial's final error is
  that of less training, not of its size; at a common epoch all trials have
  trained alike (on the same schedule, which is not over for any but the last);
- against C = training compute, with each trial's final errors (compute counts
  how long it trained): C = model/flops_per_sample x samples seen, samples
  seen = epochs trained x steps per epoch x global batch, with steps per
  epoch = (train samples // ranks) // (batch // ranks) as lipnext.train's
  drop_last loader takes them. model/flops_per_sample counts forward and
  backward matrix products (FlopCounterMode), not the optimizer's update,
  nor evaluation.

Other searched settings (beta, shift pattern, learning rate, ...) vary between
trials and count as noise around each law. A metric that cannot be fitted
(too few sizes, constant, no finite values) is reported with the reason.
The laws in N are extrapolated to the imagenet-1b and imagenet-2b presets,
which lie far beyond any small study's sizes and on another dataset: the
printout says by how far.
"""

import ast
import html
import importlib.util
import math
import os
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from mlflow.tracking import MlflowClient

from lipnext import param_counts, preset
from lipnext.data import open_dataset
from lipscale import plots, results
from lipscale.scaling import PowerLawFit, fit_power_law
from lipscale.spec import Spec, SpecError, load_spec, redact
from lipscale.study import open_study
from lipscale.tracking import PARENT_ATTR, RUN_ATTR, STATE_TAG, TRIAL_TAG

ACCURACIES = {"eval/clean_acc": 0.0, "eval/cra_36": 36 / 255, "eval/cra_72": 72 / 255,
              "eval/cra_108": 108 / 255, "eval/cra_255": 1.0}  # fmt: skip
"""Accuracy metrics and the radius (raw pixels, L2) each is certified at; clean = radius 0."""
TARGETS = ("imagenet-1b", "imagenet-2b")
"""Presets the laws in N are extrapolated to."""
AXES = {"N": ("model/params", "parameters N"), "C": ("compute", "training compute C (FLOPs)")}
"""Fit axis -> (column, label)."""
TRAINED = ("COMPLETE", "PRUNED")
"""States of the trials that are fitted and plotted (a FAILed trial's metrics say nothing of its shape)."""
AT_COMMON_EPOCH = "@common"
"""Suffix of the accuracy columns at the common epoch (Trials.common_epoch)."""
OUTSIDE = "*"
"""Marks an interval that misses its estimate: a percentile interval may, when the resamples
pile up on one side (few sizes). Said, not hidden."""
REPORT_DIR = "report"
"""Under the study root, and the parent run's artifact path."""


class ReportError(RuntimeError):
    """A study that cannot be reported: not run yet, or its rows cannot be read."""


# --- the rows -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Trials:
    frame: pd.DataFrame
    """One row per finished trial, by trial number: searched params, final metrics,
    and the derived columns model (LxWy), batch, samples (seen in training) and compute."""
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
    study = open_study(spec, create=False)
    parent = study.user_attrs.get(PARENT_ATTR)
    if parent is None:
        raise ReportError(f"study {spec.name!r} has no MLflow parent run ({PARENT_ATTR}): it never started")
    try:
        frame = results.read(spec.root).to_pandas()
        source = f"{spec.root}/results.parquet"
    except FileNotFoundError:
        frame = _rows_from_mlflow(spec, parent)
        source = f"MLflow child runs of run {parent} ({redact(spec.mlflow_uri)}): no {spec.root}/results.parquet"
    if frame.empty:
        raise ReportError(f"study {spec.name!r} has no finished trials ({source})")
    frame = _with_compute(spec, frame.sort_values("trial").reset_index(drop=True))
    epoch = _add_common_epoch(spec, frame)
    return Trials(frame, list(spec.params), epoch, source, parent)


def _rows_from_mlflow(spec: Spec, parent: str) -> pd.DataFrame:
    """The results table's columns rebuilt from the child runs of `parent`: those
    tagged with a final state (a run without one has not finished)."""
    client = MlflowClient(spec.mlflow_uri)
    experiment = client.get_run(parent).info.experiment_id
    found = client.search_runs([experiment], f"tags.`mlflow.parentRunId` = '{parent}'", max_results=50_000)
    rows = []
    for run in found:
        tags, run_id = run.data.tags, run.info.run_id
        if STATE_TAG not in tags:
            continue
        epochs = max((m.step for m in client.get_metric_history(run_id, "train/loss")), default=0)
        params = {p: _literal(run.data.params[p]) for p in spec.params if p in run.data.params}
        rows.append({"trial": int(tags[TRIAL_TAG]), "state": tags[STATE_TAG], **params, **run.data.metrics,
                     "epoch": epochs, RUN_ATTR: run_id})  # fmt: skip
    return pd.DataFrame(rows)


def _literal(text: str):
    """An MLflow param (always a string) as the value it was: '64' -> 64, 'four' -> 'four'."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def _with_compute(spec: Spec, frame: pd.DataFrame) -> pd.DataFrame:
    train_samples = _train_samples(spec)
    ranks = spec.budget.workers_per_trial
    searched = frame[[p for p in spec.params if p in frame]].to_dict("records")  # Python scalars, not numpy's
    configs = [spec.train_config(params) for params in searched]
    frame["model"] = [f"L{c.model.depth}W{c.model.width}" for c in configs]
    frame["batch"] = [c.data.batch_size for c in configs]
    steps_per_epoch = (train_samples // ranks) // (frame["batch"] // ranks)
    epochs = frame.get("epoch", np.nan)  # a study whose every trial failed reports none
    frame["samples"] = epochs * steps_per_epoch * frame["batch"]
    frame["compute"] = frame.get("model/flops_per_sample", np.nan) * frame["samples"]
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
    epoch = common_epoch(histories["eval/clean_acc"].values())
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


def _train_samples(spec: Spec) -> int:
    try:
        return open_dataset(spec.data_uri).manifest.count("train")
    except OSError as e:
        raise ReportError(f"cannot count the training samples (for compute) at {spec.data_uri}: {e}") from None


# --- the fits -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Law:
    """err = 1 - `metric` against one axis, fitted or with the reason it was not."""

    metric: str
    axis: str
    """'N' (errors at the common epoch) or 'C' (final errors): AXES."""
    x: np.ndarray
    err: np.ndarray
    trials: np.ndarray
    """Trial numbers of the points."""
    fit: PowerLawFit | None
    reason: str | None
    left_out: int
    """TRAINED trials that lack a finite value of the metric or the axis."""


def fit_laws(trials: Trials, *, resamples: int = 200, level: float = 0.9, seed: int = 0) -> list[Law]:
    laws = []
    rows = trials.frame[trials.frame["state"].isin(TRAINED)]
    for metric in ACCURACIES:
        for axis, (column, _) in AXES.items():
            x = _column(rows, column)
            err = 1 - _column(rows, metric + AT_COMMON_EPOCH if axis == "N" else metric)
            keep = np.isfinite(x) & np.isfinite(err)
            fit, reason = None, None
            if rows.empty:
                reason = "no trial finished COMPLETE or PRUNED"
            elif axis == "N" and trials.common_epoch is None:
                reason = "no epoch at which every COMPLETE or PRUNED trial was evaluated"
            elif not keep.any():
                when = f"at epoch {trials.common_epoch}" if axis == "N" else "at its end"
                reason = f"no COMPLETE or PRUNED trial has both {metric} {when} and {column}"
            else:
                try:
                    fit = fit_power_law(x[keep], err[keep], resamples=resamples, level=level, seed=seed)
                except ValueError as e:
                    reason = str(e)
            trial_numbers = rows["trial"].to_numpy()[keep]
            laws.append(Law(metric, axis, x[keep], err[keep], trial_numbers, fit, reason, int((~keep).sum())))
    return laws


def _column(frame: pd.DataFrame, name: str) -> np.ndarray:
    if name not in frame:
        return np.full(len(frame), np.nan)
    return pd.to_numeric(frame[name], errors="coerce").to_numpy(dtype=float)


def targets() -> dict[str, int]:
    """Parameter counts of the presets the laws in N are extrapolated to."""
    return {name: param_counts(preset(name))["total"] for name in TARGETS}


# --- text ---------------------------------------------------------------------------------


def format_fits(spec: Spec, trials: Trials, laws: list[Law], sizes: dict[str, int]) -> str:
    f = trials.frame
    states = ", ".join(f"{n} {s}" for s, n in f["state"].value_counts().sort_index().items())
    n = _column(f, "model/params")
    at = "none" if trials.common_epoch is None else trials.common_epoch
    lines = [
        f"study {spec.name}: {len(f)} finished trials ({states}), from {trials.source}",
        "fitted: COMPLETE and PRUNED trials",
        f"N = model/params, every parameter (stem, blocks, head); errors at the last epoch all were evaluated at: {at}",
        "C = model/flops_per_sample x samples seen (epochs x steps per epoch x batch); final errors",
    ]
    if np.isfinite(n).any():
        lines += ["", *textwrap.wrap(_extrapolation_warning(spec, np.nanmax(n), sizes), 100)]
    for law in laws:
        lines += [""] * (law.axis == "N") + _format_law(law, sizes)
    if any(f"]{OUTSIDE}" in line for line in lines):
        lines += ["", f"{OUTSIDE} the estimate lies outside its bootstrap interval: the resamples pile up on one side"]
    return "\n".join(lines)


def _extrapolation_warning(spec: Spec, largest: float, sizes: dict[str, int]) -> str:
    far = ", ".join(f"{name} ({n:.3g}: {n / largest:,.0f}x, {math.log10(n / largest):.1f} decades)"
                    for name, n in sizes.items())  # fmt: skip
    return (
        f"WARNING: the largest trained model has {largest:.3g} parameters; {far} lie beyond it, "
        f"and the study trained on {spec.dataset.name} while the presets are ImageNet models. The extrapolations "
        "say where the fitted curves go, not what such models would reach; their intervals cover the fit's "
        "uncertainty only, not the law's form."
    )


def _format_law(law: Law, sizes: dict[str, int]) -> list[str]:
    name = f"1 - {law.metric}"
    x = "N" if law.axis == "N" else "C"
    head = f"{name} vs {x}"
    if law.left_out:
        head += f" ({law.left_out} trials without a finite value left out)"
    fit = law.fit
    if fit is None:
        return [f"{head}: not fitted: {law.reason}"]
    sizes_seen = len(np.unique(law.x))
    lines = [
        (
            f"{head}: err = E + A {x}^-alpha  ({fit.level:.0%} bootstrap intervals, {len(fit.samples)} resamples, "
            f"{fit.n_points} trials, {sizes_seen} distinct {x})"
        ),
        *(_parameter(name, value, fit) for name, value in fit.params.items()),
    ]
    if fit.validation is not None:
        lines.append(f"    largest {x} held out: mean |err - fit| = {fit.validation.mean_abs_error:.4g}")
        lines.append(f"    {fit.validation.verdict}")
    if law.axis == "N":
        for target, p in zip(sizes, fit.extrapolate(list(sizes.values()))):
            lines.append(
                f"    {target} (N = {p.n:.3g}): err {p.err:.4f} {_interval(p.err, p.low, p.high, '.4f')}"
                f" -> {law.metric} {1 - p.err:.4f} [{1 - p.high:.4f}, {1 - p.low:.4f}]"
            )
    return lines


def _parameter(name: str, value: float, fit: PowerLawFit) -> str:
    low, high = fit.intervals[name]
    flat = "  (reaches 0: the trials resolve no trend)" if name == "alpha" and low == 0 else ""
    return f"    {name:<6} {value:10.4g}  {_interval(value, low, high, '.4g')}{flat}"


def _interval(value: float, low: float, high: float, spec: str) -> str:
    return f"[{low:{spec}}, {high:{spec}}]" + ("" if low <= value <= high else OUTSIDE)


# --- figures ------------------------------------------------------------------------------


def _label(frame: pd.DataFrame, trial: int) -> str:
    row = frame.loc[frame["trial"] == trial].iloc[0]
    return f"trial {trial}: {row['model']}, {row['state']}"


def scaling_panels(trials: Trials, laws: list[Law], axis: str, sizes: dict[str, int]) -> list[plots.Panel]:
    """err against `axis`, one panel per metric: the trials, the fit and its band;
    in N, dashed on to the extrapolation targets, which are drawn with their intervals."""
    xlabel = AXES[axis][1]
    when = f"at epoch {trials.common_epoch}" if axis == "N" else "at the end"
    panels = []
    for i, law in enumerate(law for law in laws if law.axis == axis):
        color = plots.PALETTE[i % len(plots.PALETTE)]
        labels = [_label(trials.frame, t) for t in law.trials]
        series = [plots.Series("trials", law.x, law.err, color=color, labels=labels)] if len(law.x) else []
        note = None if law.fit else f"not fitted: {law.reason}"
        if law.fit:
            lo, hi = law.x.min(), law.x.max()
            series += _curve(law.fit, np.geomspace(lo, hi, 60), "fit", "line", color)
            if axis == "N":
                series += _curve(law.fit, np.geomspace(hi, max(sizes.values()), 60), "extrapolated", "dashed", color)
                predictions = law.fit.extrapolate(list(sizes.values()))
                series.append(plots.Series(
                    "1B / 2B presets", [p.n for p in predictions], [p.err for p in predictions],
                    low=[p.low for p in predictions], high=[p.high for p in predictions], color="#000000",
                    labels=[f"{name}: {p.err:.3g} [{p.low:.3g}, {p.high:.3g}]" for name, p in zip(sizes, predictions)],
                ))  # fmt: skip
        panels.append(
            plots.Panel(f"1 - {law.metric}, {when}", xlabel, "error", series, logx=True, logy=True, note=note)
        )
    return panels


def _curve(fit: PowerLawFit, x: np.ndarray, name: str, style: str, color: str) -> list[plots.Series]:
    predictions = fit.interval(x)
    return [plots.Series(name, x, [p.err for p in predictions], style=style, color=color,
                         low=[p.low for p in predictions], high=[p.high for p in predictions])]  # fmt: skip


def eps_panels(trials: Trials) -> list[plots.Panel]:
    """Accuracy against the certified radius, a line per trial, coloured by parameter
    count (viridis: dark few, yellow many): at the end, and at the common epoch."""
    return [
        _eps_panel(trials, "", "at the end"),
        _eps_panel(trials, AT_COMMON_EPOCH, f"at epoch {trials.common_epoch}"),
    ]


def _eps_panel(trials: Trials, suffix: str, when: str) -> plots.Panel:
    f = trials.frame[trials.frame["state"].isin(TRAINED)]
    accuracy = np.stack([_column(f, m + suffix) for m in ACCURACIES], axis=1)
    eps = list(ACCURACIES.values())
    series = []
    colors = plots.shades(np.log(_column(f, "model/params")))
    for (_, row), acc, color in zip(f.iterrows(), accuracy, colors):
        if np.isfinite(acc).any():
            label = _label(f, row["trial"])
            series.append(plots.Series(label, eps, acc, style="marked", color=color, labels=[label] * len(eps)))
    note = None if series else "no trial reported certified accuracies"
    return plots.Panel(f"accuracy certified at radius eps, {when}", "eps (L2, pixels in [0, 1])", "accuracy", series,
                       note=note)  # fmt: skip


def pareto_panels(trials: Trials) -> list[plots.Panel]:
    """Certified accuracy against training compute: every trial, and the front of
    trials that no cheaper trial beats."""
    f = trials.frame[trials.frame["state"].isin(TRAINED)]
    panels = []
    for i, metric in enumerate(m for m in ACCURACIES if m != "eval/clean_acc"):
        c, acc = _column(f, "compute"), _column(f, metric)
        keep = np.isfinite(c) & np.isfinite(acc)
        color = plots.PALETTE[i % len(plots.PALETTE)]
        labels = [_label(f, t) for t in f["trial"].to_numpy()[keep]]
        series = []
        if keep.any():
            front = pareto_front(c[keep], acc[keep])
            series = [
                plots.Series("trials", c[keep], acc[keep], color=color, labels=labels),
                plots.Series("Pareto front", c[keep][front], acc[keep][front], style="step", color=color,
                             labels=[labels[j] for j in front]),
            ]  # fmt: skip
        note = None if series else f"no trial reported {metric} and its compute"
        panels.append(plots.Panel(metric, AXES["C"][1], "certified accuracy", series, logx=True, note=note))
    return panels


def pareto_front(cost: np.ndarray, value: np.ndarray) -> np.ndarray:
    """Indices of the points that no point of lower or equal cost beats in value,
    by increasing cost."""
    order = np.lexsort((-value, cost))  # by cost, the best value first among equal costs
    front, best = [], -np.inf
    for i in order:
        if value[i] > best:
            front.append(i)
            best = value[i]
    return np.array(front, dtype=int)


def trial_table(trials: Trials) -> tuple[list[str], list[list[str]]]:
    columns = ["trial", "state", "model", *trials.params, "model/params", "epoch", "compute", *ACCURACIES,
               "duration_s"]  # fmt: skip
    f = trials.frame
    columns = [c for c in columns if c in f]
    rows = [[_cell(row[c]) for c in columns] for _, row in f.iterrows()]
    return columns, rows


def _cell(value) -> str:
    if isinstance(value, float):
        return "" if math.isnan(value) else f"{value:.4g}"
    return str(value)


# --- the report ---------------------------------------------------------------------------


def write_report(spec: Spec, trials: Trials, laws: list[Law], text: str, out: str) -> list[Path]:
    """PNGs, the HTML page and the printed fits under `out`; returns the files."""
    os.makedirs(out, exist_ok=True)
    sizes = targets()
    title = f"study {spec.name}"
    figures = {
        "scaling_params": ("error against parameters", scaling_panels(trials, laws, "N", sizes), 3),
        "scaling_compute": ("error against training compute", scaling_panels(trials, laws, "C", sizes), 3),
        "cra_vs_eps": ("accuracy against certified radius", eps_panels(trials), 2),
        "pareto": ("certified accuracy against training compute", pareto_panels(trials), 2),
    }
    files = []
    sections: list = [("fits", f"<pre>{html.escape(text)}</pre>")]
    for name, (heading, panels, columns) in figures.items():
        path = Path(out, f"{name}.png")
        plots.save_png(panels, str(path), title=f"{title}: {heading}", columns=columns)
        files.append(path)
        sections.append((heading, plots.plotly_figure(panels, title="", columns=columns)))
    header, rows = trial_table(trials)
    path = Path(out, "trials.png")
    plots.save_table_png(header, rows, str(path), title=f"{title}: trials")
    files.append(path)
    sections.append(("trials", plots.html_table(header, rows)))
    for name, content in (("report.html", plots.html_page(f"{title}: scaling report", sections)), ("fits.txt", text)):
        path = Path(out, name)
        path.write_text(content)
        files.append(path)
    return files


def log_report(spec: Spec, trials: Trials, out: str) -> None:
    """The report's files as artifacts of the study's MLflow parent run, under report/."""
    MlflowClient(spec.mlflow_uri).log_artifacts(trials.parent_run, out, REPORT_DIR)


def default_out(spec: Spec) -> str:
    """<root>/report for a local root; ./report-<name> when the root is s3:// (MLflow keeps a copy)."""
    return f"{spec.root}/{REPORT_DIR}" if "://" not in spec.root else f"report-{spec.name}"


# --- command line -------------------------------------------------------------------------


def _fit(args) -> int:
    if args.command == "report" and importlib.util.find_spec("plotly") is None:
        print("error: the report's HTML page needs plotly: pip install -e '.[dashboards]'", file=sys.stderr)
        return 2
    try:
        spec = load_spec(args.spec)
        if args.root:
            spec = spec.with_root(args.root)
        trials = load_trials(spec)
    except (SpecError, ReportError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    laws = fit_laws(trials, resamples=args.resamples, level=args.level)
    text = format_fits(spec, trials, laws, targets())
    print(text)
    if args.command == "report":
        out = args.out or default_out(spec)
        files = write_report(spec, trials, laws, text, out)
        log_report(spec, trials, out)
        print(f"\nreport: {', '.join(f.name for f in files)} in {out}")
        print(f"logged to MLflow run {trials.parent_run} under {REPORT_DIR}/ ({redact(spec.mlflow_uri)})")
    return 0


def add_parser(subparsers) -> None:
    for name, help in (
        ("fit", "fit scaling laws of a finished study: intervals and the 1B/2B extrapolation"),
        ("report", "the fits, plus plots (PNG and one HTML page) logged to the study's MLflow parent run"),
    ):
        p = subparsers.add_parser(name, help=help, description=__doc__.split("\n\n")[0])
        p.add_argument("spec", metavar="SPEC", help="study spec (YAML)")
        p.add_argument("--root", help="study root (path or s3:// URI) in place of the spec's storage.root")
        p.add_argument("--resamples", type=int, default=200, help="bootstrap resamples per fit (default 200)")
        p.add_argument("--level", type=float, default=0.9, help="interval level (default 0.9)")
        if name == "report":
            p.add_argument("--out", help="directory of the files (default <root>/report)")
        p.set_defaults(run=_fit)
