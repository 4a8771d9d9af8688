"""Scaling-law fits recover known laws from noisy runs, with honest intervals,
and Epoch AI's published Chinchilla estimates from their own data.

Runs are drawn from err = E + A N^-alpha (and the joint form in N and D) with
multiplicative noise, three seeds per size, the way a study produces them.
"""

import csv
import re
from pathlib import Path

import numpy as np
import pytest

from lipscale.scaling import (
    HUBER_DELTA,
    compare_shapes,
    compute_frontier,
    decades_beyond,
    fit_isoflop,
    fit_joint,
    fit_power_law,
    fit_shared_exponent,
)

TRUTH = dict(E=0.25, A=5.0, alpha=0.2)  # err 0.75 at 1e5 parameters, 0.38 at 1e8
JOINT = dict(E=0.2, A=8.0, alpha=0.25, B=3.0, beta=0.3)
SIZES = np.logspace(5, 8, 7)


def _law(n):
    return TRUTH["E"] + TRUTH["A"] * np.asarray(n, dtype=float) ** -TRUTH["alpha"]


def _runs(seed: int, noise: float | np.ndarray = 0.02, seeds_per_size: int = 3):
    rng = np.random.default_rng(seed)
    n = np.repeat(SIZES, seeds_per_size)
    return n, _law(n) * np.exp(noise * rng.standard_normal(len(n)))


def _joint_runs(seed: int, noise: float = 0.01):
    rng = np.random.default_rng(seed)
    n, d = (v.ravel() for v in np.meshgrid(np.logspace(5, 8, 5), np.logspace(3, 6, 5)))
    law = JOINT["E"] + JOINT["A"] * n ** -JOINT["alpha"] + JOINT["B"] * d ** -JOINT["beta"]
    return n, d, law * np.exp(noise * rng.standard_normal(len(n)))


def test_fit_recovers_a_known_law():
    fit = fit_power_law(*_runs(seed=0, noise=0.005), resamples=50)
    assert fit.E == pytest.approx(TRUTH["E"], rel=0.05)
    assert fit.A == pytest.approx(TRUTH["A"], rel=0.2)
    assert fit.alpha == pytest.approx(TRUTH["alpha"], rel=0.05)
    assert fit.n_points == 21
    assert fit.predict(1e6)[0] == pytest.approx(TRUTH["E"] + TRUTH["A"] * 1e6 ** -TRUTH["alpha"], rel=0.01)


def test_90_percent_intervals_cover_the_truth_in_80_percent_of_50_draws():
    covered = {name: 0 for name in TRUTH}
    for seed in range(50):
        fit = fit_power_law(*_runs(seed), resamples=100, seed=seed)
        for name, value in TRUTH.items():
            low, high = fit.intervals[name]
            covered[name] += low <= value <= high
    assert min(covered.values()) >= 40, covered


def test_one_corrupt_run_barely_moves_the_fit():
    """The Huber loss counts large log residuals linearly: a run whose error
    is 50% too high (a crashed seed) pulls the fit far less than least squares would."""
    n, err = _runs(seed=0, noise=0.005)
    err[10] *= 1.5
    fit = fit_power_law(n, err, resamples=20)
    assert fit.alpha == pytest.approx(TRUTH["alpha"], rel=0.05)
    assert fit.E == pytest.approx(TRUTH["E"], rel=0.05)


def test_90_percent_intervals_cover_the_truth_despite_uneven_noise_and_two_outliers():
    """Seeds of small models scatter more (5% at 1e5 parameters down to 1% at
    1e8), and two seeds crashed (1.5x the error). The targets: the parameters,
    and the law's error a decade beyond the largest size, which is what an
    extrapolation promises; a parameter alone may drift along the ridge where
    A and alpha trade, which predictions do not feel. And the validation finds
    the true law where its largest size lies."""
    noise = np.repeat(np.geomspace(0.05, 0.01, len(SIZES)), 3)
    covered = {name: 0 for name in [*TRUTH, "err at 1e9", "validation"]}
    for seed in range(50):
        n, err = _runs(seed, noise=noise)
        err[[6, 13]] *= 1.5  # one seed at 1e6, one at 1e7
        fit = fit_power_law(n, err, resamples=50, seed=seed)
        for name, value in TRUTH.items():
            low, high = fit.intervals[name]
            covered[name] += low <= value <= high
        (beyond,) = fit.extrapolate(1e9)
        covered["err at 1e9"] += beyond.low <= _law(1e9) <= beyond.high
        covered["validation"] += fit.validation.inside
    assert min(covered.values()) >= 40, covered


