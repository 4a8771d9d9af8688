"""Scaling laws of error metrics (err = 1 - CRA, or 1 - clean accuracy).

    err(N)    = E + A N^-alpha                   fit_power_law: parameters N
    err(N, D) = E + A N^-alpha + B D^-beta       fit_joint: parameters and data (or steps)

Fitted as Epoch AI refitted Chinchilla (arXiv 2404.10102), because the
original fit had not converged and its intervals were far too narrow: the
Huber loss (delta 1e-3) between log predicted and log observed error, L-BFGS
from a grid of starting points, the best optimum kept, and bootstrap
intervals from refits on runs resampled with replacement. Every fit also
reports how well it predicts the largest N when that size is held out.
"""

from dataclasses import dataclass, field

import numpy as np
from scipy.optimize import minimize
from threadpoolctl import threadpool_limits

HUBER_DELTA = 1e-3
"""Residuals of log error beyond 1e-3 (0.1%) count linearly: outlying runs barely pull the fit."""

_ALPHA_GRID = (0.1, 0.3, 0.6, 1.2)
_SCALE_GRID = (0.1, 0.5, 0.9)  # E, and each term at the data's centre, as fractions of the smallest error
_STARTS = 4  # L-BFGS runs from the best grid points: the grid finds the basin, L-BFGS the optimum
_MAX_EXPONENT = 5.0  # err ~ N^-5 is steeper than any scaling law; the bound keeps exp() finite


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
class PowerLawFit:
    """err = E + A N^-alpha (+ B D^-beta for a joint fit; B and beta are None otherwise)."""

    E: float
    A: float
    alpha: float
    B: float | None
    beta: float | None
    intervals: dict[str, tuple[float, float]]
    """Bootstrap percentile interval of every parameter, at `level`."""
    level: float
    n_points: int
    holdout_error: float | None
    """Mean |observed - predicted| error at the largest N, fitted without that
    size; None when fewer than 4 sizes leave too few to fit without it."""
    samples: np.ndarray = field(repr=False, compare=False)
    """(resamples, parameters) of the bootstrap refits, in the order of `params`."""

    @property
    def params(self) -> dict[str, float]:
        names = ("E", "A", "alpha", "B", "beta")
        return {name: getattr(self, name) for name in names if getattr(self, name) is not None}

    def predict(self, n, d=None) -> np.ndarray:
        """The fitted error at parameters `n` (and data `d` for a joint fit)."""
        return _predict(np.array(list(self.params.values())), _inputs(self, n, d))

    def extrapolate(self, n, d=None) -> list[Prediction]:
        """The fitted error with bootstrap intervals at each of `n` (and `d`),
        e.g. at the parameter counts of the 1B and 2B presets."""
        x = _inputs(self, n, d)
        low, high = np.quantile(_predict(self.samples, x), [(1 - self.level) / 2, (1 + self.level) / 2], axis=0)
        ds = x[1] if d is not None else [None] * len(x[0])
        return [
            Prediction(float(ni), None if di is None else float(di), float(e), float(lo), float(hi))
            for ni, di, e, lo, hi in zip(x[0], ds, self.predict(n, d), low, high)
        ]


def fit_power_law(n, err, *, resamples: int = 200, level: float = 0.9, seed: int = 0) -> PowerLawFit:
    """err = E + A N^-alpha over runs of `n` parameters; repeated sizes (seeds) are welcome."""
    return _fit(dict(n=n), err, resamples, level, seed)


def fit_joint(n, d, err, *, resamples: int = 200, level: float = 0.9, seed: int = 0) -> PowerLawFit:
    """err = E + A N^-alpha + B D^-beta over runs of `n` parameters trained on `d`
    samples (or steps, or compute per parameter: any positive measure of data)."""
    return _fit(dict(n=n, d=d), err, resamples, level, seed)


# --- the fit -------------------------------------------------------------------------


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


def _loss(theta: np.ndarray, logx: np.ndarray, logy: np.ndarray, weights: np.ndarray):
    """Weighted Huber loss of log predicted - log observed error, and its gradient.

    theta = [e, a_1, alpha_1, ...] with E = exp(e), A_k = exp(a_k): in logs the
    prediction is logsumexp(e, a_k - alpha_k log x_k), smooth and positive."""
    z = theta[1::2, None] - theta[2::2, None] * logx  # log A_k x_k^-alpha_k, one row per term
    top = np.maximum(z.max(axis=0), theta[0])
    ez, ee = np.exp(z - top), np.exp(theta[0] - top)
    total = ee + ez.sum(axis=0)
    r = top + np.log(total) - logy
    psi = np.clip(r, -HUBER_DELTA, HUBER_DELTA)  # huber(r) = psi (r - psi / 2), huber'(r) = psi
    dz = weights * psi / total  # d loss / d log prediction, times d log prediction / d exp(z)
    grad = np.empty_like(theta)
    grad[0] = ee @ dz
    grad[1::2] = ez @ dz
    grad[2::2] = -(ez * logx) @ dz
    # Scaled by 1/delta so gradients are O(1) and L-BFGS's tolerances mean what they say.
    return weights @ (psi * (r - psi / 2)) / HUBER_DELTA, grad / HUBER_DELTA


