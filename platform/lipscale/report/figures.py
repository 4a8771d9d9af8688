"""What a report shows, as panels of series (lipscale.report.plots draws them: PNG and
plotly): the laws in N and in C with their bands and the 1B/2B points, accuracy
against the certified radius, certified accuracy against training compute with its
Pareto front, the trials' table; and the report's files, one HTML page among them."""

import html
import math
import os
from pathlib import Path

import numpy as np
import pandas as pd

from lipnext.metrics import ACCURACIES, CLEAN_ACC, EPOCH, PARAMS
from lipscale.report import plots
from lipscale.report.laws import AXES, Law, targets
from lipscale.report.rows import AT_COMMON_EPOCH, COMPUTE, TRAINED, Trials, column
from lipscale.scaling import PowerLawFit
from lipscale.spec import Spec


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
    accuracy = np.stack([column(f, m + suffix) for m in ACCURACIES], axis=1)
    eps = list(ACCURACIES.values())
    series = []
    params = column(f, PARAMS)
    for (_, row), acc, color in zip(f.iterrows(), accuracy, plots.shades(params)):
        if np.isfinite(acc).any():
            label = _label(f, row["trial"])
            series.append(plots.Series(label, eps, acc, style="marked", color=color, labels=[label] * len(eps),
                                       legend=False))  # fmt: skip
    note = None if series else "no trial reported certified accuracies"
    return plots.Panel(f"accuracy certified at radius eps, {when}", "eps (L2, pixels in [0, 1])", "accuracy", series,
                       note=note, colorbar=("parameters", params))  # fmt: skip


def pareto_panels(trials: Trials) -> list[plots.Panel]:
    """Certified accuracy against training compute: every trial, and the front of
    trials that no cheaper trial beats."""
    f = trials.frame[trials.frame["state"].isin(TRAINED)]
    panels = []
    for i, metric in enumerate(m for m in ACCURACIES if m != CLEAN_ACC):
        c, acc = column(f, COMPUTE), column(f, metric)
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
    columns = ["trial", "state", "model", *trials.params, PARAMS, EPOCH, COMPUTE, *ACCURACIES, "duration_s"]
    f = trials.frame
    columns = [c for c in columns if c in f]
    rows = [[_cell(row[c]) for c in columns] for _, row in f.iterrows()]
    return columns, rows


def _cell(value) -> str:
    if isinstance(value, float):
        return "" if math.isnan(value) else f"{value:.4g}"
    return str(value)


# --- the report's files ------------------------------------------------------------------


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