def test_extrapolation_intervals_widen_with_distance_and_say_how_far_and_how_the_law_fared():
    fit = fit_power_law(*_runs(seed=1), resamples=100)
    preds = fit.extrapolate([1e8, 1e9, 1.07e9, 1e10])  # the edge of the data, 1B, beyond
    widths = [p.high - p.low for p in preds]
    assert widths == sorted(widths) and widths[-1] > 2 * widths[0]
    for p in preds:
        assert p.low <= p.err <= p.high
        assert p.d is None
    assert preds.decades == pytest.approx((0, 1, np.log10(10.7), 2))
    assert preds.validation is fit.validation and preds.validation.inside
    assert list(preds) == fit.interval([1e8, 1e9, 1.07e9, 1e10]) and len(preds) == 4 and preds[1].n == 1e9


def test_decades_beyond_counts_powers_of_ten_past_the_largest_size():
    assert decades_beyond(1.07e9, 1.2e6) == pytest.approx(2.95, abs=0.005)  # imagenet-1b from a digits study
    assert decades_beyond([1e7, 1e8], 1e8).tolist() == [-1.0, 0.0]  # within the data: 0 or less


def test_validation_refits_without_the_largest_size_and_checks_it_there():
    n, err = _runs(seed=2, noise=0.005)
    clean = fit_power_law(n, err, resamples=50).validation
    assert clean.x == SIZES[-1] and clean.measured == tuple(err[n == SIZES[-1]])
    assert clean.law.n_points == 18 and clean.law.largest == (SIZES[-2],) and clean.law.validation is None
    assert clean.predicted == pytest.approx(_law(SIZES[-1]), rel=0.01) and clean.mean_abs_error < 0.01
    assert clean.low < clean.measured_mean < clean.high and clean.verdict.startswith("inside the 90% interval")

    err[n == n.max()] += 0.1  # the largest model does far worse than the trend
    shifted = fit_power_law(n, err, resamples=50).validation
    assert shifted.predicted == clean.predicted  # the refit never saw the largest size
    assert shifted.mean_abs_error == pytest.approx(0.1 + clean.mean_abs_error, abs=0.02)
    assert not shifted.inside and shifted.verdict.startswith("OUTSIDE the 90% interval: measured")


def test_the_validation_interval_holds_the_runs_scatter_not_only_the_laws():
    """60 sizes, one run each: the law's mean is well determined, the held-out
    run still scatters by its 2% noise about it, and the interval counts both:
    about the 90% range of that scatter, +-1.645 x 2%."""
    rng = np.random.default_rng(0)
    n = np.logspace(5, 8, 60)
    err = _law(n) * np.exp(0.02 * rng.standard_normal(len(n)))
    v = fit_power_law(n, err, resamples=50).validation
    (mean,) = v.law.interval(v.x)
    assert v.high - v.low > 1.5 * (mean.high - mean.low)
    assert v.high - v.low == pytest.approx(2 * 1.645 * 0.02 * _law(v.x), rel=0.3)


def test_validation_needs_four_sizes():
    n, err = _runs(seed=0)
    keep = n < SIZES[3]
    fit = fit_power_law(n[keep], err[keep], resamples=10)
    assert fit.validation is None and fit.extrapolate(1e9).validation is None


