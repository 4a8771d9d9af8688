"""Faults that take a whole study process: its driver SIGKILLed mid-study and
run again, and its root's disk filling up. The studies run as users run them,
studies/scaling_law.py in a process (and a Ray) of its own."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import optuna
import pytest
import yaml
from ledger import complete, study_ledger
from lipscale import results
from lipscale.keys import PARENT_ATTR, REQUEUED_ATTR, RUN_ATTR
from lipscale.spec import parse_spec
from servers import kill_session
from test_spec import small
from test_study import four_trial_spec

REPO = Path(__file__).parents[2]
SCRIPT = REPO / "studies" / "scaling_law.py"


def _snapshot(spec) -> dict:
    """Per COMPLETE trial: its completion time and its MLflow run's start, end and loss history."""
    study = optuna.load_study(study_name=spec.name, storage=spec.optuna_url)
    client = mlflow.MlflowClient(spec.mlflow_uri)
    snapshot = {}
    for t in study.get_trials(states=(optuna.trial.TrialState.COMPLETE,)):
        run = client.get_run(t.user_attrs[RUN_ATTR])
        history = [(m.step, m.value, m.timestamp) for m in client.get_metric_history(run.info.run_id, "train/loss")]
        snapshot[t.number] = (t.datetime_complete, run.info.start_time, run.info.end_time, history)
    return snapshot


def start_driver(tmp_path, raw: dict, name: str = "first") -> tuple[subprocess.Popen, list[str], dict]:
    """The study `raw` (written to spec.yaml) run as users run it, in a process (and a Ray) of its
    own, its output in <name>.log: (the process, its command, its environment)."""
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(raw))
    command = [sys.executable, str(SCRIPT), "--spec", str(tmp_path / "spec.yaml")]
    env = {**os.environ, "RAY_ADDRESS": "local"}  # a Ray of its own, whatever else runs here
    with open(tmp_path / f"{name}.log", "w") as log:
        process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    return process, command, env


def wait_until(condition, process: subprocess.Popen, log: Path, timeout_s: float = 300) -> None:
    """Returns once condition() holds; fails with the end of the log if the process ends first."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert process.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
        time.sleep(0.2)


@pytest.mark.slow
def test_the_driver_killed_mid_study_then_run_again(tmp_path, scoreboard):
    scoreboard.fault("SIGKILL of the study's driver (studies/scaling_law.py) mid-study, then the same command again")
    raw = four_trial_spec(tmp_path / "root")
    raw["budget"]["epochs"] = 20  # seconds per trial: the kill lands while trials run
    spec = parse_spec(raw)
    first, command, env = start_driver(tmp_path, raw)
    try:
        wait_until(lambda: complete(spec) >= 1, first, tmp_path / "first.log")
        first.send_signal(signal.SIGKILL)
        first.wait()
    finally:
        kill_session(first)
    before = _snapshot(spec)
    assert 1 <= len(before) < 4, "the kill came after the study ended: nothing to resume"

    with open(tmp_path / "second.log", "w") as log:
        second = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        assert second.wait(timeout=600) == 0, (tmp_path / "second.log").read_text()[-3000:]
    finally:
        kill_session(second)

    study = optuna.load_study(study_name=spec.name, storage=spec.optuna_url)
    completed = study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))
    assert len(completed) == 4
    others = [t for t in study.trials if t.state != optuna.trial.TrialState.COMPLETE]
    assert all(t.state.name == "FAIL" and REQUEUED_ATTR in t.user_attrs for t in others)
    client = mlflow.MlflowClient(spec.mlflow_uri)
    experiment = client.get_experiment_by_name(spec.name).experiment_id
    children = client.search_runs([experiment], f"tags.`mlflow.parentRunId` = '{study.user_attrs[PARENT_ATTR]}'")
    assert sorted(r.info.run_id for r in children) == sorted(t.user_attrs[RUN_ATTR] for t in completed)
    for run in children:  # every epoch logged once, resumed trials included
        assert [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")] == list(range(1, 21))
    after = _snapshot(spec)
    for n, (done, started, ended, history) in before.items():  # trials done before the kill were not run again
        assert (after[n][0], after[n][1], after[n][3]) == (done, started, history)
        # Optuna had the trial COMPLETE but the kill came before its MLflow run was closed: the rerun closes it.
        assert after[n][2] == ended if ended is not None else after[n][2] is not None
    assert len(results.read(spec.root)) == 4
    scoreboard.tally(study_ledger(spec, trials=4))


@pytest.fixture
def small_disk(tmp_path):
    """A 1.6 MB tmpfs (the two-trial study below needs ~2.8 MB); grow(mb) frees space.
    Mounting needs root, as CI runs."""
    disk = tmp_path / "disk"
    disk.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1600k", "tmpfs", str(disk)], check=True)

    def grow(mb: int) -> None:
        subprocess.run(["mount", "-o", f"remount,size={mb}m", str(disk)], check=True)

    yield disk, grow
    subprocess.run(["umount", "--lazy", str(disk)], check=True)


@pytest.mark.slow
def test_the_study_roots_disk_filling_up_then_space_freed(small_disk, tmp_path, scoreboard):
    scoreboard.fault("the study root's disk full mid-study (a 1.6 MB tmpfs), then space freed and the command rerun")
    disk, grow = small_disk
    raw = small(disk / "root")
    raw["budget"]["epochs"] = 3
    raw["scheduler"] = {"kind": "fifo"}
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(raw))
    spec = parse_spec(raw)
    command = [sys.executable, str(SCRIPT), "--spec", str(tmp_path / "spec.yaml")]
    env = {**os.environ, "RAY_ADDRESS": "local"}

    first = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600, start_new_session=True, check=False)
    assert first.returncode == 1, first.stderr[-3000:]
    (error,) = [line for line in first.stderr.splitlines() if line.startswith("error: ")]
    assert error.startswith("error: the study's storage is full (") and error.endswith(
        f"); free space under {spec.root} and run the same command again: the study continues from its last checkpoints"
    ), first.stderr[-3000:]
    study = optuna.load_study(study_name=spec.name, storage=spec.optuna_url)
    assert not study.get_trials(states=(optuna.trial.TrialState.FAIL,))  # no trial blamed for the disk

    grow(64)
    second = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600, start_new_session=True, check=False)
    assert second.returncode == 0, second.stderr[-3000:]
    study = optuna.load_study(study_name=spec.name, storage=spec.optuna_url)
    assert len(results.finished_trials(study)) == 2
    assert all(t.state.name == "COMPLETE" for t in results.finished_trials(study))
    scoreboard.tally(study_ledger(spec, trials=2))
