"""Deterministic robustness certificates for LipNeXt.

A point x with label y is certified at L2 radius eps (raw [0, 1] pixels) when
no perturbation of norm <= eps can change the prediction. For logits z with
Lipschitz constant L, z_y - z_j changes by at most ||w_y - w_j|| L_f eps
(per-pair head rule, L_f = Lipschitz constant of the features) and by at most
sqrt(2) L eps in general. The constants are computed from the weights as they
are, never assumed to be 1, so a weight that drifted off its manifold only
loosens the certificate.

One path: a `Certificate` of the model's current weights (one Gram matrix per
orthogonal matrix, the unit class vectors and their exact pairwise gaps) gives
the radius of every batch. `certified_radius` and lipnext.train.evaluate both
use it, so the radius the PGD soundness test attacks is the one behind the
reported CRA. Everything here runs in float64 (logits in fp32), TF32 or not.
"""

import math

import torch
import torch.nn.functional as F

from lipnext.layers import OrthogonalLinear
from lipnext.metrics import ACCURACIES
from lipnext.model import LipNeXt


def _full(t: torch.Tensor) -> torch.Tensor:
    """A float64 copy of the whole tensor, gathered if it is a DTensor shard."""
    if hasattr(t, "full_tensor"):
        t = t.full_tensor()
    return t.detach().double()


def orthogonality_error(weight: torch.Tensor) -> float:
    """||G - I||_F for the smaller Gram matrix G of W (W^T W or W W^T)."""
    w = _full(weight)
    gram = w.T @ w if w.shape[0] >= w.shape[1] else w @ w.T
    return torch.linalg.matrix_norm(gram - torch.eye(len(gram), dtype=gram.dtype, device=gram.device)).item()


def lipschitz_path(model: LipNeXt) -> list[list[OrthogonalLinear]]:
    """The orthogonal maps from pixels to features, layer by layer, each as often as it
    is applied: the stem's projection; per block x -> M R^T S(R x), R twice and M once
    (the shift S is a permutation, beta-Abs and the L2 pooling are 1-Lipschitz)."""
    return [[model.stem.proj]] + [[block.basis, block.basis, block.mix] for block in model.blocks]


def class_gaps(vectors: torch.Tensor) -> torch.Tensor:
    """||w_i - w_j|| for every pair of rows, (K, K), as the norm of the difference.
    torch.cdist takes ||a||^2 + ||b||^2 - 2 a.b beyond 25 rows, which loses digits
    to cancellation and can round a gap down: an overstated radius."""
    rows = max(1, 2**24 // vectors.numel())  # chunks of <= 2^24 differences (128 MiB in float64)
    return torch.cat([torch.linalg.vector_norm(part[:, None] - vectors, dim=-1) for part in vectors.split(rows)])


class Certificate:
    """The certificate of a model's current weights, computed once per evaluation.

    Every OrthogonalLinear gets one Gram matrix G, which gives both its drift
    ||G - I||_F and its norm bound ||W||_2 = sqrt(||G||_2) <= sqrt(1 + ||G - I||_F)
    (tight to first order, no SVD). A matrix that lipschitz_path does not
    account for is refused: the bound would silently leave it out.
    """

    @torch.no_grad()
    def __init__(self, model: LipNeXt):
        matrices = [m for m in model.modules() if isinstance(m, OrthogonalLinear)]
        path = lipschitz_path(model)
        if unaccounted := [m for m in matrices if not any(m in layer for layer in path)]:
            raise ValueError(f"the Lipschitz bound does not account for {len(unaccounted)} orthogonal matrices")
        errors = {m: orthogonality_error(m.weight) for m in matrices}
        self.ortho_error = max(errors.values())
        """The largest ||G - I||_F over the model's orthogonal matrices."""
        self.feature_lipschitz = 1.0 / min(model.config.input_std)
        """Bound on the L2 Lipschitz constant of raw pixels -> pooled features."""
        for layer in path:
            self.feature_lipschitz *= math.prod(math.sqrt(1.0 + errors[m]) for m in layer)
        self.vectors = F.normalize(_full(model.head.weight), dim=1)
        """The unit class vectors w_j of the head, float64 (K, width)."""
        self.gaps = class_gaps(self.vectors)
        self.lipschitz = self.feature_lipschitz * torch.linalg.matrix_norm(self.vectors, ord=2).item()
        """Bound on the L2 Lipschitz constant of raw pixels -> logits (exact spectral norm of the head)."""

    def radius(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Per-sample certified L2 radius, min_j (z_y - z_j) / (||w_y - w_j|| L_f): the
        per-pair head rule, never smaller than the margin rule since ||w_y - w_j||
        <= sqrt(2) ||W||_2. Negative when misclassified."""
        logits = logits.double()
        true = logits.gather(1, labels[:, None])
        radius = (true - logits) / (self.gaps.to(logits.device)[labels] * self.feature_lipschitz)
        radius.scatter_(1, labels[:, None], float("inf"))
        return radius.amin(dim=1).float()


def lipschitz_bound(model: LipNeXt) -> float:
    """Bound on the L2 Lipschitz constant of raw pixels -> logits."""
    return Certificate(model).lipschitz


@torch.no_grad()
def certified_radius(model: LipNeXt, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-sample certified L2 radius in raw pixel space (< 0: misclassified)."""
    return Certificate(model).radius(model(images).float(), labels)


def margin_radius(logits: torch.Tensor, labels: torch.Tensor, lipschitz: float) -> torch.Tensor:
    """Radius from the top margin and the sqrt(2) L rule (coarser); negative when wrong."""
    true = logits.gather(1, labels[:, None]).squeeze(1)
    others = logits.scatter(1, labels[:, None], float("-inf")).amax(dim=1)
    return (true - others) / (math.sqrt(2) * lipschitz)


def certified_counts(radius: torch.Tensor) -> torch.Tensor:
    """Points certified at each radius of metrics.ACCURACIES (strictly above it; at 0:
    correctly classified), in that order, on radius's device: no host sync per batch."""
    eps = torch.tensor(list(ACCURACIES.values()), dtype=radius.dtype, device=radius.device)
    return (radius[:, None] > eps).sum(dim=0)


def accuracies(counts: list[float], samples: float) -> dict[str, float]:
    """The reported metrics (eval/clean_acc, eval/cra_<k>) of certified_counts over `samples` points."""
    return {name: count / samples for name, count in zip(ACCURACIES, counts)}


def certified_accuracies(radius: torch.Tensor) -> dict[str, float]:
    """Clean accuracy and CRA at each reported radius, as fractions, keyed by metric name."""
    return accuracies(certified_counts(radius).tolist(), len(radius))


def offset_cross_entropy(
    logits: torch.Tensor, labels: torch.Tensor, eps: float, lipschitz: float = 1.0, temperature: float = 0.25
) -> torch.Tensor:
    """CE((z - m onehot(y)) / T) * T with m = sqrt(2) L eps: the true logit must
    win by the margin that certifies radius eps."""
    margin = math.sqrt(2) * lipschitz * eps
    offset = logits - margin * F.one_hot(labels, logits.shape[1]).to(logits.dtype)
    return F.cross_entropy(offset / temperature, labels) * temperature
