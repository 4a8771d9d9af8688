"""Faults during a study on one local Ray (shared by the module): a trial that
diverges, a Ray Train worker SIGKILLed mid-epoch, the MLflow tracking server
SIGKILLed and restarted, and checkpoints truncated or corrupted. Each case
counts what the stores kept (ledger.py) and puts it on the scoreboard."""

import math
import os
import shutil
import signal
import threading
import time
from pathlib import Path

import mlflow
import psutil
import pytest
from ledger import count, study_ledger
from lipnext import checkpoint
from lipnext.config import preset
from lipnext.train import LocalSession, train
from lipnext.train_config import CheckpointConfig, DataConfig, TrainConfig
from lipscale import results
from lipscale.keys import FAIL_REASON_ATTR, FAIL_REASON_TAG, RUN_ATTR, STATE_TAG
from lipscale.spec import parse_spec
from lipscale.store import open_store
from lipscale.study import run
from servers import mlflow_server, outage
from test_spec import small
from test_study import local_ray  # noqa: F401 - a fixture

pytestmark = pytest.mark.slow


def fifo_spec(root, trials: int, epochs: int, **budget) -> dict:
    raw = small(root)
    raw["budget"] = {"trials": trials, "max_concurrent": min(trials, 2), "epochs": epochs, **budget}
    raw["scheduler"] = {"kind": "fifo"}  # every trial to its end: COMPLETE unless a fault says otherwise
    return raw


# --- a diverging trial -------------------------------------------------------------------


def test_a_trial_whose_loss_turns_nan_fails_with_the_reason_and_the_study_goes_on(local_ray, tmp_path, scoreboard):
    scoreboard.fault("a diverging trial: learning rate 1e9, its loss NaN in its first epoch")
    raw = fifo_spec(tmp_path / "root", trials=2, epochs=2)
    raw["space"] = {"optim.lr": [3e-3, 1e9]}
    raw["budget"]["max_concurrent"] = 1
    spec = parse_spec(raw)
    study = open_store(spec, create=True).study
    study.enqueue_trial({"optim.lr": 1e9})
    study.enqueue_trial({"optim.lr": 3e-3})

    diverged, fine = run(spec).trials

    assert (diverged.state.name, fine.state.name) == ("FAIL", "COMPLETE")
    reason = diverged.user_attrs[FAIL_REASON_ATTR]
    assert reason.startswith("train/loss is nan in epoch 1 (step 2, lr ") and reason.endswith("): the trial diverged")
    client = mlflow.MlflowClient(spec.mlflow_uri)
    tracked = client.get_run(diverged.user_attrs[RUN_ATTR])
    assert tracked.info.status == "FAILED"
    assert (tracked.data.tags[STATE_TAG], tracked.data.tags[FAIL_REASON_TAG]) == ("FAIL", reason)
    (loss,) = client.get_metric_history(diverged.user_attrs[RUN_ATTR], "train/loss")
    assert loss.step == 1 and math.isnan(loss.value)
    rows = results.read(spec.root).to_pylist()
    assert [(r["state"], r[FAIL_REASON_ATTR]) for r in rows] == [("FAIL", reason), ("COMPLETE", None)]
    scoreboard.tally(study_ledger(spec, trials=2))


# --- a Ray Train worker killed mid-epoch -----------------------------------------------------


def _checkpoints(folder: Path) -> int:
    """Checkpoints Ray Train has written for the trial (it keeps them all here)."""
    return len(list(folder.glob("checkpoint_*/checksums-rank0.json")))


