"""Faults of the stores the study's driver writes to, each for real: the PostgreSQL
server of the Optuna storage stopped mid-study, briefly and for longer than the
driver waits; the MLflow tracking server down as a trial ends and the next starts,
and down for longer than a report waits; and a second driver started on the
storage of a study that is running. Each case counts what the stores kept."""

import signal
import subprocess
import threading
import time

import optuna
import pytest
import sqlalchemy
import yaml
from ledger import complete, study_ledger
from lipscale import cli, retry
from lipscale.keys import REQUEUED_ATTR
from lipscale.spec import parse_spec
from lipscale.study import run
from lipscale.trial import caused_by
from servers import kill_session, mlflow_server, outage, postgres_server
from test_faults import _an_epoch_is_logged, fifo_spec
from test_study import local_ray  # noqa: F401 - a fixture
from test_study_process_faults import start_driver, wait_until

pytestmark = pytest.mark.slow


@pytest.fixture
def postgres():
    with postgres_server() as server:
        yield server


@pytest.fixture
def no_mlflow_retries(monkeypatch):
    """MLflow's client without its own ~2 min of retries of each request, so that an outage of
    seconds reaches lipscale's retries (lipscale.retry), the layer these cases test."""
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")


def _cut_after(server, once, stopped: threading.Event) -> threading.Thread:
    """server.kill() once `once()` holds, from a thread; the server stays down (the case starts it)."""

    def cut():
        while not once() and not stopped.is_set():
            time.sleep(0.1)
        server.kill()

    thread = threading.Thread(target=cut)
    thread.start()
    return thread


# --- the PostgreSQL server of the Optuna storage ---------------------------------------------


def test_the_optuna_storage_restarted_mid_study(local_ray, postgres, tmp_path, scoreboard):
    scoreboard.fault("PostgreSQL of the Optuna storage stopped (pg_ctl -m immediate) once a trial completed; back 10 s later")
    raw = fifo_spec(tmp_path / "root", trials=3, epochs=4)
    raw["storage"]["optuna"] = postgres.url
    spec = parse_spec(raw)

    with outage(postgres, once=lambda: complete(spec) >= 1, down_s=10) as window:
        study = run(spec)

    ((_, back_at),) = window
    assert [t.state.name for t in study.trials] == ["COMPLETE"] * 3
    assert any(t.datetime_complete.timestamp() > back_at for t in study.trials), "the outage missed the trials"
    scoreboard.tally(study_ledger(spec, trials=3))


def test_the_optuna_storage_down_longer_than_the_driver_waits_then_the_study_run_again(
    local_ray, postgres, tmp_path, scoreboard, monkeypatch
):
    scoreboard.fault(
        "PostgreSQL of the Optuna storage stopped once a trial completed, for longer than the driver's retries "
        "(cut to 5 s); started again and the study run again"
    )
    monkeypatch.setattr(retry, "RETRY_FOR_S", 5)
    raw = fifo_spec(tmp_path / "root", trials=3, epochs=4)
    raw["storage"]["optuna"] = postgres.url
    spec = parse_spec(raw)

    stopped = threading.Event()
    cutter = _cut_after(postgres, lambda: complete(spec) >= 1, stopped)
    try:
        with pytest.raises(Exception) as first:
            run(spec)
    finally:
        stopped.set()
        cutter.join()
    assert caused_by(first.value, lambda e: isinstance(e, sqlalchemy.exc.OperationalError)), first.value

    postgres.start()
    study = run(spec, resume=True)

    finished = [t for t in study.trials if REQUEUED_ATTR not in t.user_attrs]
    assert [t.state.name for t in finished] == ["COMPLETE"] * 3
    assert not study.get_trials(states=(optuna.trial.TrialState.RUNNING,))
    scoreboard.tally(study_ledger(spec, trials=3))


# --- the MLflow tracking server ----------------------------------------------------------------


