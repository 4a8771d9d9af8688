"""Study designs (lipscale.design): a ladder trains every size at every point of
its sweep to the full budget, an IsoFLOP design trains each size for the epochs
that exhaust each FLOP budget, a search samples its space. A grid design's
trials are queued in Optuna, the costliest first, once. Bad designs are refused
naming the field, creating nothing."""

import optuna
import pytest
import yaml
from test_spec import small

from lipnext import param_counts, preset
from lipnext.model import train_flops_per_sample
from lipscale import cli, design
from lipscale.sections import Size
from lipscale.spec import parse_spec

DIGITS_TRAIN = 1500
"""Train images of scikit-learn's digits as lipscale converts them."""


def ladder(root, sizes=((16, 1), (32, 1)), lrs=(1e-3, 1e-2)) -> dict:
    raw = small(root)
    del raw["space"], raw["budget"]["trials"]
    raw["design"] = {"kind": "ladder", "sizes": [{"width": w, "depth": d} for w, d in sizes],
                     "sweep": {"optim.lr": list(lrs)}}  # fmt: skip
    raw["budget"]["epochs"] = 3
    return raw


def isoflop(root, budgets=(2.5e9, 1e10)) -> dict:
    raw = ladder(root, sizes=((16, 1), (32, 1), (32, 2), (64, 2)), lrs=(1e-2,))
    raw["design"] = {**raw["design"], "kind": "isoflop", "budgets": list(budgets)}
    del raw["budget"]["epochs"]
    return raw


def test_a_ladder_trains_every_size_at_every_sweep_point_to_the_full_budget(tmp_path):
    spec = parse_spec(ladder(tmp_path / "root"))
    assert spec.scheduler.kind == "fifo"  # every trial to the end: the envelope needs final results
    points = design.points(spec, DIGITS_TRAIN)
    assert [p.params for p in points] == [
        {"model.width": w, "model.depth": 1, "optim.lr": lr} for w in (16, 32) for lr in (1e-3, 1e-2)
    ]
    config = spec.train_config(points[3].params)
    assert (config.model.width, config.optim.lr, config.epochs) == (32, 1e-2, 3)
    assert spec.params == {"model.width": [16, 32], "model.depth": [1], "optim.lr": [1e-3, 1e-2]}


def test_a_size_given_by_parameters_takes_the_width_whose_model_comes_nearest():
    base = preset("tiny")
    target = param_counts(base.replace(width=64, depth=2))["total"]
    assert design.resolve(Size(params=target, depth=2), base) == (64, 2)
    # 1.2x the parameters of width 64: the nearest width the shift groups (ratio 1/8) can split.
    width, _ = design.resolve(Size(params=1.2 * target, depth=2), base)
    assert width % 8 == 0 and width == min(
        range(8, 200, 8), key=lambda w: abs(param_counts(base.replace(width=w, depth=2))["total"] - 1.2 * target)
    )


def test_an_isoflop_point_trains_the_whole_epochs_that_come_nearest_its_budget(tmp_path):
    spec = parse_spec(isoflop(tmp_path / "root"))
    points = design.points(spec, DIGITS_TRAIN)
    per_epoch = design.samples_per_epoch(DIGITS_TRAIN, 64, 1)
    assert per_epoch == 1472  # 23 whole batches of 64
    for point in points:
        config = spec.train_config(point.params)
        compute = train_flops_per_sample(config.model, 64) * per_epoch * config.epochs
        assert config.epochs >= spec.design.min_epochs
        assert abs(compute / point.budget - 1) <= 1 / (2 * spec.design.min_epochs)
    # The largest model exhausts the small budget in fewer than min_epochs: only the large budget takes it.
    assert {p.budget for p in points if p.params["model.width"] == 64} == {1e10}
    assert {p.budget for p in points if p.params["model.width"] == 16} == {2.5e9, 1e10}


