"""Training LipNeXt: the plain-torch loop, and its two edges.

    python -m lipnext.train --preset digits --data data/digits              # one process
    torchrun --nproc-per-node 2 -m lipnext.train --preset digits ...          # FSDP2, no Ray
    TorchTrainer(train_loop_per_worker, train_loop_config=config.to_dict())   # Ray Train

The loop builds the model on the meta device, shards it with FSDP2 when
there is more than one rank, materialises it (the same weights as an
unsharded init with the same seed), trains with the manifold optimizer and
the offset cross-entropy, evaluates certified accuracy, and checkpoints with
DCP. A `Session` is the edge: where checkpoints go and where metrics are
reported (Ray, or the console and a local directory).
"""

import argparse
import contextlib
import json
import logging
import math
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import get_args

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh

from lipnext import checkpoint
from lipnext.augment import Augmentation
from lipnext.certify import Certificate, accuracies, certified_counts, offset_cross_entropy
from lipnext.config import PRESETS, preset
from lipnext.data import DataError, open_dataset
from lipnext.loader import ShardLoader
from lipnext.manifold import ManifoldAdamW, param_groups
from lipnext.metrics import ACCURACIES, DIVERGED, EVAL_SAMPLES_PER_S, LIPSCHITZ_BOUND, ORTHO_ERROR, TRAIN_SAMPLES
from lipnext.model import LipNeXt, train_flops_per_sample
from lipnext.parallelize import apply_fsdp, materialize
from lipnext.train_config import CheckpointConfig, DataConfig, Device, OptimConfig, Precision, TrainConfig

log = logging.getLogger("lipnext.train")


class LocalSession:
    """No Ray: metrics go to the log (rank 0), checkpoints to config.checkpoint.dir."""

    def __init__(self, config: CheckpointConfig):
        self.config = config
        self.history: list[dict] = []

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
    process (no worker group to start)."""

    def __init__(self, api=None):
        if api is None:
            import ray.train as api
        self.api = api

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


class Diverged(ArithmeticError):
    """The training loss stopped being finite: the weights are lost, and a rerun from the
    last checkpoint would diverge again at the same step (training is deterministic)."""

    def __init__(self, reason: str, report: dict):
        super().__init__(reason)
        self.report = report
        """The diverged epoch's report (epoch, step, train/loss)."""


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device(name)


def warmup_cosine(total_steps: int, warmup_fraction: float):
    warmup = max(1, round(total_steps * warmup_fraction))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total_steps - warmup)))

    return factor


def _all_reduce_sum(values: list[float], device) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_initialized():
        dist.all_reduce(t)
    return t.tolist()


@torch.no_grad()
def evaluate(model: LipNeXt, loader: ShardLoader, device: torch.device) -> dict:
    """Clean accuracy and CRA over this rank's share, summed over ranks, with the
    certificate's Lipschitz bound and orthogonality error: exactly what
    lipnext.certify gives for the same model and data (one Certificate, one Gram
    matrix per orthogonal matrix, per evaluation).

    Always fp32: the certificate is computed from the fp32 weights, and a
    bf16 forward would use weights rounded off the manifold (~1e-2 here)."""
    training = model.training
    model.eval()
    certificate = Certificate(model)
    counts = torch.zeros(len(ACCURACIES), dtype=torch.int64, device=device)
    samples = 0
    start = time.perf_counter()
    for images, labels in loader:
        images, labels = images.to(device, non_blocking=True), labels.to(device)
        counts += certified_counts(certificate.radius(model(images).float(), labels))
        samples += len(labels)
    elapsed = _all_reduce_sum([time.perf_counter() - start], device)[0] / max(1, _world())
    n, *certified = _all_reduce_sum([samples, *counts.tolist()], device)
    model.train(training)
    return {
        **accuracies(certified, n),
        EVAL_SAMPLES_PER_S: n / elapsed,
        LIPSCHITZ_BOUND: certificate.lipschitz,
        ORTHO_ERROR: certificate.ortho_error,
    }


