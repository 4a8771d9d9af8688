"""Scaling laws of error metrics (err = 1 - CRA, or 1 - clean accuracy).

    err(N)    = E + A N^-alpha                 fit_power_law: parameters N (against compute: pass C as n)
    err(N, D) = E + A N^-alpha + B D^-beta     fit_joint: parameters and data (or steps)
    err_m(N)  = E_m + A_m N^-alpha             fit_shared_exponent: a law per metric (1 - CRA at each
                                               eps), one exponent shared by all
    N_opt(C)  = k C^a                          fit_isoflop: Chinchilla's approach 2, runs at fixed FLOP budgets;
                                               compute_frontier: approach 3, the joint law minimised at fixed C

fit_power_law, fit_joint and fit_shared_exponent take link="logit" for errors
bounded by 1: the odds err / (1 - err) follow the right-hand side instead of
err. For small err the odds are err (err 0.1: odds 0.111), so the form is the
power law where that one holds; near 1 err = odds / (1 + odds) stays below 1,
which E + A N^-alpha passes (1 - CRA at eps = 1 of a small model sits at
0.9-1.0). E and A are odds then, and err -> E / (1 + E) as N grows.

Fitted as Epoch AI refitted Chinchilla (arXiv 2404.10102), because the
original fit had not converged and its intervals were far too narrow: the
Huber loss (delta 1e-3) between log predicted and log observed error (log
odds under the logit link), L-BFGS from a grid of starting points, the best
optimum kept, and bootstrap intervals from refits on runs resampled with
replacement. tests/test_scaling.py recovers their published estimates from
their data (tests/data/chinchilla).

Every law carries its leave-the-largest-out Validation (the law refitted
without the largest size, its prediction and interval there, the measured
value, the verdict), and its extrapolations carry that verdict and the
decades they reach beyond the data: a prediction for a 1B model is never
handed out alone.
"""

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Generic, TypeVar

import numpy as np
from scipy.optimize import minimize
from threadpoolctl import threadpool_limits

HUBER_DELTA = 1e-3
"""Residuals of log error beyond 1e-3 (0.1%) count linearly: outlying runs barely pull the fit."""
LINKS = ("log", "logit")
"""What the law's right-hand side is: err itself ("log": fitted in log err), or the odds err / (1 - err)."""

_ALPHA_GRID = (0.1, 0.3, 0.6, 1.2)
_SCALE_GRID = (0.1, 0.5, 0.9)  # E, and each term at the data's centre, as fractions of the smallest error
_STARTS = 4  # L-BFGS runs from the best grid points: the grid finds the basin, L-BFGS the optimum
_MAX_EXPONENT = 5.0  # err ~ N^-5 is steeper than any scaling law; the bound keeps exp() finite
_MAX_DRAWS = 1000  # a resample that cannot be fitted is drawn again; data needing more draws is refused

T = TypeVar("T")


@dataclass(frozen=True)
class Prediction:
    """A fitted law's error at one point, with the bootstrap percentile interval
    of that fitted mean (not the wider spread of single runs around it)."""

    n: float
    d: float | None
    err: float
    low: float
    high: float


@dataclass(frozen=True)
class Validation:
    """A law refitted without its largest size (or FLOP budget) and checked
    against what was measured there.

    The interval is one for the measured value: the refit's bootstrap spread
    plus the held-out runs' own scatter (the refit's residuals, drawn again
    for each), because runs scatter about their law. Measured at level 0.9 on
    a true law with 2% noise, 16 sizes of one run each: the interval of the
    refit's mean alone held the held-out run in 25 of 30 draws, this one in 27.
    The residuals are pooled over sizes, so where noise shrinks with size (5%
    at the smallest to 1% at the largest) the interval is wider than the
    largest size's scatter and the verdict errs towards inside: 50 of 50.
    """

    x: float
    """The held-out size: the largest N (or C) of the runs, or the largest FLOP budget."""
    predicted: float
    """The refit's prediction, averaged over the held-out runs."""
    low: float
    high: float
    """Interval at `level` for `measured_mean`."""
    measured: tuple[float, ...]
    """The held-out runs' errors (fit_isoflop: the largest budget's compute-optimal N)."""
    mean_abs_error: float
    """Mean |measured - predicted| over the held-out runs."""
    level: float
    law: "PowerLawFit | IsoFLOPFit" = field(repr=False, compare=False)
    """The refit itself, e.g. to draw its curve on to the held-out size."""

    @property
    def measured_mean(self) -> float:
        return float(np.mean(self.measured))

    @property
    def inside(self) -> bool:
        return self.low <= self.measured_mean <= self.high

    @property
    def verdict(self) -> str:
        """One line, "inside ..." or "OUTSIDE ...": whether the law foresaw its own largest size."""
        return (
            f"{'inside' if self.inside else 'OUTSIDE'} the {self.level:.0%} interval: "
            f"measured {self.measured_mean:.4g} at {self.x:.3g}, the law fitted without it "
            f"predicted {self.predicted:.4g} [{self.low:.4g}, {self.high:.4g}]"
        )


