"""Empirical Lipschitz ratios ||f(x) - f(y)|| / ||x - y||, from random pairs and
from pairs found by gradient ascent on the ratio itself.

Pairs are kept at least ~0.3 apart in L2: in fp32 the ratio of two outputs a
distance d apart carries rounding noise of about 1e-7 * ||f(x)|| / d, which
for nearly coincident pairs would swamp the 1e-5 tolerance being tested.
"""

import torch


def _ratio(f, x, y):
    num = torch.linalg.vector_norm((f(x) - f(y)).flatten(1), dim=1)
    return num / torch.linalg.vector_norm((x - y).flatten(1), dim=1)


def random_pair_ratio(f, shape, pairs=1000, seed=0) -> float:
    """Largest ratio over `pairs` random pairs: half independent, half near."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(pairs, *shape, generator=g)
    far = torch.rand(pairs // 2, *shape, generator=g)
    near = x[pairs // 2 :] + 0.1 * torch.randn(pairs - pairs // 2, *shape, generator=g)
    with torch.no_grad():
        return _ratio(f, x, torch.cat([far, near])).max().item()


def ascent_ratio(f, shape, pairs=32, steps=150, distance=0.5, lr=1e-2, seed=0) -> float:
    """Largest ratio after maximising it by Adam over x and the direction u of
    y = x + distance * u / ||u||."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(pairs, *shape, generator=g).requires_grad_()
    u = torch.randn(pairs, *shape, generator=g).requires_grad_()
    opt = torch.optim.Adam([x, u], lr=lr)
    best = 0.0
    for _ in range(steps):
        step = u / torch.linalg.vector_norm(u.flatten(1), dim=1).view(-1, *[1] * len(shape))
        ratio = _ratio(f, x, x + distance * step)
        best = max(best, ratio.max().item())
        opt.zero_grad()
        (-ratio.sum()).backward()
        opt.step()
    return best