def _world() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def train(config: TrainConfig, session) -> dict:
    """Trains to config.epochs (resuming from the session's checkpoint, if
    any) and returns the last reported metrics."""
    rank, world = _rank(), _world()
    device = resolve_device(config.device)
    if config.data.batch_size % world:
        raise ValueError(f"data.batch_size={config.data.batch_size} does not split over {world} workers")
    batch = config.data.batch_size // world
    torch.manual_seed(config.seed)

    dataset = open_dataset(config.data.uri)
    if problem := config.model.data_mismatch(dataset.manifest.shape, len(dataset.manifest.classes)):
        raise ValueError(f"data.uri: {config.data.uri} {problem}")
    common = dict(rank=rank, world_size=world, seed=config.seed, prefetch=config.data.prefetch)
    train_loader = ShardLoader(dataset, "train", batch, shuffle=True, drop_last=True, augment=config.data.augment, **common)
    test_loader = ShardLoader(dataset, "test", batch, shuffle=False, **common)

    with torch.device("meta"):
        model = LipNeXt(config.model)
    if world > 1:
        apply_fsdp(model, init_device_mesh(device.type, (world,)))
    materialize(model, device, config.seed)
    o = config.optim
    optimizer = ManifoldAdamW(param_groups(model), **o.optimizer_kwargs())
    total_steps = config.epochs * len(train_loader)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(total_steps, o.warmup_fraction))
    progress = checkpoint.Progress()
    state = checkpoint.TrainingState(model, optimizer, schedule, train_loader, progress)
    with session.checkpoint_to_restore() as restore:
        if restore is not None:
            checkpoint.load(state, restore)
            log.info("resumed from %s at epoch %d, step %d", restore, progress.epoch, progress.step)

    facts = {
        "model/params": sum(p.numel() for p in model.parameters()),
        "model/flops_per_sample": train_flops_per_sample(config.model, batch),
    }
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=config.precision == "bf16")
    metrics: dict = {}
    start_time, first_epoch = time.perf_counter(), progress.epoch
    for epoch in range(first_epoch, config.epochs):
        losses, step_times = [], []
        epoch_start = time.perf_counter()
        for images, labels in train_loader:
            step_start = time.perf_counter()
            images, labels = images.to(device, non_blocking=True), labels.to(device)
            ramp = config.loss.eps_ramp_fraction * total_steps
            eps = config.loss.eps_train * min(1.0, progress.step / ramp) if ramp else config.loss.eps_train
            with autocast:
                logits = model(images)
            loss = offset_cross_entropy(logits.float(), labels, eps, temperature=config.loss.temperature)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if o.grad_clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), o.grad_clip)
            optimizer.step()
            schedule.step()
            progress.step += 1
            losses.append(loss.detach())
            step_times.append(time.perf_counter() - step_start)
        progress.epoch = epoch + 1
        epoch_seconds = time.perf_counter() - epoch_start
        loss_sum, samples = _all_reduce_sum([torch.stack(losses).sum().item(), len(losses) * batch * world], device)
        # Checked on the sum over ranks, so every rank stops at the same epoch (a per-step
        # check on one rank's loss would leave the others waiting in FSDP's collectives).
        if not math.isfinite(loss_sum):
            raise Diverged(
                f"train/loss is {loss_sum} in epoch {progress.epoch} (step {progress.step}, lr "
                f"{schedule.get_last_lr()[0]:.3g}): the trial diverged",
                {"epoch": progress.epoch, "step": progress.step, "train/loss": loss_sum},
            )
        metrics = {
            "epoch": progress.epoch,
            "step": progress.step,
            "train/loss": loss_sum * batch * world / max(1, samples),
            "train/lr": schedule.get_last_lr()[0],
            "train/eps": eps,
            TRAIN_SAMPLES: progress.step * batch * world,
            "perf/train_samples_per_s": samples / epoch_seconds,
            "perf/step_time_s": statistics.median(step_times),
            **facts,
        }
        last = progress.epoch == config.epochs
        if last or progress.epoch % config.eval_every_epochs == 0:
            with optimizer.ema_weights():
                metrics.update(evaluate(model, test_loader, device))
        every = config.checkpoint.every_epochs
        with session.checkpoint_dir(progress.step) as directory:
            saved = None
            if directory is not None and (last or (every and progress.epoch % every == 0)):
                saved = checkpoint.save(state, directory)
            if rank == 0:
                per_epoch = (time.perf_counter() - start_time) / (progress.epoch - first_epoch)
                eta = per_epoch * (config.epochs - progress.epoch)
                log.info(
                    "epoch %d/%d  loss %.4f  lr %.2e  %.0f samples/s  ETA %.0fs%s",
                    progress.epoch, config.epochs, metrics["train/loss"], metrics["train/lr"],
                    metrics["perf/train_samples_per_s"], eta,
                    "".join(f"  {k.split('/')[1]} {metrics[k]:.3f}" for k in metrics if k.startswith("eval/")),
                )
            session.report(metrics, saved)
    return metrics


