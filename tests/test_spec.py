"""Study specs: what a valid one gives each trial, and the bad ones that
`lipscale run` refuses before it creates anything, naming the field."""

import dataclasses
import json
from pathlib import Path
from typing import Literal

import optuna
import pytest
import yaml
from servers import free_port

from lipnext.train_config import CheckpointConfig, LossConfig, OptimConfig, TrainConfig
from lipscale import cli
from lipscale.sections import Fixed
from lipscale.space import scalar, searchable
from lipscale.plan import fit
from lipscale.spec import GIB, SpecError, json_schema, load_spec, parse_spec, plan_trial
from lipscale.tracking import Tracking
from lipscale.uris import redact

SPECS = Path(__file__).parents[1] / "studies" / "specs"


def small(root: Path) -> dict:
    return {
        "name": "small",
        "storage": {"root": str(root)},
        "dataset": {"name": "digits"},
        "space": {"model.width": [32, 64], "optim.lr": {"low": 1e-3, "high": 1e-2, "log": True}},
        "fixed": {"model": {"preset": "tiny"}, "data": {"batch_size": 64}},
        "budget": {"trials": 2, "max_concurrent": 2, "epochs": 1},
        "objective": {"metric": "eval/cra_36", "direction": "maximize"},
    }


def changed(spec: dict, path: str, value) -> dict:
    """spec with the value at a dotted path replaced; under space, the rest of the path is one key."""
    *parents, key = ["space", path.removeprefix("space.")] if path.startswith("space.") else path.split(".")
    target = spec
    for parent in parents:
        target = target.setdefault(parent, {})
    target[key] = value
    return spec


def test_a_valid_spec_gives_each_trial_its_config(tmp_path):
    spec = parse_spec(small(tmp_path / "root"))
    config = spec.train_config({"model.width": 64, "optim.lr": 0.005})
    assert (config.model.width, config.model.depth, config.optim.lr) == (64, 2, 0.005)  # depth: the tiny preset's
    assert config.data.uri == f"{tmp_path}/root/data/digits" and config.data.batch_size == 64
    assert config.epochs == 1 and config.seed == 0
    assert spec.optuna_url == f"sqlite:///{tmp_path}/root/optuna.db"
    assert spec.mlflow_uri == f"sqlite:///{tmp_path}/root/mlflow.db"


def test_with_a_memory_per_worker_a_trial_takes_the_micro_batch_the_planner_fits(tmp_path):
    """No micro-batch in the spec: the largest that fits the memory (the batch of 64 on 2
    workers, 32 per worker, in micro-batches of 8 here, checkpointing blocks only if it
    must); one the spec sets is kept."""
    raw = changed(small(tmp_path / "root"), "budget.workers_per_trial", 2)
    params = {"model.width": 64, "optim.lr": 0.005}
    alone = parse_spec(raw).train_config(params)
    memory = plan_trial(dataclasses.replace(alone, data=dataclasses.replace(alone.data, micro_batch_size=8)), 2).memory.peak
    spec = parse_spec(changed(raw, "budget.memory_per_worker_gib", memory / GIB))
    config = spec.fitted(spec.train_config(params))
    chosen = plan_trial(config, 2)
    assert chosen.fits(memory) and config.data.micro_batch_size >= 8 and config.data.batch_size == 64
    assert (config.data.micro_batch_size, config.activation_checkpointing) == (
        fit(alone.model, batch=64, world_size=2, memory_bytes=memory).micro_batch, chosen.activation_checkpointing
    )
    assert not plan_trial(alone, 2).fits(memory)  # the whole 32 at once would not
    explicit = parse_spec(changed(changed(raw, "budget.memory_per_worker_gib", 1.0), "fixed.data.micro_batch_size", 4))
    assert explicit.fitted(explicit.train_config(params)).data.micro_batch_size == 4


def test_the_default_root_is_under_runs_in_the_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    raw = small(tmp_path)
    del raw["storage"]
    spec = parse_spec(raw)
    assert spec.root == f"{tmp_path}/runs/small"
    # Resolved once, on the driver: Ray Tune runs each trial in a directory of its own.
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    assert spec.root == f"{tmp_path}/runs/small"


