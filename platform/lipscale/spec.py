"""The study spec: one YAML file that says what a study sweeps, on what data,
with which budget and where everything is kept.

    name: digits
    dataset: {name: digits}
    space:                                  # dotted paths into the trial's TrainConfig
      model.width: [32, 64, 128]            # a list: choices
      optim.lr: {low: 1.0e-3, high: 1.0e-2, log: true}   # a range (`step` quantises it)
    fixed: {model: {preset: digits}, data: {batch_size: 128}}
    budget: {trials: 8, max_concurrent: 2, epochs: 30}
    objective: {metric: eval/cra_36, direction: maximize}

Each section is a model of lipscale.sections; `fixed` is a trial's
TrainConfig less what the rest of the spec gives, the space's parameters are
fields of it (lipscale.space). `load_spec` validates everything that can be
checked without touching a resource (types, unknown keys, every model shape
the space can produce, the planner's memory estimate of the largest trial);
then lipscale.preflight checks that the stores and the data answer, creating
nothing. Both raise SpecError naming the field. `python -m lipscale.spec`
writes the JSON Schema that editors use (studies/specs/schema.json).
"""

import argparse
import itertools
import json
import math
import os
from pathlib import Path
from typing import Any

import yaml
from pydantic import Field, ValidationError, field_validator, model_validator

from lipnext.config import preset
from lipnext.train_config import TrainConfig
from lipscale import uris
from lipscale.data.catalog import convert_command
from lipscale.sections import RUNNER_OWNED, Budget, Dataset, Fixed, Objective, Scheduler, Space, Storage, Strict
from lipscale.space import MAX_SHAPES, check_param, param_grid

DIGITS = "digits"
"""The one dataset a study converts itself (offline, from scikit-learn); others are URIs to converted shards."""
STORE_SCHEMES = {"optuna": ("sqlite", "postgresql", "mysql"),
                 "mlflow": ("sqlite", "http", "https", "postgresql", "mysql", "databricks", "file")}  # fmt: skip
"""Schemes each store may be given as (a driver may follow the scheme: postgresql+psycopg)."""
GIB = 2**30
RAY_PACKAGE = "/_ray_pkg_"
"""In the working directory of a Ray job submitted with --working-dir: Ray's unpacked copy of it,
under the session's runtime_resources/working_dir_files/."""


class SpecError(ValueError):
    """A spec that cannot run; the message names the field."""


# --- the spec -----------------------------------------------------------------------------


