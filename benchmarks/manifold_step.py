"""Cost and accuracy of training on the manifold.

(a) the optimizer step alone on the four 1024 x 1024 matrices of two width-1024 blocks,
    same gradients: ManifoldAdamW with bf16 increments (the default) against fp32
    increments (every matmul in fp32, the old arithmetic; target >= 3x faster) and against
    geoopt's RiemannianAdam on the Stiefel manifold (target >= 2x faster);
(b) full train step (lipnext.train.train_step: forward, backward, clipping, optimizer) of
    width-1024 LipNeXt blocks at 16,384 tokens per step: ManifoldAdamW vs AdamW on
    unconstrained weights, with an fp32 forward and backward (target <= 1.05x) and under
    bf16 autocast (reported);
(c) the fp32 full train step vs the same model with torch.nn.utils.parametrizations.orthogonal
    and Adam (target >= 2x faster);
(d) orthogonality drift ||W^T W - I||_F of a 1024 x 1024 matrix over 1000 random-gradient
    steps (Lookahead on, never re-projected) at rho ~ 0.05 and ~ 0.15, with fp32 increments,
    bf16 increments (fp32 weights) and fully bf16 weights;
(e) project() after bf16 steps of the benchmark's model: max ||W^T W - I||_F of its
    orthogonal matrices (target <= 1e-6) and the certified Lipschitz bound against the
    exact one from fp64 spectral norms (target within 1e-5).

    python benchmarks/manifold_step.py         # writes benchmarks/results/manifold_step.json
    python benchmarks/manifold_step.py --smoke --repeats 1   # seconds: checks the script runs
"""

import argparse
import contextlib
import copy
import math

import geoopt
import torch
from harness import time_interleaved, write_result
from model_step import reparametrised
from torch.nn.utils import parametrize

from lipnext import LipNeXt, preset
from lipnext.certify import Certificate, lipschitz_bound, lipschitz_path, orthogonality_error
from lipnext.manifold import ManifoldAdamW, param_groups
from lipnext.orthogonal import exp_order, polar
from lipnext.train import build_model, build_optimizer, train_step
from lipnext.train_config import OptimConfig, TrainConfig

# Two width-1024 blocks on a 16x16 token grid, 64 images: 64 * 256 = 16,384 tokens.
CONFIG = preset("cifar-l8w256", width=1024, depth=2, patch_size=2)
BATCH = 64
SMOKE = preset("cifar-l8w256", width=32, depth=1, patch_size=2), 4  # seconds: checks the script runs


class BlockStack(torch.nn.Module):
    """LipNeXt's blocks, pooling and head on given tokens: the stem is left out,
    as the targets concern the blocks (its 1024 x 12 weight would add a left
    action in so(1024), one more 1024^3 exponential per step)."""

    def __init__(self, config):
        super().__init__()
        model = build_model(config, torch.device("cpu"))
        self.blocks, self.pool, self.head = model.blocks, model.pool, model.head

    def forward(self, tokens):
        for block in self.blocks:
            tokens = block(tokens)
        return self.head(self.pool(tokens))


def full_step(model, opt, x, y, run: TrainConfig, cache=False):
    """lipnext.train's train_step (clipping included) on tokens; with `cache`, each
    parametrised weight is computed once per step, not once per use."""

    def step():
        with parametrize.cached() if cache else contextlib.nullcontext():
            train_step(model, opt, x, y, 36 / 255, run)

    return step


def under_bf16_autocast(step):
    """The whole step under autocast, as ManifoldAdamW turns it off for itself."""

    def run():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            step()

    return run


def last_steps(opt) -> list[dict]:
    """||A||_F, rho = sqrt(||A^2||_F) and FastExp's order of each orthogonal matrix's last step."""
    group = opt.param_groups[0]
    beta1, beta2 = group["betas"]
    steps = []
    for p in group["params"]:
        s = opt.state[p]
        t = int(s["step"])
        a = s["exp_avg"] / (1 - beta1**t) / ((s["exp_avg_sq"] / (1 - beta2**t)).sqrt() + group["eps"]) * -group["lr"]
        a2 = a @ a
        steps.append(
            {
                "norm_A": torch.linalg.matrix_norm(a).item(),
                "rho": torch.linalg.matrix_norm(a2).sqrt().item(),
                "order": exp_order(a, a2, group["exp_sizing"]),
            }
        )
    return steps


def full_steps(repeats, config=CONFIG, batch=BATCH):
    torch.manual_seed(0)
    model = BlockStack(config)
    x = torch.randn(batch, config.grid_size, config.grid_size, config.width)
    y = torch.randint(0, 10, (batch,))
    free = copy.deepcopy(model)
    param = reparametrised(model)
    run = TrainConfig(model=config, optim=OptimConfig(lr=1e-3))
    manifold_opt = build_optimizer(model, run.optim)
    lr = run.optim.lr
    steps = {
        "manifold": full_step(model, manifold_opt, x, y, run),
        "adamw": full_step(free, torch.optim.AdamW(free.parameters(), lr=lr, weight_decay=0.0), x, y, run),
        "parametrized": full_step(param, torch.optim.Adam(param.parameters(), lr=lr), x, y, run, cache=True),
    }
    steps["manifold_bf16_autocast"] = under_bf16_autocast(steps["manifold"])
    steps["adamw_bf16_autocast"] = under_bf16_autocast(steps["adamw"])
    seconds = time_interleaved(steps, repeats, warmup=3)
    return {
        "tokens_per_step": batch * config.grid_size**2,
        "seconds_per_step": seconds,
        "manifold_over_adamw": seconds["manifold"] / seconds["adamw"],
        "manifold_over_adamw_bf16_autocast": seconds["manifold_bf16_autocast"] / seconds["adamw_bf16_autocast"],
        "speedup_vs_parametrized": seconds["parametrized"] / seconds["manifold"],
        "last_steps": last_steps(manifold_opt),
    }