def test_a_relative_root_in_a_ray_jobs_copy_of_its_working_directory_is_refused_saying_how_to_set_one(
    tmp_path, monkeypatch
):
    # `ray job submit --working-dir .` runs the driver in Ray's unpacked copy, deleted with the session.
    package = tmp_path / "session_latest" / "runtime_resources" / "working_dir_files" / "_ray_pkg_0123abcd"
    package.mkdir(parents=True)
    monkeypatch.chdir(package)
    raw = small(tmp_path)
    del raw["storage"]
    with pytest.raises(SpecError) as refused:
        parse_spec(raw)
    assert str(refused.value) == (
        "spec: storage.root: 'runs/small' is relative, and this study runs as a Ray job in Ray's temporary copy of "
        f"its working directory ({package}), deleted with the job: give the study a lasting root, an absolute path "
        "or an s3:// URI, with --root or storage.root"
    )
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(raw))
    assert load_spec(tmp_path / "spec.yaml", root=str(tmp_path / "lasting")).root == str(tmp_path / "lasting")
    assert parse_spec(small(tmp_path / "lasting")).root == str(tmp_path / "lasting")


def test_a_spec_without_an_mlflow_store_takes_mlflow_tracking_uri(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/shared.db")
    raw = small(tmp_path / "root")
    (tmp_path / "default.yaml").write_text(yaml.safe_dump(raw))
    raw["storage"]["mlflow"] = f"sqlite:///{tmp_path}/own.db"
    (tmp_path / "own.yaml").write_text(yaml.safe_dump(raw))
    assert load_spec(tmp_path / "default.yaml").mlflow_uri == f"sqlite:///{tmp_path}/shared.db"
    assert load_spec(tmp_path / "own.yaml").mlflow_uri == f"sqlite:///{tmp_path}/own.db"


def test_smoke_test_is_two_one_epoch_trials_under_another_name(tmp_path):
    smoke = parse_spec(small(tmp_path / "root")).smoke_test()
    assert smoke.name == "small-smoke" and smoke.root == f"{tmp_path}/root-smoke"
    assert (smoke.budget.trials, smoke.budget.epochs, smoke.budget.workers_per_trial) == (2, 1, 1)


@pytest.mark.parametrize("path", sorted(SPECS.glob("*.yaml")), ids=lambda p: p.name)
def test_every_committed_spec_is_valid(path):
    spec = load_spec(path)
    assert spec.name == path.stem


def test_the_committed_json_schema_is_current():
    # pydantic writes the schema: a release that changes it (2.14 added additionalProperties to the
    # trial-config dataclasses) shows here, under the versions of constraints.txt.
    assert json.loads((SPECS / "schema.json").read_text()) == json_schema(), (
        "studies/specs/schema.json is stale: regenerate it with `python -m lipscale.spec` and review the diff"
    )


def _unreachable_server() -> str:
    return f"http://127.0.0.1:{free_port()}"


BAD = [
    # (what is wrong, dotted path, value, words the error must contain)
    ("unknown key", "colour", "red", ["colour", "Extra inputs"]),
    ("unknown nested key", "fixed.optim.lrr", 0.1, ["fixed.optim.lrr"]),
    ("wrong type", "budget.trials", "eight", ["budget.trials", "integer"]),
    ("empty space", "space", {}, ["space: empty"]),
    ("no choices", "space.model.width", [], ["space.model.width", "no choices"]),
    ("width the shift groups cannot split", "space.model.width", [30, 64], ["model.width=30", "shift groups"]),
    ("beta outside [0, 1]", "space.model.beta", [0.5, 1.5], ["model.beta=1.5", "beta must lie in [0, 1]"]),
    ("negative budget", "budget.trials", -1, ["budget.trials", "greater than or equal to 1"]),
    ("negative concurrency", "budget.max_concurrent", 0, ["budget.max_concurrent"]),
    ("unknown parameter", "space.model.colour", [1], ["space.model.colour"]),
    ("a parameter the runner sets", "space.data.uri", ["x"], ["space.data.uri"]),
    ("range upside down", "space.optim.lr", {"low": 0.1, "high": 0.01}, ["space.optim.lr", "below high"]),
    ("log range through zero", "space.optim.lr", {"low": 0, "high": 0.01, "log": True}, ["space.optim.lr", "low > 0"]),
    ("continuous channel ratio", "space.model.beta", {"low": 0.2, "high": 0.8}, ["space.model.beta", "step"]),
    ("choice of the wrong type", "space.model.depth", [2, "deep"], ["space.model.depth", "integer"]),
    ("unknown metric", "objective.metric", "eval/cra_99", ["objective", "eval/cra_99"]),
    ("grace period past the end", "scheduler", {"grace_period": 5}, ["scheduler.grace_period"]),
    ("unknown preset", "fixed.model.preset", "huge", ["fixed.model.preset"]),
    ("a field the runner sets", "fixed.data.uri", "x", ["fixed.data", "set by the runner"]),
    ("cuda without GPUs", "fixed.device", "cuda", ["fixed.device", "gpus_per_worker"]),
    ("batch that does not split", "budget.workers_per_trial", 3, ["data.batch_size", "workers_per_trial=3"]),
    ("bad study name", "name", "my study/1", ["name", "pattern"]),
    ("dataset without shards", "dataset", {"name": "cifar10"}, ["dataset.uri", "lipscale data convert"]),
    ("s3 root, default SQLite", "storage.root", "s3://bucket/study", ["storage.optuna", "s3://"]),
    ("unknown storage scheme", "storage.optuna", "redis://127.0.0.1/0", ["storage.optuna", "redis"]),
    ("trial too big for its memory", "budget.memory_per_worker_gib", 0.0001,
     ["budget.memory_per_worker_gib", "micro-batches of 1", "activation checkpointing block", "GiB"]),
    ("micro-batch that does not divide", "fixed.data.micro_batch_size", 48, ["data.micro_batch_size", "48", "64"]),
    # checked by reaching out, still creating nothing:
    ("unreachable tracking server", "storage.mlflow", _unreachable_server(), ["storage.mlflow", "does not answer"]),
    (
        "store under a file",
        "storage.optuna",
        "sqlite:///{tmp}/spec.yaml/optuna.db",
        ["storage.optuna", "cannot be created"],
    ),
    ("missing data", "dataset", {"name": "cifar10", "uri": "{tmp}/cifar10"}, ["dataset.uri", "no converted dataset"]),
    ("data the model does not fit", "fixed.model.preset", "cifar-l8w256", ["fixed.model", "(1, 8, 8)"]),
    # the trial config's own checks (lipnext.train_config), named by the spec:
    ("augmentation typo", "fixed.data.augment", "cropflip", ["fixed.data", "augment", "cropflip"]),
    ("augmentation typo among the choices", "space.data.augment", [None, "cropflip"],
     ["space.data.augment", "cropflip"]),
    ("no prefetched batches", "fixed.data.prefetch", 0, ["fixed.data", "prefetch"]),
    ("negative lookahead steps", "fixed.optim.lookahead_steps", -1, ["fixed.optim", "lookahead_steps"]),
    ("negative re-projection period", "fixed.optim.reorthogonalize_every", -1,
     ["fixed.optim", "reorthogonalize_every"]),
    ("negative gradient clip", "fixed.optim.grad_clip", -1.0, ["fixed.optim", "grad_clip"]),
    ("evaluation every 0 epochs", "fixed.eval_every_epochs", 0, ["fixed", "eval_every_epochs"]),
]  # fmt: skip


@pytest.mark.parametrize("what, path, value, words", BAD, ids=[b[0] for b in BAD])
def test_a_bad_spec_is_refused_naming_the_field_and_nothing_is_created(
    what, path, value, words, tmp_path, monkeypatch, capsys
):
    monkeypatch.chdir(tmp_path)
    if isinstance(value, str):
        value = value.format(tmp=tmp_path)
    elif isinstance(value, dict):
        value = {k: v.format(tmp=tmp_path) if isinstance(v, str) else v for k, v in value.items()}
    spec = changed(small(tmp_path / "root"), path, value)
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(spec))
    assert cli.main(["run", str(tmp_path / "spec.yaml")]) == 2
    error = capsys.readouterr().err
    for word in words:
        assert word in error, error
    assert sorted(p.name for p in tmp_path.iterdir()) == ["spec.yaml"]