@dataclass(frozen=True)
class Extrapolation(Sequence, Generic[T]):
    """Predictions that come with how far beyond the data they reach and how
    the law fared at its own largest size. A sequence of its predictions."""

    predictions: tuple[T, ...]
    decades: tuple[float, ...]
    """decades_beyond(target, largest fitted) of each prediction (a joint law's
    furthest input): 3.0 is 1000x beyond; 0 or less lies within the data."""
    validation: Validation | None
    """None when the data has too few sizes to fit without the largest."""

    def __len__(self) -> int:
        return len(self.predictions)

    def __getitem__(self, i):
        return self.predictions[i]


def decades_beyond(target, largest: float) -> np.ndarray:
    """How many decades `target` lies beyond `largest` (the largest size, compute
    or budget fitted): log10(target / largest); a 1.07e9 preset from a largest
    trained model of 1.2e6 parameters is 2.95 decades out."""
    return np.log10(np.asarray(target, dtype=float) / largest)


@dataclass(frozen=True)
class PowerLawFit:
    """err = E + A N^-alpha (+ B D^-beta for a joint fit; B and beta are None
    otherwise); under the logit link err / (1 - err) equals the right-hand side."""

    E: float
    A: float
    alpha: float
    B: float | None
    beta: float | None
    intervals: dict[str, tuple[float, float]]
    """Bootstrap percentile interval of every parameter, at `level`."""
    level: float
    n_points: int
    """Runs fitted."""
    largest: tuple[float, ...]
    """The largest N (and D) fitted: where extrapolation begins."""
    link: str
    """LINKS: "log" (err is the law) or "logit" (the odds are)."""
    metric: str
    """The name of the law's errors: "err", or the metric's in fit_shared_exponent."""
    shared: tuple[str, ...]
    """The metrics fitted together with this one, sharing alpha (fit_shared_exponent); empty otherwise."""
    samples: np.ndarray = field(repr=False, compare=False)
    """(resamples, parameters) of the bootstrap refits, in the order of `params`."""
    held_out: "_HeldOut | None" = field(repr=False, compare=False)
    """Where `validation` comes from; None for a law that is itself a validation's refit."""

    @property
    def validation(self) -> Validation | None:
        """The law refitted without the runs at the largest N and checked there; None
        when the rest cannot be fitted (fewer than 3 other sizes, or 3 other D)."""
        return None if self.held_out is None else self.held_out.validations[self.metric]

    @property
    def params(self) -> dict[str, float]:
        names = ("E", "A", "alpha", "B", "beta")
        return {name: getattr(self, name) for name in names if getattr(self, name) is not None}

    def predict(self, n, d=None) -> np.ndarray:
        """The fitted error at parameters `n` (and data `d` for a joint fit)."""
        return _from_law(_predict(np.array(list(self.params.values())), _inputs(self, n, d)), self.link)

    def interval(self, n, d=None) -> list[Prediction]:
        """The fitted error with its bootstrap interval at each of `n` (and `d`):
        the law's band over the data. Beyond the data, `extrapolate`."""
        x = _inputs(self, n, d)
        low, high = _quantiles(_from_law(_predict(self.samples, x), self.link), self.level)
        ds = x[1] if d is not None else [None] * len(x[0])
        return [
            Prediction(float(ni), None if di is None else float(di), float(e), float(lo), float(hi))
            for ni, di, e, lo, hi in zip(x[0], ds, self.predict(n, d), low, high)
        ]

    def extrapolate(self, n, d=None) -> Extrapolation[Prediction]:
        """`interval` at each of `n` (and `d`), e.g. at the parameter counts of
        the 1B and 2B presets, with the decades beyond the data and the validation."""
        x = _inputs(self, n, d)
        decades = np.max([decades_beyond(v, top) for v, top in zip(x, self.largest)], axis=0)
        return Extrapolation(tuple(self.interval(n, d)), tuple(decades.tolist()), self.validation)


def fit_power_law(n, err, *, link: str = "log", resamples: int = 200, level: float = 0.9, seed: int = 0) -> PowerLawFit:
    """err = E + A N^-alpha over runs of `n` parameters; repeated sizes (seeds) are
    welcome. Against compute: the runs' training FLOPs as `n`."""
    return _fit({"n": n}, {"err": err}, link, resamples, level, seed)["err"]


def fit_joint(
    n, d, err, *, link: str = "log", resamples: int = 200, level: float = 0.9, seed: int = 0
) -> PowerLawFit:
    """err = E + A N^-alpha + B D^-beta over runs of `n` parameters trained on `d`
    samples (or steps, or compute per parameter: any positive measure of data)."""
    return _fit({"n": n, "d": d}, {"err": err}, link, resamples, level, seed)["err"]