def optimizer_only(repeats, config=CONFIG):
    """Same matrices and gradients for every optimizer: the blocks' 1024x1024 R and M."""
    torch.manual_seed(0)
    mats = [polar(torch.randn(config.width, config.width)) for _ in range(2 * config.depth)]
    grads = [torch.randn_like(m) * 1e-3 for m in mats]
    params = {name: [torch.nn.Parameter(m.clone()) for m in mats] for name in ("bf16", "fp32")}
    theirs = [geoopt.ManifoldParameter(m.clone(), manifold=geoopt.Stiefel()) for m in mats]
    opts = {
        name: ManifoldAdamW([{"params": ps, "manifold": "stiefel"}], lr=1e-3, increment_dtype=dtype)
        for (name, ps), dtype in zip(params.items(), ("bfloat16", "float32"))
    }

    def stepper(ps, opt):
        def step():
            for p, g in zip(ps, grads):
                p.grad = g.clone()
            opt.step()

        return step

    steppers = {name: stepper(params[name], opts[name]) for name in opts}
    steppers["geoopt"] = stepper(theirs, geoopt.optim.RiemannianAdam(theirs, lr=1e-3))
    seconds = time_interleaved(steppers, repeats)
    return {
        "seconds_per_step": seconds,
        "bf16_speedup_vs_fp32": seconds["fp32"] / seconds["bf16"],
        "speedup_vs_geoopt": seconds["geoopt"] / seconds["bf16"],
        "last_steps": last_steps(opts["bf16"]),
    }


PRECISIONS = {  # name: (increment_dtype, weights' dtype)
    "fp32": ("float32", torch.float32),
    "bf16_increments": ("bfloat16", torch.float32),
    "fully_bf16": ("bfloat16", torch.bfloat16),
}


def drift(precision: str, lr: float, n: int = 1024, steps: int = 1000) -> dict:
    """||W^T W - I||_F after 1, 10, 100 and 1000 random-gradient steps, never
    re-projected, and after project() at the end."""
    increment_dtype, dtype = PRECISIONS[precision]
    torch.manual_seed(0)
    w = torch.nn.Parameter(polar(torch.randn(n, n)).to(dtype))
    opt = ManifoldAdamW(
        [{"params": [w], "manifold": "stiefel"}], lr=lr, reorthogonalize_every=0, increment_dtype=increment_dtype
    )
    g = torch.Generator().manual_seed(1)
    after = {}
    for step in range(1, steps + 1):
        w.grad = torch.randn(n, n, generator=g).to(dtype)
        opt.step()
        if step in (1, 10, 100, 1000):
            after[step] = orthogonality_error(w)
    rho = last_steps(opt)[0]["rho"]
    projected = polar(w.detach().float())
    return {
        "precision": precision,
        "n": n,
        "lr": lr,
        "rho": rho,
        "error_after_steps": after,
        "error_after_project": orthogonality_error(projected),
    }


def exact_lipschitz_bound(model) -> float:
    """The certificate's bound with every orthogonal factor's norm its fp64 spectral
    norm instead of the certificate's sqrt(1 + ||W^T W - I||_F)."""

    def spectral_norm(m):
        return torch.linalg.matrix_norm(m.weight.detach().double(), ord=2).item()

    features = math.prod(spectral_norm(m) for layer in lipschitz_path(model) for m in layer) / min(model.config.input_std)
    return features * torch.linalg.matrix_norm(Certificate(model).vectors, ord=2).item()


def projection(steps: int = 100, config=CONFIG) -> dict:
    """The benchmark's model with its stem (L2W1024: 5 orthogonal matrices),
    after `steps` random-gradient bf16 steps at lr 3e-3 without re-projection, then project()."""
    torch.manual_seed(0)
    model = LipNeXt(config)
    opt = ManifoldAdamW(param_groups(model), lr=3e-3, reorthogonalize_every=0)
    for _ in range(steps):
        for p in model.parameters():
            p.grad = torch.randn_like(p)
        opt.step()

    def state():
        matrices = [t for p in param_groups(model)[0]["params"] for t in (p, opt.state[p]["slow"])]
        bound, exact = lipschitz_bound(model), exact_lipschitz_bound(model)
        return {
            "max_ortho_error": max(orthogonality_error(t) for t in matrices),
            "certified_bound": bound,
            "exact_bound": exact,
            "bound_minus_exact": bound - exact,
        }

    before = state()
    opt.project()
    return {"steps": steps, "before_project": before, "after_project": state()}


def main(repeats: int, smoke: bool):
    config, batch = SMOKE if smoke else (CONFIG, BATCH)
    drifts = [(lr, 1024, 1000) for lr in (1e-3, 3e-3)] if not smoke else [(1e-3, 32, 10)]
    result = {
        "optimizer_step": optimizer_only(repeats, config),
        "full_step": full_steps(repeats, config, batch),
        "drift": [drift(precision, lr, n, steps) for lr, n, steps in drifts for precision in PRECISIONS],
        "projection": projection(3 if smoke else 100, config),
        "targets": {
            "bf16_speedup_vs_fp32": 3.0,
            "speedup_vs_geoopt": 2.0,
            "manifold_over_adamw": 1.05,
            "speedup_vs_parametrized": 2.0,
            "max_ortho_error_after_project": 1e-6,
            "bound_minus_exact_after_project": 1e-5,
        },
    }
    write_result("manifold_step_smoke" if smoke else "manifold_step", result)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--smoke", action="store_true", help="a width-32 block, seconds: checks the script runs")
    args = parser.parse_args()
    main(args.repeats, args.smoke)
