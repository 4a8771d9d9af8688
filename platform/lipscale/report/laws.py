"""The scaling laws of a study's envelope (lipscale.report.rows: each size's best trial
at its full budget): err = 1 - accuracy against parameters N and training compute C,
fitted by lipscale.scaling with bootstrap intervals and the leave-the-largest-out
check; an IsoFLOP study's curves and compute-optimal frontier; width against depth
at equal parameters; and their printout, the laws in N extrapolated to the 1B and
2B presets only beside their verdict and the decades they reach."""

import math
import textwrap
from collections import Counter
from dataclasses import dataclass

import numpy as np

from lipnext import param_counts, preset
from lipnext.metrics import ACCURACIES, CLEAN_ACC, FLOPS_PER_SAMPLE, PARAMS, TRAIN_SAMPLES
from lipscale.report.rows import BUDGET, COMPUTE, DEPTH, EPOCHS, LEFT_OUT, SIZE, WIDTH, Trials, column
from lipscale.scaling import (
    IsoFLOPFit, PowerLawFit, ShapeComparison, compare_shapes, fit_isoflop, fit_power_law, fit_shared_exponent,
)  # fmt: skip
from lipscale.spec import Spec

TARGETS = ("imagenet-1b", "imagenet-2b")
"""Presets the laws in N are extrapolated to."""
AXES = {"N": (PARAMS, "parameters N"), "C": (COMPUTE, "training compute C (FLOPs)")}
"""Fit axis -> (column, label)."""
OUTSIDE = "*"
"""Marks an interval that misses its estimate: a percentile interval may, when the resamples
pile up on one side (few sizes). Said, not hidden."""
FRONTIER_REACH = (10, 100)
"""Multiples of an IsoFLOP study's largest budget its compute-optimal size is extrapolated to."""


@dataclass(frozen=True)
class FitOptions:
    """How the laws are fitted (`lipscale fit --link logit --shared-exponent ...`)."""

    link: str = "log"
    """lipscale.scaling.LINKS: "logit" fits the odds err / (1 - err), for errors near 1."""
    shared: bool = False
    """Fit the laws of 1 - CRA at every eps together, one exponent shared (per-eps E and A)."""
    resamples: int = 200
    level: float = 0.9
    seed: int = 0


@dataclass(frozen=True)
class Law:
    """err = 1 - `metric` of the envelope against one axis, fitted or with the reason it was not."""

    metric: str
    axis: str
    """'N' or 'C': AXES."""
    x: np.ndarray
    err: np.ndarray
    trials: np.ndarray
    """Trial numbers of the points."""
    fit: PowerLawFit | None
    reason: str | None
    left_out: int
    """Envelope trials that lack a finite value of the metric or the axis."""


@dataclass(frozen=True)
class IsoFLOP:
    """Chinchilla's approach 2 on err = 1 - `metric` of an IsoFLOP study's envelope (each size's
    best at each budget)."""

    metric: str
    n: np.ndarray
    budget: np.ndarray
    """The design budget of each point."""
    err: np.ndarray
    trials: np.ndarray
    fit: IsoFLOPFit | None
    reason: str | None


def fit_laws(trials: Trials, options: FitOptions = FitOptions()) -> list[Law]:
    """The laws in N and in C of every accuracy, on the envelope; none for an IsoFLOP study,
    whose trials trained for different budgets (its laws are fit_isoflops')."""
    if trials.design == "isoflop":
        return []
    rows = trials.envelope
    laws = []
    for axis, (name, _) in AXES.items():
        x = column(rows, name)
        errs = {metric: 1 - column(rows, metric) for metric in ACCURACIES}
        shared = _shared(x, errs, options) if options.shared else {}
        for metric, err in errs.items():
            keep = np.isfinite(x) & np.isfinite(err)
            fit, reason = shared.get(metric), None
            if rows.empty:
                reason = f"the envelope is empty: {_left_out(trials.frame)}"
            elif not keep.any():
                reason = f"no trial of the envelope has both {metric} and {name}"
            elif fit is None:
                try:
                    fit = fit_power_law(x[keep], err[keep], link=options.link, resamples=options.resamples,
                                        level=options.level, seed=options.seed)  # fmt: skip
                except ValueError as e:
                    reason = str(e)
            laws.append(Law(metric, axis, x[keep], err[keep], rows["trial"].to_numpy()[keep], fit, reason,
                            int((~keep).sum())))  # fmt: skip
    return laws


def _shared(x: np.ndarray, errs: dict[str, np.ndarray], options: FitOptions) -> dict[str, PowerLawFit]:
    """The laws of 1 - CRA at every eps that can be fitted, one exponent shared; {} when fewer
    than two can (e.g. nothing is certified at eps = 1: a constant error)."""
    eps = [m for m in errs if m != CLEAN_ACC]
    keep = np.isfinite(x) & np.all([np.isfinite(errs[m]) for m in eps], axis=0)
    if keep.sum() != len(x) or not keep.any():  # a shared fit pairs every metric of every row
        return {}
    together = {m: errs[m] for m in eps if np.ptp(errs[m]) > 0 and errs[m].max() < 1}
    if len(together) < 2:
        return {}
    try:
        return fit_shared_exponent(x, together, link=options.link, resamples=options.resamples, level=options.level,
                                   seed=options.seed)  # fmt: skip
    except ValueError:
        return {}


