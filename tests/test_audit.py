"""The certificate audit: a sound certificate survives it, a broken one fails it
loudly with the points saved, and it audits a sharded model as it audits one
process. Numbers measured on the session's trained tiny model (tests/conftest.py)."""

import copy
import dataclasses
import math

import pytest
import torch
from torch.distributed.device_mesh import init_device_mesh

from lipnext import LipNeXt, preset
from lipnext.audit import (
    UnsoundCertificate,
    audit,
    audit_sample,
    features_out,
    lipschitz_lower_bound,
    margin,
    pgd_l2,
)
from lipnext.certify import Certificate, certified_radius, lipschitz_bound, margin_radius
from lipnext.data import open_dataset
from lipnext.metrics import (
    AUDIT,
    AUDIT_FLIP_RATE_2X,
    AUDIT_FLIPS,
    AUDIT_LIPSCHITZ_BOUND,
    AUDIT_LIPSCHITZ_LOWER,
    AUDIT_LIPSCHITZ_RATIO,
    AUDIT_MARGIN_SPENT,
    AUDIT_POINTS,
    AUDIT_SECONDS,
    is_metric,
)
from lipnext.parallelize import apply_fsdp, materialize
from lipnext.ranks import run_ranks
from lipnext.train_config import TrainConfig
from lipscale.data.convert import digits_plan
from lipscale.data.shards import write_dataset


@pytest.fixture(scope="module")
def sample(digits):
    """The audit's 64 points: the first of the shuffled test split."""
    _, (x, y) = digits
    return x[: TrainConfig.audit_points], y[: TrainConfig.audit_points]


def test_a_trained_model_flips_nowhere_inside_its_radii_and_almost_everywhere_at_twice_them(trained_tiny, sample):
    """3 PGD steps take at most 72% of a point's margin at its radius (as 100 steps do)
    and flip all 59 certified points at twice it; the lower bound reaches 0.80 L_f
    (0.85 after 100 power iterations at all 64 points)."""
    x, y = sample
    radius = certified_radius(trained_tiny, x, y)
    bound = Certificate(trained_tiny).feature_lipschitz
    found = audit(trained_tiny, x, y, radius, bound)
    assert set(found) == set(AUDIT) and all(is_metric(k) and isinstance(v, float) for k, v in found.items())
    assert found[AUDIT_POINTS] == (radius > 0).sum().item() > 50
    assert found[AUDIT_FLIPS] == 0 and 0.5 < found[AUDIT_MARGIN_SPENT] < 1
    assert found[AUDIT_FLIP_RATE_2X] > 0.9
    assert 0.7 * bound < found[AUDIT_LIPSCHITZ_LOWER] <= bound == found[AUDIT_LIPSCHITZ_BOUND]
    assert found[AUDIT_LIPSCHITZ_RATIO] == pytest.approx(found[AUDIT_LIPSCHITZ_LOWER] / bound)
    assert found[AUDIT_SECONDS] > 0


def test_the_audit_leaves_the_model_as_it_found_it(trained_tiny, sample):
    """No gradient reaches the weights, the weights do not move, the mode is restored,
    and the same audit twice gives the same numbers (its directions come from its seed)."""
    model = copy.deepcopy(trained_tiny).train()
    x, y = sample
    radius = certified_radius(model, x, y)
    before = copy.deepcopy(model.state_dict())
    first, second = (audit(model, x, y, radius, 1.0) for _ in range(2))
    assert model.training and all(p.grad is None for p in model.parameters())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert {k: v for k, v in first.items() if k != AUDIT_SECONDS} == {
        k: v for k, v in second.items() if k != AUDIT_SECONDS
    }