def fit_shared_exponent(
    n, errs: Mapping[str, Sequence[float]], *, link: str = "log", resamples: int = 200, level: float = 0.9,
    seed: int = 0,
) -> dict[str, PowerLawFit]:
    """err_m = E_m + A_m N^-alpha for each metric m of `errs` (name -> one error
    per run, in the order of `n`), one alpha for all: 1 - CRA at eps 36/255 ...
    255/255 of the same runs fall with size alike, and a shared exponent pools
    the evidence of every eps for it.

    A run's row carries all its metrics and its noise is common to them (a seed
    that trained badly is bad at every eps), so the bootstrap resamples runs,
    each with all its metrics. The laws come back by metric, each with E, A and
    the shared alpha, and intervals from those joint resamples."""
    if len(errs) < 2:
        raise ValueError(f"a shared exponent needs 2 metrics or more, got {len(errs)}; fit_power_law fits one")
    return _fit({"n": n}, dict(errs), link, resamples, level, seed)


# --- the fit -------------------------------------------------------------------------


def _to_link(err: np.ndarray, link: str) -> np.ndarray:
    """log of the law's value: log err, or the log odds under the logit link."""
    return np.log(err) if link == "log" else np.log(err) - np.log1p(-err)


def _from_law(value: np.ndarray, link: str) -> np.ndarray:
    """err from the law's value (err itself, or the odds)."""
    return value if link == "log" else value / (1 + value)


def _quantiles(values: np.ndarray, level: float) -> np.ndarray:
    """The equal-tailed percentile interval at `level` over the first axis: [low, high]."""
    return np.quantile(values, [(1 - level) / 2, (1 + level) / 2], axis=0)


def _predict(params: np.ndarray, x: list[np.ndarray]) -> np.ndarray:
    """E + sum_k A_k x_k^-alpha_k for params (..., 1 + 2K) [E, A_1, alpha_1, ...]."""
    params = np.asarray(params, dtype=float)[..., None]
    out = params[..., 0, :]
    for k, xk in enumerate(x):
        out = out + params[..., 1 + 2 * k, :] * np.asarray(xk, dtype=float) ** -params[..., 2 + 2 * k, :]
    return out


def _inputs(fit: PowerLawFit, n, d) -> list[np.ndarray]:
    if (d is None) != (fit.B is None):
        raise ValueError("a joint fit needs d with n; a fit in N alone takes n only")
    given = [n] if d is None else [n, d]
    return list(np.broadcast_arrays(*(np.atleast_1d(np.asarray(v, dtype=float)) for v in given)))


class _Problem:
    """Runs x metrics fitted at once, in logs, on centred inputs u_k = log x_k - mean:
    log law_m = logsumexp(e_m, a_mk - alpha_k u_k), the exponents alpha_k shared by
    every metric (one metric: the plain law). theta = [e_1, a_11 .. a_1K, e_2, ...,
    alpha_1 .. alpha_K]; the observations run-major, run r's metrics side by side."""

    def __init__(self, u: np.ndarray, z: np.ndarray):
        self.u, self.z = u, z  # (K, runs) inputs; (runs, M) log law values observed
        k, (runs, m) = len(u), z.shape
        self.inputs, self.metrics, self.n_params = k, m, m * (1 + k) + k
        blocks = np.arange(m) * (1 + k)
        self.e = np.tile(blocks, runs)
        self.a = np.tile(blocks[None] + 1 + np.arange(k)[:, None], (1, runs))
        self.alpha = np.broadcast_to(m * (1 + k) + np.arange(k)[:, None], self.a.shape)
        self.uu, self.zz = np.repeat(u, m, axis=1), z.ravel()
        top = z.max() + 5  # ample: E and every term at the centre lie below the largest law value
        self.bounds = [(-30.0, top)] * (m * (1 + k)) + [(0.0, _MAX_EXPONENT)] * k

    def view(self, m: int) -> list[int]:
        """Indices of metric m's [e, a_1, alpha_1, ...] in theta."""
        block = m * (1 + self.inputs)
        return [block] + [i for k in range(self.inputs) for i in (block + 1 + k, self.n_params - self.inputs + k)]

    def metric(self, m: int) -> "_Problem":
        return _Problem(self.u, self.z[:, m : m + 1])