def test_joint_fit_recovers_its_parameters():
    fit = fit_joint(*_joint_runs(seed=0), resamples=50)
    for name, value in JOINT.items():
        assert fit.params[name] == pytest.approx(value, rel=0.2), name
        low, high = fit.intervals[name]
        assert low < high
    assert fit.validation.mean_abs_error < 0.02 and len(fit.validation.measured) == 5  # 1e8 parameters, 5 D
    (pred,) = fit.extrapolate(1e9, 1e6)
    assert pred.err == pytest.approx(JOINT["E"] + JOINT["A"] * 1e9 ** -0.25 + JOINT["B"] * 1e6 ** -0.3, rel=0.05)


def test_a_joint_fit_needs_d_and_a_plain_one_refuses_it():
    plain = fit_power_law(*_runs(seed=0), resamples=5)
    with pytest.raises(ValueError, match="joint"):
        plain.predict(1e9, 1e6)
    joint = fit_joint(*_joint_runs(seed=0), resamples=5)
    with pytest.raises(ValueError, match="joint"):
        joint.predict(1e9)


N3 = [1e5, 1e6, 1e7]


@pytest.mark.parametrize(
    "n,err,match",
    [
        ([1e6] * 5, [0.5, 0.4, 0.45, 0.5, 0.42], "1 distinct values"),
        ([1e5, 1e5, 1e6, 1e6], [0.6, 0.61, 0.5, 0.5], "2 distinct values"),
        (N3 + [1e8], [0.4] * 4, "constant"),
        (N3 + [1e8], [0.6, np.nan, 0.4, 0.35], "err holds 1 NaN"),
        ([1e5, np.nan, 1e7, 1e8], [0.6, 0.5, 0.4, 0.35], "n holds 1 NaN"),
        ([1e5, 1e6], [0.6, 0.5], "2 points cannot determine the 3 parameters"),
        (N3, [0.6, 0.0, 0.4], "err must be positive"),
        (N3, [0.6, 0.5], "as long as err"),
    ],
)
def test_degenerate_runs_are_refused_with_the_reason(n, err, match):
    with pytest.raises(ValueError, match=match):
        fit_power_law(n, err, resamples=5)


def test_a_joint_fit_needs_five_points_and_three_distinct_d():
    with pytest.raises(ValueError, match="4 points cannot determine the 5 parameters"):
        fit_joint([1e5, 1e6, 1e7, 1e8], [1e3, 1e4, 1e5, 1e6], [0.7, 0.6, 0.5, 0.4], resamples=5)
    with pytest.raises(ValueError, match="d takes 2 distinct values"):
        fit_joint(np.logspace(5, 8, 6), [1e3, 1e4] * 3, np.linspace(0.7, 0.4, 6), resamples=5)


def test_compute_frontier_finds_the_best_run_and_the_fitted_optimum():
    n, d, err = _joint_runs(seed=0)
    flops = 6 * n * d  # C / N = 6 D: the frontier's stand-in for data
    budgets = [1e8, 1e12, 1e14]  # the cheapest run costs 6e8
    fit, points = compute_frontier(n, flops, err, budgets, resamples=50)
    assert points.decades == pytest.approx(np.log10(np.array(budgets) / flops.max()))
    assert points.validation is fit.validation and points.validation.x == 1e8
    assert points[0].best_row is None  # no run is that cheap
    for point in points[1:]:
        within = np.flatnonzero(flops <= point.budget)
        assert point.best_row == within[np.argmin(err[within])]
        assert point.best_err == err[point.best_row]
        # The fitted optimum is the true law's, found by brute force over N.
        grid = np.logspace(3, 12, 20001)
        law = JOINT["E"] + JOINT["A"] * grid ** -0.25 + JOINT["B"] * (point.budget / (6 * grid)) ** -0.3
        assert point.predicted.err == pytest.approx(law.min(), rel=0.03)
        assert point.predicted.n == pytest.approx(grid[np.argmin(law)], rel=0.5)
        assert point.predicted.low <= point.predicted.err <= point.predicted.high
        assert point.n_low <= point.predicted.n <= point.n_high
        assert point.predicted.err <= point.best_err + 0.02  # the optimum is no worse than what was run
    assert fit.B is not None