def test_an_inflated_radius_fails_the_audit_with_the_points_saved(trained_tiny, sample, tmp_path):
    """Radii 3x the certified ones: the 1x attack is now a 3x one, and its flips are
    raised as an unsound certificate, each point saved with its adversarial image."""
    x, y = sample
    radius = 3 * certified_radius(trained_tiny, x, y)
    saved = tmp_path / "trial" / "unsound.pt"
    with pytest.raises(UnsoundCertificate, match="certified radius.*unsound.*unsound.pt") as raised:
        audit(trained_tiny, x, y, radius, Certificate(trained_tiny).feature_lipschitz, save_to=saved)
    e = raised.value
    assert e.saved == saved and len(e.labels) > 50  # most points flip at 3x
    points = torch.load(saved)
    assert set(points) == {"images", "labels", "radius", "adversarial"}
    assert torch.equal(points["labels"], e.labels) and torch.equal(points["adversarial"], e.adversarial)
    distance = torch.linalg.vector_norm((points["adversarial"] - points["images"]).flatten(1), dim=1)
    assert (distance <= points["radius"] * (1 + 1e-5)).all()
    with torch.no_grad():
        assert (trained_tiny(points["adversarial"]).argmax(1) != points["labels"]).all()
        assert (trained_tiny(points["images"]).argmax(1) == points["labels"]).all()


def test_a_certificate_that_trusts_the_weights_to_be_orthogonal_fails_the_audit(trained_tiny, sample):
    """The stem's weights doubled (off their manifold): margin-rule radii from the
    weights as they are pass the audit, radii that assume L = 1 flip 59 of 60 points.
    The lower bound (1.67) shows the constant above 1 and under the bound L_f (2.65)."""
    model, (x, y) = copy.deepcopy(trained_tiny), sample
    with torch.no_grad():
        model.stem.proj.weight.mul_(2)
        logits = model(x)
    bound = Certificate(model).feature_lipschitz
    sound = audit(model, x, y, margin_radius(logits, y, lipschitz_bound(model)), bound)
    assert sound[AUDIT_POINTS] > 50 and sound[AUDIT_FLIPS] == 0
    assert 1.5 < sound[AUDIT_LIPSCHITZ_LOWER] <= bound
    with pytest.raises(UnsoundCertificate) as raised:
        audit(model, x, y, margin_radius(logits, y, 1.0), bound)
    assert len(raised.value.labels) > 50


def test_a_point_on_its_decision_boundary_is_rounding_not_an_unsound_certificate(trained_tiny, sample):
    """A point bisected to within 1e-7 of the boundary, its margin +3e-7 in the audit's
    forward, given a radius of 1e-8 (as another batch's rounding could certify it):
    no flip is raised, and its margin does not count towards the share spent."""
    x, y = sample
    radius = certified_radius(trained_tiny, x, y)
    adversarial, reached, _ = pgd_l2(trained_tiny, x, y, 2 * radius, steps=5)
    i = int(torch.nonzero(reached > 0)[0])
    inside, outside = x[i], adversarial[i]
    with torch.no_grad():
        for _ in range(60):
            middle = (inside + outside) / 2
            if margin(trained_tiny(middle[None]), y[i : i + 1]) > 0:
                outside = middle
            else:
                inside = middle
        assert 0 < margin(trained_tiny(outside[None]), y[i : i + 1]) < 1e-6
    x, radius = x.clone(), radius.clone()
    x[i], radius[i] = outside, 1e-8
    found = audit(trained_tiny, x, y, radius, Certificate(trained_tiny).feature_lipschitz)
    assert found[AUDIT_FLIPS] == 0 and found[AUDIT_POINTS] == (radius > 0).sum().item()
    assert found[AUDIT_MARGIN_SPENT] < 1


def test_no_certified_point_leaves_only_the_lipschitz_check(trained_tiny, sample):
    x, y = sample
    found = audit(trained_tiny, x, y, torch.full((len(y),), -1.0), 1.0)
    assert found[AUDIT_POINTS] == 0 and found[AUDIT_FLIPS] == 0
    assert math.isnan(found[AUDIT_FLIP_RATE_2X]) and math.isnan(found[AUDIT_MARGIN_SPENT])
    assert 0 < found[AUDIT_LIPSCHITZ_LOWER] <= 1.0


def test_pgd_stays_in_each_ball_and_keeps_a_points_first_flip(trained_tiny, sample):
    """Outside the pixel box if that is where the margin grows: the certificate
    covers the whole ball."""
    x, y = sample
    radius = torch.linspace(0.2, 1.5, len(y))
    adversarial, reached, clean = pgd_l2(trained_tiny, x, y, radius, steps=5)
    distance = torch.linalg.vector_norm((adversarial - x).flatten(1), dim=1)
    assert (distance <= radius * (1 + 1e-5)).all()
    with torch.no_grad():
        logits = trained_tiny(adversarial)
    flipped = reached > 0
    assert flipped.any() and (~flipped).any()
    assert torch.equal(logits.argmax(1) != y, flipped)
    assert (reached >= clean).all() and (adversarial.amin() < 0 or adversarial.amax() > 1)