def _loss(theta: np.ndarray, p: _Problem, weights: np.ndarray):
    """Weighted Huber loss of log predicted - log observed law value, and its gradient.

    In logs (E = exp(e), A = exp(a)) the prediction is a logsumexp: smooth and positive."""
    z = theta[p.a] - theta[p.alpha] * p.uu  # log A_mk x_k^-alpha_k of every observation, one row per term
    e = theta[p.e]
    top = np.maximum(z.max(axis=0), e)
    ez, ee = np.exp(z - top), np.exp(e - top)
    total = ee + ez.sum(axis=0)
    r = top + np.log(total) - p.zz
    psi = np.clip(r, -HUBER_DELTA, HUBER_DELTA)  # huber(r) = psi (r - psi / 2), huber'(r) = psi
    dz = weights * psi / total  # d loss / d log prediction, times d log prediction / d exp(z)
    grad = np.bincount(p.e, ee * dz, p.n_params)
    grad += np.bincount(p.a.ravel(), (ez * dz).ravel(), p.n_params)
    grad -= np.bincount(p.alpha.ravel(), (ez * p.uu * dz).ravel(), p.n_params)
    # Scaled by 1/delta so gradients are O(1) and L-BFGS's tolerances mean what they say.
    return weights @ (psi * (r - psi / 2)) / HUBER_DELTA, grad / HUBER_DELTA


def _minimize(p: _Problem, counts: np.ndarray, starts) -> np.ndarray:
    """The best L-BFGS optimum from `starts`, runs weighted by `counts`."""
    weights = np.repeat(counts, p.metrics)
    best = None
    for start in starts:
        res = minimize(
            _loss, start, args=(p, weights), jac=True, method="L-BFGS-B", bounds=p.bounds,
            options=dict(maxiter=500, ftol=1e-12, gtol=1e-8),
        )
        if best is None or res.fun < best.fun:
            best = res
    return best.x


def _point_fit(p: _Problem, counts: np.ndarray) -> np.ndarray:
    if p.metrics == 1:
        return _minimize(p, counts, _grid(p, counts))
    # Each metric alone finds its basin (a grid over all 2M + 1 parameters would
    # have 4 x 9^M points); the shared fit starts from their E_m and A_m with
    # each one's exponents in turn.
    alone = [_point_fit(p.metric(m), counts) for m in range(p.metrics)]
    blocks = np.concatenate([theta[: -p.inputs] for theta in alone])
    return _minimize(p, counts, [np.concatenate([blocks, theta[-p.inputs :]]) for theta in alone])


def _grid(p: _Problem, counts: np.ndarray) -> list[np.ndarray]:
    """The `_STARTS` best points of a grid over E, each A_k and alpha_k, scaled to the data."""
    scales = np.log(_SCALE_GRID) + p.z.min()
    axes = [scales] * (1 + p.inputs) + [np.array(_ALPHA_GRID)] * p.inputs
    points = np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1).reshape(-1, len(axes))
    points = np.clip(points, *np.array(p.bounds).T)
    weights = np.repeat(counts, p.metrics)
    losses = np.array([_loss(point, p, weights)[0] for point in points])
    return list(points[np.argsort(losses)[:_STARTS]])


def _natural(theta: np.ndarray, centres: np.ndarray) -> np.ndarray:
    """[e, a_k, alpha_k] on centred inputs -> [E, A_k, alpha_k] on raw inputs, over the last axis."""
    out = np.exp(theta)
    out[..., 2::2] = theta[..., 2::2]
    out[..., 1::2] *= np.exp(theta[..., 2::2] * centres)
    return out


def _draw(runs: int, accept: Callable[[np.ndarray], bool], rng: np.random.Generator, what: str) -> np.ndarray:
    """How many times each of `runs` is drawn in a bootstrap resample, drawn again
    until `accept` takes it (e.g. it keeps the 3 distinct sizes a fit needs)."""
    for _ in range(_MAX_DRAWS):
        counts = rng.multinomial(runs, np.full(runs, 1 / runs)).astype(float)
        if accept(counts):
            return counts
    raise ValueError(f"no bootstrap resample in {_MAX_DRAWS} draws {what}")


def _check_columns(columns: dict[str, np.ndarray], like: str) -> None:
    """Every column flat, as long as column `like`, finite and positive."""
    size = len(columns[like])
    for name, v in columns.items():
        if v.ndim != 1 or len(v) != size:
            raise ValueError(f"{name} must be a flat sequence as long as {like} ({size}), got shape {v.shape}")
        if not np.isfinite(v).all():
            bad = np.count_nonzero(~np.isfinite(v))
            raise ValueError(f"{name} holds {bad} NaN or infinite values; drop those runs")
        if (v <= 0).any():
            raise ValueError(f"{name} must be positive (the law is fitted in logs), got min {v.min()}")


def _check_identifiable(x: dict[str, np.ndarray], y: dict[str, np.ndarray]) -> None:
    n_params = len(y) * (1 + len(x)) + len(x)
    points = len(y) * len(next(iter(y.values())))
    if points < n_params:
        raise ValueError(f"{points} points cannot determine the {n_params} parameters of the law")
    for name, v in x.items():
        if len(np.unique(v)) < 3:
            raise ValueError(
                f"{name} takes {len(np.unique(v))} distinct values; a saturating power law needs at least 3"
            )
    for name, v in y.items():
        if np.ptp(v) == 0:
            raise ValueError(f"every {name} equals {v[0]}: a constant shows no trend to fit")