# --- a published table: Epoch AI's Chinchilla replication --------------------------------

CHINCHILLA = Path(__file__).parent / "data" / "chinchilla" / "svg_extracted_data.csv"
EPOCH = dict(E=(1.817, 1.769, 1.871), A=(482, 285, 744), alpha=(0.348, 0.317, 0.373),
             B=(2085, 1042, 5810), beta=(0.366, 0.331, 0.415))  # fmt: skip
"""Besiroglu et al. 2024 (arXiv 2404.10102): estimate and 95% interval (4000 bootstrap resamples)."""
EPOCH_OPTIMUM = dict(E=np.exp(0.59711196), A=np.exp(6.17795598), alpha=0.34781303,
                     B=np.exp(7.64273236), beta=0.36585412)  # fmt: skip
"""Their unrounded optimum (`baseline_fitted_params` in their data_analysis.ipynb)."""


def _chinchilla():
    """N, D = C / (6 N) and loss of the 240 runs their fit keeps: all but the 5 of highest loss."""
    with CHINCHILLA.open() as f:
        rows = list(csv.DictReader(f))
    n, flops, loss = (np.array([float(row[k]) for row in rows]) for k in ("Model Size", "Training FLOP", "loss"))
    keep = np.argsort(loss)[:-5]
    return n[keep], flops[keep] / (6 * n[keep]), loss[keep]


def _huber_loss(p: dict, n, d, loss) -> float:
    r = np.log(p["E"] + p["A"] * n ** -p["alpha"] + p["B"] * d ** -p["beta"]) - np.log(loss)
    return float(np.sum(np.where(np.abs(r) <= HUBER_DELTA, r**2 / 2, HUBER_DELTA * (np.abs(r) - HUBER_DELTA / 2))))


def test_chinchilla_fit_recovers_epoch_ais_published_estimates_and_intervals():
    """Their 245 runs read off Hoffmann et al.'s Figure 4 (tests/data/chinchilla),
    fitted their way. Each estimate lies inside their 95% interval, each end of
    ours within a quarter of their interval's width of theirs (200 resamples to
    their 4000), and the Huber loss at our optimum is no higher than at theirs:
    the grid and L-BFGS found their optimum (a hair lower, along the flat ridge
    where A and alpha trade)."""
    n, d, loss = _chinchilla()
    assert len(n) == 240
    fit = fit_joint(n, d, loss, resamples=200, level=0.95)
    for name, (estimate, low, high) in EPOCH.items():
        assert low <= fit.params[name] <= high, name
        assert fit.params[name] == pytest.approx(EPOCH_OPTIMUM[name], rel=0.03), name
        ours, quarter = fit.intervals[name], (high - low) / 4
        assert ours[0] == pytest.approx(low, abs=quarter) and ours[1] == pytest.approx(high, abs=quarter), (name, ours)
    assert _huber_loss(fit.params, n, d, loss) <= _huber_loss(EPOCH_OPTIMUM, n, d, loss)


# --- against compute, the logit link, a shared exponent --------------------------------------


def test_a_law_against_compute_is_fit_power_law_on_flops():
    """err = E + A C^-alpha over training FLOPs 1e15 ... 1e19: A is of order C^alpha
    (1e3 here), which centring the inputs keeps well scaled."""
    rng = np.random.default_rng(0)
    c = np.repeat(np.logspace(15, 19, 7), 3)
    law = dict(E=0.3, A=2e3, alpha=0.25)
    err = (law["E"] + law["A"] * c ** -law["alpha"]) * np.exp(0.005 * rng.standard_normal(len(c)))
    fit = fit_power_law(c, err, resamples=20)
    assert fit.E == pytest.approx(law["E"], rel=0.05) and fit.alpha == pytest.approx(law["alpha"], rel=0.05)
    assert fit.largest == (1e19,) and fit.extrapolate(1e21).decades == (2.0,)


ODDS = dict(E=2.0, A=8500.0, alpha=0.49)
"""err / (1 - err) = E + A N^-alpha: err 0.97 at 1e5 parameters (1 - CRA at eps = 1), 0.75 at 1e8, 2/3 at infinity."""


