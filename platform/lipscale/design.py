"""A study's design (lipscale.sections.Design): which trials it runs.

    design: {kind: search}                          # Optuna samples `space`; ASHA stops trials early
    design:                                         # every size x every sweep point, to the full budget
      kind: ladder
      sizes: [{width: 32, depth: 4}, {params: 1.0e5, depth: 4}]
      sweep: {optim.lr: [1.0e-3, 3.0e-3]}
    design: {kind: isoflop, budgets: [1.0e12, 4.0e12], sizes: [...], sweep: {...}}

A ladder's and an IsoFLOP design's trials are a grid, its `points`: their
params are queued in the Optuna study (`queue_points`), which hands out queued
trials before it samples any, so the sampler never picks one. An IsoFLOP
point's params also carry its `epochs`: the whole epochs whose training FLOPs,
model/flops_per_sample x samples seen, come nearest its budget.
"""

import itertools
import math
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import optuna
from optuna.distributions import CategoricalDistribution

from lipnext import param_counts
from lipnext.config import LipNeXtConfig
from lipnext.model import train_flops_per_sample
from lipscale.results import finished_trials
from lipscale.sections import Size

EPOCHS = "epochs"
"""The param of an IsoFLOP point that sets its trial's epochs (TrainConfig.epochs)."""
GRID = ("ladder", "isoflop")
"""Designs whose trials are a grid of points, queued in Optuna."""
SIZE_PARAMS = ("model.width", "model.depth")
"""The params that make a point's size (its bracket under ASHA, its point on a law)."""
_WIDTH_SCAN = 256
"""Widths tried on each side of the one a parameter count asks for (beta and the shift groups
rule some out: ratio 1/8 takes multiples of 8)."""


@dataclass(frozen=True)
class Point:
    """One trial of a grid design."""

    params: dict
    """Dotted paths into the trial's TrainConfig, `epochs` for an IsoFLOP point."""
    budget: float | None = None
    """The IsoFLOP point's FLOP budget."""
    cost: float = 0.0
    """What its trial costs, relatively (a ladder's: the parameters; an IsoFLOP point's: its budget)."""

    @property
    def key(self) -> tuple:
        return tuple(sorted(self.params.items()))


def size_label(width: int, depth: int) -> str:
    """L4W64: the paper's names, depth first."""
    return f"L{depth}W{width}"


def resolve(size: Size, base: LipNeXtConfig) -> tuple[int, int]:
    """(width, depth) of a size: its width, or the valid width whose model's parameter count
    (lipnext.param_counts' total) lies nearest the one asked for."""
    if size.width is not None:
        return size.width, size.depth
    # The count is quadratic in the width at a fixed depth (2 L W^2 block weights; biases, stem
    # and head linear in W), so three counts give it exactly.
    widths = [64, 128, 192]
    a, b, c = np.polyfit(widths, [_total(base, w, size.depth) for w in widths], 2)
    root = (-b + math.sqrt(b * b - 4 * a * (c - size.params))) / (2 * a)
    valid = [w for w in range(max(1, int(root) - _WIDTH_SCAN), int(root) + _WIDTH_SCAN + 1) if _valid(base, w)]
    if not valid:
        raise ValueError(f"no valid width within {_WIDTH_SCAN} of {root:.0f} gives {size.params:.3g} parameters")
    width = min(valid, key=lambda w: abs(_total(base, w, size.depth) - size.params))
    return width, size.depth


def _valid(base: LipNeXtConfig, width: int) -> bool:
    try:
        base.replace(width=width)
    except ValueError:
        return False
    return True


@lru_cache(maxsize=4096)
def _total(base: LipNeXtConfig, width: int, depth: int) -> int:
    return param_counts(base.replace(width=width, depth=depth))["total"]


def sizes(design, base: LipNeXtConfig) -> list[tuple[int, int]]:
    """The design's sizes as (width, depth); ValueError naming design.sizes for a repeated one."""
    shapes = []
    for i, size in enumerate(design.sizes):
        try:
            shape = resolve(size, base)
        except ValueError as e:
            raise ValueError(f"design.sizes[{i}]: {e}") from None
        if shape in shapes:
            raise ValueError(f"design.sizes[{i}]: {size_label(*shape)} is size {shapes.index(shape)} again")
        shapes.append(shape)
    return shapes


def sweep(design) -> list[dict]:
    """Every point of the design's sweep grid, by dotted path (one empty point for no sweep)."""
    grid = design.sweep.model_dump(by_alias=True, exclude_none=True)
    return [dict(zip(grid, values)) for values in itertools.product(*grid.values())]


def grid(design, base: LipNeXtConfig) -> list[dict]:
    """Each size at each sweep point: the params of a ladder's trials (an IsoFLOP design's, at
    every budget that takes the size, with its epochs added)."""
    return [dict(zip(SIZE_PARAMS, shape)) | point for shape in sizes(design, base) for point in sweep(design)]


