"""Forward + backward throughput of LipNeXt, against the same network whose
orthogonal weights are re-parametrised with torch.nn.utils.parametrizations.orthogonal
(matrix_exp of a skew matrix every step), and as a fraction of measured torch.mm FLOP/s.
The model alone, no optimizer: the whole train step against the same baseline is
manifold_step.py (c).

    python benchmarks/model_step.py            # writes benchmarks/results/model_step.json
    python benchmarks/model_step.py --smoke --repeats 1   # seconds: checks the script runs
"""

import argparse
import copy

import torch
from harness import mm_flops_per_s, time_interleaved, write_result
from torch.nn.utils import parametrizations, parametrize
from torch.utils.flop_counter import FlopCounterMode

from lipnext import preset
from lipnext.layers import OrthogonalLinear
from lipnext.train import build_model

CASES = {"tiny": 256, "cifar-l8w256": 64}  # preset -> batch size


def reparametrised(model: torch.nn.Module) -> torch.nn.Module:
    model = copy.deepcopy(model)
    for module in model.modules():
        if isinstance(module, OrthogonalLinear):
            parametrizations.orthogonal(module, "weight")
    return model


def fwd_bwd(model, x, y, cache=False):
    def step():
        model.zero_grad(set_to_none=True)
        if cache:  # compute each parametrised weight once per step, not per access
            with parametrize.cached():
                loss = torch.nn.functional.cross_entropy(model(x), y)
                loss.backward()
        else:
            torch.nn.functional.cross_entropy(model(x), y).backward()

    return step


def main(repeats: int, smoke: bool):
    torch.manual_seed(0)
    peak = mm_flops_per_s(128 if smoke else 1024)
    result = {"mm_flops_per_s": peak, "cases": {}}
    for name, batch in ({"tiny": 16} if smoke else CASES).items():
        config = preset(name)
        model = build_model(config, torch.device("cpu"))
        x = torch.rand(batch, config.in_channels, config.image_size, config.image_size)
        y = torch.randint(0, config.num_classes, (batch,))
        ours, baseline = fwd_bwd(model, x, y), fwd_bwd(reparametrised(model), x, y, cache=True)
        with FlopCounterMode(display=False) as counter:
            ours()
        seconds = time_interleaved({"lipnext": ours, "parametrized": baseline}, repeats)
        flops = counter.get_total_flops()
        result["cases"][name] = {
            "batch": batch,
            "lipnext_samples_per_s": batch / seconds["lipnext"],
            "parametrized_samples_per_s": batch / seconds["parametrized"],
            "speedup_vs_parametrized": seconds["parametrized"] / seconds["lipnext"],
            "flops_per_step": flops,
            "achieved_flops_per_s": flops / seconds["lipnext"],
            "fraction_of_mm_flops": flops / seconds["lipnext"] / peak,
        }
    write_result("model_step_smoke" if smoke else "model_step", result)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--smoke", action="store_true", help="`tiny` at batch 16, seconds: checks the script runs")
    args = parser.parse_args()
    main(args.repeats, args.smoke)