def _odds_runs(seed: int):
    rng = np.random.default_rng(seed)
    n = np.repeat(SIZES, 3)
    odds = (ODDS["E"] + ODDS["A"] * n ** -ODDS["alpha"]) * np.exp(0.02 * rng.standard_normal(len(n)))
    return n, odds / (1 + odds)


def test_the_logit_link_fits_errors_near_one_and_keeps_them_below_it():
    n, err = _odds_runs(seed=0)
    logit = fit_power_law(n, err, link="logit", resamples=50)
    for name, value in ODDS.items():
        assert logit.params[name] == pytest.approx(value, rel=0.2), name
    odds = ODDS["E"] + ODDS["A"] * 1e10 ** -ODDS["alpha"]
    (far,) = logit.extrapolate(1e10)
    assert far.err == pytest.approx(odds / (1 + odds), rel=0.02) and far.low < far.err < far.high < 1
    assert logit.validation.inside and logit.link == "logit"
    # The plain law on the same runs bends its E to 0 and passes 1 two decades below the data.
    plain = fit_power_law(n, err, resamples=20)
    assert plain.predict(1e3)[0] > 1 > logit.predict(1e3)[0]


def test_the_logit_link_is_the_power_law_for_small_errors():
    """Errors of 1-3%: odds and err differ by 3% at most, and so do the two fits."""
    rng = np.random.default_rng(0)
    n = np.repeat(SIZES, 3)
    err = (0.01 + 0.5 * n**-0.3) * np.exp(0.01 * rng.standard_normal(len(n)))
    log, logit = (fit_power_law(n, err, link=link, resamples=20) for link in ("log", "logit"))
    assert logit.alpha == pytest.approx(log.alpha, rel=0.03)
    assert logit.predict([1e5, 1e8, 1e10]) == pytest.approx(log.predict([1e5, 1e8, 1e10]), rel=0.01)


def test_the_logit_link_refuses_errors_of_one():
    with pytest.raises(ValueError, match="err must lie below 1 for the logit link"):
        fit_power_law(N3 + [1e8], [1.0, 0.9, 0.8, 0.7], link="logit", resamples=5)
    with pytest.raises(ValueError, match="link must be one of"):
        fit_power_law(N3 + [1e8], [0.9, 0.8, 0.75, 0.7], link="probit", resamples=5)


EPS_LAWS = {"1 - eval/cra_36": (0.15, 3.0), "1 - eval/cra_72": (0.25, 4.0),
            "1 - eval/cra_108": (0.35, 5.0), "1 - eval/cra_255": (0.55, 6.0)}  # fmt: skip
"""(E, A) of 1 - CRA at each eps, all falling as N^-0.25."""


def test_a_shared_exponent_pools_the_evidence_of_every_eps():
    rng = np.random.default_rng(0)
    n = np.repeat(SIZES, 3)
    errs = {m: (e + a * n**-0.25) * np.exp(0.02 * rng.standard_normal(len(n))) for m, (e, a) in EPS_LAWS.items()}
    fits = fit_shared_exponent(n, errs, resamples=50)
    assert list(fits) == list(EPS_LAWS)
    (alpha,) = {f.alpha for f in fits.values()}  # one exponent
    assert alpha == pytest.approx(0.25, rel=0.1)
    for metric, (e, a) in EPS_LAWS.items():
        fit = fits[metric]
        assert fit.E == pytest.approx(e, rel=0.1) and fit.A == pytest.approx(a, rel=0.4), metric
        assert fit.shared == tuple(m for m in EPS_LAWS if m != metric) and fit.n_points == 21
        assert fit.validation.law.shared == fit.shared
    shared_width = np.diff(fits["1 - eval/cra_36"].intervals["alpha"])[0]
    alone = np.diff([fit_power_law(n, err, resamples=50).intervals["alpha"] for err in errs.values()], axis=1)
    assert shared_width < alone.min() and shared_width < alone.mean() / 1.5  # four eps: sqrt(4) = 2 at best


