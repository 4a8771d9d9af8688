"""The `lipscale` command answers --help without importing what runs its commands:
torch, Ray and MLflow take seconds to import (`lipscale --help` took 7-8 s when
every command's module was imported to declare its arguments)."""

import json
import subprocess
import sys

import pytest

LIPSCALE = """
import json, sys
from lipscale.cli import main
try:
    main(sys.argv[1:])
finally:  # also after --help's SystemExit
    print(json.dumps(sorted(m for m in sys.modules if m.split(".")[0] in ("ray", "mlflow", "torch"))), file=sys.stderr)
"""
"""`lipscale`, printing last which modules of ray, mlflow and torch it imported."""


def imported(*argv: str) -> tuple[str, list[str]]:
    """What `lipscale ARGV` prints, and the modules of ray, mlflow and torch it imported."""
    done = subprocess.run([sys.executable, "-c", LIPSCALE, *argv], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout, json.loads(done.stderr.splitlines()[-1])


@pytest.mark.parametrize("argv", [["--help"], ["data", "convert", "--help"], ["run", "--help"], ["report", "--help"]])
def test_help_imports_none_of_ray_mlflow_torch(argv):
    out, heavy = imported(*argv)
    assert out.startswith(" ".join(["usage: lipscale", *argv[:-1]]) + " ")
    assert heavy == []


def test_a_command_imports_its_implementation_once_chosen():
    out, heavy = imported("plan", "tiny", "--batch", "8", "--flops-per-s", "1e12")
    assert "parameters" in out and "torch" in heavy and "ray" not in heavy and "mlflow" not in heavy
