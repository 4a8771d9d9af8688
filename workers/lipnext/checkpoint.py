"""DCP checkpoints of a training run.

One Stateful holds everything a restarted worker group needs to continue
bit for bit: model and optimizer (manifold moments, Lookahead and EMA state
included, resharded by DCP if the world size changed), learning-rate
schedule, loader position, RNG and progress. Only this module calls
dcp.save / dcp.load.

A checkpoint rebuilds its model from nothing else: rank 0 writes the run's
TrainConfig (config.json) into every checkpoint, and into the final one a
weights-only export (model.pt: the full fp32 state dict; 12% of a digits
checkpoint, whose shards also hold the optimizer's moments, slow weights and
step sums). `load_model(directory)` reads the export, or the model's part of
the DCP shards where there is none; `EXPORT` names the export's files (what
the platform copies to a model registry such as MLflow).

A checkpoint is complete when every rank's checksum file is there: after
DCP has written its shards (and rank 0 the metadata, config and export), each
rank records the size and sha256 of the files it wrote, as DCP's writer
reports them (not a guess at DCP's file names). A truncated or corrupt
checkpoint fails `verify` before DCP reads a byte of it. On restore each rank
hashes only its share (`verified_everywhere`: the files of one saving rank,
~1/world of the checkpoint, where each rank hashing everything was ~21 GB per
rank at 1B) and the ranks agree on the verdict, so `latest` (and the Ray edge,
lipnext.session.RaySession) pass over a checkpoint that any rank found bad, all
ranks together, to the newest one that every rank verified.
"""

import hashlib
import json
import logging
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemWriter
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_state_dict,
)
from torch.distributed.checkpoint.stateful import Stateful

from lipnext import ranks
from lipnext.model import LipNeXt
from lipnext.train_config import TrainConfig

METADATA = ".metadata"  # DCP writes it last, on the coordinator
CHECKSUMS = "checksums-rank{rank}.json"
"""Written by each rank after its shards: {file: [size, sha256]}; rank 0's also holds the world size."""
CONFIG = "config.json"
"""The run's TrainConfig.to_dict(), in every checkpoint."""
MODEL = "model.pt"
"""The model's full fp32 state dict (torch.save), in the final checkpoint."""
EXPORT = (CONFIG, MODEL)
"""The files that rebuild the trained model: all of a checkpoint that a model registry needs."""

log = logging.getLogger("lipnext.checkpoint")


class CheckpointError(Exception):
    """A checkpoint that is incomplete, truncated or corrupt; the message names the file."""


@dataclass
class Progress:
    epoch: int = 0
    """Epochs completed."""
    step: int = 0
    """Optimizer steps taken."""


class TrainingState(Stateful):
    def __init__(self, model, optimizer, schedule, loader, progress: Progress):
        self.model, self.optimizer, self.schedule = model, optimizer, schedule
        self.loader, self.progress = loader, progress

    def state_dict(self) -> dict:
        model, optim = get_state_dict(self.model, self.optimizer)
        # Loader position and RNG are per rank: keyed by rank so DCP's
        # de-duplication of equal keys across ranks cannot mix them up.
        rank = f"rank{ranks.rank()}"
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
        rank = f"rank{ranks.rank()}"
        self.loader.load_state_dict(state["loader"][rank])
        torch.set_rng_state(state["rng"][rank])
        self.progress.epoch, self.progress.step = state["progress"]["epoch"], state["progress"]["step"]


class _Writer(FileSystemWriter):
    """DCP's file writer, remembering the files this rank wrote (its write results)."""

    def write_data(self, plan, planner):
        written = super().write_data(plan, planner)
        self.files = sorted({result.storage_data.relative_path for result in written.wait()})
        return written