def test_the_tracking_server_down_as_a_trial_ends_and_the_next_starts(
    local_ray, no_mlflow_retries, tmp_path, scoreboard
):
    scoreboard.fault(
        "SIGKILL of the MLflow tracking server as the first of two trials ended (its run closed, the next one's "
        "created during the outage); back 10 s later"
    )
    (tmp_path / "mlflow").mkdir()
    with mlflow_server(tmp_path / "mlflow") as server:
        raw = fifo_spec(tmp_path / "root", trials=2, epochs=3)
        raw["budget"]["max_concurrent"] = 1
        raw["storage"]["mlflow"] = server.uri
        spec = parse_spec(raw)
        with outage(server, once=lambda: complete(spec) >= 1, down_s=10) as window:
            study = run(spec)

        ((killed_at, _),) = window
        first, second = study.trials
        assert (first.state.name, second.state.name) == ("COMPLETE", "COMPLETE")
        assert first.datetime_complete.timestamp() < killed_at + 1 < second.datetime_complete.timestamp()
        scoreboard.tally(study_ledger(spec, trials=2))


def test_a_report_that_mlflow_never_takes_stops_the_study_then_the_same_command_finishes_it(
    local_ray, no_mlflow_retries, tmp_path, scoreboard, monkeypatch, capsys
):
    scoreboard.fault(
        "SIGKILL of the MLflow tracking server mid-study, down for longer than a report waits (cut to 5 s); "
        "started again and the same command run again"
    )
    monkeypatch.setattr(retry, "RETRY_FOR_S", 5)
    (tmp_path / "mlflow").mkdir()
    with mlflow_server(tmp_path / "mlflow") as server:
        raw = fifo_spec(tmp_path / "root", trials=2, epochs=8)
        raw["storage"]["mlflow"] = server.uri
        (tmp_path / "spec.yaml").write_text(yaml.safe_dump(raw))
        spec = parse_spec(raw)

        stopped = threading.Event()
        cutter = _cut_after(server, lambda: _an_epoch_is_logged(server, spec), stopped)
        try:
            assert cli.main(["run", str(tmp_path / "spec.yaml")]) == 1
        finally:
            stopped.set()
            cutter.join()
        (error,) = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
        assert error.startswith("error: trial-000") and " was not logged to MLflow after 5 s of retries (" in error
        assert error.endswith(
            "the study stops: run the same command again once MLflow answers, and the trial resumes from its last "
            "checkpoint, logging it again"
        )

        server.start()
        assert cli.main(["run", str(tmp_path / "spec.yaml")]) == 0

        study = optuna.load_study(study_name=spec.name, storage=spec.optuna_url)
        assert [t.state.name for t in study.trials] == ["COMPLETE", "COMPLETE"]
        scoreboard.tally(study_ledger(spec, trials=2))  # every epoch of both trials logged once


# --- two drivers on one storage --------------------------------------------------------------------


def _running(spec) -> bool:
    """Whether a trial of the study is RUNNING in its Optuna storage (read creating nothing)."""
    try:
        storage = optuna.storages.RDBStorage(spec.optuna_url, skip_table_creation=True, skip_compatibility_check=True)
        study = optuna.load_study(study_name=spec.name, storage=storage)
        return bool(study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)))
    except (sqlalchemy.exc.SQLAlchemyError, optuna.exceptions.StorageInternalError, KeyError):  # no tables, no study
        return False


def test_a_second_driver_on_the_storage_of_a_running_study_is_refused(tmp_path, scoreboard):
    scoreboard.fault("a second driver (the same command, another process) started while the first runs the study")
    raw = fifo_spec(tmp_path / "root", trials=3, epochs=6)
    spec = parse_spec(raw)
    first, command, env = start_driver(tmp_path, raw)
    try:
        wait_until(lambda: _running(spec), first, tmp_path / "first.log")
        second = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300, check=False)
        assert first.wait(timeout=600) == 0, (tmp_path / "first.log").read_text()[-3000:]
    finally:
        if first.poll() is None:
            first.send_signal(signal.SIGKILL)
        kill_session(first)

    assert second.returncode == 2, second.stderr[-3000:]
    (error,) = [line for line in second.stderr.splitlines() if line.startswith("error: ")]
    assert error.startswith(f"error: storage.optuna: study 'small' is being run by another driver (pid {first.pid} on ")
    study = optuna.load_study(study_name=spec.name, storage=spec.optuna_url)
    assert [t.state.name for t in study.trials] == ["COMPLETE"] * 3  # none taken for an orphan and run again
    scoreboard.tally(study_ledger(spec, trials=3))