def train_in_ray(config: TrainConfig, session: RaySession) -> None:
    """train(), with a divergence reported as the trial's last result instead of raised:
    Ray would retry a failed trial from its last checkpoint, to diverge again."""
    try:
        train(config, session)
    except Diverged as e:
        log.error("%s", e)
        session.report({**e.report, DIVERGED: str(e)}, None)


def train_loop_per_worker(config: dict) -> None:
    """Ray Train's entry: config is TrainConfig.to_dict()."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    train_in_ray(TrainConfig.from_dict(config), RaySession())


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Train one LipNeXt (one process, or under torchrun).")
    p.add_argument("--preset", default="digits", choices=list(PRESETS), help="model preset")
    p.add_argument("--data", default=DataConfig.uri, help="dataset URI (see `lipscale data convert`)")
    p.add_argument("--epochs", type=int, default=TrainConfig.epochs)
    p.add_argument("--batch-size", type=int, default=DataConfig.batch_size, help="global batch")
    p.add_argument("--lr", type=float, default=OptimConfig.lr)
    p.add_argument("--augment", choices=get_args(Augmentation), default=DataConfig.augment)
    p.add_argument("--precision", choices=get_args(Precision), default=TrainConfig.precision)
    p.add_argument("--device", choices=get_args(Device), default=TrainConfig.device)
    p.add_argument("--seed", type=int, default=TrainConfig.seed)
    p.add_argument("--checkpoint-dir", default=None, help="save (and resume from) DCP checkpoints here")
    p.add_argument("--json", action="store_true", help="print the final metrics as JSON")
    return p


def main(argv: list[str] | None = None) -> dict:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    try:
        config = TrainConfig(
            model=preset(args.preset),
            optim=OptimConfig(lr=args.lr),
            data=DataConfig(uri=args.data, batch_size=args.batch_size, augment=args.augment),
            checkpoint=CheckpointConfig(dir=args.checkpoint_dir),
            epochs=args.epochs,
            seed=args.seed,
            precision=args.precision,
            device=args.device,
        )
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    torchrun = "RANK" in os.environ
    if torchrun and not dist.is_initialized():
        dist.init_process_group("nccl" if resolve_device(args.device).type == "cuda" else "gloo")
    try:
        metrics = train(config, LocalSession(config.checkpoint))
    except (DataError, Diverged) as e:  # bad data, or a run that cannot go on: one line, no traceback
        raise SystemExit(f"error: {e}") from None
    finally:
        if torchrun:
            dist.destroy_process_group()
    if args.json and _rank() == 0:
        print(json.dumps(metrics, indent=2))
    return metrics


if __name__ == "__main__":
    main()
