"""The recipe on `shapes`, arm by arm, at equal wall time: what each change of issue 16 buys.

    python benchmarks/recipe.py                 # writes benchmarks/results/recipe.json
    python benchmarks/recipe.py --smoke         # tiny data and budget: the code path, not the figure

Arms (LipNeXt width 128, depth 8, batch 128, crop + flip; each trained by lipnext.train.train):

    offset_ce      the old recipe: offset cross-entropy, eps ramped 0 -> 36/255 over half of training, patch 4
    emma           EMMA in its place, the same ramp
    emma_liresnet  EMMA with LiResNet++'s radius: 3.6/255 -> 108/255 at half, held
    patch_2        that, on a 16x16 token grid (patch 2) instead of 8x8
    conv_baseline  a 1-Lipschitz convolutional network of about the same size from deel-torchlip
                   (spectrally normalised convolutions, GroupSort2, invertible downsampling, an L2 pool),
                   our unit-norm head, the patch_2 arm's loss and radius, certified by the same per-pair
                   rule with the library's Lipschitz bound of 1; skipped where deel-torchlip is missing
                   (benchmark-only, never a runtime dependency: pip install deel-torchlip==1.0.5, MIT, numpy + torch)

Every arm gets the same wall time, `--seconds` of training per run: one calibration epoch of every arm
(interleaved) gives its seconds per epoch, and so the epochs that fill the budget, which its lr schedule
and eps ramp then span. Every arm runs at each lr of `--lrs` and reports its best (by CRA at 72/255).
The runs go arm by arm within an lr, so load that changes over the run falls on every arm alike;
`uptime`'s load is recorded before and after.
"""

import argparse
import os
import tempfile
import time
from pathlib import Path

import torch
from harness import write_result
from torch import nn

from lipnext import preset
from lipnext.certify import accuracies, certified_counts
from lipnext.layers import UnitNormHead
from lipnext.loader import ShardLoader
from lipnext.loss import certified_margin_loss
from lipnext.metrics import ACCURACIES, PARAMS, TRAIN_SAMPLES_PER_S
from lipnext.train import LocalSession, train, warmup_cosine
from lipnext.train_config import CheckpointConfig, DataConfig, LossConfig, OptimConfig, TrainConfig
from lipscale.data.convert import convert

OLD_EPS = dict(eps_start=0.0, eps_peak=1.0)
ARMS = {  # name: (patch size, LossConfig)
    "offset_ce": (4, LossConfig(kind="offset_ce", **OLD_EPS)),
    "emma": (4, LossConfig(kind="emma", **OLD_EPS)),
    "emma_liresnet": (4, LossConfig(kind="emma")),
    "patch_2": (2, LossConfig(kind="emma")),
}
BASELINE = "conv_baseline"


def lipnext_config(data: str, patch: int, loss: LossConfig, lr: float, epochs: int, width: int, depth: int):
    return TrainConfig(
        model=preset("cifar-l8w256", width=width, depth=depth, patch_size=patch, num_classes=10),
        optim=OptimConfig(lr=lr, lr_floor=min(1e-5, lr)),
        loss=loss,
        data=DataConfig(uri=data, batch_size=128, augment="crop_flip"),
        checkpoint=CheckpointConfig(),
        epochs=epochs,
        eval_every_epochs=epochs,
        audit_points=0,
    )


def conv_baseline(width: int) -> nn.Module:
    """A standard 1-Lipschitz conv net (deel-torchlip's layers, as in its examples): 3x3
    spectral convolutions with GroupSort2, halving the grid by invertible downsampling
    (a permutation), an L2 norm pool to features, and LipNeXt's unit-norm head so that
    the loss and the per-pair certificate are the same as the LipNeXt arms'."""
    from deel import torchlip

    c = width // 4
    layers = []
    for cin, cout in [(3, c), (c, c)]:
        layers += [torchlip.SpectralConv2d(cin, cout, 3, padding=1), torchlip.GroupSort2()]
    layers.append(torchlip.InvertibleDownSampling(2))  # 32 -> 16, 4c channels
    for cin, cout in [(4 * c, 2 * c), (2 * c, 2 * c)]:
        layers += [torchlip.SpectralConv2d(cin, cout, 3, padding=1), torchlip.GroupSort2()]
    layers.append(torchlip.InvertibleDownSampling(2))  # 16 -> 8, 8c channels
    for cin, cout in [(8 * c, 2 * c), (2 * c, 2 * c)]:
        layers += [torchlip.SpectralConv2d(cin, cout, 3, padding=1), torchlip.GroupSort2()]
    layers += [torchlip.ScaledAdaptativeL2NormPool2d((1, 1)), nn.Flatten()]
    features = torchlip.Sequential(*layers)
    head = UnitNormHead(2 * c, 10)
    head.init_weights(torch.Generator().manual_seed(0))
    return nn.Sequential(features, head)


