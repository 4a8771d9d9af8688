"""The study as users run it: studies/scaling_law.py in its own process,
killed and run again, and submitted as a job to a Ray cluster with token
authentication."""

import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pytest
from lipscale import results
from servers import _wait_until_answering, free_port, kill_session

REPO = Path(__file__).parents[1]
SCRIPT = REPO / "studies" / "scaling_law.py"


def test_the_entry_script_explains_itself():
    out = subprocess.run([sys.executable, SCRIPT, "--help"], capture_output=True, text=True, check=True).stdout
    assert "ray job submit" in out and "--resume" in out and "--smoke-test" in out


@pytest.mark.slow
def test_ray_job_submit_runs_the_smoke_test_on_a_cluster_with_token_auth(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env |= {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": uuid.uuid4().hex}  # this cluster's token, not ~/.ray's
    dashboard = f"http://127.0.0.1:{free_port()}"
    temp = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # short: Ray's socket paths are limited to ~100 bytes
    head_command = [
        "ray", "start", "--head", f"--port={free_port()}", "--node-ip-address=127.0.0.1", "--num-cpus=2",
        "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard.rsplit(':', 1)[1]}",
        f"--temp-dir={temp}", "--disable-usage-stats",
        "--block",  # stopped by signalling this process: `ray stop` would stop every Ray on the machine
    ]  # fmt: skip
    with open(tmp_path / "head.log", "w") as log:
        head = subprocess.Popen(head_command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        _wait_until_answering(f"{dashboard}/api/version", head, timeout_s=120)

        def ray_job(*args, token=env["RAY_AUTH_TOKEN"], timeout=60):
            return subprocess.run(
                ["ray", "job", *args[:1], "--address", dashboard, *args[1:]],
                check=False,
                env=env | {"RAY_AUTH_TOKEN": token}, capture_output=True, text=True, timeout=timeout,
            )  # fmt: skip

        deadline = time.monotonic() + 120
        while ray_job("list").returncode != 0:  # the job agent comes up after the dashboard
            assert time.monotonic() < deadline, ray_job("list").stderr[-2000:]
            time.sleep(1)
        assert ray_job("list", token="0" * 32).returncode != 0  # authentication is on

        job = f"lipscale-smoke-{uuid.uuid4().hex[:8]}"
        root = tmp_path / "root"
        submit = ray_job(
            "submit", "--submission-id", job, "--working-dir", str(REPO), "--",
            sys.executable, "studies/scaling_law.py", "--smoke-test", "--root", str(root),
            timeout=600,
        )  # fmt: skip
        assert submit.returncode == 0, submit.stdout[-3000:] + submit.stderr[-3000:]
        assert f"Job '{job}' succeeded" in ray_job("status", job).stdout
        assert "study digits-smoke: 2 trials (2 COMPLETE)" in ray_job("logs", job).stdout
        assert [row["state"] for row in results.read(str(root)).to_pylist()] == ["COMPLETE", "COMPLETE"]
    finally:
        head.terminate()
        try:
            head.wait(timeout=60)
        finally:
            kill_session(head)
            shutil.rmtree(temp, ignore_errors=True)