def _check_bootstrap(resamples: int, level: float) -> None:
    if not 0 < level < 1:
        raise ValueError(f"level must lie in (0, 1), got {level}")
    if resamples < 1:
        raise ValueError(f"resamples must be positive, got {resamples}")


def _fit(
    columns: dict, metrics: dict, link: str, resamples: int, level: float, seed: int, validate: bool = True
) -> dict[str, PowerLawFit]:
    """The laws of `metrics` (name -> err per run) over the inputs `columns`
    (name -> value per run), fitted at once with shared exponents."""
    x = {name: np.asarray(v, dtype=float) for name, v in columns.items()}
    y = {name: np.asarray(v, dtype=float) for name, v in metrics.items()}
    if link not in LINKS:
        raise ValueError(f"link must be one of {LINKS}, got {link!r}")
    _check_columns({**x, **y}, like=next(iter(y)))
    if link == "logit":
        for name, v in y.items():
            if (v >= 1).any():
                raise ValueError(f"{name} must lie below 1 for the logit link (its odds), got max {v.max()}")
    _check_identifiable(x, y)
    _check_bootstrap(resamples, level)
    xs = list(x.values())
    # Centre log x on the data: the grid and L-BFGS then see A_k of order err, not N^alpha.
    centres = np.array([np.log(v).mean() for v in xs])
    p = _Problem(np.log(np.stack(xs)) - centres[:, None], np.stack([_to_link(v, link) for v in y.values()], axis=1))
    runs = len(xs[0])

    def enough_sizes(counts: np.ndarray) -> bool:
        return all(len(np.unique(v[counts > 0])) >= 3 for v in xs)

    # One BLAS thread: the problems are tiny, and on a busy 2-core machine
    # OpenBLAS threads waiting on each other inside L-BFGS made fits 3-25x slower.
    with threadpool_limits(limits=1):
        theta = _point_fit(p, np.ones(runs))
        rng = np.random.default_rng(seed)
        thetas = np.empty((resamples, p.n_params))
        for i in range(resamples):
            counts = _draw(runs, enough_sizes, rng, f"keeps 3 distinct values of {', '.join(x)}")
            # Warm start from the full-data optimum: a resample moves the optimum, not the basin.
            thetas[i] = _minimize(p, counts, [theta])
    held_out = _HeldOut(x, y, link, resamples, level, seed) if validate else None

    fits = {}
    for m, name in enumerate(y):
        view = p.view(m)
        params, samples = _natural(theta[view], centres), _natural(thetas[:, view], centres)
        names = ["E", "A", "alpha", "B", "beta"][: len(params)]
        values = dict(zip(names, params.tolist()))
        fits[name] = PowerLawFit(
            E=values["E"], A=values["A"], alpha=values["alpha"], B=values.get("B"), beta=values.get("beta"),
            intervals={n: (float(lo), float(hi)) for n, lo, hi in zip(names, *_quantiles(samples, level))},
            level=level, n_points=runs, largest=tuple(float(v.max()) for v in xs), link=link, metric=name,
            shared=tuple(other for other in y if other != name), samples=samples, held_out=held_out,
        )  # fmt: skip
    return fits


class _HeldOut:
    """The validations of laws fitted together, computed once when first asked
    for: a refit doubles a fit's cost (a second bootstrap), which e.g. a study
    of the intervals' coverage has no use for."""

    def __init__(self, x: dict, y: dict, link: str, resamples: int, level: float, seed: int):
        self._args = (x, y, link, resamples, level, seed)

    @cached_property
    def validations(self) -> dict[str, Validation | None]:
        return _hold_out(*self._args)


def _hold_out(x: dict, y: dict, link: str, resamples: int, level: float, seed: int) -> dict[str, Validation | None]:
    """Each law refitted without the runs at the largest value of the first input, checked there."""
    first = next(iter(x.values()))
    held = first == first.max()
    kept_x = {name: v[~held] for name, v in x.items()}
    kept_y = {name: v[~held] for name, v in y.items()}
    try:
        _check_identifiable(kept_x, kept_y)
    except ValueError:  # too few sizes left without the largest: nothing to check it with
        return dict.fromkeys(y)
    refits = _fit(kept_x, kept_y, link, resamples, level, seed, validate=False)
    rng = np.random.default_rng([seed, 1])
    at = [v[held] for v in x.values()]
    validations = {}
    for name, law in refits.items():
        measured, predicted = y[name][held], law.predict(*at)
        residuals = _to_link(kept_y[name], link) - _to_link(law.predict(*kept_x.values()), link)
        # Each refit's law at each held-out run, plus a run's scatter: a residual drawn again.
        laws = np.log(_predict(law.samples, at))
        runs = _from_law(np.exp(laws + rng.choice(residuals, size=laws.shape)), link)
        low, high = _quantiles(runs.mean(axis=1), level)
        validations[name] = Validation(
            float(first.max()), float(predicted.mean()), float(low), float(high), tuple(measured.tolist()),
            float(np.abs(measured - predicted).mean()), level, law,
        )  # fmt: skip
    return validations


