"""Training LipNeXt: the plain-torch loop, and its two edges.

    python -m lipnext.train --preset digits --data data/digits              # one process
    torchrun --nproc-per-node 2 -m lipnext.train --preset digits ...          # FSDP2, no Ray
    TorchTrainer(train_loop_per_worker, train_loop_config=config.to_dict())   # Ray Train

Three parts that the loop, the benchmarks and the tests share:
`build_model` (on the meta device, parallelised by lipnext.parallelize:
activation checkpointing and compile as configured, FSDP2 over the mesh,
then materialised: the same weights as an unsharded init with the same seed),
`build_optimizer` (the manifold optimizer from OptimConfig) and `train_step`
(forward, the certified-margin loss and backward per micro-batch, clipping,
optimizer step). One parallel path, torchtitan's: `train` shards with FSDP2 at
every world size, one rank included (a process group of one when none
exists), so a one-GPU run takes the same sharded optimizer as a 64-GPU one.
`train` loops over them; at every epoch end it syncs Lookahead,
projects the matrices onto their manifold, evaluates certified accuracy
(lipnext.certify), audits the certificate (lipnext.audit) and checkpoints with
DCP (lipnext.checkpoint). A session is the edge
(lipnext.session): where checkpoints go and where metrics are reported (Ray,
or the console and a local directory).
"""

import argparse
import json
import logging
import math
import os
import statistics
import time
from typing import get_args

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.tensor import Partial

from lipnext import checkpoint, ranks
from lipnext.audit import UnsoundCertificate, audit, audit_sample
from lipnext.augment import Augmentation
from lipnext.certify import Certificate, accuracies, certified_counts, feature_lipschitz
from lipnext.config import PRESETS, LipNeXtConfig, preset
from lipnext.data import DataError, open_dataset
from lipnext.loader import ShardLoader
from lipnext.loss import certified_margin_loss
from lipnext.manifold import ManifoldAdamW, param_groups
from lipnext.metrics import (
    ACCURACIES,
    DIVERGED,
    EPOCH,
    EVAL_SAMPLES_PER_S,
    FLOPS_PER_SAMPLE,
    LIPSCHITZ_BOUND,
    ORTHO_ERROR,
    PARAMS,
    STEP,
    STEP_TIME_S,
    TRAIN_EPS,
    TRAIN_LOSS,
    TRAIN_LR,
    TRAIN_SAMPLES,
    TRAIN_SAMPLES_PER_S,
    UNSOUND,
)
from lipnext.model import LipNeXt, train_flops_per_sample
from lipnext.parallelize import materialize, micro_batch_sync, parallelize
from lipnext.ranks import process_group
from lipnext.session import LocalSession, RaySession
from lipnext.train_config import (
    ActivationCheckpointing,
    CheckpointConfig,
    DataConfig,
    Device,
    OptimConfig,
    Precision,
    TrainConfig,
)

log = logging.getLogger("lipnext.train")


class Stopped(Exception):
    """A trial that cannot go on: a rerun from its last checkpoint would stop the same
    way (training is deterministic). Its last report carries the reason under `key`."""

    key: str

    def __init__(self, reason: str, report: dict):
        super().__init__(reason)
        self.report = report
        """The stopping epoch's report (epoch, step; train/loss for a divergence)."""


class Diverged(Stopped, ArithmeticError):
    """The training loss (or its gradient) stopped being finite."""

    key = DIVERGED


class Unsound(Stopped):
    """The audit flipped a point inside its certified radius (lipnext.audit.UnsoundCertificate)."""

    key = UNSOUND


class NonFiniteStep(ArithmeticError):
    """train_step found a gradient norm that is not finite, on every rank at once; the
    optimizer step was not taken."""

    def __init__(self, loss: torch.Tensor, grad_norm: torch.Tensor):
        super().__init__(f"the gradient norm is {grad_norm.item()}")
        self.loss, self.grad_norm = loss, grad_norm


def resolve_device(name: str) -> torch.device:
    """The device of `name`; for cuda this process's current GPU, which the edges set from
    the local rank (main under torchrun, train_loop_per_worker under Ray Train)."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device(name)


def build_model(
    config: LipNeXtConfig, device: torch.device, seed: int = 0, mesh: DeviceMesh | None = None,
    activation_checkpointing: ActivationCheckpointing = "none", compile: bool = False,
) -> LipNeXt:  # fmt: skip
    """LipNeXt built on the meta device, parallelised (lipnext.parallelize: sharded with
    FSDP2 over `mesh` if given), then materialised on `device` with the weights of
    LipNeXt.init_weights(seed)."""
    with torch.device("meta"):
        model = LipNeXt(config)
    parallelize(model, mesh, activation_checkpointing, compile)
    materialize(model, device, seed)
    return model


def build_training_model(config: TrainConfig, device: torch.device) -> LipNeXt:
    """The model `train` trains: config's, sharded with FSDP2 over every rank of the
    default process group (one included), with its checkpointing and compile options."""
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    return build_model(config.model, device, config.seed, mesh, config.activation_checkpointing, config.compile)


def build_optimizer(model: LipNeXt, config: OptimConfig) -> ManifoldAdamW:
    """The manifold optimizer over the model's parameter groups, as `config` sets it."""
    return ManifoldAdamW(param_groups(model), **config.optimizer_kwargs())


