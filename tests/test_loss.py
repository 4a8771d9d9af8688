"""The training losses (lipnext.loss) and the training radius by epoch."""

import math

import pytest
import torch
import torch.nn.functional as F

from lipnext.loss import emma, margins, offset_ce, training_eps
from lipnext.train_config import LossConfig

# Three class vectors, not of unit length (the losses must normalise them): unit rows (1, 0),
# (0, 1) and (1, 1) / sqrt(2), so the gaps are sqrt(2) (0-1) and 0.765 (0-2, 1-2).
HEAD = torch.tensor([[2.0, 0.0], [0.0, 3.0], [3.0, 3.0]])
UNIT = HEAD / HEAD.norm(dim=1, keepdim=True)


def _direct_emma(logits, labels, eps, head, lipschitz, temperature):
    """EMMA written out pair by pair, in float64, from its definition."""
    unit = [[v / math.hypot(*row) for v in row] for row in head.double().tolist()]
    total = 0.0
    for z, y in zip(logits.double().tolist(), labels.tolist()):
        raised = []
        for j, z_j in enumerate(z):
            gap = z_j - z[y]  # <= 0 where y wins against j
            if j == y:
                raised.append(0.0)
                continue
            margin = eps * lipschitz * math.dist(unit[y], unit[j])
            factor = min(max(-gap / margin, 0.01), 1.0)
            raised.append(gap + factor * margin)
        scaled = [r / temperature for r in raised]
        log_sum = math.log(sum(math.exp(s) for s in scaled))
        total += (log_sum - scaled[y]) * temperature
    return total / len(labels)


def test_margins_are_the_per_pair_certificate_gaps_of_the_unit_rows():
    labels = torch.tensor([0, 2])
    expected = 0.5 * torch.cdist(UNIT, UNIT)[labels]
    assert torch.allclose(margins(HEAD, labels, lipschitz=0.5), expected, atol=1e-6)


@pytest.mark.parametrize("temperature", [1.0, 0.25])
def test_emma_equals_the_per_pair_formula_on_hand_made_logits(temperature):
    # Sample 0 wins against both classes by more than the margin (factor 1), sample 1 loses
    # to class 2 (factor clipped at 0.01), sample 2 wins by a fraction of one margin.
    logits = torch.tensor([[1.0, 0.2, -0.5], [0.1, 0.0, 0.9], [-0.2, 0.3, 0.25]])
    labels = torch.tensor([0, 1, 1])
    eps, lipschitz = 0.3, 1.5
    got = emma(logits, labels, eps, HEAD, lipschitz, temperature).item()
    assert got == pytest.approx(_direct_emma(logits, labels, eps, HEAD, lipschitz, temperature), rel=1e-6)


def test_emma_factor_is_detached_and_the_margin_reaches_the_head():
    logits = torch.tensor([[0.4, 0.3, 0.35]], requires_grad=True)
    labels = torch.tensor([0])
    head = HEAD.clone().requires_grad_()
    emma(logits, labels, 0.5, head).backward()
    # The same loss with the factor a constant: the logits' gradient must agree.
    margin = 0.5 * margins(HEAD, labels, 1.0)
    factor = ((logits[:, :1] - logits) / margin).clamp(0.01, 1).detach()
    same = logits.detach().requires_grad_()
    F.cross_entropy(same - same[:, :1] + factor * margin, labels).backward()
    assert torch.allclose(logits.grad, same.grad, atol=1e-7)
    assert torch.isfinite(head.grad).all() and head.grad.abs().sum() > 0  # the zero gap j = y included


def test_emma_at_eps_0_is_the_cross_entropy():
    logits, labels = torch.randn(64, 10), torch.randint(0, 10, (64,))
    head = torch.randn(10, 16)
    assert emma(logits, labels, 0.0, head).item() == pytest.approx(F.cross_entropy(logits, labels).item(), rel=1e-6)


def test_emma_asks_less_than_the_offset_of_the_worst_pair():
    """Every pair's margin is at most the uniform sqrt(2) L eps, so with the factor at 1
    (every pair won by its margin) EMMA's loss is at most offset CE's."""
    logits = 3 * F.one_hot(torch.arange(3), 3).float()
    labels = torch.arange(3)
    assert emma(logits, labels, 0.5, HEAD, temperature=0.25) < offset_ce(logits, labels, 0.5, temperature=0.25)


def test_offset_cross_entropy_demands_the_certifying_margin():
    logits, labels = torch.randn(64, 10), torch.randint(0, 10, (64,))
    plain = F.cross_entropy(logits / 0.25, labels) * 0.25
    assert offset_ce(logits, labels, eps=0.0) == pytest.approx(plain.item())
    # Adding the margin sqrt(2) * eps to the true logit undoes the offset.
    shifted = logits + math.sqrt(2) * 0.5 * F.one_hot(labels, 10)
    assert offset_ce(shifted, labels, eps=0.5) == pytest.approx(plain.item(), rel=1e-5)


def test_the_training_radius_follows_liresnet_from_a_tenth_to_the_peak_at_half_and_holds():
    config = LossConfig()  # 36/255 from 0.1 x to 3 x over half of training
    epochs = 800
    assert config.eps(0, epochs) == pytest.approx(3.6 / 255)
    assert config.eps(200, epochs) == pytest.approx(36 / 255 * (0.1 + 2.9 * 0.5))
    assert config.eps(400, epochs) == pytest.approx(108 / 255)
    assert config.eps(799, epochs) == pytest.approx(108 / 255)
    imagenet = LossConfig(eps_peak=2.0)
    assert imagenet.eps(0, 400) == pytest.approx(3.6 / 255) and imagenet.eps(399, 400) == pytest.approx(72 / 255)


def test_the_old_ramp_is_the_same_rule_from_0_to_1():
    assert [training_eps(e, 10, 0.2, 0.0, 1.0, 0.5) for e in (0, 1, 5, 9)] == pytest.approx([0, 0.04, 0.2, 0.2])
    assert training_eps(0, 10, 0.2, 0.1, 3.0, 0.0) == pytest.approx(0.6)  # no ramp: the peak throughout