def _minimize(logx, logy, weights, starts, bounds) -> np.ndarray:
    best = None
    for start in starts:
        res = minimize(
            _loss, start, args=(logx, logy, weights), jac=True, method="L-BFGS-B", bounds=bounds,
            options=dict(maxiter=500, ftol=1e-12, gtol=1e-8),
        )
        if best is None or res.fun < best.fun:
            best = res
    return best.x


def _grid(logx, logy, weights, bounds) -> list[np.ndarray]:
    """The `_STARTS` best points of a grid over E, each A_k and alpha_k, scaled to the data."""
    smallest = logy.min()
    scales = np.log(_SCALE_GRID) + smallest
    axes = [scales] + [scales, np.array(_ALPHA_GRID)] * logx.shape[0]
    points = np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1).reshape(-1, len(axes))
    points = np.clip(points, *np.array(bounds).T)
    losses = np.array([_loss(p, logx, logy, weights)[0] for p in points])
    return list(points[np.argsort(losses)[:_STARTS]])


def _check_columns(err: np.ndarray, **columns: np.ndarray) -> None:
    for name, v in {**columns, "err": err}.items():
        if v.ndim != 1 or len(v) != len(err):
            raise ValueError(f"{name} must be a flat sequence as long as err ({len(err)}), got shape {v.shape}")
        if not np.isfinite(v).all():
            bad = np.count_nonzero(~np.isfinite(v))
            raise ValueError(f"{name} holds {bad} NaN or infinite values; drop those runs")
        if (v <= 0).any():
            raise ValueError(f"{name} must be positive (the law is fitted in logs), got min {v.min()}")


def _check_identifiable(y: np.ndarray, **x: np.ndarray) -> None:
    n_params = 1 + 2 * len(x)
    if len(y) < n_params:
        raise ValueError(f"{len(y)} points cannot determine the {n_params} parameters of the law")
    for name, v in x.items():
        if len(np.unique(v)) < 3:
            raise ValueError(
                f"{name} takes {len(np.unique(v))} distinct values; a saturating power law needs at least 3"
            )
    if np.ptp(y) == 0:
        raise ValueError(f"every err equals {y[0]}: a constant shows no trend to fit")


def _fit(columns: dict, y, resamples: int, level: float, seed: int) -> PowerLawFit:
    columns = {name: np.asarray(v, dtype=float) for name, v in columns.items()}
    y = np.asarray(y, dtype=float)
    _check_columns(y, **columns)
    _check_identifiable(y, **columns)
    x = list(columns.values())
    if not 0 < level < 1:
        raise ValueError(f"level must lie in (0, 1), got {level}")
    if resamples < 1:
        raise ValueError(f"resamples must be positive, got {resamples}")
    # Centre log x on the data: the grid and L-BFGS then see A_k of order err, not N^alpha.
    centres = [float(np.log(v).mean()) for v in x]
    logx = np.stack([np.log(v) - c for v, c in zip(x, centres)])
    logy = np.log(y)
    top = logy.max() + 5  # ample: E and every term at the centre lie below the largest error
    bounds = [(-30.0, top)] + [(-30.0, top), (0.0, _MAX_EXPONENT)] * len(x)

    def point_fit(weights: np.ndarray) -> np.ndarray:
        return _minimize(logx, logy, weights, _grid(logx, logy, weights, bounds), bounds)

    def natural(theta: np.ndarray) -> np.ndarray:
        """[e, a_k, alpha_k] on centred inputs -> [E, A_k, alpha_k] on raw inputs."""
        out = np.exp(theta)
        out[2::2] = theta[2::2]
        out[1::2] *= np.exp(theta[2::2] * np.array(centres))
        return out

    # One BLAS thread: the problems are tiny, and on a busy 2-core machine
    # OpenBLAS threads waiting on each other inside L-BFGS made fits 3-25x slower.
    with threadpool_limits(limits=1):
        theta = point_fit(np.ones_like(y))
        rng = np.random.default_rng(seed)
        samples = np.empty((resamples, len(theta)))
        for i in range(resamples):
            weights = _resample(x, rng)
            # Warm start from the full-data optimum: a resample moves the optimum, not the basin.
            samples[i] = natural(_minimize(logx, logy, weights, [theta], bounds))
        holdout = _holdout_error(x, y, point_fit, natural) if len(np.unique(x[0])) >= 4 else None

    lo, hi = np.quantile(samples, [(1 - level) / 2, (1 + level) / 2], axis=0)
    params = natural(theta)
    names = ["E", "A", "alpha", "B", "beta"][: len(params)]
    values = dict(zip(names, params.tolist()))
    return PowerLawFit(
        E=values["E"], A=values["A"], alpha=values["alpha"], B=values.get("B"), beta=values.get("beta"),
        intervals={name: (float(a), float(b)) for name, a, b in zip(names, lo, hi)},
        level=level, n_points=len(y), holdout_error=holdout, samples=samples,
    )