def warmup_cosine(config: OptimConfig, steps_per_epoch: int, epochs: int):
    """The lr factor of each step (LambdaLR's): a linear warm-up over config.warmup_epochs,
    then a cosine from 1 down to lr_floor / lr at the last step."""
    total = steps_per_epoch * epochs
    warmup = max(1, round(config.warmup_epochs * steps_per_epoch))
    floor = config.lr_floor / config.lr

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))
        return floor + (1 - floor) * cosine

    return factor


def _grad_norm(model: LipNeXt) -> torch.Tensor:
    """The L2 norm of all gradients together, over all ranks (under FSDP2 the
    gradients are DTensor shards, and full_tensor() all-reduces the norm)."""
    norm = torch.nn.utils.get_total_norm([p.grad for p in model.parameters() if p.grad is not None])
    return norm.full_tensor() if hasattr(norm, "full_tensor") else norm


def _whole_head(model: LipNeXt) -> torch.Tensor:
    """The head's fp32 rows for the loss's margins (K x width: small, gathered whole under
    FSDP2). The margins' gradient is one rank's; averaged over ranks on its way back to the
    shards (Partial avg), as FSDP2 averages the gradients of the forward."""
    head = model.head.weight
    if hasattr(head, "full_tensor"):
        head = head.full_tensor(grad_placements=[Partial("avg")] * head.device_mesh.ndim)
    return head.float()


def train_step(
    model: LipNeXt, optimizer: ManifoldAdamW, images: torch.Tensor, labels: torch.Tensor, eps: float,
    config: TrainConfig,
) -> torch.Tensor:  # fmt: skip
    """One step of training on this rank's batch: per micro-batch of
    config.data.micro_batch_size (the whole batch if None) a forward (bf16 autocast
    when config.precision is bf16; the weights stay fp32), the loss config.loss.kind at
    radius `eps` (lipnext.loss) weighted by the micro-batch's share of the batch (so the gradients add
    up to the whole batch's mean loss's) and a backward; then clipping to
    config.optim.grad_clip and one manifold step. Returns this rank's mean loss over
    the batch, detached, on the images' device.

    Raises NonFiniteStep, before the optimizer step, when the gradient norm is
    not finite (a non-finite loss makes every gradient NaN). The norm is the one
    clipping needs anyway, already reduced over ranks, so every rank stops at the
    same step, for one scalar host sync per step (under FSDP2 a rank that raised
    alone would leave the others waiting in a collective)."""
    optimizer.zero_grad(set_to_none=True)
    micro = config.data.micro_batch_size or len(labels)
    batches = list(zip(images.split(micro), labels.split(micro)))
    loss = torch.zeros((), device=images.device)
    for i, (x, y) in enumerate(batches):
        micro_batch_sync(model, last=i == len(batches) - 1)
        with torch.autocast(images.device.type, dtype=torch.bfloat16, enabled=config.precision == "bf16"):
            logits = model(x)
        share = certified_margin_loss(
            config.loss.kind, logits.float(), y, eps, _whole_head(model), feature_lipschitz(config.model),
            config.loss.temperature,
        ) * (len(y) / len(labels))  # fmt: skip
        share.backward()
        loss += share.detach()
    grad_norm = _grad_norm(model)
    if not torch.isfinite(grad_norm):
        raise NonFiniteStep(loss, grad_norm)
    if config.optim.grad_clip:
        torch.nn.utils.clip_grads_with_norm_(model.parameters(), config.optim.grad_clip, grad_norm)
    optimizer.step()
    return loss


def _all_reduce_sum(values: list[float], device) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_initialized():
        dist.all_reduce(t)
    return t.tolist()