def fit_isoflops(trials: Trials, options: FitOptions = FitOptions()) -> list[IsoFLOP]:
    """An IsoFLOP study's curves and N_opt = k C^a for every accuracy; none for other designs."""
    if trials.design != "isoflop":
        return []
    rows = trials.envelope
    out = []
    for metric in ACCURACIES:
        n, budget, err = column(rows, PARAMS), column(rows, BUDGET), 1 - column(rows, metric)
        keep = np.isfinite(n) & np.isfinite(budget) & np.isfinite(err)
        fit, reason = None, None
        try:
            # The design's budgets, exact, group the runs (their compute lies within whole epochs of them).
            fit = fit_isoflop(n[keep], budget[keep], err[keep], rel_tol=1e-9, resamples=options.resamples,
                              level=options.level, seed=options.seed)  # fmt: skip
        except ValueError as e:
            reason = str(e)
        out.append(IsoFLOP(metric, n[keep], budget[keep], err[keep], rows["trial"].to_numpy()[keep], fit, reason))
    return out


def shape_comparisons(trials: Trials) -> dict[str, list[ShapeComparison]]:
    """Width against depth at about equal parameters (lipscale.scaling.compare_shapes), on the
    envelope, for every accuracy: metric -> groups of two shapes or more."""
    rows = trials.envelope
    out = {}
    for metric in ACCURACIES:
        err = 1 - column(rows, metric)
        n = column(rows, PARAMS)
        keep = np.isfinite(err) & np.isfinite(n)
        out[metric] = compare_shapes(rows[WIDTH][keep], rows[DEPTH][keep], n[keep], err[keep])
    return out


def targets() -> dict[str, int]:
    """Parameter counts of the presets the laws in N are extrapolated to."""
    return {name: param_counts(preset(name))["total"] for name in TARGETS}


# --- the printout -----------------------------------------------------------------------


def format_fits(
    spec: Spec, trials: Trials, laws: list[Law], isoflops: list[IsoFLOP], sizes: dict[str, int],
    options: FitOptions = FitOptions(),
) -> str:  # fmt: skip
    f = trials.frame
    states = ", ".join(f"{n} {s}" for s, n in f["state"].value_counts().sort_index().items())
    metric, direction = trials.objective
    envelope = trials.envelope
    link = "the logit link: the odds err / (1 - err) follow the law" if options.link == "logit" else "err itself"
    lines = [
        f"study {spec.name} ({trials.design}): {len(f)} finished trials ({states}), from {trials.source}",
        f"envelope: {_envelope(trials)}, each the best by {metric} ({direction}) among those trained to their full "
        f"budget ({_budgets(envelope)})",
        f"left out of every law: {_left_out(f)}",
        f"N = {PARAMS}, every parameter (stem, blocks, head); C = {FLOPS_PER_SAMPLE} x {TRAIN_SAMPLES} "
        f"(samples seen in training, all ranks); fitted in {link}"
        + ("; the laws of 1 - CRA share one exponent across eps" if options.shared else ""),
    ]
    n = column(envelope, PARAMS)
    if laws and np.isfinite(n).any():
        lines += ["", *textwrap.wrap(_extrapolation_warning(spec, np.nanmax(n), sizes), 100)]
    for law in laws:
        lines += [""] * (law.axis == "N") + _format_law(law, envelope, sizes)
    for iso in isoflops:
        lines += ["", *_format_isoflop(iso)]
    lines += _format_shapes(shape_comparisons(trials)[metric] if metric in ACCURACIES else [], metric)
    if any(f"]{OUTSIDE}" in line for line in lines):
        lines += ["", f"{OUTSIDE} the estimate lies outside its bootstrap interval: the resamples pile up on one side"]
    return "\n".join(lines)


def _envelope(trials: Trials) -> str:
    envelope = trials.envelope
    if trials.design == "isoflop":
        return f"{len(envelope)} points ({envelope[SIZE].nunique()} sizes at {envelope[BUDGET].nunique()} budgets)"
    return f"{len(envelope)} sizes"


def _budgets(rows) -> str:
    epochs = sorted(set(rows[EPOCHS]))
    if len(epochs) < 2:
        return f"{epochs[0]} epochs" if epochs else "none did"
    return f"{epochs[0]} to {epochs[-1]} epochs"


def _left_out(frame) -> str:
    """How many trials are not in the envelope, and why, by reason: 'not the best' counts by size together."""
    reasons = Counter("not their size's best" if why.startswith("not the best") else why
                      for why in frame[LEFT_OUT] if why)  # fmt: skip
    return ", ".join(f"{count} {why}" for why, count in reasons.most_common()) or "none"