def test_a_shared_exponent_resamples_runs_with_all_their_metrics():
    """A second metric that only rescales the first (a run's metrics share its
    noise) adds no evidence: resampled by run, the shared alpha's interval is
    the first law's own; resampled by point it would narrow as if it were."""
    n, err = _runs(seed=0)
    alone = fit_power_law(n, err, resamples=30)
    shared = fit_shared_exponent(n, {"err": err, "1.3 err": 1.3 * err}, resamples=30)
    assert shared["err"].intervals["alpha"] == pytest.approx(alone.intervals["alpha"], rel=1e-4)
    assert shared["1.3 err"].E == pytest.approx(1.3 * alone.E, rel=1e-4)


def test_a_shared_exponent_needs_two_metrics_of_one_length():
    n, err = _runs(seed=0)
    with pytest.raises(ValueError, match="needs 2 metrics or more, got 1"):
        fit_shared_exponent(n, {"err": err}, resamples=5)
    with pytest.raises(ValueError, match="b must be a flat sequence as long as a"):
        fit_shared_exponent(n, {"a": err, "b": err[:-1]}, resamples=5)
    with pytest.raises(ValueError, match="every b equals 0.5"):
        fit_shared_exponent(n, {"a": err, "b": np.full(len(n), 0.5)}, resamples=5)


# --- IsoFLOP curves: Chinchilla's approach 2 -----------------------------------------------

G = (JOINT["alpha"] * JOINT["A"] / (JOINT["beta"] * JOINT["B"])) ** (1 / (JOINT["alpha"] + JOINT["beta"]))
A_OPT = JOINT["beta"] / (JOINT["alpha"] + JOINT["beta"])  # 0.545
"""The JOINT law with D = C / (6 N) is least at N_opt = G (C / 6)^A_OPT."""


def _n_opt(c):
    return G * (np.asarray(c, dtype=float) / 6) ** A_OPT


def _isoflop_runs(seed: int, budgets=np.logspace(13, 16, 4)):
    """At each budget 7 sizes from N_opt / 10 to 10 N_opt, each trained to use
    the budget (to 1%), one run each, 1% noise: an isoflop design."""
    rng = np.random.default_rng(seed)
    n = np.concatenate([_n_opt(c) * np.logspace(-1, 1, 7) for c in budgets])
    flops = np.repeat(budgets, 7) * (1 + 0.01 * rng.uniform(-1, 1, len(n)))
    law = JOINT["E"] + JOINT["A"] * n ** -JOINT["alpha"] + JOINT["B"] * (flops / (6 * n)) ** -JOINT["beta"]
    return n, flops, law * np.exp(0.01 * rng.standard_normal(len(n)))


def test_isoflop_curves_find_each_budgets_optimum_and_the_frontier_through_them():
    n, flops, err = _isoflop_runs(seed=0)
    fit = fit_isoflop(n, flops, err, resamples=200)
    assert [round(np.log10(curve.budget)) for curve in fit.curves] == [13, 14, 15, 16]
    assert sorted(i for curve in fit.curves for i in curve.rows) == list(range(len(n)))
    for curve in fit.curves:
        opt = curve.minimum.predicted
        assert curve.bracketed and opt.n == pytest.approx(_n_opt(curve.budget), rel=0.15)
        assert curve.minimum.n_low <= opt.n <= curve.minimum.n_high and opt.low <= opt.err <= opt.high
        assert opt.d == pytest.approx(curve.budget / opt.n)
        assert curve.err(opt.n) == opt.err and curve.err(opt.n * 3) > opt.err
        assert curve.minimum.best_err == err[list(curve.rows)].min() <= opt.err + 0.01
    assert fit.intervals["a"][0] <= A_OPT <= fit.intervals["a"][1] and fit.a == pytest.approx(A_OPT, abs=0.03)
    frontier = fit.extrapolate([1e18, 1e20])  # 2 and 4 decades beyond the largest budget
    assert frontier.decades == pytest.approx((2, 4), abs=0.01)
    for size in frontier:
        assert size.low <= size.n <= size.high and size.low <= _n_opt(size.budget) <= size.high
    assert frontier[1].high / frontier[1].low > frontier[0].high / frontier[0].low  # wider further out
    assert frontier.validation is fit.validation and fit.validation.inside and fit.validation.x == fit.curves[-1].budget
    assert fit.validation.law.largest == fit.curves[-2].budget