def test_a_file_that_is_not_a_mapping_is_refused(tmp_path, capsys):
    (tmp_path / "spec.yaml").write_text("- just\n- a list\n")
    assert cli.main(["run", str(tmp_path / "spec.yaml")]) == 2
    assert "a spec is a mapping" in capsys.readouterr().err


def test_fixed_is_the_trial_config_less_what_the_spec_gives_elsewhere(tmp_path):
    trial_fields = [f.name for f in dataclasses.fields(TrainConfig)]
    assert list(Fixed.model_fields) == [name for name in trial_fields if name not in ("epochs", "seed")]
    fixed = parse_spec(small(tmp_path)).fixed  # sets only the preset and the batch
    assert fixed.optim == OptimConfig() and fixed.loss == LossConfig()
    assert fixed.eval_every_epochs == TrainConfig.eval_every_epochs and fixed.precision == TrainConfig.precision
    assert (fixed.checkpoint.keep, CheckpointConfig().keep) == (1, 2)  # a study keeps one checkpoint per trial


def test_a_field_of_literal_values_is_searched_among_them():
    @dataclasses.dataclass(frozen=True)
    class Section:
        mode: Literal["a", "b"] = "a"
        """How it runs."""
        maybe: Literal[1, 2] | None = None
        pair: tuple[int, int] = (1, 2)

    assert searchable({"x": Section}) == {"x.mode": Literal["a", "b"], "x.maybe": Literal[1, 2] | None}
    assert (scalar(Literal["a", "b"]), scalar(Literal[1, 2] | None), scalar(tuple[int, int])) == (str, int, None)


