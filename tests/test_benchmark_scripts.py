"""Every benchmark script still runs: a smoke mode exercises its code path (the
training worker's own train_step) on the CPU at a tiny size, in seconds, and
writes results/*_smoke.json (ignored by git). Timings are not checked."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).parents[1] / "benchmarks"

SMOKE = {  # script: (its arguments, the file it writes, a check of what it wrote)
    "gpu_step.py": (
        ["--smoke", "--steps", "2"],
        "gpu_step_smoke.json",
        lambda r: r["cases"][0]["samples_per_s"] > 0 and 0 < r["cases"][0]["optimizer_s"] < r["cases"][0]["step_s"],
    ),
    "loader.py": (["--smoke"], "loader_smoke.json", lambda r: r["ratio"] > 0 and r["train_step_samples_per_s"] > 0),
    "worker_step.py": (
        ["--smoke", "--sections", "scaling", "memory", "--steps", "1"],
        "worker_step_scaling_memory_smoke.json",
        lambda r: r["scaling"]["tiny"]["samples_per_s_2_ranks"] > 0 and r["memory"]["tiny"]["max_rank_over_unsharded"] < 0.55,
    ),
    "manifold_step.py": (
        ["--smoke", "--repeats", "1"],
        "manifold_step_smoke.json",
        lambda r: min(r["full_step"]["seconds_per_step"].values()) > 0 and r["optimizer_step"]["speedup_vs_geoopt"] > 0,
    ),
    "model_step.py": (["--smoke", "--repeats", "1"], "model_step_smoke.json", lambda r: r["cases"]["tiny"]["flops_per_step"] > 0),
    "audit_cost.py": (
        ["--smoke", "--repeats", "2"],
        "audit_cost_smoke.json",
        lambda r: r["evaluations"] == 1 and r["share_of_trial"] > 0 and r["audit"]["audit/flips_at_radius"] == 0,
    ),
}  # fmt: skip


@pytest.mark.parametrize("script", SMOKE)
def test_a_benchmark_runs_in_smoke_mode(script):
    args, written, check = SMOKE[script]
    result = BENCHMARKS / "results" / written
    result.unlink(missing_ok=True)
    subprocess.run([sys.executable, script, *args], cwd=BENCHMARKS, check=True)
    assert check(json.loads(result.read_text()))