# --- compute-optimal frontier ----------------------------------------------------------


@dataclass(frozen=True)
class FrontierPoint:
    """What a FLOP budget buys: the best run observed within it (compute_frontier)
    or at it (fit_isoflop), and the fitted compute-optimal size and its error there."""

    budget: float
    best_row: int | None
    """Index of the run with the lowest error among those within (at) the budget; None if none is."""
    best_err: float | None
    predicted: Prediction
    """The fitted optimum: n = compute-optimal parameters, d = budget / n, err with its interval."""
    n_low: float
    n_high: float
    """Interval of the compute-optimal n, at the fit's level."""


def compute_frontier(
    params, flops, err, budgets, *, resamples: int = 200, level: float = 0.9, seed: int = 0
) -> tuple[PowerLawFit, Extrapolation[FrontierPoint]]:
    """For each FLOP budget C, the best observed run with flops <= C, and the
    compute-optimal point of the joint fit err = E + A N^-alpha + B (C/N)^-beta.

    C/N (training FLOPs per parameter) stands in for data: at a fixed image
    size a run's compute is about 6 x tokens x N per sample, so C/N counts
    samples seen. Minimising the fit over N at fixed C (Chinchilla's approach
    3) gives N* = (alpha A / (beta B))^(1/(alpha+beta)) C^(beta/(alpha+beta)).
    The points come with each budget's decades beyond the costliest run and
    the joint law's validation (its largest N held out).
    """
    n, c, y = (np.asarray(v, dtype=float) for v in (params, flops, err))
    _check_columns({"params": n, "flops": c, "err": y}, like="err")
    fit = _fit({"params": n, "flops / params": c / n}, {"err": y}, "log", resamples, level, seed)["err"]
    centre = np.array(list(fit.params.values()))
    budgets = np.atleast_1d(np.asarray(budgets, dtype=float))
    points = []
    for budget in budgets:
        within = np.flatnonzero(c <= budget)
        best = int(within[np.argmin(y[within])]) if len(within) else None
        n_opt, err_opt = _optimum(centre, budget)
        (n_low, low), (n_high, high) = _quantiles(np.stack(_optimum(fit.samples, budget), axis=1), level)
        predicted = Prediction(float(n_opt), float(budget / n_opt), float(err_opt), float(low), float(high))
        best_err = None if best is None else float(y[best])
        points.append(FrontierPoint(float(budget), best, best_err, predicted, float(n_low), float(n_high)))
    return fit, Extrapolation(tuple(points), tuple(decades_beyond(budgets, c.max()).tolist()), fit.validation)


def _optimum(params: np.ndarray, budget: float) -> tuple[np.ndarray, np.ndarray]:
    """Compute-optimal N and its error at C = budget, for params [..., (E, A, alpha, B, beta)]."""
    e, a, alpha, b, beta = np.moveaxis(params, -1, 0)
    with np.errstate(divide="ignore", invalid="ignore"):  # an exponent of 0: no optimum, inf or nan
        n = (alpha * a / (beta * b)) ** (1 / (alpha + beta)) * budget ** (beta / (alpha + beta))
        return n, e + a * n**-alpha + b * (budget / n) ** -beta


# --- IsoFLOP curves: Chinchilla's approach 2 ---------------------------------------------


@dataclass(frozen=True)
class IsoFLOPCurve:
    """The runs at one FLOP budget and the parabola in ln N through their errors
    (Chinchilla's Figure 3, left), with its minimum."""

    budget: float
    """Median training FLOPs of the runs."""
    rows: tuple[int, ...]
    """Indices of the runs."""
    sizes: tuple[float, float]
    """The smallest and largest N run at this budget."""
    minimum: FrontierPoint
    curvature: float
    """err = minimum err + curvature ln(N / N_opt)^2."""

    def err(self, n) -> np.ndarray:
        """The parabola at parameters `n`."""
        opt = self.minimum.predicted
        return opt.err + self.curvature * np.log(np.asarray(n, dtype=float) / opt.n) ** 2

    @property
    def bracketed(self) -> bool:
        """Whether the minimum lies among the sizes run; if not, the parabola's
        extrapolation places it, and the budget wants sizes further that way."""
        return self.sizes[0] <= self.minimum.predicted.n <= self.sizes[1]


@dataclass(frozen=True)
class OptimalSize:
    """The compute-optimal size at one FLOP budget, N_opt = k C^a, with its bootstrap interval."""

    budget: float
    n: float
    low: float
    high: float


