"""The search space of a study: which fields of a trial's config it may search, how
a searched parameter is written (a list of choices, or a range {low, high, log,
step}), and the values of it that the spec's checks build.

A parameter is a dotted path into the trial's TrainConfig (`model.width`,
`optim.lr`, ...), one of its sections' scalar fields; the field's own type and
checks (lipnext.config, lipnext.train_config) are the only declaration of what
it may hold.
"""

from types import UnionType
from typing import Literal, Union, get_args, get_origin, get_type_hints

from lipnext.config import LipNeXtConfig
from lipnext.train_config import DataConfig, LossConfig, OptimConfig

SECTIONS = {"model": LipNeXtConfig, "optim": OptimConfig, "loss": LossConfig, "data": DataConfig}
"""The parts of a trial's TrainConfig that a space may search."""
NOT_SEARCHED = {"model.image_size", "model.in_channels", "model.num_classes", "data.uri", "data.prefetch"}
"""Fields the dataset or the runner decides."""
MAX_SHAPES = 1_000_000
"""Model shapes the space may produce; each one is built (cheap: a dataclass) to check it."""
SCALARS = (int, float, str, bool)
"""What an Optuna distribution can hold (a tuple field cannot be one choice)."""


def scalar(kind) -> type | None:
    """The scalar type a field of type `kind` holds: int, float, str or bool, that of a
    Literal's values, or the one besides None of an Optional; None for any other type."""
    union = get_origin(kind) in (Union, UnionType)  # `str | None`, and `Literal[...] | None` (a typing.Union)
    options = [k for k in get_args(kind) if k is not type(None)] if union else [kind]
    found = set()
    for option in options:
        if get_origin(option) is Literal:
            found |= {type(value) for value in get_args(option)}
        else:
            found.add(option)
    return found.pop() if len(found) == 1 and found <= set(SCALARS) else None


def searchable(sections: dict[str, type] = SECTIONS) -> dict[str, type]:
    """Dotted path -> field type of every scalar field of the sections that a space may search."""
    return {
        f"{section}.{name}": kind
        for section, cls in sections.items()
        for name, kind in get_type_hints(cls).items()
        if scalar(kind) is not None and f"{section}.{name}" not in NOT_SEARCHED
    }


SEARCHABLE = searchable()


def check_param(path: str, values: list | dict, section: str = "space") -> None:
    """That a searched parameter is well formed: distinct choices, or a range that Optuna
    can sample. Raises ValueError("<section>.<path>: ..."): the space's, or a design's sweep."""
    kind, where = scalar(SEARCHABLE[path]), f"{section}.{path}"
    if isinstance(values, list):
        if not values:
            raise ValueError(f"{where}: no choices")
        if len(set(map(repr, values))) < len(values):
            raise ValueError(f"{where}: repeated choices {values}")
        return
    low, high, step = values["low"], values["high"], values.get("step")
    if kind not in (int, float):
        raise ValueError(f"{where}: a range needs a numeric field; give a list of choices")
    if kind is int and not all(isinstance(v, int) for v in (low, high, step or 1)):
        raise ValueError(f"{where}: an integer field needs integer low, high and step")
    if not low < high:
        raise ValueError(f"{where}: low {low} must be below high {high}")
    if values["log"] and low <= 0:
        raise ValueError(f"{where}: a log range needs low > 0, got {low}")
    if values["log"] and step is not None and kind is float:
        raise ValueError(f"{where}: a float range is either log or stepped, not both")
    if step is not None and step <= 0:
        raise ValueError(f"{where}: step must be positive, got {step}")


def param_grid(path: str, values: list | dict) -> list:
    """The values of a searched parameter that the checks build: all of a finite set, the
    ends of a continuous range."""
    if isinstance(values, list):
        return values
    step = values.get("step") or (1 if is_int(path) else None)
    if path.startswith("model.") and step is None:
        raise ValueError(
            f"space.{path}: a continuous range gives channel counts that are not whole numbers; "
            "give choices or a step"
        )
    if step is None:
        return [values["low"], values["high"]]
    count = int((values["high"] - values["low"]) / step + 1e-9) + 1
    return [values["low"] + i * step for i in range(count)]


def is_int(path: str) -> bool:
    """Whether a searchable field holds integers (its range steps by 1 unless told)."""
    return scalar(SEARCHABLE[path]) is int