def save(state: TrainingState, directory: str | os.PathLike, config: TrainConfig, export: bool = False) -> Path:
    """Every rank writes its shards into `directory` (local disk: Ray, or the
    caller, moves it to the run's storage; DCP straight to S3 is fragile), rank 0
    the config and, with `export`, the weights-only model.pt; then each its checksums."""
    directory = Path(directory)
    writer = _Writer(directory)
    dcp.save({"train": state}, storage_writer=writer)
    rank = ranks.rank()
    if export:  # a collective under FSDP2: the full tensors arrive on rank 0, on its CPU
        weights = get_model_state_dict(state.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    # Rank 0 returns from dcp.save after writing the metadata.
    names = list(writer.files)
    if rank == 0:
        (directory / CONFIG).write_text(json.dumps(config.to_dict(), indent=1))
        if export:
            torch.save(weights, directory / MODEL)
        names += [METADATA, CONFIG] + ([MODEL] if export else [])
    checksums = {"world_size": ranks.world_size()} if rank == 0 else {}
    checksums["files"] = {name: _size_and_digest(directory / name) for name in names}
    temporary = directory / f".{CHECKSUMS.format(rank=rank)}.tmp"
    temporary.write_text(json.dumps(checksums))
    temporary.rename(directory / CHECKSUMS.format(rank=rank))  # whole or absent
    return directory


def _size_and_digest(path: Path) -> list:
    # sha256 runs at ~1.5 GB/s: seconds per rank for a billion-parameter model's shard.
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            digest.update(chunk)
    return [path.stat().st_size, digest.hexdigest()]


def verify(directory: str | os.PathLike, share: tuple[int, int] | None = None) -> None:
    """Raises CheckpointError unless every rank's checksum file is there and the files
    listed in them have their recorded size and sha256: all of them, or with `share`
    (rank, world) only those of the saving ranks rank, rank + world, ... (each rank's
    own when the world size is the one saved)."""
    directory = Path(directory)
    first = directory / CHECKSUMS.format(rank=0)
    if not first.exists():
        raise CheckpointError(f"{first}: missing: the checkpoint was not completed")
    saved_world = json.loads(first.read_text())["world_size"]
    for rank in range(saved_world):
        listing = directory / CHECKSUMS.format(rank=rank)
        if not listing.exists():
            raise CheckpointError(f"{listing}: missing: rank {rank} of {saved_world} did not complete the checkpoint")
    mine = range(saved_world) if share is None else range(share[0], saved_world, share[1])
    for rank in mine:
        listing = directory / CHECKSUMS.format(rank=rank)
        for name, (size, sha256) in json.loads(listing.read_text())["files"].items():
            path = directory / name
            if not path.exists():
                raise CheckpointError(f"{path}: missing (listed in {listing.name})")
            if path.stat().st_size != size:
                raise CheckpointError(f"{path}: truncated: {path.stat().st_size} bytes, {listing.name} says {size}")
            if _size_and_digest(path)[1] != sha256:
                raise CheckpointError(f"{path}: corrupt: its sha256 differs from {listing.name}'s")


def verified_everywhere(directory: str | os.PathLike) -> bool:
    """Whether every rank verifies its share of the checkpoint (`verify` with this rank's
    share); every rank calls it on the same directory, and all get the same answer.
    A rank that finds its share bad logs why."""
    rank, world = ranks.rank(), ranks.world_size()
    try:
        verify(directory, share=(rank, world))
        ok = True
    except CheckpointError as e:
        log.warning("passing over a bad checkpoint: %s", e)
        ok = False
    if not dist.is_initialized():
        return ok
    # On the collectives' device: NCCL moves only CUDA tensors.
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
    verdict = torch.tensor(int(ok), device=device)
    dist.all_reduce(verdict, op=dist.ReduceOp.MIN)
    if ok and not verdict.item():
        log.warning("passing over %s: another rank found its share bad", directory)
    return bool(verdict.item())


def load(state: TrainingState, directory: str | os.PathLike) -> None:
    """Loads a checkpoint that `verified_everywhere` accepted (the sessions' restore)."""
    dcp.load({"train": state}, checkpoint_id=str(directory))


def latest(root: str | os.PathLike) -> Path | None:
    """The newest checkpoint directory under `root` that every rank verified, if any (bad
    ones are logged); every rank calls it, and all get the same one."""
    for directory in sorted((p for p in Path(root).iterdir() if p.is_dir()), reverse=True):
        if verified_everywhere(directory):
            return directory
    return None


def prune(root: str | os.PathLike, keep: int) -> None:
    """Deletes all but the newest `keep` checkpoint directories under `root` (rank 0)."""
    if ranks.rank() == 0:
        for old in sorted(p for p in Path(root).iterdir() if p.is_dir())[:-keep]:
            shutil.rmtree(old)


def load_model(directory: str | os.PathLike) -> LipNeXt:
    """The model of a checkpoint, rebuilt from the directory alone: unsharded, fp32,
    on the CPU, in eval mode. From the export (model.pt) when the checkpoint has
    one, else from the model's part of the DCP shards (any world size at save time)."""
    directory = Path(directory)
    config = TrainConfig.from_dict(json.loads((directory / CONFIG).read_text()))
    with torch.device("meta"):
        model = LipNeXt(config.model)
    model.to_empty(device="cpu")
    model.normalize.init_weights()  # its buffers come from the config, not from the checkpoint
    if (directory / MODEL).exists():
        weights = torch.load(directory / MODEL, map_location="cpu", weights_only=True)
    else:
        state = {"train": {"model": model.state_dict()}}
        dcp.load(state, checkpoint_id=str(directory))
        weights = state["train"]["model"]
    model.load_state_dict(weights)
    return model.eval()
