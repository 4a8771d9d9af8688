"""The scaling laws of a study's rows (lipscale.report.rows): err = 1 - accuracy
against parameters N (errors at the common epoch) and training compute C (final
errors), fitted by lipscale.scaling with bootstrap intervals, and their printout,
with the laws in N extrapolated to the 1B and 2B presets."""

import math
import textwrap
from dataclasses import dataclass

import numpy as np

from lipnext import param_counts, preset
from lipnext.metrics import ACCURACIES, FLOPS_PER_SAMPLE, PARAMS, TRAIN_SAMPLES
from lipscale.report.rows import AT_COMMON_EPOCH, COMPUTE, TRAINED, Trials, column
from lipscale.scaling import PowerLawFit, fit_power_law
from lipscale.spec import Spec

TARGETS = ("imagenet-1b", "imagenet-2b")
"""Presets the laws in N are extrapolated to."""
AXES = {"N": (PARAMS, "parameters N"), "C": (COMPUTE, "training compute C (FLOPs)")}
"""Fit axis -> (column, label)."""
OUTSIDE = "*"
"""Marks an interval that misses its estimate: a percentile interval may, when the resamples
pile up on one side (few sizes). Said, not hidden."""


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
        for axis, (name, _) in AXES.items():
            x = column(rows, name)
            err = 1 - column(rows, metric + AT_COMMON_EPOCH if axis == "N" else metric)
            keep = np.isfinite(x) & np.isfinite(err)
            fit, reason = None, None
            if rows.empty:
                reason = "no trial finished COMPLETE or PRUNED"
            elif axis == "N" and trials.common_epoch is None:
                reason = "no epoch at which every COMPLETE or PRUNED trial was evaluated"
            elif not keep.any():
                when = f"at epoch {trials.common_epoch}" if axis == "N" else "at its end"
                reason = f"no COMPLETE or PRUNED trial has both {metric} {when} and {name}"
            else:
                try:
                    fit = fit_power_law(x[keep], err[keep], resamples=resamples, level=level, seed=seed)
                except ValueError as e:
                    reason = str(e)
            trial_numbers = rows["trial"].to_numpy()[keep]
            laws.append(Law(metric, axis, x[keep], err[keep], trial_numbers, fit, reason, int((~keep).sum())))
    return laws


def targets() -> dict[str, int]:
    """Parameter counts of the presets the laws in N are extrapolated to."""
    return {name: param_counts(preset(name))["total"] for name in TARGETS}


# --- the printout -----------------------------------------------------------------------


def format_fits(spec: Spec, trials: Trials, laws: list[Law], sizes: dict[str, int]) -> str:
    f = trials.frame
    states = ", ".join(f"{n} {s}" for s, n in f["state"].value_counts().sort_index().items())
    n = column(f, PARAMS)
    at = "none" if trials.common_epoch is None else trials.common_epoch
    lines = [
        f"study {spec.name}: {len(f)} finished trials ({states}), from {trials.source}",
        "fitted: COMPLETE and PRUNED trials",
        f"N = {PARAMS}, every parameter (stem, blocks, head); errors at the last epoch all were evaluated at: {at}",
        f"C = {FLOPS_PER_SAMPLE} x {TRAIN_SAMPLES} (samples seen in training, all ranks); final errors",
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
