"""What a converter hands the shard writer (lipscale.data.shards): a Plan of Parts,
each a shard's worth of images and labels, loaded only when it is written. Plain
dataclasses, so the `shapes` generator's config (which the command line declares
its options from) imports nothing heavy.
"""

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Part:
    """One shard to write. `load()` returns its images, uint8 (count, C, H, W),
    and labels (count,). `key` names exactly what they will be (the source
    slice and the options), so a rerun can keep a finished shard instead of
    converting it again. `load` must pickle (a functools.partial of a module
    function) when the writer runs several processes."""

    key: str
    count: int
    load: Callable[[], tuple[np.ndarray, np.ndarray]]


@dataclass(frozen=True)
class Plan:
    """What a converter hands the writer, after checking its whole source."""

    name: str
    shape: tuple[int, int, int]
    classes: tuple[str, ...]
    encoding: str
    splits: dict[str, list[Part]]
