"""L2 projected gradient descent on the logit margin (our own implementation)."""

import torch


def pgd_l2(model, x, y, radius, steps=100):
    """Per-sample radius; returns adversarial inputs inside the L2 ball and [0, 1]."""
    view = (-1,) + (1,) * (x.dim() - 1)
    radius = radius.view(view)
    delta = torch.zeros_like(x, requires_grad=True)
    alpha = 2.5 * radius / steps
    for _ in range(steps):
        logits = model(x + delta)
        true = logits.gather(1, y[:, None]).squeeze(1)
        other = logits.scatter(1, y[:, None], float("-inf")).amax(dim=1)
        (other - true).sum().backward()
        with torch.no_grad():
            g = delta.grad
            delta += alpha * g / g.flatten(1).norm(dim=1).clamp_min(1e-12).view(view)
            delta.copy_((x + delta).clamp(0, 1) - x)  # into the image box, then into the ball:
            norm = delta.flatten(1).norm(dim=1).view(view)  # shrinking keeps it in the box
            delta *= (radius / norm.clamp_min(1e-12)).clamp(max=1)
        delta.grad = None
    return (x + delta).detach()