@dataclass(frozen=True)
class IsoFLOPFit:
    """Chinchilla's approach 2: at each FLOP budget the minimum of a parabola in
    ln N, and N_opt = k C^a through those minima (least squares in logs)."""

    curves: list[IsoFLOPCurve]
    """One per budget, cheapest first."""
    k: float
    a: float
    intervals: dict[str, tuple[float, float]]
    """Bootstrap percentile intervals of k and a, at `level`."""
    level: float
    validation: Validation | None
    """N_opt = k C^a refitted without the largest budget and checked against that
    budget's minimum (its measured value); None with fewer than 3 budgets."""
    samples: np.ndarray = field(repr=False, compare=False)
    """(resamples, 2): k and a of the bootstrap refits."""

    @property
    def largest(self) -> float:
        """The largest budget fitted: where extrapolation begins."""
        return self.curves[-1].budget

    def predict(self, budgets) -> np.ndarray:
        """The compute-optimal N at each of `budgets`."""
        return self.k * np.asarray(budgets, dtype=float) ** self.a

    def interval(self, budgets) -> list[OptimalSize]:
        c = np.atleast_1d(np.asarray(budgets, dtype=float))
        low, high = _quantiles(self.samples[:, :1] * c ** self.samples[:, 1:], self.level)
        return [
            OptimalSize(float(b), float(n), float(lo), float(hi)) for b, n, lo, hi in zip(c, self.predict(c), low, high)
        ]

    def extrapolate(self, budgets) -> Extrapolation[OptimalSize]:
        """`interval` at each of `budgets`, with the decades beyond the largest budget and the validation."""
        c = np.atleast_1d(np.asarray(budgets, dtype=float))
        return Extrapolation(tuple(self.interval(c)), tuple(decades_beyond(c, self.largest).tolist()), self.validation)


def fit_isoflop(
    params, flops, err, *, rel_tol: float = 0.05, resamples: int = 200, level: float = 0.9, seed: int = 0
) -> IsoFLOPFit:
    """Chinchilla's approach 2 over runs whose training was set to exhaust fixed
    FLOP budgets: runs whose `flops` lie within `rel_tol` of the cheapest of them
    share a budget; at each, err = c0 + c1 ln N + c2 (ln N)^2 by least squares (as
    Hoffmann et al. fitted loss) places the compute-optimal N and its error; then
    ln N_opt = ln k + a ln C by least squares across budgets.

    The bootstrap resamples runs within each budget (the budgets are the design,
    not a sample of it) and refits every parabola and the line."""
    n, c, y = (np.asarray(v, dtype=float) for v in (params, flops, err))
    _check_columns({"params": n, "flops": c, "err": y}, like="err")
    _check_bootstrap(resamples, level)
    rng = np.random.default_rng(seed)
    curves, log_n = [], []  # log_n: per budget, ln N_opt of the full data and then of each resample
    for rows in _groups(c, rel_tol):
        budget, u, yb = float(np.median(c[rows])), np.log(n[rows]), y[rows]
        if len(np.unique(u)) < 3:
            raise ValueError(
                f"the {len(rows)} runs at budget {budget:.3g} FLOPs take {len(np.unique(u))} distinct sizes; "
                "a parabola needs at least 3"
            )
        point = _parabola(u, yb, np.ones(len(rows)))
        if point is None:
            raise ValueError(f"the runs at budget {budget:.3g} FLOPs show no minimum: their errors curve down in ln N")

        def curves_up(counts: np.ndarray, u=u, yb=yb) -> bool:
            return _parabola(u, yb, counts) is not None

        what = f"at budget {budget:.3g} FLOPs curves up over 3 distinct sizes"
        fits = np.array([point] + [_parabola(u, yb, _draw(len(rows), curves_up, rng, what)) for _ in range(resamples)])
        (n_low, low), (n_high, high) = _quantiles(np.stack([np.exp(fits[1:, 0]), fits[1:, 1]], axis=1), level)
        n_opt, err_opt = float(np.exp(point[0])), float(point[1])
        best = int(rows[np.argmin(yb)])
        minimum = FrontierPoint(
            budget, best, float(y[best]), Prediction(n_opt, budget / n_opt, err_opt, float(low), float(high)),
            float(n_low), float(n_high),
        )  # fmt: skip
        sizes = (float(n[rows].min()), float(n[rows].max()))
        curves.append(IsoFLOPCurve(budget, tuple(rows.tolist()), sizes, minimum, float(point[2])))
        log_n.append(fits[:, 0])
    if len(curves) < 2:
        raise ValueError(f"N_opt = k C^a needs 2 FLOP budgets or more; the runs share 1 (within rel_tol {rel_tol})")
    return _size_frontier(curves, np.stack(log_n, axis=1), level, validate=True)