def _kill_a_worker_mid_epoch(folder: Path, killed: list) -> None:
    """Times an epoch (between two checkpoints), then SIGKILLs a Ray Train worker of this
    test's Ray half an epoch after the next checkpoint; records (pid, checkpoints at the kill)."""
    deadline = time.monotonic() + 300
    seen = []
    while len(seen) < 3 and time.monotonic() < deadline:
        if _checkpoints(folder) > len(seen):
            seen.append(time.monotonic())
        time.sleep(0.02)
    time.sleep((seen[2] - seen[1]) / 2)
    me = os.getpid()
    workers = [
        p for p in psutil.process_iter(["cmdline"])
        if "ray::RayTrainWorker" in " ".join(p.info["cmdline"] or []) and me in {q.pid for q in p.parents()}
    ]  # fmt: skip
    before = _checkpoints(folder)
    os.kill(workers[-1].pid, signal.SIGKILL)
    killed.append((workers[-1].pid, before, _checkpoints(folder)))


def test_a_ray_train_worker_killed_mid_epoch(local_ray, tmp_path, scoreboard):
    scoreboard.fault("SIGKILL of one of a trial's two Ray Train workers half way through an epoch")
    raw = fifo_spec(tmp_path / "root", trials=1, epochs=8, workers_per_trial=2, cpus_per_worker=0.5)
    raw["space"] = {"model.width": [64]}
    raw["fixed"]["checkpoint"] = {"keep": 20}  # all of them: the killer counts them
    spec = parse_spec(raw)
    killed: list = []
    killer = threading.Thread(target=_kill_a_worker_mid_epoch, args=(Path(spec.root) / "train" / "trial-0000", killed))
    killer.start()
    (trial,) = run(spec).trials
    killer.join()

    ((pid, before, after),) = killed
    assert before == after < spec.budget.epochs, "the kill did not land inside an epoch"
    assert not psutil.pid_exists(pid)
    assert trial.state.name == "COMPLETE"
    history = mlflow.MlflowClient(spec.mlflow_uri).get_metric_history(trial.user_attrs[RUN_ATTR], "train/loss")
    assert sorted(m.step for m in history) == list(range(1, 9))
    scoreboard.tally(study_ledger(spec, trials=1))


# --- the tracking server killed and restarted ------------------------------------------------


def _an_epoch_is_logged(server, spec) -> bool:
    client = mlflow.MlflowClient(server.uri)
    experiment = client.get_experiment_by_name(spec.name)
    return bool(experiment) and any(r.data.metrics.get("train/loss") for r in client.search_runs([experiment.experiment_id]))


def test_the_tracking_server_killed_mid_study_and_restarted(local_ray, tmp_path, scoreboard):
    scoreboard.fault("SIGKILL of the MLflow tracking server mid-study; restarted on the same port and store 5 s later")
    (tmp_path / "mlflow").mkdir()
    with mlflow_server(tmp_path / "mlflow") as server:
        raw = fifo_spec(tmp_path / "root", trials=2, epochs=8)
        raw["storage"]["mlflow"] = server.uri
        spec = parse_spec(raw)
        with outage(server, once=lambda: _an_epoch_is_logged(server, spec)) as window:
            study = run(spec)

        ((killed_at, back_at),) = window
        assert all(t.datetime_complete.timestamp() > back_at for t in study.trials), "the outage missed the trials"
        assert [t.state.name for t in study.trials] == ["COMPLETE", "COMPLETE"]
        client = mlflow.MlflowClient(spec.mlflow_uri)
        for t in study.trials:
            history = client.get_metric_history(t.user_attrs[RUN_ATTR], "train/loss")
            assert sorted(m.step for m in history) == list(range(1, 9))
            assert any(m.timestamp / 1000 > killed_at for m in history), "no epoch was logged during the outage"
        scoreboard.tally(study_ledger(spec, trials=2))


# --- checkpoints truncated or corrupted ------------------------------------------------------


@pytest.fixture(scope="module")
def digits_shards(tmp_path_factory) -> str:
    from lipscale.data.convert import convert

    root = tmp_path_factory.mktemp("data") / "digits"
    convert("digits", None, str(root))
    return str(root)


def _largest_shard(directory: Path) -> Path:
    return max(directory.glob("*.distcp"), key=lambda p: p.stat().st_size)


def _truncate(directory: Path) -> None:
    shard = _largest_shard(directory)
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])


