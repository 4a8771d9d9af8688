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

`load_spec` validates everything that can be checked without touching a
resource (types, unknown keys, every model shape the space can produce, the
planner's memory estimate of the largest trial); `check_storage` then checks
that the storage, tracking and data locations answer, creating nothing. Both
raise SpecError naming the field. `python -m lipscale.spec` writes the JSON
Schema that editors use (studies/specs/schema.json).
"""

import argparse
import ast
import inspect
import itertools
import json
import math
import os
import re
import textwrap
from types import UnionType
import urllib.error
import urllib.request
from dataclasses import asdict
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model, field_validator, model_validator

from lipnext.config import PRESETS, LipNeXtConfig, preset
from lipnext.train_config import CheckpointConfig, DataConfig, LossConfig, OptimConfig, TrainConfig

METRICS = (
    "eval/clean_acc", "eval/cra_36", "eval/cra_72", "eval/cra_108", "eval/cra_255", "train/loss",
    "perf/train_samples_per_s", "perf/eval_samples_per_s", "perf/step_time_s",
    "model/params", "model/flops_per_sample", "model/lipschitz_bound", "model/ortho_error",
)  # fmt: skip
"""The metric contract (../shared/DESIGN.md): what a trial reports and an objective may name."""

Metric = Literal[METRICS]  # type: ignore[valid-type]
DIGITS = "digits"
"""The one dataset a study converts itself (offline, from scikit-learn); others are URIs to converted shards."""
NOT_SEARCHED = {
    "model.image_size", "model.in_channels", "model.num_classes", "data.uri", "data.prefetch",
}  # fmt: skip
"""Fields the dataset or the runner decides."""
MAX_SHAPES = 1_000_000
"""Model shapes the space may produce; each one is built (cheap: a dataclass) to check it."""
RUNNER_OWNED = {"fixed": {"data": {"uri"}, "checkpoint": {"dir"}}}
"""Fields of the fixed settings that the runner sets: the data from `dataset`, checkpoints under the root."""
GIB = 2**30
_PASSWORD = re.compile(r"(://[^/@\s:]*):[^/@\s]*@")
"""The password of a URL's user info: scheme://user:PASSWORD@host."""


class SpecError(ValueError):
    """A spec that cannot run; the message names the field."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)


def redact(text: str) -> str:
    """`text` with the password of every URL in it replaced by ***: for anything that prints or
    logs a URL (credentials belong in the environment or files: PGPASSFILE, MLFLOW_TRACKING_PASSWORD,
    AWS_*, but a URL may still carry one)."""
    return _PASSWORD.sub(r"\1:***@", text)


def _attribute_docs(cls) -> dict[str, str]:
    """The docstrings under a dataclass's fields, for the JSON Schema."""
    body = ast.parse(textwrap.dedent(inspect.getsource(cls))).body[0].body
    return {
        a.target.id: " ".join(b.value.value.split())
        for a, b in itertools.pairwise(body)
        if isinstance(a, ast.AnnAssign) and isinstance(b, ast.Expr) and isinstance(b.value, ast.Constant)
    }


SECTIONS = {"model": LipNeXtConfig, "optim": OptimConfig, "loss": LossConfig, "data": DataConfig}
"""The parts of a trial's TrainConfig that a space may search."""


def _searchable() -> dict[str, type]:
    """Dotted path -> type of every scalar field of the sections (tuples cannot be Optuna choices)."""
    found = {}
    for section, cls in SECTIONS.items():
        for name, kind in get_type_hints(cls).items():
            union = get_origin(kind) in (Union, UnionType)  # `int | None`, or `Optional[Literal[...]]`
            scalars = [k for k in get_args(kind) if k is not type(None)] if union else [kind]
            scalar = all(k in (int, float, str, bool) or get_origin(k) is Literal for k in scalars)
            if scalar and f"{section}.{name}" not in NOT_SEARCHED:
                found[f"{section}.{name}"] = kind
    return found


SEARCHABLE = _searchable()


# --- sections -----------------------------------------------------------------------------


class Storage(_Strict):
    root: str | None = None
    """Study root: a path or s3:// URI holding Ray Tune's trials and checkpoints, results.parquet
    and (locally) the SQLite stores. Default runs/<name> under the working directory."""
    optuna: str | None = None
    """Optuna storage URL (sqlite:///..., postgresql://...). Default sqlite:///<root>/optuna.db."""
    mlflow: str | None = None
    """MLflow tracking URI (sqlite:///..., http://...). Default sqlite:///<root>/mlflow.db."""


class Dataset(_Strict):
    name: str
    """'digits' (converted under the study root on first use) or the name of converted shards."""
    uri: str | None = None
    """Converted shards (`lipscale data convert`): a path or s3:// URI. Required except for digits."""


class Range(_Strict):
    low: int | float
    high: int | float
    log: bool = False
    """Sample uniformly in log space."""
    step: int | float | None = None
    """Quantisation; integer fields step by 1 unless told."""


def _space_model() -> type[BaseModel]:
    docs = {f"{section}.{k}": v for section, cls in SECTIONS.items() for k, v in _attribute_docs(cls).items()}
    return create_model(
        "Space",
        __config__=ConfigDict(extra="forbid"),
        __doc__="Parameters to search: a list of choices, or a range {low, high, log, step}.",
        **{
            path.replace(".", "__"): (list[kind] | Range | None, Field(None, alias=path, description=docs.get(path)))
            for path, kind in SEARCHABLE.items()
        },
    )


def _model_overrides() -> type[BaseModel]:
    docs = _attribute_docs(LipNeXtConfig)
    return create_model(
        "ModelOverrides",
        __config__=ConfigDict(extra="forbid"),
        __doc__="A preset's shape, with some fields replaced.",
        preset=(Literal[tuple(PRESETS)], Field(description="Base shape: one of lipnext.config.PRESETS.")),
        **{
            name: (kind | None, Field(None, description=docs.get(name)))
            for name, kind in get_type_hints(LipNeXtConfig).items()
        },
    )


Space = _space_model()
ModelOverrides = _model_overrides()


class Fixed(_Strict):
    """Settings every trial shares; the space's parameters are applied on top."""

    model: ModelOverrides
    optim: OptimConfig = OptimConfig()
    loss: LossConfig = LossConfig()
    data: DataConfig = DataConfig()
    """Batch (global, split over the workers) and augmentation; the URI comes from `dataset`."""
    checkpoint: CheckpointConfig = CheckpointConfig(keep=1)
    """Period and number kept (Ray's num_to_keep); checkpoints go to the study root."""
    eval_every_epochs: int = Field(1, ge=1)
    """Evaluate certified accuracy every k epochs, and always after the last."""
    precision: Literal["fp32", "bf16"] = "fp32"
    device: Literal["auto", "cpu", "cuda"] = "auto"

    @field_validator("data", "checkpoint", mode="before")
    @classmethod
    def _runner_owns(cls, value, info):
        (owned,) = RUNNER_OWNED["fixed"][info.field_name]
        if isinstance(value, dict) and owned in value:
            raise ValueError(f"{owned} is set by the runner (data: `dataset`; checkpoints: the study root)")
        return value


class Budget(_Strict):
    trials: int = Field(ge=1)
    """Trials in the study; a resumed study fills up to it."""
    max_concurrent: int = Field(1, ge=1)
    """Trials running at once (always enforced: Ray Train's placement groups are outside Tune's accounting)."""
    epochs: int = Field(ge=1)
    """Epochs of every trial (ASHA may stop a trial earlier)."""
    workers_per_trial: int = Field(1, ge=1)
    """Ranks of a trial; above 1 a Ray Train worker group shards the model with FSDP2."""
    cpus_per_worker: float = Field(1, gt=0)
    gpus_per_worker: float = Field(0, ge=0)
    memory_per_worker_gib: float | None = Field(None, gt=0)
    """Memory a worker's train step may use (GPU: its memory less the CUDA context). When given,
    the planner refuses a space whose largest trial does not fit, before anything starts."""
    max_failures: int = Field(1, ge=0)
    """Restarts of a failed trial from its last checkpoint."""
    launcher: Literal["auto", "ray_train"] = "auto"
    """'auto': a one-worker trial trains inside its Tune trial process (no worker group to start,
    ~12-16 s saved per trial); 'ray_train': always a Ray Train TorchTrainer."""


class Scheduler(_Strict):
    kind: Literal["asha", "fifo"] = "asha"
    """'asha': stop trials that trail at each rung; 'fifo': run every trial to the end."""
    metric: Metric | None = None
    """Default: the (first) objective's metric."""
    direction: Literal["maximize", "minimize"] | None = None
    """Default: the objective's direction; needed when the metric is not an objective."""
    grace_period: int = Field(1, ge=1)
    """Epochs before ASHA may stop a trial."""
    reduction_factor: float = Field(3, gt=1)


class Objective(_Strict):
    metric: Metric
    direction: Literal["maximize", "minimize"]


# --- the spec -----------------------------------------------------------------------------


class Spec(_Strict):
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
        self.storage.root = root if "://" in root else os.path.abspath(root)
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
        f = self.fixed
        overrides = f.model.model_dump(exclude_none=True)
        model = preset(overrides.pop("preset"), **overrides).to_dict()
        tree = {
            "model": model, "optim": asdict(f.optim), "loss": asdict(f.loss),
            "data": asdict(f.data) | {"uri": self.data_uri}, "checkpoint": asdict(f.checkpoint),
            "epochs": self.budget.epochs, "eval_every_epochs": f.eval_every_epochs,
            "seed": self.seed, "precision": f.precision, "device": f.device,
        }  # fmt: skip
        for path, value in params.items():
            section, name = path.split(".")
            tree[section][name] = value
        return TrainConfig.from_dict(tree)

    def _raw(self) -> dict:
        return self.model_dump(by_alias=True, exclude_none=True, exclude=RUNNER_OWNED)

    def with_root(self, root: str) -> "Spec":
        """This spec with another study root (the default stores follow it)."""
        raw = self._raw()
        raw["storage"]["root"] = root
        return parse_spec(raw, "--root")

    def smoke_test(self) -> "Spec":
        """Two one-epoch trials of this spec on one CPU worker each, as study <name>-smoke: seconds."""
        changes = dict(trials=2, max_concurrent=2, epochs=1, workers_per_trial=1, gpus_per_worker=0)
        raw = self._raw()
        raw["name"] = f"{self.name}-smoke"
        if self.storage.root:
            raw["storage"]["root"] = f"{self.storage.root.rstrip('/')}-smoke"
        raw["budget"] = {**raw["budget"], **changes, "memory_per_worker_gib": None}
        raw["fixed"]["device"] = "cpu"
        raw["scheduler"]["grace_period"] = 1
        return parse_spec(raw, "--smoke-test")

    # Checks, each raising ValueError("<field>: <reason>").

    def _check_storage_urls(self):
        if self.root.startswith("s3://"):
            for name in ("optuna", "mlflow"):
                if getattr(self.storage, name) is None:
                    raise ValueError(
                        f"storage.{name}: an s3:// root has no local path for the default SQLite file; "
                        "give a URL (a server, or sqlite:////an/absolute/path)"
                    )
        elif "://" in self.root and not self.root.startswith("file://"):
            raise ValueError(f"storage.root: {self.root!r} is neither a path nor an s3:// URI")
        schemes = {"optuna": ("sqlite", "postgresql", "mysql"), "mlflow": ("sqlite", "http", "https", "postgresql",
                                                                           "mysql", "databricks", "file")}  # fmt: skip
        for name, url in (("optuna", self.optuna_url), ("mlflow", self.mlflow_uri)):
            scheme = url.split(":", 1)[0].split("+", 1)[0]
            if scheme not in schemes[name]:
                raise ValueError(f"storage.{name}: {url!r} is not a URL of {', '.join(schemes[name])}")

    def _check_dataset(self):
        if self.dataset.name != DIGITS and self.dataset.uri is None:
            raise ValueError(
                f"dataset.uri: required for {self.dataset.name!r} (convert it first: "
                f"`lipscale data convert {self.dataset.name} SOURCE DEST`); only digits is converted by the study"
            )

    def _check_space(self):
        params = self.params
        if not params:
            raise ValueError("space: empty; a study searches at least one parameter")
        for path, values in params.items():
            kind = SEARCHABLE[path]
            if isinstance(values, list):
                if not values:
                    raise ValueError(f"space.{path}: no choices")
                if len(set(map(repr, values))) < len(values):
                    raise ValueError(f"space.{path}: repeated choices {values}")
                continue
            low, high, step = values["low"], values["high"], values.get("step")
            if kind not in (int, float):
                raise ValueError(f"space.{path}: a range needs a numeric field; give a list of choices")
            if kind is int and not all(isinstance(v, int) for v in (low, high, step or 1)):
                raise ValueError(f"space.{path}: an integer field needs integer low, high and step")
            if not low < high:
                raise ValueError(f"space.{path}: low {low} must be below high {high}")
            if values["log"] and low <= 0:
                raise ValueError(f"space.{path}: a log range needs low > 0, got {low}")
            if values["log"] and step is not None and kind is float:
                raise ValueError(f"space.{path}: a float range is either log or stepped, not both")
            if step is not None and step <= 0:
                raise ValueError(f"space.{path}: step must be positive, got {step}")

    def _values(self, path: str) -> list:
        """The values of a searched parameter that the checks build: all of a finite set, the ends of a range."""
        values = self.params[path]
        if isinstance(values, list):
            return values
        step = values.get("step") or (1 if SEARCHABLE[path] is int else None)
        if path.startswith("model.") and step is None:
            raise ValueError(
                f"space.{path}: a continuous range gives channel counts that are not whole numbers; "
                "give choices or a step"
            )
        if step is None:
            return [values["low"], values["high"]]
        count = int((values["high"] - values["low"]) / step + 1e-9) + 1
        return [values["low"] + i * step for i in range(count)]

    def _check_shapes(self):
        """Builds every model shape the space can produce, and every other value on its own."""
        model_paths = [p for p in self.params if p.startswith("model.")]
        for path in self.params:
            if path not in model_paths:
                for value in self._values(path):
                    _named(f"space.{path}", self.train_config, {path: value})
        grids = [self._values(p) for p in model_paths]
        if (count := math.prod(len(g) for g in grids)) > MAX_SHAPES:
            raise ValueError(f"space: {count:,} model shapes (over {MAX_SHAPES:,}); give fewer choices or larger steps")
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


def load_spec(path: str | os.PathLike) -> Spec:
    """Reads and validates a spec file; raises SpecError naming the field. Touches nothing else.
    A spec that names no MLflow store takes MLFLOW_TRACKING_URI's, as MLflow's own clients do."""
    try:
        raw = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as e:
        raise SpecError(f"{path}: {e}") from None
    tracking = os.environ.get("MLFLOW_TRACKING_URI")
    if tracking and isinstance(raw, dict) and isinstance(raw.get("storage", {}), dict):
        raw["storage"] = {"mlflow": tracking, **raw.get("storage", {})}  # the spec's own wins
    return parse_spec(raw, str(path))


# --- reachability: creates nothing -----------------------------------------------------------


def check_storage(spec: Spec) -> None:
    """That the study root, the Optuna and MLflow stores and the data can be reached, without
    creating any of them; raises SpecError naming the field."""
    for field, check, location in (
        ("storage.root", _check_location, spec.root),
        ("storage.optuna", _check_url, spec.optuna_url),
        ("storage.mlflow", _check_url, spec.mlflow_uri),
    ):
        if problem := check(location):
            raise SpecError(redact(f"{field}: {problem}"))
    for field, problem in _check_data(spec):
        raise SpecError(redact(f"{field}: {problem}"))


def _check_location(location: str) -> str | None:
    if location.startswith("s3://"):
        import s3fs

        bucket = location.removeprefix("s3://").split("/", 1)[0]
        try:
            # Not exists(): it answers False for an endpoint that does not answer at all.
            s3fs.S3FileSystem().ls(bucket)
        except FileNotFoundError:
            return f"bucket {bucket!r} does not exist"
        except Exception as e:  # s3fs raises many kinds, all meaning "cannot reach it"
            return f"cannot reach {location}: {e}"
        return None
    path = Path(location.removeprefix("file://"))
    if path.exists():
        return None if os.access(path, os.W_OK) else f"{path} is not writable"
    while not path.exists():
        path = path.parent
    if not path.is_dir() or not os.access(path, os.W_OK):
        return f"{location} cannot be created: {path} is not a writable directory"
    return None


def _check_url(url: str) -> str | None:
    scheme = url.split(":", 1)[0].split("+", 1)[0]
    if scheme == "sqlite":
        return _check_location(url.removeprefix("sqlite:///")) if url != "sqlite://" else None
    if scheme == "file":
        return _check_location(url.removeprefix("file://"))
    if scheme in ("http", "https"):
        try:
            urllib.request.urlopen(f"{url.rstrip('/')}/health", timeout=5)
        except urllib.error.HTTPError:
            pass  # it answered
        except OSError as e:
            return f"{url} does not answer: {e}"
        return _check_tracking_login(url)
    if scheme == "databricks":
        return None
    import sqlalchemy

    try:
        with sqlalchemy.create_engine(url).connect():
            return None
    except Exception as e:  # drivers raise their own kinds
        return f"cannot connect to {url}: {e}"


def _check_tracking_login(url: str) -> str | None:
    """That the tracking server lets this client read (with MLFLOW_TRACKING_USERNAME/PASSWORD
    where it authenticates): a refused login stops the study before its Optuna study exists."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    try:
        MlflowClient(url).search_experiments(max_results=1)
    except MlflowException as e:
        return f"{url} refuses this client (MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD?): {e.message[:300]}"
    return None


def _check_data(spec: Spec) -> list[tuple[str, str]]:
    """The data exists (unless the study converts digits) and its images and classes fit the model."""
    from lipnext.data import DataError, open_dataset
    from lipscale.data.convert import plan

    try:
        manifest = open_dataset(spec.data_uri).manifest
        shape, classes = tuple(manifest.shape), len(manifest.classes)
    except Exception as e:  # DataError, OSError, fsspec's ValueError for an unknown protocol, botocore's own
        if spec.dataset.name != DIGITS:
            return [("dataset.uri", f"no converted dataset at {spec.data_uri}: {e}")]
        digits = plan(DIGITS)
        shape, classes = digits.shape, len(digits.classes)
    if problem := spec.train_config({}).model.data_mismatch(shape, classes):
        return [("fixed.model", f"{spec.dataset.name} {problem}")]
    return []


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