def _parabola(u: np.ndarray, y: np.ndarray, counts: np.ndarray) -> tuple[float, float, float] | None:
    """(u at the minimum, err there, curvature) of err = c0 + c1 u + c2 u^2 by least
    squares, runs weighted by `counts`; None if the drawn runs take fewer than 3
    sizes or curve down (no minimum)."""
    if len(np.unique(u[counts > 0])) < 3:
        return None
    centre = u.mean()  # centred: at u = ln 1e9 = 20.7, the raw powers would be ill-conditioned
    c2, c1, c0 = np.polyfit(u - centre, y, 2, w=np.sqrt(counts))
    if c2 <= 0:
        return None
    return centre - c1 / (2 * c2), c0 - c1**2 / (4 * c2), c2


def _size_frontier(curves: list[IsoFLOPCurve], log_n: np.ndarray, level: float, validate: bool) -> IsoFLOPFit:
    """ln N_opt = ln k + a ln C through the curves' minima; log_n (1 + resamples,
    budgets) holds the minima of the full data first, then of each resample."""
    log_c = np.log([curve.budget for curve in curves])
    xc = log_c - log_c.mean()
    a = (log_n - log_n.mean(axis=1, keepdims=True)) @ xc / (xc @ xc)
    k = np.exp(log_n.mean(axis=1) - a * log_c.mean())
    samples = np.stack([k[1:], a[1:]], axis=1)
    intervals = {name: (float(lo), float(hi)) for name, lo, hi in zip("ka", *_quantiles(samples, level))}
    validation = None
    if validate and len(curves) >= 3:
        law = _size_frontier(curves[:-1], log_n[:, :-1], level, validate=False)
        predicted = np.log(law.k) + law.a * log_c[-1]
        # Each refit's line at the largest budget, plus the scatter of that budget's
        # own minimum: its resamples about it.
        bands = np.log(law.samples[:, 0]) + law.samples[:, 1] * log_c[-1] + log_n[1:, -1] - log_n[0, -1]
        low, high = _quantiles(np.exp(bands), level)
        measured = float(np.exp(log_n[0, -1]))
        validation = Validation(
            curves[-1].budget, float(np.exp(predicted)), float(low), float(high), (measured,),
            abs(measured - float(np.exp(predicted))), level, law,
        )  # fmt: skip
    return IsoFLOPFit(curves, float(k[0]), float(a[0]), intervals, level, validation, samples)


def _groups(values: np.ndarray, rel_tol: float) -> list[np.ndarray]:
    """Indices of `values` in groups, smallest first, each within `rel_tol` of its smallest member."""
    order = np.argsort(values, kind="stable")
    groups, start = [], 0
    while start < len(order):
        stop = start
        while stop < len(order) and values[order[stop]] <= values[order[start]] * (1 + rel_tol):
            stop += 1
        groups.append(order[start:stop])
        start = stop
    return groups


# --- width versus depth ------------------------------------------------------------------


@dataclass(frozen=True)
class Shape:
    """The runs of one (width, depth) in a group of similar size."""

    width: int
    depth: int
    params: float
    err: float
    """Mean over the shape's runs (seeds)."""
    err_std: float | None
    """Standard deviation over its runs; None for a single run."""
    runs: int


@dataclass(frozen=True)
class ShapeComparison:
    """Shapes of about the same parameter count, lowest mean error first."""

    params: float
    """Median parameter count of the group."""
    shapes: list[Shape]

    @property
    def gap(self) -> float:
        """How much more error the runner-up shape makes than the best."""
        return self.shapes[1].err - self.shapes[0].err


def compare_shapes(width, depth, params, err, *, rel_tol: float = 0.05) -> list[ShapeComparison]:
    """Groups runs whose parameter counts lie within `rel_tol` of the group's
    smallest, and in each group with two or more shapes ranks the shapes by
    mean error: the paper's L32W4096 (1.074e9) against L64W2896 (1.073e9).
    Groups with one shape compare nothing and are left out."""
    w, d = (np.asarray(v) for v in (width, depth))
    n, y = (np.asarray(v, dtype=float) for v in (params, err))
    if not len(w) == len(d) == len(n) == len(y):
        raise ValueError(f"width, depth, params and err differ in length: {len(w)}, {len(d)}, {len(n)}, {len(y)}")
    if not (np.isfinite(n).all() and np.isfinite(y).all()):
        raise ValueError("params and err must be finite; drop runs with NaN metrics")
    comparisons = []
    for group in _groups(n, rel_tol):
        shapes = []
        for wd in sorted({(int(w[i]), int(d[i])) for i in group}):
            runs = [i for i in group if (w[i], d[i]) == wd]
            errs = y[runs]
            std = float(errs.std(ddof=1)) if len(runs) > 1 else None
            shapes.append(Shape(*wd, float(n[runs].mean()), float(errs.mean()), std, len(runs)))
        if len(shapes) > 1:
            shapes.sort(key=lambda s: s.err)
            comparisons.append(ShapeComparison(float(np.median(n[group])), shapes))
    return comparisons