def samples_per_epoch(count: int, batch: int, workers: int) -> int:
    """Samples a training epoch takes over all ranks: each rank reads count // workers of the
    split and drops its last partial batch (lipnext's ShardLoader with drop_last)."""
    per_rank = batch // workers
    return (count // workers) // per_rank * per_rank * workers


@lru_cache(maxsize=1024)
def _flops_per_sample(model: LipNeXtConfig, batch: int) -> float:
    return train_flops_per_sample(model, batch)


def points(spec, train_count: int) -> list[Point]:
    """The trials of a grid design over a train split of `train_count` samples; [] for a search.
    An IsoFLOP budget takes the sizes that train at least design.min_epochs there; ValueError
    when fewer than 3 do (a parabola needs 3): lipscale.preflight names design.budgets."""
    design = spec.design
    if design.kind not in GRID:
        return []
    base = spec.base_model()
    if design.kind == "ladder":
        return [Point(p, cost=_total(base, *(p[path] for path in SIZE_PARAMS))) for p in grid(design, base)]
    workers = spec.budget.workers_per_trial
    out = []
    for budget in design.budgets:
        at_budget, short = [], []
        for params in grid(design, base):
            config = spec.train_config({EPOCHS: design.min_epochs, **params})
            batch = config.data.batch_size
            samples = samples_per_epoch(train_count, batch, workers)
            per_epoch = samples * _flops_per_sample(config.model, batch // workers)
            epochs = round(budget / per_epoch)
            label = size_label(config.model.width, config.model.depth)
            if epochs >= design.min_epochs:
                at_budget.append(Point({**params, EPOCHS: epochs}, budget, budget))
            elif label not in short:
                short.append(label)
        trained = {(p.params["model.width"], p.params["model.depth"]) for p in at_budget}
        if len(trained) < 3:
            raise ValueError(
                f"at {budget:.3g} FLOPs {len(trained)} sizes train {design.min_epochs} epochs or "
                f"more (too few epochs: {', '.join(short) or 'none'}); a parabola needs 3: give smaller sizes "
                "or a larger budget"
            )
        out += at_budget
    return out


def check_budgets(design) -> None:
    """That the IsoFLOP budgets lie far enough apart for each trial's realised compute (within
    1 / (2 min_epochs) of its budget) to tell which budget it trained for."""
    slack = 1 / (2 * design.min_epochs)
    apart = (1 + slack) / (1 - slack)
    budgets = sorted(design.budgets)
    for low, high in zip(budgets, budgets[1:]):
        if high < low * apart:
            raise ValueError(
                f"design.budgets: {low:.3g} and {high:.3g} lie closer than x{apart:.3g}: trials trained for whole "
                f"epochs (at least min_epochs {design.min_epochs}) could not be told apart by their compute"
            )


def nominal_budget(compute, budgets) -> np.ndarray:
    """The design budget each realised compute trained for: the nearest in log (check_budgets
    keeps the budgets far enough apart for that to be the one)."""
    c, b = np.log(np.asarray(compute, dtype=float)), np.log(np.asarray(sorted(budgets), dtype=float))
    return np.exp(b)[np.abs(c[:, None] - b[None, :]).argmin(axis=1)]


def search_space(points: list[Point]) -> dict[str, CategoricalDistribution]:
    """The Optuna distributions of a grid's params: each the choice among its points' values."""
    values: dict[str, list] = {}
    for point in points:
        for path, value in point.params.items():
            if value not in values.setdefault(path, []):
                values[path].append(value)
    return {path: CategoricalDistribution(choices) for path, choices in values.items()}


def queue_points(study: optuna.Study, points: list[Point]) -> int:
    """Queues the points that no trial of the study holds yet (a FAIL trial holds its point: a
    diverged trial counts, as in a search), the costliest first; returns how many. Idempotent: a
    rerun queues none.

    Costliest first because the trials share a few slots: started last, the largest trial
    would run on alone while the other slots idle; longest first ends within 4/3 - 1/(3 m) of
    the shortest schedule on m slots (Graham 1969: 7/6 on 2)."""
    held: dict[tuple, int] = {}
    for t in finished_trials(study) + study.get_trials(deepcopy=False, states=_PENDING):
        # A queued (WAITING) trial's params are Optuna's `fixed_params` system attr until it is
        # asked for (what Optuna's own GridSampler reads); a re-queued orphan's retry is one.
        params = t.params or t.system_attrs.get("fixed_params", {})
        key = tuple(sorted(params.items()))
        held[key] = held.get(key, 0) + 1
    queued = 0
    for point in sorted(points, key=lambda p: -p.cost):
        if held.get(point.key, 0):
            held[point.key] -= 1
            continue
        study.enqueue_trial(point.params, skip_if_exists=False)
        queued += 1
    return queued


_PENDING = (optuna.trial.TrialState.RUNNING, optuna.trial.TrialState.WAITING)
