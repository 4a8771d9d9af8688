import math

import pytest
import torch
from sklearn.datasets import load_digits

from lipnext import LipNeXt, preset
from lipnext.certify import offset_cross_entropy
from lipnext.manifold import ManifoldAdamW, param_groups


@pytest.fixture(scope="session")
def digits():
    """scikit-learn's bundled 8x8 digits as raw [0, 1] images, shuffled with seed 0
    (the file is ordered by writer): 1500 train, 297 test."""
    d = load_digits()
    perm = torch.randperm(len(d.target), generator=torch.Generator().manual_seed(0))
    x = (torch.tensor(d.images, dtype=torch.float32)[:, None] / 16)[perm]
    y = torch.tensor(d.target)[perm]
    return (x[:1500], y[:1500]), (x[1500:], y[1500:])


@pytest.fixture(scope="session")
def trained_tiny(digits):
    """The tiny preset trained on digits with the manifold optimizer, 900 steps
    of 128 with cosine decay (~5 s)."""
    (x, y), _ = digits
    torch.manual_seed(0)
    model = LipNeXt(preset("tiny"))
    steps = 900
    opt = ManifoldAdamW(param_groups(model), lr=3e-3)
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / steps)))
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        idx = torch.randint(0, len(x), (128,), generator=g)
        loss = offset_cross_entropy(model(x[idx]), y[idx], eps=36 / 255)
        opt.zero_grad()
        loss.backward()
        opt.step()
        schedule.step()
    return model.eval()


@pytest.fixture(scope="session")
def digits_shards(tmp_path_factory) -> str:
    """The same digits converted to the shard format (`lipscale data convert digits`)."""
    from lipscale.data.convert import convert

    root = tmp_path_factory.mktemp("data") / "digits"
    convert("digits", None, str(root))
    return str(root)