def test_isoflop_and_the_joint_law_agree_on_the_compute_optimal_size():
    """Approach 2 (parabolas at each budget) and approach 3 (the joint law
    minimised at fixed C) on the same runs: the same N_opt to 20%."""
    n, flops, err = _isoflop_runs(seed=1)
    isoflop = fit_isoflop(n, flops, err, resamples=50)
    _, points = compute_frontier(n, flops, err, [1e16, 1e18], resamples=20)
    for point, size in zip(points, isoflop.extrapolate([1e16, 1e18])):
        assert point.predicted.n == pytest.approx(size.n, rel=0.2)


def test_isoflop_validation_needs_three_budgets():
    n, flops, err = _isoflop_runs(seed=0, budgets=[1e13, 1e14])
    assert fit_isoflop(n, flops, err, resamples=10).validation is None


def test_isoflop_refuses_budgets_it_cannot_fit_with_the_reason():
    n, flops, err = _isoflop_runs(seed=0)
    with pytest.raises(ValueError, match="N_opt = k C\\^a needs 2 FLOP budgets or more"):
        fit_isoflop(n[:7], flops[:7], err[:7], resamples=5)
    two_sizes = np.r_[np.arange(2), np.arange(7, len(n))]
    budget = f"{np.median(flops[:2]):.3g}"  # 1e13 to 1%
    with pytest.raises(ValueError, match=re.escape(f"the 2 runs at budget {budget} FLOPs take 2 distinct sizes")):
        fit_isoflop(n[two_sizes], flops[two_sizes], err[two_sizes], resamples=5)
    falling = err.copy()
    falling[:7] = np.linspace(0.5, 0.3, 7) - 0.01 * (np.arange(7) - 3) ** 2  # curves down
    with pytest.raises(ValueError, match=re.escape(f"budget {np.median(flops[:7]):.3g} FLOPs show no minimum")):
        fit_isoflop(n, flops, falling, resamples=5)


def test_compare_shapes_at_fixed_params_ranks_the_paper_question():
    """L32W4096 against L64W2896 at about 1.07B parameters: two seeds each."""
    rows = [  # width, depth, params, err (1 - CRA at eps 1)
        (4096, 32, 1.0737e9, 0.700), (4096, 32, 1.0737e9, 0.702),
        (2896, 64, 1.0735e9, 0.704), (2896, 64, 1.0735e9, 0.706),
        (2048, 32, 2.684e8, 0.75),  # alone at its size: nothing to compare
        (1024, 32, 6.71e7, 0.771), (724, 64, 6.71e7, 0.768),
    ]
    groups = compare_shapes(*zip(*rows))
    assert [round(g.params, -6) for g in groups] == [6.7e7, 1.074e9]
    small, large = groups
    assert [(s.width, s.depth) for s in small.shapes] == [(724, 64), (1024, 32)]
    assert [(s.width, s.depth) for s in large.shapes] == [(4096, 32), (2896, 64)]
    assert large.shapes[0].runs == 2 and large.shapes[0].err == pytest.approx(0.701)
    assert large.shapes[0].err_std == pytest.approx(np.std([0.700, 0.702], ddof=1))
    assert small.shapes[0].err_std is None
    assert large.gap == pytest.approx(0.004)


def test_compare_shapes_refuses_ragged_or_nan_columns():
    with pytest.raises(ValueError, match="differ in length"):
        compare_shapes([1, 2], [1, 2], [1e6], [0.5, 0.4])
    with pytest.raises(ValueError, match="NaN"):
        compare_shapes([1, 2], [1, 2], [1e6, 1e6], [0.5, np.nan])
