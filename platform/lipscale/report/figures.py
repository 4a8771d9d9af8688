"""What a report shows, as panels of series (lipscale.report.plots draws them: PNG and
plotly): the laws in N and in C on the envelope with their bands and, in N, the 1B/2B
points; each law's leave-the-largest-out check; accuracy against the certified
radius; width against depth at equal parameters; each trial's cost; certified
accuracy against training compute with its Pareto front; an IsoFLOP study's curves
and frontier; the trials' table; and the report's files, one HTML page among them."""

import html
import math
import os
from pathlib import Path

import numpy as np
import pandas as pd

from lipnext.metrics import ACCURACIES, CLEAN_ACC, EPOCH, PARAMS, TRAIN_SAMPLES_PER_S
from lipscale.report import plots
from lipscale.report.laws import AXES, FRONTIER_REACH, IsoFLOP, Law, shape_comparisons, targets
from lipscale.report.rows import BUDGET, COMPUTE, LEFT_OUT, SIZE, TRAINED, Trials, column
from lipscale.scaling import PowerLawFit
from lipscale.spec import Spec

GREY = "#999999"
"""Trials outside the envelope."""


def _label(row) -> str:
    return f"trial {row['trial']}: {row[SIZE]}, {row['state']}" + (f" ({row[LEFT_OUT]})" if row[LEFT_OUT] else "")


def _labels(frame: pd.DataFrame) -> list[str]:
    return [_label(row) for _, row in frame.iterrows()]


def scaling_panels(trials: Trials, laws: list[Law], axis: str, sizes: dict[str, int]) -> list[plots.Panel]:
    """err against `axis`, one panel per metric: the envelope, the other trials that reached
    their full budget (grey), the fit and its band; in N, dashed on to the extrapolation
    targets, drawn with their intervals beside the law's verdict."""
    name, xlabel = AXES[axis]
    full = trials.frame[trials.frame[LEFT_OUT].str.startswith("not the best")]
    panels = []
    for i, law in enumerate(law for law in laws if law.axis == axis):
        color = plots.PALETTE[i % len(plots.PALETTE)]
        envelope = trials.frame[trials.frame["trial"].isin(law.trials)]
        others = full[np.isfinite(column(full, law.metric))]
        series = []
        if len(others):
            series.append(plots.Series("not their size's best", column(others, name), 1 - column(others, law.metric),
                                       color=GREY, labels=_labels(others)))  # fmt: skip
        if len(law.x):
            series.append(plots.Series("envelope", law.x, law.err, color=color, labels=_labels(envelope)))
        note = None if law.fit else f"not fitted: {law.reason}"
        if law.fit:
            lo, hi = law.x.min(), law.x.max()
            series += _curve(law.fit, np.geomspace(lo, hi, 60), "fit", "line", color)
            v = law.fit.validation
            if axis == "N" and v is not None:
                series += _curve(law.fit, np.geomspace(hi, max(sizes.values()), 60), "extrapolated", "dashed", color)
                predictions = law.fit.extrapolate(list(sizes.values()))
                series.append(plots.Series(
                    "1B / 2B presets", [p.n for p in predictions], [p.err for p in predictions],
                    low=[p.low for p in predictions], high=[p.high for p in predictions], color="#000000",
                    labels=[f"{name}: {p.err:.3g} [{p.low:.3g}, {p.high:.3g}], {d:.1f} decades out"
                            for name, p, d in zip(sizes, predictions, predictions.decades)],
                ))  # fmt: skip
                note = f"largest held out: {'inside' if v.inside else 'OUTSIDE'} its {v.level:.0%} interval"
        panels.append(plots.Panel(f"1 - {law.metric}, envelope", xlabel, "error", series, logx=True, logy=True,
                                  note=note))  # fmt: skip
    return panels


def _curve(fit: PowerLawFit, x: np.ndarray, name: str, style: str, color: str) -> list[plots.Series]:
    predictions = fit.interval(x)
    return [plots.Series(name, x, [p.err for p in predictions], style=style, color=color,
                         low=[p.low for p in predictions], high=[p.high for p in predictions])]  # fmt: skip


