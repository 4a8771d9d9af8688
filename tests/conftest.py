import pytest
import torch
from sklearn.datasets import load_digits

from lipnext import preset
from lipnext.train import build_model, build_optimizer, train_step, warmup_cosine
from lipnext.train_config import TrainConfig


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
    """The tiny preset trained on digits by lipnext.train's own step (manifold
    optimizer, clipping, warm-up and cosine decay), 900 steps of 128 at eps 36/255 (~5 s)."""
    (x, y), _ = digits
    config = TrainConfig(model=preset("tiny"))
    model = build_model(config.model, torch.device("cpu"), seed=0)
    optimizer = build_optimizer(model, config.optim)
    steps = 900
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(steps, config.optim.warmup_fraction))
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        idx = torch.randint(0, len(x), (128,), generator=g)
        train_step(model, optimizer, x[idx], y[idx], 36 / 255, config)
        schedule.step()
    return model.eval()


@pytest.fixture(scope="session")
def digits_shards(tmp_path_factory) -> str:
    """The same digits converted to the shard format (`lipscale data convert digits`)."""
    from lipscale.data.convert import convert

    root = tmp_path_factory.mktemp("data") / "digits"
    convert("digits", None, str(root))
    return str(root)
