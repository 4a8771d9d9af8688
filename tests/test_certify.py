"""The certificate is sound: every measured Lipschitz ratio of the whole model
stays under `lipschitz_bound`, also when the weights have left their manifold
and when inputs are normalised by a std below 1; PGD at the certified radius
flips nothing; and the CRA that evaluation reports is exactly lipnext.certify's."""

import math

import pytest
import torch
import torch.nn.functional as F
from lipschitz_check import ascent_ratio, random_pair_ratio

from lipnext import LipNeXt, preset
from lipnext.audit import pgd_l2
from lipnext.certify import (
    Certificate,
    certified_accuracies,
    certified_radius,
    class_gaps,
    lipschitz_bound,
    margin_radius,
    offset_cross_entropy,
    orthogonality_error,
)
from lipnext.layers import OrthogonalLinear
from lipnext.loader import ShardLoader
from lipnext.manifold import param_groups
from lipnext.metrics import ACCURACIES, CLEAN_ACC, LIPSCHITZ_BOUND, ORTHO_ERROR, cra
from lipnext.train import evaluate


f64 = dict(dtype=torch.float64)


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
    fresh = Certificate(_model()).feature_lipschitz
    assert 1.0 <= fresh < 1 + 1e-4  # fp32 orthogonal init is orthogonal to ~1e-6
    drifted = _drift(_model(), 0.3)
    assert Certificate(drifted).feature_lipschitz > 1.5
    assert Certificate(_model(input_std=(0.25,))).feature_lipschitz == pytest.approx(4 * fresh)
    # The drift reported is that of the worst of the matrices the optimizer keeps orthogonal.
    orthogonal = param_groups(drifted)[0]["params"]
    assert Certificate(drifted).ortho_error == max(orthogonality_error(w) for w in orthogonal) > 0.1


def test_a_matrix_the_bound_does_not_account_for_is_refused():
    model = _model()
    model.extra = OrthogonalLinear(32, 32)  # a layer added without teaching lipschitz_path about it
    with pytest.raises(ValueError, match="does not account for 1 orthogonal matrices"):
        Certificate(model)


def test_class_gaps_are_exact_where_cdist_rounds_them_down():
    """Near-duplicate class vectors (gaps ~1e-6): cdist's ||a||^2 + ||b||^2 - 2ab path
    (taken beyond 25 rows) is off by ~1e-4 and rounds some gaps down, which would
    overstate radii; the norm of the differences is exact to float64 rounding."""
    g = torch.Generator().manual_seed(0)
    near = torch.eye(1, 64, **f64) + 1e-6 * torch.randn(30, 64, generator=g, **f64)
    vectors = F.normalize(near, dim=1)
    rows = vectors.tolist()  # the reference: exact differences, their squares summed exactly (fsum)
    exact = [[math.sqrt(math.fsum((a - b) ** 2 for a, b in zip(u, v))) for v in rows] for u in rows]
    exact = torch.tensor(exact, **f64)
    torch.testing.assert_close(class_gaps(vectors), exact, rtol=1e-14, atol=0)
    off_diagonal = ~torch.eye(30, dtype=torch.bool)
    assert (torch.cdist(vectors, vectors)[off_diagonal] < exact[off_diagonal] * (1 - 1e-8)).any()


def test_orthogonality_error_is_frobenius_distance_of_the_gram_matrix():
    w = torch.linalg.qr(torch.randn(16, 8, dtype=torch.float64)).Q  # orthonormal columns
    assert orthogonality_error(w) < 1e-12 and orthogonality_error(w.T) < 1e-12
    assert orthogonality_error(2 * w) == pytest.approx(3 * math.sqrt(8))  # ||4I - I||_F


def test_pairwise_rule_is_never_looser_than_the_margin_rule():
    model = _drift(_model(), 0.1)
    x, y = torch.rand(200, 1, 8, 8), torch.randint(0, 10, (200,))
    with torch.no_grad():
        logits = model(x)
    pairwise = Certificate(model).radius(logits, y)
    margin = margin_radius(logits, y, lipschitz_bound(model))
    correct = logits.argmax(1) == y
    assert torch.equal(pairwise > 0, correct) and torch.equal(margin > 0, correct)  # sign: right or wrong
    assert correct.any() and (pairwise[correct] >= margin[correct] - 1e-6).all()


def test_certified_accuracies_count_radii_strictly_above_each_eps():
    radius = torch.tensor([-0.1, 0.0, 0.1, 36 / 255 + 1e-4, 0.5, 2.0])
    acc = certified_accuracies(radius)
    assert acc == {CLEAN_ACC: 4 / 6, cra(36): 3 / 6, cra(72): 2 / 6, cra(108): 2 / 6, cra(255): 1 / 6}


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


def test_evaluation_reports_exactly_the_cra_that_certify_computes(trained_tiny, digits_shards):
    """evaluate() on the digits test split, against certified_radius (the function the
    PGD test attacks) and certified_accuracies on the same batches: equal, not close."""
    loader = ShardLoader(digits_shards, "test", 100, shuffle=False)
    reported = evaluate(trained_tiny, loader, torch.device("cpu"))
    radius = torch.cat([certified_radius(trained_tiny, x, y) for x, y in loader])
    assert len(radius) == 297 and {k: reported[k] for k in ACCURACIES} == certified_accuracies(radius)
    assert reported[CLEAN_ACC] > 0.9 and reported[cra(36)] > 0.5  # a model that certifies something
    assert reported[LIPSCHITZ_BOUND] == lipschitz_bound(trained_tiny)
    assert reported[ORTHO_ERROR] == Certificate(trained_tiny).ortho_error


def test_pgd_at_the_certified_radius_flips_no_certified_point(trained_tiny, digits):
    """100-step L2 PGD on the margin, each point attacked at its own certified
    radius (certified_radius: the path of the reported CRA): none flips. The same
    attack at twice the radius flips most points (measured: all 278), so it is
    strong enough to find flips that exist."""
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
