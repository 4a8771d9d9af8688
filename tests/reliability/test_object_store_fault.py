"""The object store unreachable for a few seconds while a study rooted on it
writes checkpoints: moto_server behind a TCP forwarder (tcp_forwarder.py),
the forwarder SIGKILLed and started again on its port. The module's Ray is
started after the AWS_* variables point at the forwarder, so its workers do."""

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest
import ray
import s3fs
from ledger import study_ledger
from lipnext import checkpoint
from lipscale.spec import parse_spec
from lipscale.study import run
from lipscale.keys import RUN_ATTR
from servers import free_port, kill_session, moto_server, outage
from test_spec import small

pytestmark = pytest.mark.slow
FORWARDER = Path(__file__).parent / "tcp_forwarder.py"


class Forwarder:
    def __init__(self, target: int):
        self.port, self.target, self.process = free_port(), target, None

    def start(self) -> None:
        self.process = subprocess.Popen(
            [sys.executable, FORWARDER, str(self.port), str(self.target)], start_new_session=True
        )
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return
            except OSError:
                assert time.monotonic() < deadline and self.process.poll() is None, "the forwarder did not start"
                time.sleep(0.05)

    def kill(self) -> None:
        kill_session(self.process)


@pytest.fixture(scope="module")
def flaky_s3():
    with moto_server("lipscale") as settings:
        moto = settings["AWS_ENDPOINT_URL"]
        forwarder = Forwarder(int(moto.rsplit(":", 1)[1]))
        forwarder.start()
        os.environ["AWS_ENDPOINT_URL"] = f"http://127.0.0.1:{forwarder.port}"  # moto_server restores it
        s3fs.S3FileSystem.clear_instance_cache()
        ray.init(num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1")
        try:
            yield forwarder, s3fs.S3FileSystem(skip_instance_cache=True, client_kwargs={"endpoint_url": moto})
        finally:
            ray.shutdown()
            forwarder.kill()


def _two_checkpoints_are_in_the_bucket(moto) -> bool:
    moto.invalidate_cache()
    return len(moto.glob("lipscale/study/tune/trial-0000/checkpoint_*/.metadata")) >= 2


def test_the_object_store_unreachable_while_checkpoints_are_written(flaky_s3, tmp_path, scoreboard):
    scoreboard.fault("the S3 endpoint (moto_server behind a forwarder) gone for 5 s while a trial writes checkpoints")
    forwarder, moto = flaky_s3
    raw = small("s3://lipscale/study")
    raw["storage"] |= {"optuna": f"sqlite:///{tmp_path}/optuna.db", "mlflow": f"sqlite:///{tmp_path}/mlflow.db"}
    raw["budget"] = {"trials": 1, "epochs": 8}
    raw["scheduler"] = {"kind": "fifo"}
    raw["fixed"]["checkpoint"] = {"keep": 2}
    spec = parse_spec(raw)
    with outage(forwarder, once=lambda: _two_checkpoints_are_in_the_bucket(moto)) as window:
        (trial,) = run(spec).trials

    ((cut, back),) = window
    assert trial.datetime_complete.timestamp() > back, "the outage came after the trial"
    assert trial.state.name == "COMPLETE"
    history = mlflow.MlflowClient(spec.mlflow_uri).get_metric_history(trial.user_attrs[RUN_ATTR], "train/loss")
    assert sorted(m.step for m in history) == list(range(1, 9))
    # pyarrow's S3 client retries through the outage, but may drop a failed part upload with
    # only a log line ("Error ignored when destroying file"): the checkpoints kept are whole.
    for kept in moto.glob("lipscale/study/tune/trial-0000/checkpoint_*"):
        local = tmp_path / "downloaded" / kept.rsplit("/", 1)[1]
        moto.get(kept + "/", str(local) + "/", recursive=True)
        checkpoint.verify(local)
    scoreboard.tally(study_ledger(spec, trials=1))
