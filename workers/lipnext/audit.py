"""The certificate audit: every evaluation attacks what it has just certified.

On a fixed sample of test points, the ones certified at this evaluation are
attacked by L2 PGD on the logit margin

  - at each point's own certified radius: a flip there means the certificate
    is unsound, and the audit raises `UnsoundCertificate` with the points saved;
  - at twice that radius: the attack must flip most points there, or a clean
    result at 1x would say nothing about the attack (on trained digits models it
    flips all; early in training the certificate can be loose by more than 2x,
    and then the share is low for any attack: 100 steps flip no more than 3);

and the feature map's Lipschitz constant gets an empirical lower bound (power
iteration on its Jacobian, every ratio ||f(x) - f(x')|| / ||x - x'|| of a real
pair), reported beside the certified bound L_f that the radii divide by.

    x, y = (t.to(device) for t in audit_sample(dataset, config.audit_points, seed))  # once per trial
    radius = certificate.radius(model(x), y)                                         # every evaluation
    metrics.update(audit(model, x, y, radius, certificate.feature_lipschitz, save_to=directory / "unsound.pt"))

lipnext.train.evaluate runs it on the trial's sample (TrainConfig.audit_points)
at every evaluation; an UnsoundCertificate there fails the trial.

The attack maximises the margin max_{j != y} z_j - z_y, not a cross-entropy:
with unit-norm class vectors the logits span a few units and the softmax is
nearly flat: at 1.5x the radius, 100 steps of cross-entropy PGD flip none of
the 278 certified test points of the tests' trained tiny model, 100 steps on
the margin flip 155. It is not clamped to
[0, 1] pixels: the certificate is a claim about every perturbation of norm
<= eps, in the pixel box or not, so the whole ball is what is audited (a
clamp could only hide a flip).

fp32 and no autocast (bf16 logits are ~1% off: the attack would audit
another function), gradients to the inputs only (`torch.autograd.grad`: the
weights' .grad is untouched), a fixed number of steps (no data-dependent
exit). Through model's own call, so it runs under FSDP2 too: every rank must
then audit the same sample, and each computes the same result.

Cost (benchmarks/audit_cost.py): 0.08 s per evaluation of a default-study
digits trial, 2.4% of the trial's wall time (1.8% of its CPU time), against
0.03 s for the evaluation itself.
"""

import contextlib
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from lipnext import metrics as m
from lipnext.data import Dataset, decode_png
from lipnext.model import LipNeXt


@dataclass(frozen=True)
class AuditConfig:
    steps: int = 3
    """PGD steps, for 1x and 2x together. On digits trials (preset digits; width 256, depth 8)
    3 take as much margin at 1x as 100 steps from 3 starts (at most 0.768; 0.914, as 50
    steps do) and flip every point at 2x: the model is close to linear at these radii."""
    lipschitz_points: int = 8
    """The first points of the sample, where power iteration looks for the Lipschitz lower bound."""
    lipschitz_steps: int = 5
    """Power iterations: on the digits trial, 5 at 8 points reach 0.810 L_f, 30 at 64 points 0.821."""
    lipschitz_distance: float = 0.1
    """||x - x'|| of its pairs: small, for the Jacobian at x, and far above fp32 rounding."""
    seed: int = 0
    """Of the power iteration's first directions (the same on every rank)."""


class UnsoundCertificate(AssertionError):
    """PGD flipped a point inside its certified radius: a bug in the certificate
    (or in the model it was computed for), never bad luck. The points are in
    `saved` (a dict of tensors) when the audit was given a file."""

    def __init__(self, images, labels, radius, adversarial, saved: Path | None):
        flips = len(labels)
        super().__init__(
            f"{flips} point{'s' * (flips != 1)} flipped inside {'their' if flips != 1 else 'its'} certified "
            f"radius (smallest {radius.min().item():.4g}): the certificate is unsound"
            + (f"; saved to {saved}" if saved else "")
        )
        self.images, self.labels, self.radius, self.adversarial = images, labels, radius, adversarial
        self.saved = saved


