"""The certificate is sound: every measured Lipschitz ratio of the whole model
stays under `lipschitz_bound`, also when the weights have left their manifold
and when inputs are normalised by a std below 1."""

import math

import pytest
import torch
import torch.nn.functional as F
from lipschitz_check import ascent_ratio, random_pair_ratio

from lipnext import LipNeXt, preset
from lipnext.audit import pgd_l2
from lipnext.certify import (
    certified_accuracies,
    certified_radius,
    class_vectors,
    feature_lipschitz_bound,
    lipschitz_bound,
    margin_radius,
    offset_cross_entropy,
    orthogonality_error,
    pairwise_radius,
)


def _model(seed=0, **overrides):
    torch.manual_seed(seed)
    return LipNeXt(preset("tiny", **overrides))


def _drift(model, scale):
    """Moves every orthogonal matrix off its manifold, as a bad optimizer would."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for block in model.blocks:
            for w in (block.basis.weight, block.mix.weight):
                w.add_(scale * torch.randn(w.shape, generator=g) / math.sqrt(w.shape[0]))
    return model


@pytest.mark.parametrize(
    "name,model",
    [
        ("fresh", lambda: _model()),
        ("drifted", lambda: _drift(_model(), 0.3)),
        ("std-0.25", lambda: _model(input_std=(0.25,))),
    ],
)
def test_whole_model_ratio_never_exceeds_the_bound(name, model):
    model = model()
    bound = lipschitz_bound(model)
    assert random_pair_ratio(model, (1, 8, 8)) <= bound
    assert ascent_ratio(model, (1, 8, 8), steps=300) <= bound


def test_bound_tracks_drift_and_normalisation():
    fresh = feature_lipschitz_bound(_model())
    assert 1.0 <= fresh < 1 + 1e-4  # fp32 orthogonal init is orthogonal to ~1e-6
    assert feature_lipschitz_bound(_drift(_model(), 0.3)) > 1.5
    assert feature_lipschitz_bound(_model(input_std=(0.25,))) == pytest.approx(4 * fresh)


def test_orthogonality_error_is_frobenius_distance_of_the_gram_matrix():
    w = torch.linalg.qr(torch.randn(16, 8, dtype=torch.float64)).Q  # orthonormal columns
    assert orthogonality_error(w) < 1e-12 and orthogonality_error(w.T) < 1e-12
    assert orthogonality_error(2 * w) == pytest.approx(3 * math.sqrt(8))  # ||4I - I||_F


def test_pairwise_rule_is_never_looser_than_the_margin_rule():
    model = _drift(_model(), 0.1)
    x, y = torch.rand(200, 1, 8, 8), torch.randint(0, 10, (200,))
    with torch.no_grad():
        logits = model(x)
    pairwise = pairwise_radius(logits, y, class_vectors(model), feature_lipschitz_bound(model))
    margin = margin_radius(logits, y, lipschitz_bound(model))
    correct = logits.argmax(1) == y
    assert torch.equal(pairwise > 0, correct) and torch.equal(margin > 0, correct)  # sign: right or wrong
    assert correct.any() and (pairwise[correct] >= margin[correct] - 1e-6).all()


def test_certified_accuracies_count_radii_strictly_above_each_eps():
    radius = torch.tensor([-0.1, 0.0, 0.1, 36 / 255 + 1e-4, 0.5, 2.0])
    acc = certified_accuracies(radius)
    assert acc == pytest.approx(
        {"clean_acc": 4 / 6, "cra_36": 3 / 6, "cra_72": 2 / 6, "cra_108": 2 / 6, "cra_255": 1 / 6}
    )


def test_offset_cross_entropy_demands_the_certifying_margin():
    logits, labels = torch.randn(64, 10), torch.randint(0, 10, (64,))
    plain = F.cross_entropy(logits / 0.25, labels) * 0.25
    assert offset_cross_entropy(logits, labels, eps=0.0) == pytest.approx(plain.item())
    # Adding the margin sqrt(2) * eps to the true logit undoes the offset.
    shifted = logits + math.sqrt(2) * 0.5 * F.one_hot(labels, 10)
    assert offset_cross_entropy(shifted, labels, eps=0.5) == pytest.approx(plain.item(), rel=1e-5)


def test_bf16_forward_agrees_with_fp32():
    """Tolerance: max |z_bf16 - z_fp32| <= 3% of max |z_fp32| (measured ~1.1%:
    bf16 keeps 8 mantissa bits, ~0.4% per rounding, over 2 blocks)."""
    model, x = _model(), torch.rand(256, 1, 8, 8)
    with torch.no_grad():
        fp32 = model(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            autocast = model(x).float()
        pure = model.to(torch.bfloat16)(x.bfloat16()).float()
    for bf16 in (autocast, pure):
        assert (bf16 - fp32).abs().max() <= 0.03 * fp32.abs().max()
        assert (bf16.argmax(1) == fp32.argmax(1)).float().mean() >= 0.95


def test_pgd_at_the_certified_radius_flips_no_certified_point(trained_tiny, digits):
    """100-step L2 PGD on the margin, each point attacked at its own certified
    radius: none flips. The same attack at twice the radius flips most points
    (measured: all 278), so it is strong enough to find flips that exist."""
    _, (x, y) = digits
    radius = certified_radius(trained_tiny, x, y)
    certified = radius > 0
    x, y, radius = x[certified], y[certified], radius[certified]
    assert len(y) > 250
    adv, _, _ = pgd_l2(trained_tiny, x, y, radius, steps=100)
    assert ((adv - x).flatten(1).norm(dim=1) <= radius * (1 + 1e-5)).all()
    stronger, _, _ = pgd_l2(trained_tiny, x, y, 2 * radius, steps=100)
    with torch.no_grad():
        assert (trained_tiny(adv).argmax(1) == y).all()
        assert (trained_tiny(stronger).argmax(1) != y).float().mean() > 0.5
