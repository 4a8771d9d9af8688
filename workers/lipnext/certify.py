"""Deterministic robustness certificates for LipNeXt.

A point x with label y is certified at L2 radius eps (raw [0, 1] pixels) when
no perturbation of norm <= eps can change the prediction. For logits z with
Lipschitz constant L, z_y - z_j changes by at most ||w_y - w_j|| L_f eps
(per-pair head rule, L_f = Lipschitz constant of the features) and by at most
sqrt(2) L eps in general. The constants are computed from the weights as they
are, never assumed to be 1, so a weight that drifted off its manifold only
loosens the certificate.
"""

import math

import torch
import torch.nn.functional as F

from lipnext.model import LipNeXt

EPS_255 = (36, 72, 108, 255)
"""Radii reported as eval/cra_<k>, for eps = k / 255."""


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


def orthogonal_norm_bound(weight: torch.Tensor) -> float:
    """Upper bound on ||W||_2 of a (near) orthogonal W: ||W||_2^2 = ||G||_2
    <= 1 + ||G - I||_2 <= 1 + ||G - I||_F. One Gram product instead of an SVD,
    and tight to first order in the drift."""
    return math.sqrt(1.0 + orthogonality_error(weight))


def max_orthogonality_error(model: LipNeXt) -> float:
    """The largest ||G - I||_F over the model's orthogonal matrices."""
    matrices = [model.stem.proj.weight] + [w for b in model.blocks for w in (b.basis.weight, b.mix.weight)]
    return max(orthogonality_error(w) for w in matrices)


def block_bound(block) -> float:
    """x -> M R^T S(R x): S is a permutation and beta-Abs is 1-Lipschitz."""
    r = orthogonal_norm_bound(block.basis.weight)
    return r * r * orthogonal_norm_bound(block.mix.weight)


@torch.no_grad()
def feature_lipschitz_bound(model: LipNeXt) -> float:
    """Bound on the L2 Lipschitz constant of raw pixels -> pooled features."""
    bound = 1.0 / min(model.config.input_std)
    bound *= orthogonal_norm_bound(model.stem.proj.weight)
    for block in model.blocks:
        bound *= block_bound(block)
    return bound  # L2 pooling is 1-Lipschitz


@torch.no_grad()
def class_vectors(model: LipNeXt) -> torch.Tensor:
    return F.normalize(_full(model.head.weight), dim=1)


@torch.no_grad()
def lipschitz_bound(model: LipNeXt) -> float:
    """Bound on the L2 Lipschitz constant of raw pixels -> logits (exact
    spectral norm of the head)."""
    head = torch.linalg.matrix_norm(class_vectors(model), ord=2).item()
    return feature_lipschitz_bound(model) * head


def margin_radius(logits: torch.Tensor, labels: torch.Tensor, lipschitz: float) -> torch.Tensor:
    """Radius from the top margin and the sqrt(2) L rule; negative when wrong."""
    true = logits.gather(1, labels[:, None]).squeeze(1)
    others = logits.scatter(1, labels[:, None], float("-inf")).amax(dim=1)
    return (true - others) / (math.sqrt(2) * lipschitz)


def pairwise_radius(
    logits: torch.Tensor, labels: torch.Tensor, vectors: torch.Tensor, feature_lipschitz: float
) -> torch.Tensor:
    """min_j (z_y - z_j) / (||w_y - w_j|| L_f): the per-pair head rule, never
    smaller than the margin rule since ||w_y - w_j|| <= sqrt(2) ||W||_2."""
    logits = logits.double()
    true = logits.gather(1, labels[:, None])
    gaps = torch.cdist(vectors[labels], vectors)  # (N, K) ||w_y - w_j||
    radius = (true - logits) / (gaps * feature_lipschitz)
    radius.scatter_(1, labels[:, None], float("inf"))
    return radius.amin(dim=1).float()


@torch.no_grad()
def certified_radius(model: LipNeXt, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-sample certified L2 radius in raw pixel space (< 0: misclassified)."""
    vectors = class_vectors(model).to(images.device)
    return pairwise_radius(model(images).float(), labels, vectors, feature_lipschitz_bound(model))


def certified_accuracies(radius: torch.Tensor) -> dict[str, float]:
    """Clean accuracy and CRA at each EPS_255 radius, as fractions."""
    metrics = {"clean_acc": (radius > 0).float().mean().item()}
    for k in EPS_255:
        metrics[f"cra_{k}"] = (radius > k / 255).float().mean().item()
    return metrics


def offset_cross_entropy(
    logits: torch.Tensor, labels: torch.Tensor, eps: float, lipschitz: float = 1.0, temperature: float = 0.25
) -> torch.Tensor:
    """CE((z - m onehot(y)) / T) * T with m = sqrt(2) L eps: the true logit must
    win by the margin that certifies radius eps."""
    margin = math.sqrt(2) * lipschitz * eps
    offset = logits - margin * F.one_hot(labels, logits.shape[1]).to(logits.dtype)
    return F.cross_entropy(offset / temperature, labels) * temperature
