"""The sections of a study spec (lipscale.spec): storage, dataset, design, space,
fixed, budget, scheduler, objective, each a pydantic model that refuses unknown keys.

`fixed` is a trial's TrainConfig (lipnext.train_config) less what the spec
gives elsewhere: its fields, defaults, allowed values and checks are the
dataclasses' own, and the schema's descriptions are their attribute
docstrings, read by pydantic. The space's parameters and the model's
overrides take their types and descriptions from the same dataclasses.
"""

import dataclasses
from typing import Annotated, Literal, get_type_hints

from pydantic import BaseModel, ConfigDict, Field, create_model, field_validator, model_validator

from lipnext.config import PRESETS, LipNeXtConfig, preset
from lipnext.metrics import CONTRACT
from lipnext.train_config import CheckpointConfig, TrainConfig
from lipscale.space import SEARCHABLE, SECTIONS

Metric = Literal[CONTRACT]  # type: ignore[valid-type]
"""What an objective or the scheduler may name: the metric contract (lipnext.metrics)."""
ELSEWHERE = ("model", "epochs", "seed")
"""TrainConfig fields that `fixed` leaves to the rest of the spec: the model as a preset with
overrides, epochs in the budget, the seed at the top (it seeds the sampler too)."""
STUDY_DEFAULTS = {"checkpoint": CheckpointConfig(keep=1)}
"""Where a study's trial defaults differ from a lone run's: one checkpoint kept per trial (the
latest, which a resumed trial restarts from; Ray deletes the older ones)."""
RUNNER_OWNED = {"fixed": {"data": {"uri"}, "checkpoint": {"dir"}}}
"""Fields of the fixed settings that the runner sets: the data from `dataset`, checkpoints under the root."""
SECTION_NOTES = {
    "data": "Batch (global, split over the workers) and augmentation; the URI comes from `dataset`.",
    "checkpoint": "Period and number kept (Ray's num_to_keep); checkpoints go to the study root.",
}
"""What the schema says of the sections whose runner-owned fields the spec leaves out."""


class Strict(BaseModel):
    """A section: unknown keys are refused; the docstrings under fields are the schema's descriptions."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)


def field_docs(cls) -> dict[str, str]:
    """The docstrings under a dataclass's fields, as pydantic reads them for a schema."""
    holder = create_model("Holder", __base__=Strict, value=(cls, ...))
    properties = holder.model_json_schema()["$defs"][cls.__name__]["properties"]
    return {name: p["description"] for name, p in properties.items() if "description" in p}


class Storage(Strict):
    root: str | None = None
    """Study root: a path or s3:// URI holding Ray Tune's trials and checkpoints, results.parquet
    and (locally) the SQLite stores. Default runs/<name> under the working directory."""
    optuna: str | None = None
    """Optuna storage URL (sqlite:///..., postgresql://...). Default sqlite:///<root>/optuna.db."""
    mlflow: str | None = None
    """MLflow tracking URI (sqlite:///..., http://...). Default sqlite:///<root>/mlflow.db."""


class Dataset(Strict):
    name: str
    """'digits' or 'shapes' (generated: converted under the study root on first use), or the name
    of converted shards."""
    uri: str | None = None
    """Converted shards (`lipscale data convert`): a path or s3:// URI. Required except for the
    generated datasets."""
    options: dict[str, int | float] = {}
    """A generated dataset's options, as `lipscale data convert NAME --help` lists them (shapes:
    train, test, num_classes, seed, ...)."""


class Range(Strict):
    low: int | float
    high: int | float
    log: bool = False
    """Sample uniformly in log space."""
    step: int | float | None = None
    """Quantisation; integer fields step by 1 unless told."""


def _space_model() -> type[BaseModel]:
    docs = {f"{section}.{k}": v for section, cls in SECTIONS.items() for k, v in field_docs(cls).items()}
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
    docs = field_docs(LipNeXtConfig)
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


class _FixedChecks(Strict):
    """What Fixed checks besides its fields' own types and dataclass checks."""

    @field_validator("data", "checkpoint", mode="before", check_fields=False)
    @classmethod
    def _runner_owns(cls, value, info):
        (owned,) = RUNNER_OWNED["fixed"][info.field_name]
        if isinstance(value, dict) and owned in value:
            raise ValueError(f"{owned} is set by the runner (data: `dataset`; checkpoints: the study root)")
        return value

    @model_validator(mode="after")
    def _trial_checks(self):
        # TrainConfig's own checks of its top-level fields (eval_every_epochs, precision, ...),
        # on the preset's shape: the overrides are checked with every shape the space gives.
        kept = {name: getattr(self, name) for name in type(self).model_fields if name != "model"}
        TrainConfig(model=preset(self.model.preset), **kept)
        return self