def _flip_a_byte(directory: Path) -> None:
    shard = _largest_shard(directory)
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))


DAMAGE = {
    "truncated": (_truncate, r"__0_0\.distcp: truncated: \d+ bytes, checksums-rank0\.json says \d+"),
    "corrupt": (_flip_a_byte, r"__0_0\.distcp: corrupt: its sha256 differs from checksums-rank0\.json's"),
    "never completed": (
        lambda d: (d / "checksums-rank0.json").unlink(),
        r"checksums-rank0\.json: missing: the checkpoint was not completed",
    ),
}
EVAL = ["eval/clean_acc", "eval/cra_36", "eval/cra_72", "train/loss", "model/lipschitz_bound"]


def _config(data: str, folder: Path) -> TrainConfig:
    return TrainConfig(
        model=preset("tiny"),
        data=DataConfig(uri=data, batch_size=100),
        checkpoint=CheckpointConfig(dir=str(folder), keep=3),
        epochs=3,
    )


@pytest.fixture(scope="module")
def uninterrupted(digits_shards, tmp_path_factory) -> tuple[dict, Path]:
    """A 3-epoch run without Ray that kept all 3 checkpoints: its last metrics and its folder."""
    config = _config(digits_shards, tmp_path_factory.mktemp("uninterrupted") / "checkpoints")
    return train(config, LocalSession(config.checkpoint)), Path(config.checkpoint.dir)


@pytest.mark.parametrize("damage", DAMAGE)
def test_a_bad_last_checkpoint_is_passed_over_for_the_one_before(
    damage, uninterrupted, digits_shards, tmp_path, scoreboard
):
    scoreboard.fault(f"the newest checkpoint of a run {damage} (a real file), then the run restarted")
    harm, message = DAMAGE[damage]
    uninterrupted, folder = uninterrupted
    shutil.copytree(folder, tmp_path / "b")
    *_, before_last, last = sorted((tmp_path / "b").iterdir())
    harm(last)
    with pytest.raises(checkpoint.CheckpointError, match=message):
        checkpoint.verify(last)
    assert checkpoint.latest(tmp_path / "b") == before_last

    session = LocalSession(_config(digits_shards, tmp_path / "b").checkpoint)
    resumed = train(_config(digits_shards, tmp_path / "b"), session)

    assert [m["epoch"] for m in session.history] == [3]  # from epoch 2's checkpoint, not from scratch
    assert {k: resumed[k] for k in EVAL} == {k: uninterrupted[k] for k in EVAL}  # bit for bit
    checkpoint.verify(last)  # written again, whole
    scoreboard.tally({"epochs": count([3], [m["epoch"] for m in session.history])})


def test_ray_train_passes_over_a_truncated_checkpoint(local_ray, digits_shards, tmp_path, scoreboard):
    scoreboard.fault("Ray Train's newest checkpoint truncated (a real file), then the run started again")
    from lipnext.train import train_loop_per_worker
    from ray.train import CheckpointConfig as RayCheckpoints
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    def fit():
        return TorchTrainer(
            train_loop_per_worker,
            train_loop_config=_config(digits_shards, tmp_path).to_dict() | {"checkpoint": {"keep": 2}},
            scaling_config=ScalingConfig(num_workers=1, resources_per_worker={"CPU": 1}),
            run_config=RunConfig(
                name="run", storage_path=str(tmp_path / "ray"), checkpoint_config=RayCheckpoints(num_to_keep=2)
            ),
        ).fit()

    first = fit()
    *_, last = sorted(p for p in (tmp_path / "ray" / "run").glob("checkpoint_*") if p.is_dir())  # named by time
    _truncate(last)
    again = fit()
    assert again.metrics["epoch"] == 3
    assert {k: again.metrics[k] for k in EVAL} == {k: first.metrics[k] for k in EVAL}
    scoreboard.tally({"epochs": count([3], [again.metrics["epoch"]])})
