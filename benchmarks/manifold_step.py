"""Cost of training on the manifold.

(a) full train step (forward, backward, optimizer) of width-1024 LipNeXt blocks at
    16,384 tokens per step: ManifoldAdamW vs AdamW on unconstrained weights (target <= 1.10x);
(b) the optimizer step alone: ManifoldAdamW vs geoopt's RiemannianAdam on the Stiefel
    manifold, same matrices and gradients (target >= 2x faster);
(c) full train step vs the same model with torch.nn.utils.parametrizations.orthogonal
    and Adam (target >= 2x faster);
(d) orthogonality drift over 1000 random-gradient steps with and without periodic
    re-projection, and what bf16 rounding of the weights does to the certificate.

    python benchmarks/manifold_step.py         # writes benchmarks/results/manifold_step.json
"""

import argparse
import copy
import math

import geoopt
import torch
from harness import time_interleaved, write_result
from model_step import reparametrised
from torch.nn.utils import parametrize

from lipnext import LipNeXt, preset
from lipnext.certify import orthogonality_error
from lipnext.manifold import ManifoldAdamW, param_groups
from lipnext.orthogonal import polar

# Two width-1024 blocks on a 16x16 token grid, 64 images: 64 * 256 = 16,384 tokens.
CONFIG = preset("cifar-l8w256", width=1024, depth=2, patch_size=2)
BATCH = 64


class BlockStack(torch.nn.Module):
    """LipNeXt's blocks, pooling and head on given tokens: the stem is left out,
    as the targets concern the blocks (its 1024 x 12 weight would add a left
    action in so(1024), one more 1024^3 exponential per step)."""

    def __init__(self, config):
        super().__init__()
        model = LipNeXt(config)
        self.blocks, self.pool, self.head = model.blocks, model.pool, model.head

    def forward(self, tokens):
        for block in self.blocks:
            tokens = block(tokens)
        return self.head(self.pool(tokens))


def train_step(model, opt, x, y, cache=False):
    def step():
        opt.zero_grad(set_to_none=True)
        if cache:
            with parametrize.cached():
                torch.nn.functional.cross_entropy(model(x), y).backward()
        else:
            torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()

    return step


def last_step_norms(opt) -> list[float]:
    """||A||_F of each orthogonal matrix's most recent step: which FastExp branch ran."""
    group = opt.param_groups[0]
    beta1, beta2 = group["betas"]
    norms = []
    for p in group["params"]:
        s = opt.state[p]
        t = int(s["step"])
        a = s["exp_avg"] / (1 - beta1**t) / ((s["exp_avg_sq"] / (1 - beta2**t)).sqrt() + group["eps"])
        norms.append(group["lr"] * torch.linalg.matrix_norm(a).item())
    return norms


def full_steps(repeats):
    torch.manual_seed(0)
    model = BlockStack(CONFIG)
    x = torch.randn(BATCH, CONFIG.grid_size, CONFIG.grid_size, CONFIG.width)
    y = torch.randint(0, 10, (BATCH,))
    free = copy.deepcopy(model)
    param = reparametrised(model)
    manifold_opt = ManifoldAdamW(param_groups(model), lr=1e-3)
    steps = {
        "manifold": train_step(model, manifold_opt, x, y),
        "adamw": train_step(free, torch.optim.AdamW(free.parameters(), lr=1e-3, weight_decay=0.0), x, y),
        "parametrized": train_step(param, torch.optim.Adam(param.parameters(), lr=1e-3), x, y, cache=True),
    }
    seconds = time_interleaved(steps, repeats, warmup=3)
    return {
        "tokens_per_step": BATCH * CONFIG.grid_size**2,
        "seconds_per_step": seconds,
        "manifold_over_adamw": seconds["manifold"] / seconds["adamw"],
        "speedup_vs_parametrized": seconds["parametrized"] / seconds["manifold"],
        "last_step_norm_A": last_step_norms(manifold_opt),
    }


def optimizer_only(repeats):
    """Same matrices and gradients for both optimizers: the blocks' 1024x1024 R and M."""
    torch.manual_seed(0)
    mats = [polar(torch.randn(1024, 1024)) for _ in range(2 * CONFIG.depth)]
    grads = [torch.randn_like(m) * 1e-3 for m in mats]
    ours = [torch.nn.Parameter(m.clone()) for m in mats]
    theirs = [geoopt.ManifoldParameter(m.clone(), manifold=geoopt.Stiefel()) for m in mats]
    our_opt = ManifoldAdamW([{"params": ours, "manifold": "stiefel"}], lr=1e-3)
    their_opt = geoopt.optim.RiemannianAdam(theirs, lr=1e-3)

    def stepper(params, opt):
        def step():
            for p, g in zip(params, grads):
                p.grad = g.clone()
            opt.step()

        return step

    seconds = time_interleaved({"ours": stepper(ours, our_opt), "geoopt": stepper(theirs, their_opt)}, repeats)
    return {"seconds_per_step": seconds, "speedup_vs_geoopt": seconds["geoopt"] / seconds["ours"]}


def drift(n: int, steps: int = 1000) -> dict:
    def run(every):
        torch.manual_seed(0)
        w = torch.nn.Parameter(polar(torch.randn(n, n)))
        opt = ManifoldAdamW([{"params": [w], "manifold": "stiefel"}], lr=1e-3, reorthogonalize_every=every)
        worst = 0.0
        for _ in range(steps):
            w.grad = torch.randn(n, n)
            opt.step()
            worst = max(worst, orthogonality_error(w))
        return worst, orthogonality_error(w)

    default_every = ManifoldAdamW([torch.zeros(1)]).defaults["reorthogonalize_every"]
    worst, _ = run(default_every)
    _, never = run(0)
    w32 = polar(torch.randn(n, n))
    bf16_error = orthogonality_error(w32.bfloat16())
    return {
        "n": n,
        "steps": steps,
        "fp32_max_error_default_schedule": worst,
        "fp32_error_never_reprojected": never,
        "fp32_error_fresh": orthogonality_error(w32),
        # bf16 compute uses the weights rounded to bf16: the bound per matrix the
        # certificate would need for that forward pass is sqrt(1 + error).
        "bf16_rounded_error": bf16_error,
        "bf16_norm_bound_per_matrix": math.sqrt(1 + bf16_error),
    }


def main(repeats: int):
    result = {
        "full_step": full_steps(repeats),
        "optimizer_step": optimizer_only(repeats),
        "drift": [drift(32), drift(256)],
        "targets": {"manifold_over_adamw": 1.10, "speedup_vs_geoopt": 2.0, "speedup_vs_parametrized": 2.0},
    }
    write_result("manifold_step", result)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=7)
    main(parser.parse_args().repeats)
