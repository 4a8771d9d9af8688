"""The training losses that ask for certified margins, and the training radius by epoch.

Both losses take logits z = head(features), whose class vectors w_j are unit rows
and whose features are L-Lipschitz in raw pixels: z_y - z_j then moves by at most
L ||w_y - w_j|| eps within radius eps, the per-pair margin that lipnext.certify
certifies with: the same unit rows (lipnext.layers.unit_rows) and, with every
matrix orthogonal, its feature bound (lipnext.certify.feature_lipschitz).

    emma       each wrong logit z_j raised by eps L ||w_y - w_j|| times a detached
               clip((z_y - z_j) / that margin, 0.01, 1), then cross-entropy
               (EMMA, LiResNet++; the paper's loss)
    offset_ce  the true logit lowered by one uniform sqrt(2) L eps, then cross-entropy

EMMA's factor spends the margin only where the sample has not yet won it: a
pair already certified at eps gets the whole margin, one far from it (the
gap at 1% of the margin or less) only 1% of it, so hopeless pairs do not
dominate the gradient. The uniform sqrt(2) bound is the per-pair one at its
worst pair (||w_y - w_j|| <= sqrt(2) for unit rows), so offset_ce asks every
pair for the margin only the closest class needs.
"""

import math
from typing import Literal

import torch
import torch.nn.functional as F

from lipnext.layers import unit_rows

LossKind = Literal["emma", "offset_ce"]


def margins(head_weight: torch.Tensor, labels: torch.Tensor, lipschitz: float) -> torch.Tensor:
    """L ||w_y - w_j|| for each sample's label y and every class j, (B, K), differentiable
    in the head. From the Gram rows (||a - b||^2 = 2 - 2 a.b for unit rows): B K width
    multiply-adds, like the head itself, where the certificate's exact differences
    (lipnext.certify.class_gaps) would take K^2 width. The cancellation that rules
    those out for a certificate only blurs a loss. The clamp keeps the gradient of
    the zero gap (j = y) at 0 instead of NaN."""
    w = unit_rows(head_weight)
    return lipschitz * (2 - 2 * w[labels] @ w.T).clamp(min=1e-12).sqrt()


def emma(
    logits: torch.Tensor, labels: torch.Tensor, eps: float, head_weight: torch.Tensor, lipschitz: float = 1.0,
    temperature: float = 1.0,
) -> torch.Tensor:  # fmt: skip
    """EMMA at radius eps: with y = z - z_y and m_j = L ||w_y - w_j||,
    CE((y + f eps m) / T, label) * T, f = clip(-y_j / (eps m_j), 0.01, 1) detached.
    At eps = 0, the plain cross-entropy."""
    y = logits - logits.gather(1, labels[:, None])
    if eps == 0:
        return F.cross_entropy(y / temperature, labels) * temperature
    margin = eps * margins(head_weight, labels, lipschitz)
    factor = (-y / margin).clamp(0.01, 1).detach()
    return F.cross_entropy((y + factor * margin) / temperature, labels) * temperature


def offset_ce(
    logits: torch.Tensor, labels: torch.Tensor, eps: float, lipschitz: float = 1.0, temperature: float = 0.25
) -> torch.Tensor:
    """CE((z - m onehot(y)) / T) * T with m = sqrt(2) L eps: the true logit must
    win by the margin that certifies radius eps against any class."""
    margin = math.sqrt(2) * lipschitz * eps
    offset = logits - margin * F.one_hot(labels, logits.shape[1]).to(logits.dtype)
    return F.cross_entropy(offset / temperature, labels) * temperature


def certified_margin_loss(
    kind: LossKind, logits: torch.Tensor, labels: torch.Tensor, eps: float, head_weight: torch.Tensor,
    lipschitz: float, temperature: float,
) -> torch.Tensor:  # fmt: skip
    """The loss `kind` (LossConfig.kind) at radius eps, for logits of a head with
    rows `head_weight` on L-Lipschitz features."""
    if kind == "emma":
        return emma(logits, labels, eps, head_weight, lipschitz, temperature)
    return offset_ce(logits, labels, eps, lipschitz, temperature)


def training_eps(epoch: int, epochs: int, eps: float, start: float, peak: float, ramp_fraction: float) -> float:
    """The training radius of `epoch` (0-based) of `epochs`: eps times a factor that
    rises linearly from `start` at epoch 0 to `peak` at ramp_fraction of training,
    then holds. LiResNet++: start 0.1, peak 3 (CIFAR, Tiny-ImageNet) or 2 (ImageNet),
    ramp 1/2, i.e. 36/255 * (0.1 + (m - 0.1) * min(2 epoch / epochs, 1)); a ramp of
    0 is the peak throughout."""
    ramp = ramp_fraction * epochs
    progress = min(epoch / ramp, 1.0) if ramp else 1.0
    return eps * (start + (peak - start) * progress)
