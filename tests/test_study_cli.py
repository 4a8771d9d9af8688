"""The study's entry script as users meet it. Run as users run it elsewhere:
killed and run again in tests/reliability/test_study_process_faults.py,
submitted as a job to a Ray cluster with token authentication in
tests/test_infra_local.py."""

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).parents[1]
SCRIPT = REPO / "studies" / "scaling_law.py"


def test_the_entry_script_explains_itself():
    out = subprocess.run([sys.executable, SCRIPT, "--help"], capture_output=True, text=True, check=True).stdout
    assert "ray job submit" in out and "--resume" in out and "--smoke-test" in out
