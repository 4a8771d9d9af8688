"""Where a training run reports to and checkpoints into: its edge (lipnext.train).

LocalSession runs without Ray (the console and a local directory); RaySession
reports through Ray Train or Ray Tune and hands checkpoints to Ray, which puts
them in the run's storage.
"""

import contextlib
import logging
import tempfile
from pathlib import Path

from lipnext import checkpoint
from lipnext.train_config import CheckpointConfig

log = logging.getLogger("lipnext.session")


class LocalSession:
    """No Ray: metrics go to the log (rank 0), checkpoints to config.checkpoint.dir."""

    def __init__(self, config: CheckpointConfig):
        self.config = config
        self.history: list[dict] = []
        self.artifact_dir = Path(config.dir) if config.dir else None
        """Where a run's findings go (the points of an unsound certificate); None: nowhere."""

    @contextlib.contextmanager
    def checkpoint_to_restore(self):
        yield checkpoint.latest(self.config.dir) if self.config.dir and Path(self.config.dir).exists() else None

    @contextlib.contextmanager
    def checkpoint_dir(self, step: int):
        yield Path(self.config.dir) / f"step_{step:09d}" if self.config.dir else None

    def report(self, metrics: dict, saved: Path | None) -> None:
        self.history.append(metrics)
        if saved is not None:
            checkpoint.prune(self.config.dir, self.config.keep)


class RaySession:
    """Inside Ray: report through `api`, checkpoints handed to Ray, which merges
    the ranks' shard files into the run's storage. `api` is ray.train in a Ray
    Train worker (the default), ray.tune in a Tune trial that trains in its own
    process (no worker group to start). `artifact_dir`: where a run's findings go (a
    Tune trial's directory; Ray Train v2 workers have none to ask for)."""

    def __init__(self, api=None, artifact_dir: Path | None = None):
        if api is None:
            import ray.train as api
        self.api, self.artifact_dir = api, artifact_dir

    @contextlib.contextmanager
    def checkpoint_to_restore(self):
        """Ray's latest checkpoint, or the newest older one kept beside it when that one
        fails verification (a truncated or corrupt upload); None if none verifies."""
        for candidate in _newest_first(self.api.get_checkpoint()):
            with candidate.as_directory() as directory:
                try:
                    checkpoint.verify(directory)
                except checkpoint.CheckpointError as e:
                    log.warning("passing over a bad checkpoint: %s", e)
                    continue
                yield Path(directory)
                return
        yield None

    @contextlib.contextmanager
    def checkpoint_dir(self, step: int):
        with tempfile.TemporaryDirectory(prefix=f"lipnext-step{step}-") as directory:
            yield Path(directory)

    def report(self, metrics: dict, saved: Path | None) -> None:
        self.api.report(metrics, checkpoint=self.api.Checkpoint.from_directory(saved) if saved else None)


def _newest_first(registered) -> list:
    """Ray's checkpoint and the older ones it keeps in the same folder (CheckpointConfig's
    num_to_keep: Ray only hands back the latest), newest first."""
    if registered is None:
        return []
    import pyarrow.fs

    folder, name = registered.path.rstrip("/").rsplit("/", 1)
    siblings = registered.filesystem.get_file_info(pyarrow.fs.FileSelector(folder))
    older = sorted(
        (i.path for i in siblings if i.type == pyarrow.fs.FileType.Directory and i.base_name.startswith("checkpoint_")
         and i.base_name < name),
        reverse=True,
    )  # fmt: skip
    return [registered] + [type(registered)(path, filesystem=registered.filesystem) for path in older]