@torch.no_grad()
def evaluate(
    model: LipNeXt, loader: ShardLoader, device: torch.device,
    sample: tuple[torch.Tensor, torch.Tensor] | None = None, save_to=None,
) -> dict:  # fmt: skip
    """Clean accuracy and CRA over this rank's share, summed over ranks, with the
    certificate's Lipschitz bound and orthogonality error: exactly what
    lipnext.certify gives for the same model and data (one Certificate, one Gram
    matrix per orthogonal matrix, per evaluation). With an audit `sample` (the
    same points on every rank), the same certificate is attacked there
    (lipnext.audit); a flip inside a radius raises UnsoundCertificate, the points
    saved to `save_to`.

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
    elapsed = _all_reduce_sum([time.perf_counter() - start], device)[0] / max(1, ranks.world_size())
    n, *certified = _all_reduce_sum([samples, *counts.tolist()], device)
    report = {
        **accuracies(certified, n),
        EVAL_SAMPLES_PER_S: n / elapsed,
        LIPSCHITZ_BOUND: certificate.lipschitz,
        ORTHO_ERROR: certificate.ortho_error,
    }
    if sample is not None:
        x, y = (t.to(device) for t in sample)
        radius = certificate.radius(model(x).float(), y)
        report.update(audit(model, x, y, radius, certificate.feature_lipschitz, save_to))
    model.train(training)
    return report


def train(config: TrainConfig, session) -> dict:
    """Trains to config.epochs (resuming from the session's checkpoint, if
    any) and returns the last reported metrics."""
    device = resolve_device(config.device)
    if device.type == "cpu":
        # Subnormal floats make x86 arithmetic crawl: width-1024 blocks at seed 0 took 8.7-43 s on
        # 4 of 12 fp32 steps (1.7-2.1 s the others), and none with them flushed to zero. Nothing a
        # certificate reads is that small (weight norms ~1; a smaller margin would certify 0).
        torch.set_flush_denormal(True)
    with process_group(device):
        return _train(config, session, device)


def _train(config: TrainConfig, session, device: torch.device) -> dict:
    rank, world = ranks.rank(), ranks.world_size()
    batch, _ = config.per_rank_batch(world)
    torch.manual_seed(config.seed)

    dataset = open_dataset(config.data.uri)
    if problem := config.model.data_mismatch(dataset.manifest.shape, len(dataset.manifest.classes)):
        raise ValueError(f"data.uri: {config.data.uri} {problem}")
    common = dict(rank=rank, world_size=world, seed=config.seed, prefetch=config.data.prefetch)
    augment = config.data.augment
    train_loader = ShardLoader(dataset, "train", batch, shuffle=True, drop_last=True, augment=augment, **common)
    test_loader = ShardLoader(dataset, "test", batch, shuffle=False, **common)
    sample = audit_sample(dataset, config.audit_points, config.seed) if config.audit_points else None

    model = build_training_model(config, device)
    optimizer = build_optimizer(model, config.optim)
    lr_factor = warmup_cosine(config.optim, len(train_loader), config.epochs)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
    progress = checkpoint.Progress()
    state = checkpoint.TrainingState(model, optimizer, schedule, train_loader, progress)
    with session.checkpoint_to_restore() as restore:
        if restore is not None:
            checkpoint.load(state, restore)
            log.info("resumed from %s at epoch %d, step %d", restore, progress.epoch, progress.step)

    facts = {
        PARAMS: sum(p.numel() for p in model.parameters()),
        FLOPS_PER_SAMPLE: train_flops_per_sample(config.model, batch),
    }
    metrics: dict = {}
    start_time, first_epoch = time.perf_counter(), progress.epoch
    for epoch in range(first_epoch, config.epochs):
        losses, step_times = [], []
        epoch_start = time.perf_counter()
        eps = config.loss.eps(epoch, config.epochs)
        for images, labels in train_loader:
            step_start = time.perf_counter()
            images, labels = images.to(device, non_blocking=True), labels.to(device)
            try:
                losses.append(train_step(model, optimizer, images, labels, eps, config))
            except NonFiniteStep as e:
                raise _diverged(e, epoch + 1, progress.step + 1, schedule.get_last_lr()[0], device) from None
            schedule.step()
            progress.step += 1
            step_times.append(time.perf_counter() - step_start)
        # LiResNet++ syncs Lookahead at every epoch end; the polar projection then puts every
        # matrix back at the float32 floor (~6e-7 at n = 1024), so each evaluation and
        # checkpoint below sees exactly orthogonal weights, whatever the increments' dtype.
        optimizer.sync_lookahead()
        optimizer.project()
        progress.epoch = epoch + 1
        epoch_seconds = time.perf_counter() - epoch_start
        loss_sum, samples = _all_reduce_sum([torch.stack(losses).sum().item(), len(losses) * batch * world], device)
        metrics = {
            EPOCH: progress.epoch,
            STEP: progress.step,
            TRAIN_LOSS: loss_sum * batch * world / max(1, samples),
            TRAIN_LR: schedule.get_last_lr()[0],
            TRAIN_EPS: eps,
            TRAIN_SAMPLES: progress.step * batch * world,
            TRAIN_SAMPLES_PER_S: samples / epoch_seconds,
            STEP_TIME_S: statistics.median(step_times),
            **facts,
        }
        last = progress.epoch == config.epochs
        if last or progress.epoch % config.eval_every_epochs == 0:
            save_to = session.artifact_dir / "unsound.pt" if rank == 0 and session.artifact_dir else None
            try:
                with optimizer.ema_weights():
                    metrics.update(evaluate(model, test_loader, device, sample, save_to))
            except UnsoundCertificate as e:  # every rank audits the same points: all are here
                raise Unsound(f"{e} (epoch {progress.epoch})", {EPOCH: progress.epoch, STEP: progress.step}) from None
        every = config.checkpoint.every_epochs
        with session.checkpoint_dir(progress.step) as directory:
            saved = None
            if directory is not None and (last or (every and progress.epoch % every == 0)):
                saved = checkpoint.save(state, directory, config, export=last)
            if rank == 0:
                per_epoch = (time.perf_counter() - start_time) / (progress.epoch - first_epoch)
                eta = per_epoch * (config.epochs - progress.epoch)
                log.info(
                    "epoch %d/%d  loss %.4f  lr %.2e  %.0f samples/s  ETA %.0fs%s",
                    progress.epoch, config.epochs, metrics[TRAIN_LOSS], metrics[TRAIN_LR],
                    metrics[TRAIN_SAMPLES_PER_S], eta,
                    "".join(f"  {k.split('/')[1]} {metrics[k]:.3f}" for k in ACCURACIES if k in metrics),
                )  # fmt: skip
            session.report(metrics, saved)
    return metrics


def _diverged(step: NonFiniteStep, epoch: int, number: int, lr: float, device) -> Diverged:
    """The report of a step whose gradient norm was not finite (every rank is here at once)."""
    loss = _all_reduce_sum([step.loss.item()], device)[0] / ranks.world_size()
    what = f"{TRAIN_LOSS} is {loss}" if not math.isfinite(loss) else f"{TRAIN_LOSS} is {loss} but {step}"
    return Diverged(
        f"{what} in epoch {epoch} (step {number}, lr {lr:.3g}): the trial diverged",
        {EPOCH: epoch, STEP: number, TRAIN_LOSS: loss},
    )


def train_in_ray(config: TrainConfig, session: RaySession) -> None:
    """train(), with a divergence or an unsound certificate reported as the trial's last
    result instead of raised: Ray would retry a failed trial from its last checkpoint,
    to stop again at the same step."""
    try:
        train(config, session)
    except Stopped as e:
        log.error("%s", e)
        session.report({**e.report, e.key: str(e)}, None)


def train_loop_per_worker(config: dict) -> None:
    """Ray Train's entry: config is TrainConfig.to_dict()."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    if torch.cuda.is_available():
        import ray.train.torch

        torch.cuda.set_device(ray.train.torch.get_device())  # this worker's GPU, by its local rank
    train_in_ray(TrainConfig.from_dict(config), RaySession())


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Train one LipNeXt (one process, or under torchrun).")
    p.add_argument("--preset", default="digits", choices=list(PRESETS), help="model preset")
    p.add_argument("--data", default=DataConfig.uri, help="dataset URI (see `lipscale data convert`)")
    p.add_argument("--epochs", type=int, default=TrainConfig.epochs)
    p.add_argument("--batch-size", type=int, default=DataConfig.batch_size, help="global batch")
    p.add_argument("--micro-batch-size", type=int, default=None, help="samples per rank per forward/backward")
    p.add_argument(
        "--activation-checkpointing", choices=get_args(ActivationCheckpointing), default=TrainConfig.activation_checkpointing
    )
    p.add_argument("--compile", action="store_true", help="torch.compile each block")
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
            data=DataConfig(
                uri=args.data, batch_size=args.batch_size, micro_batch_size=args.micro_batch_size, augment=args.augment
            ),
            checkpoint=CheckpointConfig(dir=args.checkpoint_dir),
            epochs=args.epochs,
            seed=args.seed,
            precision=args.precision,
            device=args.device,
            activation_checkpointing=args.activation_checkpointing,
            compile=args.compile,
        )
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    torchrun = "RANK" in os.environ
    if torchrun and not dist.is_initialized():
        cuda = resolve_device(args.device).type == "cuda"
        if cuda:  # else every rank of a node lands on cuda:0
            torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        dist.init_process_group("nccl" if cuda else "gloo")
    rank = ranks.rank()  # before the process group goes
    try:
        metrics = train(config, LocalSession(config.checkpoint))
    except (DataError, Stopped) as e:  # bad data, or a run that cannot go on: one line, no traceback
        raise SystemExit(f"error: {e}") from None
    finally:
        if torchrun:
            dist.destroy_process_group()
    if args.json and rank == 0:
        print(json.dumps(metrics, indent=2))
    return metrics


if __name__ == "__main__":
    main()