def train_baseline(data: str, loss: LossConfig, lr: float, epochs: int, width: int) -> dict:
    """The LipNeXt arms' loop, by hand for a foreign model: the same loader, augmentation,
    schedule, loss, clipping and Adam moments (its parameters are all Euclidean), the per-pair
    certificate."""
    torch.manual_seed(0)
    model = conv_baseline(width)
    optim = OptimConfig(lr=lr, lr_floor=min(1e-5, lr))
    opt = torch.optim.Adam(model.parameters(), lr=lr, betas=optim.betas)
    train_loader = ShardLoader(data, "train", 128, shuffle=True, drop_last=True, augment="crop_flip")
    test_loader = ShardLoader(data, "test", 256, shuffle=False)
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(optim, len(train_loader), epochs))
    head = model[1].weight
    seconds = samples = 0.0
    for epoch in range(epochs):
        eps = loss.eps(epoch, epochs)
        start = time.perf_counter()
        for x, y in train_loader:
            value = certified_margin_loss(loss.kind, model(x), y, eps, head, 1.0, loss.temperature)
            opt.zero_grad(set_to_none=True)
            value.backward()
            nn.utils.clip_grad_norm_(model.parameters(), optim.grad_clip)
            opt.step()
            schedule.step()
            samples += len(y)
        seconds += time.perf_counter() - start
    model.eval()
    counts, n = torch.zeros(len(ACCURACIES), dtype=torch.int64), 0
    with torch.no_grad():
        vectors = model[1].class_vectors()
        gaps = torch.cdist(vectors.double(), vectors.double())  # 10 rows: exact enough here
        for x, y in test_loader:
            z = model(x).double()
            radius = (z.gather(1, y[:, None]) - z) / gaps[y]
            radius.scatter_(1, y[:, None], float("inf"))
            counts += certified_counts(radius.amin(1))
            n += len(y)
    return {
        **accuracies(counts.tolist(), n),
        TRAIN_SAMPLES_PER_S: samples / seconds,
        PARAMS: sum(p.numel() for p in model.parameters()),
    }


def has_baseline() -> bool:
    try:
        import deel.torchlip  # noqa: F401
    except ImportError:
        return False
    return True


def run(arm: str, data: str, lr: float, epochs: int, width: int, depth: int) -> dict:
    start = time.perf_counter()
    if arm == BASELINE:
        metrics = train_baseline(data, ARMS["patch_2"][1], lr, epochs, width)
    else:
        patch, loss = ARMS[arm]
        config = lipnext_config(data, patch, loss, lr, epochs, width, depth)
        metrics = train(config, LocalSession(config.checkpoint))
    keep = [*ACCURACIES, TRAIN_SAMPLES_PER_S, PARAMS]
    return {"lr": lr, "epochs": epochs, "wall_s": time.perf_counter() - start, **{k: metrics[k] for k in keep}}


def load() -> float:
    return os.getloadavg()[0]


def main(smoke: bool, seconds: float, lrs: list[float]):
    torch.set_num_threads(2)
    width, depth = (32, 2) if smoke else (128, 8)
    arms = [*ARMS, BASELINE] if has_baseline() else list(ARMS)
    with tempfile.TemporaryDirectory() as tmp:
        data = str(Path(tmp) / "shapes")
        sizes = dict(train=640, test=256) if smoke else dict(train=5000, test=1000)
        convert("shapes", None, data, **sizes)
        load_before = load()
        # Calibration: one epoch of each arm, interleaved, gives its seconds per epoch.
        samples = sizes["train"] // 128 * 128
        per_epoch = {a: samples / run(a, data, lrs[0], 1, width, depth)[TRAIN_SAMPLES_PER_S] for a in arms}
        epochs = {a: max(1, round(seconds / s)) for a, s in per_epoch.items()}
        runs = {a: [] for a in arms}
        for lr in lrs:
            for a in arms:
                runs[a].append(run(a, data, lr, epochs[a], width, depth))
                print(a, runs[a][-1], flush=True)
        best = {a: max(rs, key=lambda r: (r["eval/cra_72"], r["eval/cra_108"])) for a, rs in runs.items()}
    result = {
        "task": f"shapes {sizes['train']} train / {sizes['test']} test, 10 classes, batch 128, crop + flip",
        "budget_s_per_run": seconds,
        "lrs": lrs,
        "model": f"LipNeXt width {width} depth {depth}; the baseline from deel-torchlip",
        "seconds_per_epoch": per_epoch,
        "epochs": epochs,
        "load_1min": {"before": load_before, "after": load()},
        "baseline": "deel-torchlip 1.0.5" if BASELINE in arms else "skipped: deel-torchlip is not installed",
        "best": best,
        "runs": runs,
    }
    write_result("recipe_smoke" if smoke else "recipe", result)


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--seconds", type=float, default=None, help="training wall time per run (default 90; smoke 2)")
    p.add_argument("--lrs", type=float, nargs="+", default=[3e-3, 1e-2])
    args = p.parse_args()
    main(args.smoke, args.seconds or (2 if args.smoke else 90), args.lrs)
