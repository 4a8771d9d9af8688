"""Real servers for tests, started on 127.0.0.1 and stopped at teardown.

Use a fixture by importing it into a test module: `from servers import s3_server`.
"""

import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest
import s3fs

from lipscale.ports import free_port


def _wait_until_answering(url: str, process: subprocess.Popen, timeout_s: float = 30):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{process.args[0]} exited with {process.returncode} before answering")
        try:
            urllib.request.urlopen(url, timeout=1)
            return
        except urllib.error.HTTPError:
            return  # it answered, if only with an error
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"{url} did not answer within {timeout_s} s")


@contextlib.contextmanager
def moto_server(bucket: str):
    """A moto S3 server on a free port of 127.0.0.1 with an empty `bucket`.
    While it runs, the AWS_* variables point s3fs, boto3 and pyarrow at it (and
    any process started meanwhile: a local Ray's workers inherit them); s3fs's
    cached filesystems are cleared on both sides so none keeps another
    endpoint. Yields the settings."""
    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    process = subprocess.Popen(
        [shutil.which("moto_server"), "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    saved = {}
    try:
        _wait_until_answering(endpoint, process)
        settings = dict(
            AWS_ENDPOINT_URL=endpoint,
            AWS_ACCESS_KEY_ID="testing",
            AWS_SECRET_ACCESS_KEY="testing",
            AWS_DEFAULT_REGION="us-east-1",
        )
        saved = {name: os.environ.get(name) for name in settings}
        os.environ.update(settings)
        s3fs.S3FileSystem.clear_instance_cache()
        s3fs.S3FileSystem().mkdir(bucket)
        yield dict(settings, bucket=bucket, uri=f"s3://{bucket}")
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        s3fs.S3FileSystem.clear_instance_cache()
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.fixture
def s3_server():
    """moto_server with a bucket `lipscale`, for one test."""
    with moto_server("lipscale") as settings:
        yield settings


def kill_session(process: subprocess.Popen) -> None:
    """SIGKILL to what a process started in its own session left running (Ray's agents
    outlive a killed driver; mlflow server's uvicorn workers outlive it)."""
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    process.wait()


class MlflowServer:
    """`mlflow server` on a free port of 127.0.0.1 over a SQLite store in `folder`.
    kill() is a SIGKILL of it and its workers; start() brings it back on the same port
    and store."""

    def __init__(self, folder):
        self.folder, self.port = folder, free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.process = None

    def start(self) -> None:
        command = [
            shutil.which("mlflow"), "server", "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1",
            "--backend-store-uri", f"sqlite:///{self.folder}/mlflow.db",
            "--artifacts-destination", str(self.folder / "artifacts"),
        ]  # fmt: skip
        with open(self.folder / "server.log", "a") as log:
            self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        _wait_until_answering(f"{self.uri}/health", self.process, timeout_s=120)

    def kill(self) -> None:
        kill_session(self.process)


@contextlib.contextmanager
def mlflow_server(folder):
    server = MlflowServer(folder)
    server.start()
    try:
        yield server
    finally:
        server.kill()


class PostgresServer:
    """PostgreSQL on a free port of 127.0.0.1, its data in a fresh folder under /tmp (the postgres
    user, which the server runs as when this runs as root, cannot reach pytest's), with a database
    `optuna` that anyone on 127.0.0.1 may use (trust: a test's server). kill() stops it at once
    (`pg_ctl stop -m immediate`: every connection cut, as a crash does); start() brings it back on
    the same port and data."""

    def __init__(self):
        self.folder = Path(tempfile.mkdtemp(prefix="lipscale-pg-"))
        self.folder.chmod(0o755)
        self.data, self.port = self.folder / "data", free_port()
        self.url = f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/optuna"
        self.bindir = Path(shutil.which("initdb")).resolve().parent
        self.data.mkdir(mode=0o700)
        if os.geteuid() == 0:
            shutil.chown(self.data, "postgres", "postgres")
        self._pg("initdb", "-D", str(self.data), "-U", "postgres", "--auth=trust")

    def _pg(self, tool: str, *args: str) -> None:
        command = [str(self.bindir / tool), *args]
        if os.geteuid() == 0:
            command = ["runuser", "-u", "postgres", "--", *command]
        subprocess.run(command, check=True, capture_output=True, text=True)

    def start(self) -> None:
        options = f"-p {self.port} -k {self.data} -c listen_addresses=127.0.0.1"
        self._pg("pg_ctl", "-D", str(self.data), "-l", str(self.data / "server.log"), "-o", options, "-w", "start")

    def kill(self) -> None:
        self._pg("pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "stop")

    def create_database(self) -> None:
        self._pg("createdb", "-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres", "optuna")


@contextlib.contextmanager
def postgres_server():
    server = PostgresServer()
    server.start()
    try:
        server.create_database()
        yield server
    finally:
        with contextlib.suppress(subprocess.CalledProcessError):  # already stopped
            server.kill()
        shutil.rmtree(server.folder, ignore_errors=True)


@contextlib.contextmanager
def outage(server, once: Callable[[], bool], down_s: float = 5, timeout_s: float = 300):
    """While the block runs: once `once()` holds (or timeout_s has passed), server.kill(), and
    server.start() down_s later, from a background thread. Yields a list that holds the
    outage's (start, end) in epoch seconds when the block has ended."""
    window: list[tuple[float, float]] = []

    def cut():
        deadline = time.monotonic() + timeout_s
        while not once() and time.monotonic() < deadline:
            time.sleep(0.1)
        server.kill()
        began = time.time()
        time.sleep(down_s)
        server.start()
        window.append((began, time.time()))

    thread = threading.Thread(target=cut)
    thread.start()
    try:
        yield window
    finally:
        thread.join()