def test_the_lower_bound_finds_the_spectral_norm_of_a_linear_map():
    a = torch.randn(10, 64, generator=torch.Generator().manual_seed(0))
    norm = torch.linalg.matrix_norm(a, ord=2).item()
    x = torch.rand(4, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    lower = lipschitz_lower_bound(lambda v: v.flatten(1) @ a.T, x, 20, 0.1, torch.Generator().manual_seed(2))
    assert norm * (1 - 1e-3) < lower <= norm * (1 + 1e-5)


def test_features_out_makes_the_model_return_its_pooled_features(trained_tiny, sample):
    x, _ = sample
    with torch.no_grad(), features_out(trained_tiny):
        features = trained_tiny(x)
    assert torch.equal(features, trained_tiny.features(x))
    with torch.no_grad():
        assert trained_tiny(x).shape == (len(x), 10)  # the hook is gone


def test_the_sample_is_the_same_test_points_whatever_the_shards_and_encoding(digits, tmp_path):
    """Drawn by the seed from the first shards of the test split: the sample of a
    dataset in shards of 100 raw images equals that of the same data in PNG, and
    each point is a test image with its label (pixels in steps of 1/255)."""
    plan = digits_plan(shard_size=100)
    raw, png = (open_dataset(write_dataset(p, str(tmp_path / p.encoding)) and str(tmp_path / p.encoding))
                for p in (plan, dataclasses.replace(plan, encoding="png")))  # fmt: skip
    x, y = audit_sample(raw, 64, seed=0)
    assert x.dtype == torch.float32 and x.shape == (64, 1, 8, 8) and 0 <= x.min() and x.max() <= 1
    for got, expected in zip(audit_sample(png, 64, seed=0), (x, y)):
        assert torch.equal(got, expected)
    assert not torch.equal(audit_sample(raw, 64, seed=1)[1], y)
    _, (test_x, test_y) = digits
    nearest = torch.cdist(x.flatten(1), test_x.flatten(1)).min(dim=1)
    assert (nearest.values < 1e-2).all() and torch.equal(test_y[nearest.indices], y)
    assert len(set(nearest.indices.tolist())) == 64
    assert len(audit_sample(raw, 150, seed=0)[1]) == 150  # two shards


CONFIG = preset("tiny", width=40, shift_ratio=1 / 8)


def _audit_after_init(sharded: bool):
    """A fresh model's audit on random points, then one training backward."""
    with torch.device("meta"):
        model = LipNeXt(CONFIG)
    if sharded:
        apply_fsdp(model, init_device_mesh("cpu", (torch.distributed.get_world_size(),)))
    materialize(model, torch.device("cpu"), seed=7)
    g = torch.Generator().manual_seed(3)
    x, y = torch.rand(32, 1, 8, 8, generator=g), torch.randint(0, 10, (32,), generator=g)
    with torch.no_grad():
        radius = torch.where(model(x).argmax(1) == y, 0.3, -1.0)
    found = audit(model, x, y, radius, 1.0)
    untouched = all(p.grad is None for p in model.parameters())
    torch.nn.functional.cross_entropy(model(x), y).backward()
    grads = {n: p.grad.full_tensor() if sharded else p.grad for n, p in model.named_parameters()}
    return {k: v for k, v in found.items() if k != AUDIT_SECONDS}, untouched, grads


def test_a_sharded_model_is_audited_like_one_process_and_trains_on_after():
    """FSDP2 on 2 ranks, every rank auditing the same points: the same numbers on
    each rank as in one process, no gradient left on the weights, and the next
    backward's gradients those of one process."""
    expected, untouched, grads = _audit_after_init(False)
    assert untouched and expected[AUDIT_POINTS] > 0
    for found, untouched, sharded_grads in run_ranks(_audit_after_init, 2, True):
        assert found == pytest.approx(expected, rel=1e-5) and untouched
        for name, grad in grads.items():
            torch.testing.assert_close(sharded_grads[name], grad, rtol=1e-5, atol=1e-7)