def test_the_schema_describes_each_field_with_its_dataclass_docstring():
    defs = json_schema()["$defs"]
    width = "Channels C of every block; the block weights are 2 * depth * width**2."
    assert defs["Space"]["properties"]["model.width"]["description"] == width
    assert defs["ModelOverrides"]["properties"]["width"]["description"] == width
    assert defs["Fixed"]["properties"]["eval_every_epochs"]["description"].startswith("Evaluate on the test split")


def test_redact_hides_the_password_of_every_url_and_nothing_else():
    text = "postgresql+psycopg://study:pw@db:5432/optuna, http://me:x%40y@host/; s3://bucket/a@b user@host"
    redacted = "postgresql+psycopg://study:***@db:5432/optuna, http://me:***@host/; s3://bucket/a@b user@host"
    assert redact(text) == redacted


def test_a_password_in_a_storage_url_is_neither_printed_nor_logged(tmp_path, capsys):
    url = f"postgresql+psycopg://study:pw-0f1e@127.0.0.1:{free_port()}/optuna"  # nothing listens there
    raw = changed(small(tmp_path / "root"), "storage.optuna", url)
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(raw))
    assert cli.main(["run", str(tmp_path / "spec.yaml")]) == 2
    error = capsys.readouterr().err
    assert "storage.optuna: cannot connect to postgresql+psycopg://study:***@127.0.0.1" in error, error
    assert "pw-0f1e" not in error
    # The spec is the study's parent run's params in MLflow.
    spec = parse_spec(raw)
    (tmp_path / "root").mkdir()
    tracking = Tracking(spec)
    params = tracking.client.get_run(tracking.parent_run(optuna.create_study(), spec)).data.params
    assert params["storage.optuna"] == url.replace(":pw-0f1e@", ":***@")
    assert not [k for k, v in params.items() if "pw-0f1e" in v]