def test_a_grid_is_queued_costliest_first_and_only_once(tmp_path):
    spec = parse_spec(ladder(tmp_path / "root"))
    points = design.points(spec, DIGITS_TRAIN)
    study = optuna.create_study()
    assert design.queue_points(study, points) == 4
    queued = [t.system_attrs["fixed_params"]["model.width"] for t in study.trials]
    assert queued == [32, 32, 16, 16]  # the longest trials first: the slots end together
    assert design.queue_points(study, points) == 0  # a rerun queues nothing again
    trial = study.ask()  # a queued trial is handed out first, with its point's params
    assert trial.params == {} and study.trials[0].system_attrs["fixed_params"] == points[2].params


def test_a_ladders_smoke_test_is_its_first_two_sizes_at_its_first_sweep_point(tmp_path):
    smoke = parse_spec(ladder(tmp_path / "root", sizes=((16, 1), (32, 1), (64, 1)))).smoke_test()
    assert smoke.design.kind == "ladder" and smoke.budget.epochs == 1
    assert [p.params for p in design.points(smoke, DIGITS_TRAIN)] == [
        {"model.width": 16, "model.depth": 1, "optim.lr": 1e-3}, {"model.width": 32, "model.depth": 1, "optim.lr": 1e-3}
    ]  # fmt: skip


def _set(raw: dict, path: str, value) -> dict:
    """raw with the value at a dotted path (a list index as a number) replaced; None deletes it."""
    *parents, key = [int(k) if k.isdigit() else k for k in path.split(".")]
    target = raw
    for parent in parents:
        target = target[parent] if isinstance(target, list) else target.setdefault(parent, {})
    if value is None:
        del target[key]
    else:
        target[key] = value
    return raw


BAD = [
    # (what is wrong, which design, dotted path, value, words the error must contain)
    ("a ladder with a space", ladder, "space", {"model.width": [16]}, ["space: a ladder design"]),
    ("a ladder with a trial budget", ladder, "budget.trials", 4, ["budget.trials", "its points"]),
    ("a ladder without epochs", ladder, "budget.epochs", None, ["budget.epochs", "a ladder trains every size"]),
    ("a sweep over the sizes", ladder, "design.sweep", {"model.width": [16, 32]}, ["design.sweep.model.width"]),
    ("a sweep range", ladder, "design.sweep", {"optim.lr": {"low": 1e-3, "high": 1e-2, "log": True}},
     ["design.sweep.optim.lr", "a grid"]),
    ("a repeated sweep value", ladder, "design.sweep", {"optim.lr": [1e-3, 1e-3]},
     ["design.sweep.optim.lr", "repeated"]),
    ("a size of width and parameters", ladder, "design.sizes.0", {"width": 16, "params": 1e4, "depth": 1},
     ["design.sizes.0", "not both"]),
    ("a size twice", ladder, "design.sizes.1", {"width": 16, "depth": 1}, ["design.sizes[1]", "L1W16 is size 0"]),
    ("a width the shift groups cannot split", ladder, "design.sizes.1", {"width": 30, "depth": 1},
     ["model.width=30", "shift groups"]),
    ("an unknown design", ladder, "design.kind", "staircase", ["design", "staircase"]),
    ("a search without a space", ladder, "design", {"kind": "search"}, ["space: a search needs it"]),
    ("isoflop epochs", isoflop, "budget.epochs", 3, ["budget.epochs", "from its FLOP budget"]),
    ("isoflop under ASHA", isoflop, "scheduler", {"kind": "asha"}, ["scheduler.kind", "fifo"]),
    ("isoflop budgets too close", isoflop, "design.budgets", [2.5e9, 2.75e9], ["design.budgets", "closer than"]),
    ("isoflop budget too small for 3 sizes", isoflop, "design.budgets", [1e9, 1e10],
     ["design.budgets", "at 1e+09 FLOPs 1 sizes train 4 epochs", "a parabola needs 3"]),
]  # fmt: skip


@pytest.mark.parametrize("what, make, path, value, words", BAD, ids=[b[0] for b in BAD])
def test_a_bad_design_is_refused_naming_the_field_and_nothing_is_created(
    what, make, path, value, words, tmp_path, monkeypatch, capsys
):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(_set(make(tmp_path / "root"), path, value)))
    assert cli.main(["run", str(tmp_path / "spec.yaml")]) == 2
    error = capsys.readouterr().err
    for word in words:
        assert word in error, error
    assert sorted(p.name for p in tmp_path.iterdir()) == ["spec.yaml"]