def validation_panels(trials: Trials, laws: list[Law]) -> list[plots.Panel]:
    """Each law in N fitted without its largest size: the sizes it was fitted to, its curve
    and band on to the held-out size, its interval there, and what was measured."""
    panels = []
    for i, law in enumerate(law for law in laws if law.axis == "N"):
        color = plots.PALETTE[i % len(plots.PALETTE)]
        v = law.fit.validation if law.fit else None
        title = f"1 - {law.metric}: largest size held out"
        if v is None:
            reason = law.reason if law.fit is None else "the other sizes are too few to fit"
            panels.append(plots.Panel(title, AXES["N"][1], "error", note=f"not checked: {reason}", logx=True))
            continue
        kept = law.x < v.x
        envelope = trials.frame.set_index("trial").loc[law.trials]
        labels = [f"trial {t}: {envelope.at[t, SIZE]}" for t in law.trials]
        held = [label for label, k in zip(labels, kept) if not k]
        series = [
            plots.Series("fitted to", law.x[kept], law.err[kept], color=color,
                         labels=[label for label, k in zip(labels, kept) if k]),
            *_curve(v.law, np.geomspace(law.x[kept].min(), v.x, 60), "law without the largest", "line", color),
            plots.Series(f"its {v.level:.0%} interval there", [v.x], [v.predicted], low=[v.low], high=[v.high],
                         color="#000000", labels=[f"predicted {v.predicted:.4g} [{v.low:.4g}, {v.high:.4g}]"]),
            plots.Series("measured (held out)", [v.x] * len(v.measured), list(v.measured), color=plots.PALETTE[4],
                         labels=held),
        ]  # fmt: skip
        panels.append(plots.Panel(title, AXES["N"][1], "error", series, logx=True, logy=True,
                                  note=f"{'inside' if v.inside else 'OUTSIDE'}: measured {v.measured_mean:.4g}, "
                                       f"predicted {v.predicted:.4g} [{v.low:.4g}, {v.high:.4g}]"))  # fmt: skip
    return panels


def eps_panels(trials: Trials) -> list[plots.Panel]:
    """Accuracy against the certified radius, a line per trial, coloured by parameter
    count (viridis: dark few, yellow many): every trial at its end, and the envelope."""
    f = trials.frame[trials.frame["state"].isin(TRAINED)]
    return [_eps_panel(f, "every trial at its end"), _eps_panel(trials.envelope, "the envelope: each size's best")]


def _eps_panel(f: pd.DataFrame, which: str) -> plots.Panel:
    accuracy = np.stack([column(f, m) for m in ACCURACIES], axis=1)
    eps = list(ACCURACIES.values())
    series = []
    params = column(f, PARAMS)
    for (_, row), acc, color in zip(f.iterrows(), accuracy, plots.shades(params)):
        if np.isfinite(acc).any():
            label = _label(row)
            series.append(plots.Series(label, eps, acc, style="marked", color=color, labels=[label] * len(eps),
                                       legend=False))  # fmt: skip
    note = None if series else "no trial reported certified accuracies"
    return plots.Panel(f"accuracy certified at radius eps, {which}", "eps (L2, pixels in [0, 1])", "accuracy", series,
                       note=note, colorbar=("parameters", params))  # fmt: skip


def shape_panels(trials: Trials) -> list[plots.Panel]:
    """Width against depth at about equal parameters: per group of the envelope, each
    accuracy's error against depth, one point per shape."""
    groups: dict[float, dict[str, list]] = {}
    for metric, comparisons in shape_comparisons(trials).items():
        for group in comparisons:
            groups.setdefault(round(group.params, -2), {})[metric] = sorted(group.shapes, key=lambda s: s.depth)
    panels = []
    for params, by_metric in groups.items():
        series = [
            plots.Series(f"1 - {metric}", [s.depth for s in shapes], [s.err for s in shapes], style="marked",
                         color=plots.PALETTE[i % len(plots.PALETTE)],
                         labels=[f"L{s.depth}W{s.width} ({s.params:.3g} parameters): {s.err:.4f}" for s in shapes])
            for i, (metric, shapes) in enumerate(by_metric.items())
        ]  # fmt: skip
        shapes = next(iter(by_metric.values()))
        title = f"N ~ {params:.3g}: " + " vs ".join(f"L{s.depth}W{s.width}" for s in shapes)
        panels.append(plots.Panel(title, "depth (the width falls as it grows)", "error", series, logx=True))
    if not panels:
        panels.append(plots.Panel("width against depth", "depth", "error",
                                  note="no two shapes of the envelope have about equal parameters (within 5%)"))
    return panels


def cost_panels(trials: Trials) -> list[plots.Panel]:
    """What each trial cost: its wall time against its training compute, and its
    throughput against its size; by state."""
    f = trials.frame
    panels = []
    for title, (x, xlabel, logx), (y, ylabel) in (
        ("wall time of each trial", (COMPUTE, AXES["C"][1], True), ("duration_s", "seconds")),
        ("training throughput of each trial", (PARAMS, AXES["N"][1], True), (TRAIN_SAMPLES_PER_S, "samples / s")),
    ):
        series = []
        for i, state in enumerate(sorted(f["state"].unique())):
            rows = f[f["state"] == state]
            keep = np.isfinite(column(rows, x)) & np.isfinite(column(rows, y))
            if keep.any():
                series.append(plots.Series(state, column(rows, x)[keep], column(rows, y)[keep],
                                           color=plots.PALETTE[i % len(plots.PALETTE)],
                                           labels=_labels(rows[keep])))  # fmt: skip
        note = None if series else f"no trial reported {x} and {y}"
        panels.append(plots.Panel(title, xlabel, ylabel, series, logx=logx, note=note))
    return panels


def pareto_panels(trials: Trials) -> list[plots.Panel]:
    """Certified accuracy against training compute: every trial, and the front of
    trials that no cheaper trial beats."""
    f = trials.frame[trials.frame["state"].isin(TRAINED)]
    panels = []
    for i, metric in enumerate(m for m in ACCURACIES if m != CLEAN_ACC):
        c, acc = column(f, COMPUTE), column(f, metric)
        keep = np.isfinite(c) & np.isfinite(acc)
        color = plots.PALETTE[i % len(plots.PALETTE)]
        labels = _labels(f[keep])
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