def _fixed_model() -> type[BaseModel]:
    """TrainConfig's fields less ELSEWHERE, with their types, defaults and descriptions; the
    model as a preset with overrides."""
    hints, docs = get_type_hints(TrainConfig), field_docs(TrainConfig)
    fields = {}
    for f in dataclasses.fields(TrainConfig):
        if f.name in ELSEWHERE:
            continue
        default = f.default if f.default_factory is dataclasses.MISSING else f.default_factory()
        default = STUDY_DEFAULTS.get(f.name, default)
        fields[f.name] = (hints[f.name], Field(default, description=SECTION_NOTES.get(f.name, docs.get(f.name))))
    return create_model(
        "Fixed",
        __base__=_FixedChecks,
        __doc__="Settings every trial shares; the space's parameters are applied on top.",
        model=(ModelOverrides, ...),
        **fields,
    )


Fixed = _fixed_model()


class Budget(Strict):
    trials: int | None = Field(None, ge=1)
    """Trials of a search; a resumed study fills up to it. A ladder or IsoFLOP design's trials are
    its points: leave it out."""
    max_concurrent: int = Field(1, ge=1)
    """Trials running at once (always enforced: Ray Train's placement groups are outside Tune's accounting)."""
    epochs: int | None = Field(None, ge=1)
    """Epochs of every trial of a search or ladder (ASHA may stop a trial earlier); an IsoFLOP
    design sets each trial's from its FLOP budget."""
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


class Scheduler(Strict):
    kind: Literal["asha", "fifo"] = "asha"
    """'asha': stop trials that trail at each rung; 'fifo': run every trial to the end."""
    metric: Metric | None = None
    """Default: the (first) objective's metric."""
    direction: Literal["maximize", "minimize"] | None = None
    """Default: the objective's direction; needed when the metric is not an objective."""
    grace_period: int = Field(1, ge=1)
    """Epochs before ASHA may stop a trial."""
    reduction_factor: float = Field(3, gt=1)


class Size(Strict):
    """A model size of a ladder or IsoFLOP design: a width at a depth, or a parameter count at a depth."""

    depth: int = Field(ge=1)
    width: int | None = Field(None, ge=1)
    params: float | None = Field(None, gt=0)
    """All parameters (stem, blocks, head) in place of a width: the width is the one, among those
    the shift groups and beta split, whose model's count lies nearest."""

    @model_validator(mode="after")
    def _one_of(self):
        if (self.width is None) == (self.params is None):
            raise ValueError("give a width or a parameter count (params), not both")
        return self


class SearchDesign(Strict):
    """Optuna samples the space, the scheduler (ASHA) stops trials that trail: a hyper-parameter
    search. Only the trials that reached the full budget feed a law."""

    kind: Literal["search"]


class LadderDesign(Strict):
    """Every size trained to the full budget at every point of a small sweep (a grid): the law is
    fitted to each size's best (the envelope). ASHA, if chosen, compares trials of one size only."""

    kind: Literal["ladder"]
    sizes: list[Size] = Field(min_length=1)
    sweep: Space = Field(default_factory=Space)
    """Settings tried at every size, each a list of values (a grid): optim.lr at least, say."""


class IsoFLOPDesign(Strict):
    """Fixed training-FLOP budgets; at each, every size trained for the epochs that exhaust it
    (Chinchilla's approach 2): IsoFLOP curves, the compute-optimal size per budget, the frontier."""

    kind: Literal["isoflop"]
    budgets: list[float] = Field(min_length=2)
    """Training FLOPs per trial (model/flops_per_sample x samples seen)."""
    sizes: list[Size] = Field(min_length=3)
    sweep: Space = Field(default_factory=Space)
    """Settings tried at every size and budget, each a list of values (a grid)."""
    min_epochs: int = Field(4, ge=1)
    """At each budget, the sizes that train at least this many whole epochs there; whole epochs
    put a trial's compute within 1 / (2 min_epochs) of its budget (12.5% at 4)."""


Design = Annotated[SearchDesign | LadderDesign | IsoFLOPDesign, Field(discriminator="kind")]
"""How a study chooses its trials: `kind` selects one."""


class Objective(Strict):
    metric: Metric
    direction: Literal["maximize", "minimize"]