class Spec(Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    """Study name: the Optuna study, the MLflow experiment and the default root runs/<name>."""
    storage: Storage = Storage()
    dataset: Dataset
    space: Space
    fixed: Fixed
    budget: Budget
    scheduler: Scheduler = Scheduler()
    objective: list[Objective] = Field(min_length=1)
    """One objective, or several (e.g. CRA up and FLOPs down) for a Pareto front."""
    seed: int = 0
    """Seed of every trial's training and (plus the trials already run) of the sampler."""

    @field_validator("objective", mode="before")
    @classmethod
    def _one_or_many(cls, value):
        return [value] if isinstance(value, dict) else value

    @model_validator(mode="after")
    def _absolute_root(self):
        # Ray Tune runs every trial in a working directory of its own: a
        # relative root is resolved here, once, before the spec travels to them.
        root = self.storage.root or f"runs/{self.name}"
        if not uris.protocol(root) and not os.path.isabs(root) and RAY_PACKAGE in os.getcwd():
            raise ValueError(
                f"storage.root: {root!r} is relative, and this study runs as a Ray job in Ray's temporary copy of "
                f"its working directory ({os.getcwd()}), deleted with the job: give the study a lasting root, "
                "an absolute path or an s3:// URI, with --root or storage.root"
            )
        self.storage.root = root if uris.protocol(root) else os.path.abspath(root)
        return self

    @model_validator(mode="after")
    def _check(self) -> "Spec":
        self._check_storage_urls()
        self._check_dataset()
        self._check_space()
        self._check_shapes()
        self._check_budget()
        self._check_scheduler()
        return self

    # Paths and URLs, with the defaults under the root filled in.

    @property
    def root(self) -> str:
        return self.storage.root

    @property
    def optuna_url(self) -> str:
        return self.storage.optuna or f"sqlite:///{self.root}/optuna.db"

    @property
    def mlflow_uri(self) -> str:
        return self.storage.mlflow or f"sqlite:///{self.root}/mlflow.db"

    @property
    def data_uri(self) -> str:
        return self.dataset.uri or f"{self.root}/data/{DIGITS}"

    @property
    def params(self) -> dict[str, list | dict]:
        """The searched parameters by dotted path."""
        return self.space.model_dump(by_alias=True, exclude_none=True)

    @property
    def directions(self) -> list[str]:
        return [o.direction for o in self.objective]

    def train_config(self, params: dict[str, Any]) -> TrainConfig:
        """The trial's config: the fixed settings, then the sampled `params` (dotted paths)."""
        overrides = self.fixed.model.model_dump(exclude_none=True)
        tree = self.fixed.model_dump(exclude={"model"}) | {
            "model": preset(overrides.pop("preset"), **overrides).to_dict(),
            "epochs": self.budget.epochs,
            "seed": self.seed,
        }
        tree["data"]["uri"] = self.data_uri
        for path, value in params.items():
            section, name = path.split(".")
            tree[section][name] = value
        return TrainConfig.from_dict(tree)

    def _raw(self) -> dict:
        return self.model_dump(by_alias=True, exclude_none=True, exclude=RUNNER_OWNED)

    def smoke_test(self, root: str | None = None) -> "Spec":
        """Two one-epoch trials of this spec on one CPU worker each, as study <name>-smoke: seconds.
        Its root is `root` (--root) as given, else this spec's with -smoke."""
        changes = dict(trials=2, max_concurrent=2, epochs=1, workers_per_trial=1, gpus_per_worker=0)
        raw = self._raw()
        raw["name"] = f"{self.name}-smoke"
        if root or self.storage.root:
            raw["storage"]["root"] = root or f"{self.storage.root.rstrip('/')}-smoke"
        raw["budget"] = {**raw["budget"], **changes, "memory_per_worker_gib": None}
        raw["fixed"]["device"] = "cpu"
        raw["scheduler"]["grace_period"] = 1
        return parse_spec(raw, "--smoke-test")

    # Checks, each raising ValueError("<field>: <reason>").

    def _check_storage_urls(self):
        root = uris.protocol(self.root)
        if root == "s3":
            for name in ("optuna", "mlflow"):
                if getattr(self.storage, name) is None:
                    raise ValueError(
                        f"storage.{name}: an s3:// root has no local path for the default SQLite file; "
                        "give a URL (a server, or sqlite:////an/absolute/path)"
                    )
        elif root not in (None, "file"):
            raise ValueError(f"storage.root: {self.root!r} is neither a path nor an s3:// URI")
        for name, url in (("optuna", self.optuna_url), ("mlflow", self.mlflow_uri)):
            if uris.scheme(url) not in STORE_SCHEMES[name]:
                raise ValueError(f"storage.{name}: {url!r} is not a URL of {', '.join(STORE_SCHEMES[name])}")

    def _check_dataset(self):
        if self.dataset.name != DIGITS and self.dataset.uri is None:
            raise ValueError(
                f"dataset.uri: required for {self.dataset.name!r} (convert it first: "
                f"`{convert_command(self.dataset.name, 'DEST')}`); only digits is converted by the study"
            )

    def _check_space(self):
        if not self.params:
            raise ValueError("space: empty; a study searches at least one parameter")
        for path, values in self.params.items():
            check_param(path, values)

    def _values(self, path: str) -> list:
        return param_grid(path, self.params[path])

    def _check_shapes(self):
        """Builds every model shape the space can produce, and every other value on its own."""
        model_paths = [p for p in self.params if p.startswith("model.")]
        for path in self.params:
            if path not in model_paths:
                for value in self._values(path):
                    _named(f"space.{path}", self.train_config, {path: value})
        grids = [self._values(p) for p in model_paths]
        if (count := math.prod(len(g) for g in grids)) > MAX_SHAPES:
            raise ValueError(
                f"space: {count:,} model shapes (over {MAX_SHAPES:,}); give fewer choices or larger steps"
            )
        for combo in itertools.product(*grids):
            params = dict(zip(model_paths, combo))
            where = "space." + ", ".join(f"{p}={v}" for p, v in params.items()) if params else "fixed.model"
            _named(where, self.train_config, params)

    def largest(self) -> TrainConfig:
        """The trial with the most memory per step: the largest width, depth and batch searched
        (with the first value of anything else searched, so the shape is one the space gives)."""
        biggest = ("model.width", "model.depth", "data.batch_size")
        values = {path: self._values(path) for path in self.params}
        return self.train_config({p: max(v) if p in biggest else v[0] for p, v in values.items()})

    def _check_budget(self):
        b, f = self.budget, self.fixed
        batches = self._values("data.batch_size") if "data.batch_size" in self.params else [f.data.batch_size]
        for batch in batches:
            if batch % b.workers_per_trial:
                raise ValueError(
                    f"data.batch_size: {batch} does not split over budget.workers_per_trial={b.workers_per_trial}"
                )
        if f.device == "cuda" and b.gpus_per_worker == 0:
            raise ValueError("fixed.device: cuda needs budget.gpus_per_worker > 0")
        if f.device == "cpu" and b.gpus_per_worker > 0:
            raise ValueError("budget.gpus_per_worker: GPUs requested for fixed.device: cpu")
        if b.memory_per_worker_gib is not None:
            self._check_memory()

    def _check_memory(self):
        b = self.budget
        config = self.largest()
        p = plan_trial(config, b.workers_per_trial)
        if not p.fits(int(b.memory_per_worker_gib * GIB)):
            m = config.model
            raise ValueError(
                f"budget.memory_per_worker_gib: the largest trial (width {m.width}, depth {m.depth}, batch "
                f"{p.batch} per worker on {b.workers_per_trial}) needs {p.memory.peak / GIB:.3g} GiB per worker "
                f"(`lipscale plan`), more than {b.memory_per_worker_gib:g}"
            )

    def _check_scheduler(self):
        s, first = self.scheduler, self.objective[0]
        metric = s.metric or first.metric
        directions = {o.metric: o.direction for o in self.objective}
        if s.direction is None and metric not in directions:
            raise ValueError(f"scheduler.direction: needed, {metric} is not an objective")
        if s.kind == "asha" and s.grace_period > self.budget.epochs:
            raise ValueError(f"scheduler.grace_period: {s.grace_period} exceeds budget.epochs={self.budget.epochs}")
        if len(directions) < len(self.objective):
            raise ValueError("objective: a metric is named twice")

    @property
    def scheduler_metric(self) -> tuple[str, str]:
        """(metric, 'max' or 'min') that ASHA ranks trials by."""
        s = self.scheduler
        metric = s.metric or self.objective[0].metric
        direction = s.direction or {o.metric: o.direction for o in self.objective}[metric]
        return metric, direction[:3]


def plan_trial(config: TrainConfig, workers: int):
    """The planner's estimate of a trial's train step on each of its workers."""
    from lipscale.plan import plan

    return plan(
        config.model, batch=config.data.batch_size // workers, world_size=workers, dtype=config.precision,
        optimizer=config.optim.optimizer_kwargs(),
    )  # fmt: skip


def _named(where: str, build, *args):
    """Runs `build(*args)`, naming `where` in the error a config's own validation raises."""
    try:
        return build(*args)
    except (ValueError, TypeError) as e:
        raise ValueError(f"{where}: {e}") from None


# --- loading ------------------------------------------------------------------------------


def _format(error: ValidationError) -> str:
    lines = []
    for e in error.errors():
        where = ".".join(str(part) for part in e["loc"])
        message = e["msg"].removeprefix("Value error, ")
        if e["type"] != "value_error" and isinstance(e["input"], (str, int, float)):
            message += f", got {e['input']!r}"
        lines.append(f"{where}: {message}" if where else message)
    return "\n".join(lines)


def parse_spec(raw: Any, source: str = "spec") -> Spec:
    if not isinstance(raw, dict):
        raise SpecError(f"{source}: a spec is a mapping of name, dataset, space, fixed, budget, objective, ...")
    try:
        return Spec.model_validate(raw)
    except ValidationError as e:
        raise SpecError(f"{source}: {_format(e)}") from None


def load_spec(path: str | os.PathLike, root: str | None = None) -> Spec:
    """Reads and validates a spec file; raises SpecError naming the field. Touches nothing else.
    A spec that names no MLflow store takes MLFLOW_TRACKING_URI's, as MLflow's own clients do.
    `root` (--root) replaces storage.root before the spec is validated, the default stores
    following it: a relative root the spec gives may be refused where this runs (a Ray job)."""
    try:
        raw = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as e:
        raise SpecError(f"{path}: {e}") from None
    tracking = os.environ.get("MLFLOW_TRACKING_URI")
    if tracking and isinstance(raw, dict) and isinstance(raw.get("storage", {}), dict):
        raw["storage"] = {"mlflow": tracking, **raw.get("storage", {})}  # the spec's own wins
    if root is not None and isinstance(raw, dict):
        raw["storage"] = {**(raw.get("storage") or {}), "root": root}
    return parse_spec(raw, str(path))


# --- JSON Schema --------------------------------------------------------------------------


def json_schema() -> dict:
    return Spec.model_json_schema(by_alias=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Write the study spec's JSON Schema (for editors).")
    parser.add_argument("out", nargs="?", default="studies/specs/schema.json")
    args = parser.parse_args(argv)
    Path(args.out).write_text(json.dumps(json_schema(), indent=2) + "\n")


if __name__ == "__main__":
    main()
