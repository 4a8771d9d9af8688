"""The benchmark scripts that cannot run their real sizes here still run: a
smoke mode exercises their code path on the CPU (timings are not checked)."""

import json
import subprocess
import sys
from pathlib import Path

BENCHMARKS = Path(__file__).parents[1] / "benchmarks"


def test_gpu_step_runs_in_smoke_mode():
    subprocess.run([sys.executable, "gpu_step.py", "--smoke", "--steps", "2"], cwd=BENCHMARKS, check=True)
    result = json.loads((BENCHMARKS / "results" / "gpu_step_smoke.json").read_text())
    (case,) = result["cases"]
    assert case["samples_per_s"] > 0 and case["model_flops_per_step"] > 0


def test_audit_cost_runs_in_smoke_mode():
    subprocess.run([sys.executable, "audit_cost.py", "--smoke", "--repeats", "2"], cwd=BENCHMARKS, check=True)
    result = json.loads((BENCHMARKS / "results" / "audit_cost_smoke.json").read_text())
    assert result["evaluations"] == 1 and 0 < result["share_of_trial"] and 0 < result["share_of_trial_cpu"]
    assert result["audit"]["audit/flips_at_radius"] == 0
