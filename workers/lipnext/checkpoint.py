"""DCP checkpoints of a training run.

One Stateful holds everything a restarted worker group needs to continue
bit for bit: model and optimizer (manifold moments, Lookahead and EMA state
included, resharded by DCP if the world size changed), learning-rate
schedule, loader position, RNG and progress. Only this module calls
dcp.save / dcp.load.
"""

import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.checkpoint.stateful import Stateful

METADATA = ".metadata"  # DCP writes it last, on the coordinator: a directory without it is incomplete


@dataclass
class Progress:
    epoch: int = 0
    """Epochs completed."""
    step: int = 0
    """Optimizer steps taken."""


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


class TrainingState(Stateful):
    def __init__(self, model, optimizer, schedule, loader, progress: Progress):
        self.model, self.optimizer, self.schedule = model, optimizer, schedule
        self.loader, self.progress = loader, progress

    def state_dict(self) -> dict:
        model, optim = get_state_dict(self.model, self.optimizer)
        # Loader position and RNG are per rank: keyed by rank so DCP's
        # de-duplication of equal keys across ranks cannot mix them up.
        rank = f"rank{_rank()}"
        return {
            "model": model,
            "optim": optim,
            "schedule": self.schedule.state_dict(),
            "loader": {rank: self.loader.state_dict()},
            "rng": {rank: torch.get_rng_state()},
            "progress": asdict(self.progress),
        }

    def load_state_dict(self, state: dict) -> None:
        set_state_dict(self.model, self.optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
        self.schedule.load_state_dict(state["schedule"])
        rank = f"rank{_rank()}"
        self.loader.load_state_dict(state["loader"][rank])
        torch.set_rng_state(state["rng"][rank])
        self.progress.epoch, self.progress.step = state["progress"]["epoch"], state["progress"]["step"]


def save(state: TrainingState, directory: str | os.PathLike) -> Path:
    """Every rank writes its shards into `directory` (local disk: Ray, or the
    caller, moves it to the run's storage; DCP straight to S3 is fragile)."""
    dcp.save({"train": state}, checkpoint_id=str(directory))
    return Path(directory)


def load(state: TrainingState, directory: str | os.PathLike) -> None:
    if not (Path(directory) / METADATA).exists():
        raise FileNotFoundError(f"{directory} is not a complete checkpoint (no {METADATA})")
    dcp.load({"train": state}, checkpoint_id=str(directory))


def latest(root: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint directory under `root`, if any."""
    complete = sorted(p.parent for p in Path(root).glob(f"*/{METADATA}"))
    return complete[-1] if complete else None


def prune(root: str | os.PathLike, keep: int) -> None:
    """Deletes all but the newest `keep` checkpoint directories under `root` (rank 0)."""
    if _rank() == 0:
        for old in sorted(p for p in Path(root).iterdir() if p.is_dir())[:-keep]:
            shutil.rmtree(old)


def load_model(model, directory: str | os.PathLike) -> None:
    """Loads just the weights of a training checkpoint into an unsharded model
    (one process, any world size at save time): for evaluation and export."""
    state = {"train": {"model": model.state_dict()}}
    dcp.load(state, checkpoint_id=str(directory))
    model.load_state_dict(state["train"]["model"])