def margin(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """max_{j != y} z_j - z_y: the prediction has left y when it is > 0."""
    true = logits.gather(1, labels[:, None]).squeeze(1)
    return logits.scatter(1, labels[:, None], float("-inf")).amax(dim=1) - true


def _per_sample(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return t.view((-1,) + (1,) * (like.dim() - 1))


def _norm(t: torch.Tensor) -> torch.Tensor:
    return _per_sample(torch.linalg.vector_norm(t.flatten(1), dim=1), t)


def pgd_l2(
    model, images: torch.Tensor, labels: torch.Tensor, radius: torch.Tensor, steps: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """L2 PGD on the margin from the clean point, each point inside the ball of its
    own radius (not the pixel box): steps of 2.5 r / steps along the normalised
    gradient (Madry et al.); a point stops at its first flip. Returns the
    strongest adversarial images found, their margins and the clean margins."""
    r = _per_sample(radius, images)
    alpha = 2.5 * r / steps
    delta = torch.zeros_like(images)
    for step in range(steps + 1):
        delta.requires_grad_(step < steps)
        with torch.set_grad_enabled(step < steps):
            z = margin(model(images + delta), labels)
        with torch.no_grad():
            if step == 0:
                clean, best, best_margin = z.detach(), images.clone(), z.detach()
            better = z > best_margin
            best_margin = torch.where(better, z, best_margin).detach()
            best = torch.where(_per_sample(better, images), images + delta, best).detach()
        if step == steps:
            break
        (grad,) = torch.autograd.grad(z.sum(), delta)
        with torch.no_grad():
            moving = _per_sample(best_margin <= 0, images)
            delta = delta + moving * alpha * grad / _norm(grad).clamp_min(1e-12)
            delta = delta * (r / _norm(delta).clamp_min(1e-12)).clamp(max=1)
    return best, best_margin, clean


def lipschitz_lower_bound(f, x: torch.Tensor, steps: int, distance: float, generator=None) -> float:
    """The largest ||f(x + d v) - f(x)|| / d over the points `x` and the directions v
    of `steps` power iterations v <- J^T J v / ||J^T J v|| (J = f's Jacobian at x,
    J v ~ (f(x + d v) - f(x)) / d), from directions drawn from `generator`. That is
    gradient ascent on the ratio over v with the best step (v -> J v is linear), and
    every ratio is one of a real pair: a lower bound on f's Lipschitz constant (up
    to fp32 rounding, ~1e-7 ||f(x)|| / d)."""
    v = torch.randn(x.shape, generator=generator, device=x.device)
    x = x.detach().requires_grad_()
    fx = f(x)
    best = torch.zeros(len(x), device=x.device)
    for step in range(steps):
        v = v / _norm(v).clamp_min(1e-12)
        with torch.no_grad():
            jv = f(x + distance * v) - fx
        best = torch.maximum(best, torch.linalg.vector_norm(jv.flatten(1), dim=1) / distance)
        if step < steps - 1:
            (v,) = torch.autograd.grad(fx, x, grad_outputs=jv, retain_graph=True)
    return best.max().item()


@contextlib.contextmanager
def features_out(model: LipNeXt):
    """model(x) returns the pooled features: the head's output replaced by its
    input (LiResNet's check of the bound, head as identity). Through model's own
    call, so FSDP2's hooks on the root still gather and free its weights."""
    handle = model.head.register_forward_hook(lambda module, inputs, output: inputs[0])
    try:
        yield
    finally:
        handle.remove()


def audit(
    model: LipNeXt, images: torch.Tensor, labels: torch.Tensor, radius: torch.Tensor, feature_lipschitz: float,
    save_to: str | Path | None = None, config: AuditConfig = AuditConfig(),
) -> dict[str, float]:
    """The audit metrics (lipnext.metrics.AUDIT) of `model` on a sample whose certified
    radii (< 0: misclassified) are `radius`, with the certified bound L_f of the
    feature map. Raises UnsoundCertificate, after saving the points to `save_to`,
    when a point flips inside its radius."""
    start = time.perf_counter()
    certified = radius > 0
    x, y, r = images[certified].float(), labels[certified], radius[certified].float()
    n = len(y)
    generator = torch.Generator(images.device).manual_seed(config.seed)
    training = model.training
    model.eval()
    try:
        with torch.enable_grad(), torch.autocast(images.device.type, enabled=False):
            # 1x and 2x in one batch: half the calls (under FSDP, half the collectives)
            adversarial, reached, clean = pgd_l2(
                model, torch.cat([x, x]), torch.cat([y, y]), torch.cat([r, 2 * r]), config.steps
            )
            with features_out(model):
                lower = lipschitz_lower_bound(
                    model, images[: config.lipschitz_points].float(), config.lipschitz_steps,
                    config.lipschitz_distance, generator,
                )  # fmt: skip
    finally:
        model.train(training)
    # fp32 rounding of logits at the scale of the margins: a point a hair inside its radius
    # (~1e-7) may be a hair outside in the audit's own forward (another batch, other rounding)
    rounding = 1e-5 * clean.abs().max() if n else 0.0
    flipped = reached[:n] > rounding
    if flipped.any():
        point = dict(images=x[flipped], labels=y[flipped], radius=r[flipped], adversarial=adversarial[:n][flipped])
        if save_to is not None:
            save_to = Path(save_to)
            save_to.parent.mkdir(parents=True, exist_ok=True)
            torch.save({k: v.cpu() for k, v in point.items()}, save_to)
        raise UnsoundCertificate(**point, saved=save_to)
    # the share of its clean margin that the attack at 1x took away: < 1 while sound (1 is a flip)
    above = clean[:n] < -rounding
    spent = (reached[:n][above] - clean[:n][above]) / -clean[:n][above]
    return {
        m.AUDIT_POINTS: float(n),
        m.AUDIT_FLIPS: 0.0,
        m.AUDIT_MARGIN_SPENT: spent.max().item() if len(spent) else math.nan,
        m.AUDIT_FLIP_RATE_2X: (reached[n:] > 0).float().mean().item() if n else math.nan,
        m.AUDIT_LIPSCHITZ_LOWER: lower,
        m.AUDIT_LIPSCHITZ_BOUND: feature_lipschitz,
        m.AUDIT_LIPSCHITZ_RATIO: lower / feature_lipschitz,
        m.AUDIT_SECONDS: time.perf_counter() - start,
    }


def audit_sample(dataset: Dataset, points: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`points` test images ([0, 1] float32, N C H W) and labels, drawn by `seed` from the
    first shards of the test split: the same points at every evaluation and on every rank."""
    pool_images, pool_labels = [], []
    for shard in dataset.manifest.shards("test"):
        images, labels = dataset.read_shard(shard)
        if isinstance(images, list):  # PNG
            images = torch.stack([decode_png(png, dataset.manifest.shape) for png in images])
        pool_images.append(images)
        pool_labels.append(labels)
        if sum(len(t) for t in pool_labels) >= points:
            break
    images, labels = torch.cat(pool_images), torch.cat(pool_labels)
    pick = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))[:points]
    return images[pick].float() / 255, labels[pick]
