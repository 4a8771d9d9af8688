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

That is a search (`design: {kind: search}`, the default). A ladder or an
IsoFLOP design gives its sizes and sweep in `design` instead of a space
(lipscale.design):

    design:
      kind: ladder
      sizes: [{width: 32, depth: 4}, {width: 64, depth: 4}, {params: 2.0e5, depth: 4}]
      sweep: {optim.lr: [1.0e-3, 3.0e-3]}
    budget: {max_concurrent: 2, epochs: 30}

Each section is a model of lipscale.sections; `fixed` is a trial's
TrainConfig less what the rest of the spec gives, the space's (and the
sweep's) parameters are fields of it (lipscale.space). `load_spec` validates everything that can be
checked without touching a resource (types, unknown keys, every model shape
the space can produce, the planner's memory estimate of the largest trial);
then lipscale.preflight checks that the stores and the data answer, creating
nothing. Both raise SpecError naming the field. `python -m lipscale.spec`
writes the JSON Schema that editors use (studies/specs/schema.json).
"""

import argparse
import dataclasses
import itertools
import json
import math
import os
from pathlib import Path
from typing import Any

import yaml
from pydantic import Field, ValidationError, field_validator, model_validator

from lipnext.config import LipNeXtConfig, preset
from lipnext.train_config import TrainConfig
from lipscale import design, uris
from lipscale.data.catalog import GENERATED, convert_command
from lipscale.data.shapes import ShapesConfig
from lipscale.sections import (
    RUNNER_OWNED, Budget, Dataset, Design, Fixed, Objective, Scheduler, SearchDesign, Space, Storage, Strict,
)  # fmt: skip
from lipscale.space import MAX_SHAPES, check_param, param_grid

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
    design: Design = SearchDesign(kind="search")
    space: Space | None = None
    """What a search samples; a ladder or IsoFLOP design gives its sizes and sweep instead."""
    fixed: Fixed
    budget: Budget
    scheduler: Scheduler | None = None
    """Default: ASHA for a search (grace period 1), FIFO (every trial to the end) for the others."""
    objective: list[Objective] = Field(min_length=1)
    """One objective, or several (e.g. CRA up and FLOPs down) for a Pareto front."""
    seed: int = 0
    """Seed of every trial's training and (plus the trials already run) of the sampler."""
    rehearsal: bool = False
    """Set by `lipscale rehearse` (lipscale.rehearse) on its copy of a GPU spec: trials ask for the
    spec's GPUs as Ray resources and train on the CPU."""

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
    def _default_scheduler(self):
        if self.scheduler is None:
            self.scheduler = Scheduler() if self.design.kind not in design.GRID else Scheduler(kind="fifo")
        return self

    @model_validator(mode="after")
    def _check(self) -> "Spec":
        self._check_storage_urls()
        self._check_dataset()
        self._check_design()
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
        return self.dataset.uri or f"{self.root}/data/{self.dataset.name}"

    @property
    def params(self) -> dict[str, list | dict]:
        """The searched parameters by dotted path: the space's, or a grid design's (its sizes'
        widths and depths, its sweep) with the values its points take."""
        if self.design.kind not in design.GRID:
            return self.space.model_dump(by_alias=True, exclude_none=True)
        values: dict[str, list] = {}
        for point in self.grid():
            for path, value in point.items():
                if value not in values.setdefault(path, []):
                    values[path].append(value)
        return values

    def grid(self) -> list[dict]:
        """A grid design's points (sizes x sweep) by dotted path, an IsoFLOP design's without
        their epochs (those need the data: lipscale.design.points)."""
        return design.grid(self.design, self.base_model())

    def base_model(self) -> LipNeXtConfig:
        """The fixed model: the preset with the spec's overrides."""
        overrides = self.fixed.model.model_dump(exclude_none=True)
        return preset(overrides.pop("preset"), **overrides)

    @property
    def directions(self) -> list[str]:
        return [o.direction for o in self.objective]

    def train_config(self, params: dict[str, Any]) -> TrainConfig:
        """The trial's config: the fixed settings, then the sampled `params` (dotted paths;
        an IsoFLOP point's `epochs` is a top-level field)."""
        tree = self.fixed.model_dump(exclude={"model"}) | {
            "model": self.base_model().to_dict(),
            "epochs": self.budget.epochs,
            "seed": self.seed,
        }
        tree["data"]["uri"] = self.data_uri
        if self.rehearsal:
            tree["device"] = "cpu"
        for path, value in params.items():
            section, _, name = path.rpartition(".")
            (tree[section] if section else tree)[name] = value
        return TrainConfig.from_dict(tree)

    def _raw(self) -> dict:
        return self.model_dump(by_alias=True, exclude_none=True, exclude=RUNNER_OWNED)

    def smoke_test(self, root: str | None = None) -> "Spec":
        """Two one-epoch trials of this spec on one CPU worker each, as study <name>-smoke: seconds.
        A grid design's smoke test is a ladder of its first two sizes at its sweep's first point.
        Its root is `root` (--root) as given, else this spec's with -smoke."""
        changes = dict(max_concurrent=2, epochs=1, workers_per_trial=1, gpus_per_worker=0)
        raw = self._raw()
        raw["name"] = f"{self.name}-smoke"
        if root or self.storage.root:
            raw["storage"]["root"] = root or f"{self.storage.root.rstrip('/')}-smoke"
        raw["budget"] = {**raw["budget"], **changes, "memory_per_worker_gib": None}
        raw["fixed"]["device"] = "cpu"
        if self.design.kind in design.GRID:
            sweep = {path: values[:1] for path, values in raw["design"]["sweep"].items()}
            raw["design"] = {"kind": "ladder", "sizes": raw["design"]["sizes"][:2], "sweep": sweep}
            raw["scheduler"] = {"kind": "fifo"}
        else:
            raw["budget"]["trials"] = 2
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
        name, options = self.dataset.name, self.dataset.options
        if name not in GENERATED and self.dataset.uri is None:
            raise ValueError(
                f"dataset.uri: required for {name!r} (convert it first: `{convert_command(name, 'DEST')}`); "
                f"only {' and '.join(GENERATED)} are converted by the study"
            )
        if name == "shapes":
            _named("dataset.options", ShapesConfig, **options)
        elif options:
            raise ValueError(f"dataset.options: {name} takes none (only shapes is generated with options)")

    def _check_design(self):
        d, b = self.design, self.budget
        if d.kind not in design.GRID:
            for field, value in (("space", self.space), ("budget.trials", b.trials), ("budget.epochs", b.epochs)):
                if value is None:
                    raise ValueError(f"{field}: a search needs it (a ladder or isoflop design gives sizes instead)")
            return
        if self.space is not None:
            raise ValueError(f"space: a {d.kind} design tries its sizes at every point of design.sweep; give the "
                             "settings to try there")  # fmt: skip
        if b.trials is not None:
            raise ValueError(f"budget.trials: a {d.kind} design's trials are its points (sizes x sweep); leave it out")
        if d.kind == "ladder" and b.epochs is None:
            raise ValueError("budget.epochs: a ladder trains every size to it; give it")
        if d.kind == "isoflop":
            if b.epochs is not None:
                raise ValueError("budget.epochs: an isoflop design sets each trial's epochs from its FLOP budget; "
                                 "leave it out")  # fmt: skip
            if self.scheduler.kind != "fifo":
                raise ValueError("scheduler.kind: an isoflop design needs every trial to its budget (each point of a "
                                 "curve): fifo")  # fmt: skip
            design.check_budgets(d)
        for path, values in d.sweep.model_dump(by_alias=True, exclude_none=True).items():
            if path in design.SIZE_PARAMS:
                raise ValueError(f"design.sweep.{path}: the sizes' widths and depths are design.sizes'")
            if not isinstance(values, list):
                raise ValueError(f"design.sweep.{path}: a sweep is a grid; give a list of values")
            check_param(path, values, section="design.sweep")
        design.sizes(d, self.base_model())

    def _check_space(self):
        if self.design.kind in design.GRID:
            return
        if not self.params:
            raise ValueError("space: empty; a study searches at least one parameter")
        for path, values in self.params.items():
            check_param(path, values)

    def values(self, path: str) -> list:
        """The values of a searched parameter that the checks build (lipscale.space.param_grid)."""
        return param_grid(path, self.params[path])

    def _buildable(self, params: dict) -> dict:
        """A grid point as train_config builds it: an IsoFLOP point's epochs come with the data, so
        its fewest stand in."""
        return {design.EPOCHS: self.design.min_epochs, **params} if self.design.kind == "isoflop" else params

    def _check_shapes(self):
        """Builds every model shape the space can produce, and every other value on its own; or
        every point of a grid design."""
        if self.design.kind in design.GRID:
            for params in self.grid():
                _named("design: " + ", ".join(f"{p}={v}" for p, v in params.items()), self.train_config,
                       self._buildable(params))  # fmt: skip
            return
        model_paths = [p for p in self.params if p.startswith("model.")]
        for path in self.params:
            if path not in model_paths:
                for value in self.values(path):
                    _named(f"space.{path}", self.train_config, {path: value})
        if (count := math.prod(len(self.values(p)) for p in model_paths)) > MAX_SHAPES:
            raise ValueError(
                f"space: {count:,} model shapes (over {MAX_SHAPES:,}); give fewer choices or larger steps"
            )
        for params in self.model_shapes():
            where = "space." + ", ".join(f"{p}={v}" for p, v in params.items()) if params else "fixed.model"
            _named(where, self.train_config, params)

    def model_shapes(self) -> list[dict]:
        """Every combination of the model parameters the space searches ([{}] when it searches none)."""
        paths = [p for p in self.params if p.startswith("model.")]
        return [dict(zip(paths, combo)) for combo in itertools.product(*(self.values(p) for p in paths))]

    def largest(self) -> TrainConfig:
        """The trial with the most memory per step: the largest width, depth and batch searched
        (with the first value of anything else searched, so the shape is one the space gives);
        of a grid design, the point the planner gives the highest peak."""
        if self.design.kind in design.GRID:
            configs = {}
            for params in self.grid():
                config = self.train_config(self._buildable(params))
                configs.setdefault((config.model, config.data.batch_size), config)
            workers = self.budget.workers_per_trial
            return max(configs.values(), key=lambda c: plan_trial(c, workers).memory.peak)
        biggest = ("model.width", "model.depth", "data.batch_size")
        values = {path: self.values(path) for path in self.params}
        return self.train_config({p: max(v) if p in biggest else v[0] for p, v in values.items()})

    def _check_budget(self):
        b, f = self.budget, self.fixed
        batches = self.values("data.batch_size") if "data.batch_size" in self.params else [f.data.batch_size]
        for batch in batches:
            if batch % b.workers_per_trial:
                raise ValueError(
                    f"data.batch_size: {batch} does not split over budget.workers_per_trial={b.workers_per_trial}"
                )
            if (micro := f.data.micro_batch_size) and (batch // b.workers_per_trial) % micro:
                raise ValueError(
                    f"data.micro_batch_size: {micro} does not divide the batch per worker, {batch // b.workers_per_trial}"
                )
        if f.device == "cuda" and b.gpus_per_worker == 0:
            raise ValueError("fixed.device: cuda needs budget.gpus_per_worker > 0")
        if f.device == "cpu" and b.gpus_per_worker > 0:
            raise ValueError("budget.gpus_per_worker: GPUs requested for fixed.device: cpu")
        if b.memory_per_worker_gib is not None:
            self._check_memory()

    def _check_memory(self):
        b = self.budget
        config = self.fitted(self.largest())
        p = plan_trial(config, b.workers_per_trial)
        if not p.fits(int(b.memory_per_worker_gib * GIB)):
            m = config.model
            raise ValueError(
                f"budget.memory_per_worker_gib: the largest trial (width {m.width}, depth {m.depth}, batch "
                f"{p.per_rank_batch} per worker on {b.workers_per_trial}, in micro-batches of {p.micro_batch}, "
                f"activation checkpointing {p.activation_checkpointing}) needs {p.memory.peak / GIB:.3g} GiB per "
                f"worker (`lipscale plan`), more than {b.memory_per_worker_gib:g}"
            )

    def fitted(self, config: TrainConfig, memory_gib: float | None = None) -> TrainConfig:
        """The trial's config as it trains: with budget.memory_per_worker_gib (or `memory_gib`)
        and no data.micro_batch_size, the largest micro-batch that the planner fits in that
        memory (with activation checkpointing if only that fits; one the config asks for is kept)."""
        b = self.budget
        memory_gib = memory_gib or b.memory_per_worker_gib
        if memory_gib is None or config.data.micro_batch_size is not None:
            return config
        from lipscale.plan import fit

        chosen = fit(
            config.model, batch=config.data.batch_size, world_size=b.workers_per_trial,
            memory_bytes=int(memory_gib * GIB), dtype=config.precision,
            activation_checkpointing="block" if config.activation_checkpointing == "block" else None,
            optimizer=config.optim.optimizer_kwargs(),
        )  # fmt: skip
        data = dataclasses.replace(config.data, micro_batch_size=chosen.micro_batch)
        return dataclasses.replace(config, data=data, activation_checkpointing=chosen.activation_checkpointing)

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
    """The planner's estimate of a trial's train step on each of its workers, as configured."""
    from lipscale.plan import plan

    return plan(
        config.model, batch=config.data.batch_size, world_size=workers, micro_batch=config.data.micro_batch_size,
        activation_checkpointing=config.activation_checkpointing, dtype=config.precision,
        optimizer=config.optim.optimizer_kwargs(),
    )  # fmt: skip


def _named(where: str, build, *args, **kwargs):
    """Runs `build(*args, **kwargs)`, naming `where` in the error a config's own validation raises."""
    try:
        return build(*args, **kwargs)
    except (ValueError, TypeError) as e:
        raise ValueError(f"{where}: {e}") from None


# --- loading ------------------------------------------------------------------------------


def _format(error: ValidationError) -> str:
    lines = []
    for e in error.errors():
        loc = e["loc"]
        if loc[:1] == ("design",) and len(loc) > 2:  # pydantic names the union's member: design.ladder.sizes
            loc = loc[:1] + loc[2:]
        where = ".".join(str(part) for part in loc)
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
