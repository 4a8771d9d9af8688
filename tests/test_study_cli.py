"""The study as users run it: studies/scaling_law.py in its own process,
killed and run again. Submitted as a job to a Ray cluster with token
authentication: tests/test_infra_local.py."""

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
from test_study import four_trial_spec

from lipscale import results
from lipscale.spec import parse_spec
from lipscale.tracking import PARENT_ATTR, RUN_ATTR

REPO = Path(__file__).parents[1]
SCRIPT = REPO / "studies" / "scaling_law.py"


def test_the_entry_script_explains_itself():
    out = subprocess.run([sys.executable, SCRIPT, "--help"], capture_output=True, text=True, check=True).stdout
    assert "ray job submit" in out and "--resume" in out and "--smoke-test" in out


def _kill_session(process: subprocess.Popen) -> None:
    """What a process started in its own session left running (Ray's agents outlive a killed driver)."""
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _complete(spec) -> int:
    if not Path(spec.optuna_url.removeprefix("sqlite:///")).exists():
        return 0
    storage = optuna.storages.RDBStorage(spec.optuna_url)
    if spec.name not in optuna.get_all_study_names(storage):
        return 0
    study = optuna.load_study(study_name=spec.name, storage=storage)
    return len(study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)))


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


@pytest.mark.slow
def test_a_study_killed_mid_way_ends_with_its_budget_when_run_again(tmp_path):
    raw = four_trial_spec(tmp_path / "root")
    raw["budget"]["epochs"] = 20  # seconds per trial: the kill lands while trials run
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(raw))
    spec = parse_spec(raw)
    command = [sys.executable, str(SCRIPT), "--spec", str(tmp_path / "spec.yaml")]
    env = {**os.environ, "RAY_ADDRESS": "local"}  # a Ray of its own, whatever else runs here

    with open(tmp_path / "first.log", "w") as log:
        first = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while _complete(spec) < 1:
            assert first.poll() is None and time.monotonic() < deadline, (tmp_path / "first.log").read_text()[-3000:]
            time.sleep(0.2)
        first.send_signal(signal.SIGKILL)
        first.wait()
    finally:
        _kill_session(first)
    before = _snapshot(spec)
    assert 1 <= len(before) < 4, "the kill came after the study ended: nothing to resume"

    with open(tmp_path / "second.log", "w") as log:
        second = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        assert second.wait(timeout=600) == 0, (tmp_path / "second.log").read_text()[-3000:]
    finally:
        _kill_session(second)

    study = optuna.load_study(study_name=spec.name, storage=spec.optuna_url)
    complete = study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))
    assert len(complete) == 4
    others = [t for t in study.trials if t.state != optuna.trial.TrialState.COMPLETE]
    assert all(t.state.name == "FAIL" and results.REQUEUED_ATTR in t.user_attrs for t in others)
    client = mlflow.MlflowClient(spec.mlflow_uri)
    experiment = client.get_experiment_by_name(spec.name).experiment_id
    children = client.search_runs([experiment], f"tags.`mlflow.parentRunId` = '{study.user_attrs[PARENT_ATTR]}'")
    assert sorted(r.info.run_id for r in children) == sorted(t.user_attrs[RUN_ATTR] for t in complete)
    for run in children:  # every epoch logged once, resumed trials included
        assert [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")] == list(range(1, 21))
    after = _snapshot(spec)
    assert {n: after[n] for n in before} == before  # trials done before the kill were not run again
    assert len(results.read(spec.root)) == 4
