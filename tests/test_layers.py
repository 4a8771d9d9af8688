"""Every LipNeXt layer, and the feature map they compose, is 1-Lipschitz in fp32.

One property suite for all layers: random pairs and gradient-ascent pairs
must both stay within 1 + 1e-5.
"""

import pytest
import torch
from lipschitz_check import ascent_ratio, random_pair_ratio

from lipnext import LipNeXt, preset
from lipnext.layers import BetaAbs, L2SpatialPool, OrthogonalLinear, PatchStem, SpatialShift
from lipnext.model import LipNeXtBlock

TOL = 1 + 1e-5


def _built(module):
    torch.manual_seed(0)
    if hasattr(module, "init_weights"):
        with torch.no_grad():
            module.init_weights()
    return module


TOKENS = (4, 4, 32)  # (H, W, C) channels-last feature maps
LAYERS = {
    "orthogonal-square": (lambda: _built(OrthogonalLinear(32, 32)), (32,)),
    "orthogonal-widening": (lambda: _built(OrthogonalLinear(12, 48)), (12,)),
    "orthogonal-narrowing": (lambda: _built(OrthogonalLinear(48, 12)), (48,)),
    "patch-stem": (lambda: _built(PatchStem(3, 2, 32)), (3, 8, 8)),
    "shift-four": (lambda: SpatialShift(32, 1 / 8, 1), TOKENS),
    "shift-dilated": (lambda: SpatialShift(32, 1 / 16, 2), TOKENS),
    "beta-abs": (lambda: BetaAbs(32, 0.5), TOKENS),
    "l2-pool": (lambda: L2SpatialPool(), TOKENS),
    "block": (lambda: _built(LipNeXtBlock(preset("tiny", in_channels=3, image_size=8), 0)), TOKENS),
    "features-four": (lambda: _built(LipNeXt(preset("tiny"))).features, (1, 8, 8)),
    "features-dilated": (lambda: _built(LipNeXt(preset("tiny", shift_pattern="dilated", depth=3))).features, (1, 8, 8)),
    "features-none": (lambda: _built(LipNeXt(preset("tiny", shift_pattern="none"))).features, (1, 8, 8)),
}


@pytest.mark.parametrize("name", LAYERS)
def test_layer_is_1_lipschitz(name):
    build, shape = LAYERS[name]
    f = build()
    assert random_pair_ratio(f, shape) <= TOL
    assert ascent_ratio(f, shape) <= TOL


@pytest.mark.parametrize("shape", [(32, 32), (12, 48), (48, 12)])
def test_orthogonal_linear_preserves_norms_along_its_long_side(shape):
    layer = _built(OrthogonalLinear(*shape))
    x = torch.randn(256, shape[0])
    y = layer(x)
    if shape[1] >= shape[0]:  # orthonormal columns: an isometry
        torch.testing.assert_close(y.norm(dim=1), x.norm(dim=1), rtol=1e-5, atol=0)
    else:  # orthonormal rows: exact on the row space, a contraction elsewhere
        rowspace = x @ layer.weight.T @ layer.weight
        torch.testing.assert_close(layer(rowspace).norm(dim=1), rowspace.norm(dim=1), rtol=1e-5, atol=0)
        assert (y.norm(dim=1) <= x.norm(dim=1) * TOL).all()


@pytest.mark.parametrize("ratio,distance", [(1 / 8, 1), (1 / 16, 1), (1 / 8, 2), (1 / 4, 1)])
def test_spatial_shift_is_an_exact_permutation(ratio, distance):
    shift = SpatialShift(32, ratio, distance)
    x = torch.arange(2 * 5 * 6 * 32, dtype=torch.float64).reshape(2, 5, 6, 32)
    y = shift(x)
    assert torch.equal(y.flatten().sort().values, x.flatten())  # same multiset of values
    g = round(32 * ratio)
    assert torch.equal(y[:, 0, :, 0], x[:, distance, :, 0])  # up: row h takes row h + d
    assert torch.equal(y[:, distance, :, g], x[:, 0, :, g])  # down
    assert torch.equal(y[:, :, 0, 2 * g], x[:, :, distance, 2 * g])  # left
    assert torch.equal(y[:, :, distance, 3 * g], x[:, :, 0, 3 * g])  # right
    assert torch.equal(y[..., 4 * g :], x[..., 4 * g :])  # the rest stays put


def test_shift_pattern_none_is_identity_and_dilated_alternates():
    assert all(b.shift.group == 0 for b in LipNeXt(preset("tiny", shift_pattern="none")).blocks)
    blocks = LipNeXt(preset("tiny", shift_pattern="dilated", depth=4)).blocks
    assert [b.shift.distance for b in blocks] == [1, 2, 1, 2]


def test_beta_abs_folds_exactly_beta_of_the_channels():
    x = -torch.ones(3, 2, 2, 16)
    y = BetaAbs(16, 0.25)(x)
    assert (y[..., :4] == 1).all() and (y[..., 4:] == -1).all()


def test_spatial_shift_gradient_is_the_inverse_shift():
    x = torch.randn(2, 5, 6, 32, dtype=torch.float64, requires_grad=True)
    torch.autograd.gradcheck(SpatialShift(32, 1 / 8, 2), (x,))


def test_block_gives_the_same_output_with_and_without_forming_M_R_transpose():
    """Few tokens: R^T then M; many: M R^T as one matrix. Same map either way."""
    block = _built(LipNeXtBlock(preset("tiny", in_channels=3, image_size=8), 0)).double()
    many = torch.randn(8, 4, 4, 32, dtype=torch.float64)  # 128 tokens > 32 channels
    one_by_one = torch.cat([block(x[None]) for x in many])  # 16 tokens each
    torch.testing.assert_close(block(many), one_by_one)