def _extrapolation_warning(spec: Spec, largest: float, sizes: dict[str, int]) -> str:
    far = ", ".join(f"{name} ({n:.3g}: {n / largest:,.0f}x, {math.log10(n / largest):.1f} decades)"
                    for name, n in sizes.items())  # fmt: skip
    return (
        f"WARNING: the largest trained model has {largest:.3g} parameters; {far} lie beyond it, "
        f"and the study trained on {spec.dataset.name} while the presets are ImageNet models. The extrapolations "
        "say where the fitted curves go, not what such models would reach; their intervals cover the fit's "
        "uncertainty only, not the law's form."
    )


def _format_law(law: Law, envelope, sizes: dict[str, int]) -> list[str]:
    head = f"1 - {law.metric} vs {law.axis}"
    if law.left_out:
        head += f" ({law.left_out} trials without a finite value left out)"
    fit = law.fit
    if fit is None:
        return [f"{head}: not fitted: {law.reason}"]
    shared = f", alpha shared with {', '.join(fit.shared)}" if fit.shared else ""
    lines = [
        f"{head}: err = E + A {law.axis}^-alpha  ({fit.level:.0%} bootstrap intervals, {len(fit.samples)} resamples, "
        f"{fit.n_points} sizes{shared})",
        *(_parameter(name, value, fit) for name, value in fit.params.items()),
    ]
    v = fit.validation
    if v is None:
        lines.append(f"    largest {law.axis} not held out: the others are too few to fit; nothing extrapolated")
        return lines
    held = envelope.loc[envelope["trial"].isin(law.trials[law.x == v.x]), SIZE]
    lines.append(f"    largest {law.axis} held out ({', '.join(held)}): {v.verdict}")
    if law.axis == "N":
        predictions = fit.extrapolate(list(sizes.values()))
        for target, p, decades in zip(sizes, predictions, predictions.decades):
            lines.append(
                f"    {target} (N = {p.n:.3g}, {decades:.1f} decades beyond the data; beside the verdict above): "
                f"err {p.err:.4f} {_interval(p.err, p.low, p.high, '.4f')} -> {law.metric} {1 - p.err:.4f} "
                f"[{1 - p.high:.4f}, {1 - p.low:.4f}]"
            )
    return lines


def _parameter(name: str, value: float, fit: PowerLawFit) -> str:
    low, high = fit.intervals[name]
    flat = "  (reaches 0: the trials resolve no trend)" if name == "alpha" and low == 0 else ""
    return f"    {name:<6} {value:10.4g}  {_interval(value, low, high, '.4g')}{flat}"


def _interval(value: float, low: float, high: float, spec: str) -> str:
    return f"[{low:{spec}}, {high:{spec}}]" + ("" if low <= value <= high else OUTSIDE)


def _format_isoflop(iso: IsoFLOP) -> list[str]:
    head = f"1 - {iso.metric}: IsoFLOP curves (Chinchilla's approach 2)"
    fit = iso.fit
    if fit is None:
        return [f"{head}: not fitted: {iso.reason}"]
    lines = [f"{head}: N_opt = k C^a  ({fit.level:.0%} bootstrap intervals, {len(fit.samples)} resamples)"]
    for curve in fit.curves:
        opt, where = curve.minimum.predicted, "" if curve.bracketed else "  (beyond the sizes run: extrapolated)"
        lines.append(
            f"    C = {curve.budget:.3g}: N_opt {opt.n:.3g} [{curve.minimum.n_low:.3g}, {curve.minimum.n_high:.3g}], "
            f"err there {opt.err:.4f}; best run {curve.minimum.best_err:.4f}{where}"
        )
    lines += [_parameter(name, value, fit) for name, value in (("k", fit.k), ("a", fit.a))]
    if fit.validation is None:
        lines.append("    largest budget not held out: fewer than 3 budgets; nothing extrapolated")
        return lines
    lines.append(f"    largest budget held out (N_opt): {fit.validation.verdict}")
    frontier = fit.extrapolate([fit.largest * k for k in FRONTIER_REACH])
    for point, decades in zip(frontier, frontier.decades):
        lines.append(
            f"    C = {point.budget:.3g} ({decades:.1f} decades beyond the budgets; beside the verdict above): "
            f"N_opt {point.n:.3g} [{point.low:.3g}, {point.high:.3g}]"
        )
    return lines


def _format_shapes(comparisons: list[ShapeComparison], metric: str) -> list[str]:
    if not comparisons:
        return ["", f"width against depth (1 - {metric}): no two shapes of the envelope have about equal parameters"]
    lines = ["", f"width against depth at about equal parameters (1 - {metric}, envelope; within 5%):"]
    for group in comparisons:
        shapes = ", ".join(f"L{s.depth}W{s.width} {s.err:.4f}" for s in group.shapes)
        lines.append(f"    N ~ {group.params:.3g}: {shapes} (best first; gap {group.gap:.4f})")
    return lines