def isoflop_panels(isoflops: list[IsoFLOP]) -> list[plots.Panel]:
    """Per accuracy: err against N at each budget with its parabola and minimum; and the
    compute-optimal N against C, N_opt = k C^a with its band, dashed beyond the budgets."""
    panels = []
    for iso in isoflops:
        fit = iso.fit
        if fit is None:
            panels.append(plots.Panel(f"1 - {iso.metric}: IsoFLOP curves", AXES["N"][1], "error", logx=True,
                                      note=f"not fitted: {iso.reason}"))  # fmt: skip
            continue
        curves = []
        for i, curve in enumerate(fit.curves):
            color = plots.PALETTE[i % len(plots.PALETTE)]
            mine = np.isclose(iso.budget, curve.budget, rtol=1e-6)
            n = np.geomspace(min(curve.sizes[0], curve.minimum.predicted.n), max(curve.sizes[1],
                             curve.minimum.predicted.n), 60)  # fmt: skip
            opt = curve.minimum.predicted
            curves += [
                plots.Series(f"C = {curve.budget:.2g}", iso.n[mine], iso.err[mine], color=color,
                             labels=[f"trial {t}" for t in iso.trials[mine]]),
                plots.Series(f"parabola at {curve.budget:.2g}", n, curve.err(n), style="line", color=color),
                plots.Series(f"N_opt at {curve.budget:.2g}", [opt.n], [opt.err], color="#000000",
                             labels=[f"N_opt {opt.n:.3g} [{curve.minimum.n_low:.3g}, {curve.minimum.n_high:.3g}]"]),
            ]  # fmt: skip
        panels.append(plots.Panel(f"1 - {iso.metric}: IsoFLOP curves", AXES["N"][1], "error", curves, logx=True))
        c = np.geomspace(fit.curves[0].budget, fit.largest, 40)
        beyond = np.geomspace(fit.largest, fit.largest * FRONTIER_REACH[-1], 40)
        frontier = [
            plots.Series("N_opt of each budget", [cv.budget for cv in fit.curves],
                         [cv.minimum.predicted.n for cv in fit.curves], low=[cv.minimum.n_low for cv in fit.curves],
                         high=[cv.minimum.n_high for cv in fit.curves], color=plots.PALETTE[0]),
            *_frontier(fit, c, "N_opt = k C^a", "line"),
            *_frontier(fit, beyond, "extrapolated", "dashed"),
        ]  # fmt: skip
        v = fit.validation
        note = None if v is None else f"largest budget held out: {'inside' if v.inside else 'OUTSIDE'} its interval"
        panels.append(plots.Panel(f"1 - {iso.metric}: compute-optimal size", AXES["C"][1], "parameters N", frontier,
                                  logx=True, logy=True, note=note))  # fmt: skip
    return panels


def _frontier(fit, budgets: np.ndarray, name: str, style: str) -> list[plots.Series]:
    sizes = fit.interval(budgets)
    return [plots.Series(name, budgets, [s.n for s in sizes], style=style, color=plots.PALETTE[0],
                         low=[s.low for s in sizes], high=[s.high for s in sizes])]  # fmt: skip


def trial_table(trials: Trials) -> tuple[list[str], list[list[str]]]:
    columns = ["trial", "state", SIZE, *trials.params, PARAMS, EPOCH, BUDGET, COMPUTE, *ACCURACIES, "duration_s",
               LEFT_OUT]  # fmt: skip
    f = trials.frame
    columns = [c for c in dict.fromkeys(columns) if c in f]
    rows = [[_cell(row[c]) for c in columns] for _, row in f.iterrows()]
    return columns, rows


def _cell(value) -> str:
    if isinstance(value, float):
        return "" if math.isnan(value) else f"{value:.4g}"
    return str(value)


# --- the report's files ------------------------------------------------------------------


def write_report(
    spec: Spec, trials: Trials, laws: list[Law], isoflops: list[IsoFLOP], text: str, out: str
) -> list[Path]:
    """PNGs, the HTML page and the printed fits under `out`; returns the files."""
    os.makedirs(out, exist_ok=True)
    sizes = targets()
    title = f"study {spec.name}"
    figures = {}
    if trials.design == "isoflop":
        figures["isoflop"] = ("IsoFLOP curves and the compute-optimal frontier", isoflop_panels(isoflops), 2)
    else:
        figures["scaling_params"] = ("error against parameters", scaling_panels(trials, laws, "N", sizes), 3)
        figures["validation"] = ("each law without its largest size", validation_panels(trials, laws), 3)
        figures["scaling_compute"] = ("error against training compute", scaling_panels(trials, laws, "C", sizes), 3)
    figures |= {
        "cra_vs_eps": ("accuracy against certified radius", eps_panels(trials), 2),
        "shapes": ("width against depth at equal parameters", shape_panels(trials), 3),
        "cost": ("what each trial cost", cost_panels(trials), 2),
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