def _resample(x: list[np.ndarray], rng: np.random.Generator) -> np.ndarray:
    """How many times each run is drawn in a bootstrap resample; drawn again
    until every input keeps the 3 distinct values a fit needs."""
    while True:
        counts = rng.multinomial(len(x[0]), np.full(len(x[0]), 1 / len(x[0]))).astype(float)
        if all(len(np.unique(v[counts > 0])) >= 3 for v in x):
            return counts


def _holdout_error(x, y, point_fit, natural) -> float:
    held = x[0] == x[0].max()
    theta = natural(point_fit((~held).astype(float)))
    return float(np.abs(_predict(theta, [v[held] for v in x]) - y[held]).mean())


# --- compute-optimal frontier ----------------------------------------------------------


@dataclass(frozen=True)
class FrontierPoint:
    """What a FLOP budget buys: the best run observed within it, and the
    fitted law's compute-optimal size and error there (with its interval)."""

    budget: float
    best_row: int | None
    """Index of the run with the lowest error among those within the budget; None if none is."""
    best_err: float | None
    predicted: Prediction
    """The fitted optimum: n = compute-optimal parameters, d = budget / n."""


def compute_frontier(
    params, flops, err, budgets, *, resamples: int = 200, level: float = 0.9, seed: int = 0
) -> tuple[PowerLawFit, list[FrontierPoint]]:
    """For each FLOP budget C, the best observed run with flops <= C, and the
    compute-optimal point of the joint fit err = E + A N^-alpha + B (C/N)^-beta.

    C/N (training FLOPs per parameter) stands in for data: at a fixed image
    size a run's compute is about 6 x tokens x N per sample, so C/N counts
    samples seen. Minimising the fit over N at fixed C (Chinchilla's approach
    3) gives N* = (alpha A / (beta B))^(1/(alpha+beta)) C^(beta/(alpha+beta)).
    """
    n, c, y = (np.asarray(v, dtype=float) for v in (params, flops, err))
    _check_columns(y, params=n, flops=c)
    fit = _fit({"params": n, "flops / params": c / n}, y, resamples, level, seed)
    centre = np.array(list(fit.params.values()))
    points = []
    for budget in np.atleast_1d(np.asarray(budgets, dtype=float)):
        within = np.flatnonzero(c <= budget)
        best = int(within[np.argmin(y[within])]) if len(within) else None
        n_opt, err_opt = _optimum(centre, budget)
        low, high = np.quantile(_optimum(fit.samples, budget)[1], [(1 - level) / 2, (1 + level) / 2])
        predicted = Prediction(float(n_opt), float(budget / n_opt), float(err_opt), float(low), float(high))
        points.append(FrontierPoint(float(budget), best, None if best is None else float(y[best]), predicted))
    return fit, points


def _optimum(params: np.ndarray, budget: float) -> tuple[np.ndarray, np.ndarray]:
    """Compute-optimal N and its error at C = budget, for params [..., (E, A, alpha, B, beta)]."""
    e, a, alpha, b, beta = np.moveaxis(params, -1, 0)
    with np.errstate(divide="ignore", invalid="ignore"):  # an exponent of 0: no optimum, inf or nan
        n = (alpha * a / (beta * b)) ** (1 / (alpha + beta)) * budget ** (beta / (alpha + beta))
        return n, e + a * n**-alpha + b * (budget / n) ** -beta


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
    order = np.argsort(n, kind="stable")
    start = 0
    while start < len(order):
        stop = start
        while stop < len(order) and n[order[stop]] <= n[order[start]] * (1 + rel_tol):
            stop += 1
        group = order[start:stop]
        start = stop
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
