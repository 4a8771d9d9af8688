#!/usr/bin/env python3
"""A realistic LipScale stack on this machine, every server on 127.0.0.1 and free ports:

- a Ray cluster with token authentication: a head (dashboard and job API) and a second
  worker node process, one CPU each;
- PostgreSQL (the Debian package: infra/local/install_postgres.sh) holding the Optuna
  storage, the MLflow backend store and MLflow's user database;
- S3: `moto_server` with a bucket `lipscale` (any S3 endpoint in real use);
- an MLflow tracking server with authentication (`--app-name basic-auth`), its artifacts
  proxied to s3://lipscale/mlartifacts, so clients need no S3 keys for artifacts.

    python infra/local/stack.py up                       # -> /tmp/lipscale-stack (--dir DIR)
    python infra/local/stack.py spec studies/specs/digits.yaml > /tmp/digits-stack.yaml
    set -a; . /tmp/lipscale-stack/secrets/client.env; set +a
    ray job submit --working-dir . -- python studies/scaling_law.py --spec /tmp/digits-stack.yaml
    python infra/local/stack.py down --purge

`spec` writes the same study spec with its storage URIs pointed at the stack, nothing else
changed. No URI carries a credential: the PostgreSQL password is in a libpq password file
(PGPASSFILE), the MLflow user's in MLFLOW_TRACKING_USERNAME/PASSWORD, the S3 keys in AWS_*
and the Ray token in a file (RAY_AUTH_TOKEN_PATH). The Ray nodes are started with all of
them in their environment, as a cluster's nodes get them from mounted secrets, so a job
submission carries none. They are generated at `up`, kept under DIR/secrets (mode 0700),
and client.env there exports them for clients on this machine.

`down` stops what `up` started (by process group and `pg_ctl stop`), nothing else: other
Ray clusters on the machine keep running. Logs are in DIR/logs.
"""

import argparse
import json
import os
import pwd
import secrets
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from base64 import b64encode
from pathlib import Path

import yaml

from lipscale.ports import free_port

HOST = "127.0.0.1"
BUCKET = "lipscale"
DB_USER = "lipscale"
DATABASES = {"optuna": "optuna", "mlflow": "mlflow", "mlflow_auth": "mlflow_auth"}
"""Role -> database name, all owned by DB_USER."""
MLFLOW_USER = "lipscale"
"""The study's MLflow account; the admin account only creates it."""
NODE_CPUS = 1
"""CPUs of each Ray node: two nodes, so a two-trial study puts one trial on each."""
START_TIMEOUT_S = 180
"""Servers start slowly on a busy 2-core machine (MLflow's first migrations, Ray's agents)."""
SECRETS = ("ray_token", "pg_password", "mlflow_admin_password", "mlflow_password", "mlflow_flask_key",
           "aws_access_key_id", "aws_secret_access_key")  # fmt: skip
"""The credentials `up` generates, each a file under DIR/secrets."""
DEFAULT_DIR = "/tmp/lipscale-stack"
"""Short (Ray's socket paths are limited to ~100 bytes) and reachable by the postgres user."""


def _wait(what: str, check, process: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while not check():
        if process.poll() is not None:
            raise SystemExit(f"{what} exited with {process.returncode}; see {log}")
        if time.monotonic() > deadline:
            raise SystemExit(f"{what} did not come up within {START_TIMEOUT_S} s; see {log}")
        time.sleep(0.5)


def _answers(url: str, headers: dict | None = None) -> bool:
    try:
        urllib.request.urlopen(urllib.request.Request(url, headers=headers or {}), timeout=2)
        return True
    except OSError:  # an HTTP error status too
        return False


class Stack:
    """The stack's directory: DIR/stack.json (ports, URIs, process ids), DIR/secrets, DIR/logs."""

    def __init__(self, root: str):
        self.dir = Path(root).absolute()
        self.secrets = self.dir / "secrets"
        self.logs = self.dir / "logs"
        self.pgdata = self.dir / "postgres"
        self.state_file = self.dir / "stack.json"
        self.state = json.loads(self.state_file.read_text()) if self.state_file.exists() else {}

    def save(self) -> None:
        self.state_file.write_text(json.dumps(self.state, indent=2) + "\n")

    def secret(self, name: str) -> str:
        return (self.secrets / name).read_text().strip()

    def _new_secret(self, name: str, value: str) -> str:
        path = self.secrets / name
        path.write_text(value + "\n")
        path.chmod(0o600)
        return value

    # --- what clients need -------------------------------------------------------------

    @property
    def uris(self) -> dict[str, str]:
        return self.state["uris"]

    def client_env(self) -> dict[str, str]:
        """Environment of a client of the stack, and of its Ray nodes: where things are and
        the credentials, never inside a URI."""
        s = self.state
        return {
            "RAY_ADDRESS": s["uris"]["ray_dashboard"],
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN_PATH": str(self.secrets / "ray_token"),
            "MLFLOW_TRACKING_USERNAME": MLFLOW_USER,
            "MLFLOW_TRACKING_PASSWORD": self.secret("mlflow_password"),
            "AWS_ENDPOINT_URL": s["uris"]["s3_endpoint"],
            "AWS_ACCESS_KEY_ID": self.secret("aws_access_key_id"),
            "AWS_SECRET_ACCESS_KEY": self.secret("aws_secret_access_key"),
            "AWS_DEFAULT_REGION": "us-east-1",
            "PGPASSFILE": str(self.secrets / "pgpass"),
        }

    def configured_secrets(self) -> dict[str, str]:
        """Every credential the stack generated, by file name."""
        return {name: self.secret(name) for name in SECRETS}

    def storage(self, study: str) -> dict[str, str]:
        """A spec's storage section for a study on this stack."""
        return {
            "root": f"s3://{BUCKET}/studies/{study}",
            "optuna": self.uris["optuna"],
            "mlflow": self.uris["mlflow"],
        }

    # --- up ------------------------------------------------------------------------------

    def up(self) -> None:
        if self.dir.exists() and any(self.dir.iterdir()):
            raise SystemExit(f"{self.dir} is not empty: `down --purge` it first, or give another --dir")
        for d in (self.dir, self.logs):
            d.mkdir(mode=0o755, parents=True, exist_ok=True)
        self.dir.chmod(0o755)  # the postgres user reaches its data directory through it
        self.secrets.mkdir(mode=0o700)
        self.state = {"processes": {}, "uris": {}}
        self._make_secrets()
        self.save()
        try:
            self._start_s3()
            self._start_postgres()
            self._start_mlflow()
            self._start_ray()
        except BaseException:
            self.down()
            raise
        self._write_client_env()
        print(f"stack up in {self.dir}:")
        for name, uri in self.uris.items():
            print(f"  {name:14s} {uri}")
        print(f"credentials for clients: set -a; . {self.secrets / 'client.env'}; set +a")

    def _make_secrets(self) -> None:
        for name in SECRETS:
            self._new_secret(
                name, secrets.token_hex(16) if name != "aws_access_key_id" else f"AKIA{secrets.token_hex(8).upper()}"
            )

    def _spawn(self, name: str, command: list[str], env: dict[str, str]) -> subprocess.Popen:
        """A server in a session of its own (so `down` stops it and its children by group)."""
        log = self.logs / f"{name}.log"
        with open(log, "w") as out:
            process = subprocess.Popen(
                command, env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True
            )
        self.state["processes"][name] = process.pid
        self.save()
        return process

    def _base_env(self) -> dict[str, str]:
        # A RAY_ADDRESS of the caller's would send `ray start` to another cluster.
        return {k: v for k, v in os.environ.items() if not k.startswith(("RAY_ADDRESS", "RAY_AUTH_", "MLFLOW_"))}

    def _start_s3(self) -> None:
        port = free_port(HOST)
        endpoint = f"http://{HOST}:{port}"
        process = self._spawn("s3", [shutil.which("moto_server"), "-H", HOST, "-p", str(port)], self._base_env())
        _wait("moto_server", lambda: _answers(endpoint), process, self.logs / "s3.log")
        self.state["uris"]["s3_endpoint"] = endpoint
        import boto3

        boto3.client(
            "s3", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id=self.secret("aws_access_key_id"),
            aws_secret_access_key=self.secret("aws_secret_access_key"),
        ).create_bucket(Bucket=BUCKET)  # fmt: skip
        self.state["uris"]["s3_bucket"] = f"s3://{BUCKET}"
        self.save()

    # PostgreSQL: the server runs as the postgres user when this runs as root (it refuses root).

    def _as_db_owner(self, command: list[str], **kwargs) -> subprocess.CompletedProcess:
        if os.geteuid() == 0:
            command = ["runuser", "-u", "postgres", "--", *command]
        return subprocess.run(command, check=True, capture_output=True, text=True, **kwargs)

    def _start_postgres(self) -> None:
        bindir = postgres_bindir()
        port = free_port(HOST)
        self.pgdata.mkdir(mode=0o700)
        if os.geteuid() == 0:
            owner = pwd.getpwnam("postgres")
            os.chown(self.pgdata, owner.pw_uid, owner.pw_gid)
        # Local (socket) connections only from the data directory's owner; TCP needs the password.
        self._as_db_owner([f"{bindir}/initdb", "-D", str(self.pgdata), "-U", "postgres", "-E", "UTF8",
                           "--auth-local=trust", "--auth-host=scram-sha-256"])  # fmt: skip
        options = f"-p {port} -k {self.pgdata} -c listen_addresses={HOST}"
        self.state["postgres"] = {"bindir": bindir, "port": port}
        self.save()
        self._as_db_owner(
            [f"{bindir}/pg_ctl", "-D", str(self.pgdata), "-l", str(self.pgdata / "server.log"), "-o", options,
             "-w", "-t", str(START_TIMEOUT_S), "start"]
        )  # fmt: skip
        # The password goes in on stdin, never in a command line that `ps` shows.
        sql = f"CREATE ROLE {DB_USER} LOGIN PASSWORD '{self.secret('pg_password')}';\n" + "".join(
            f"CREATE DATABASE {db} OWNER {DB_USER};\n" for db in DATABASES.values()
        )
        self._as_db_owner([f"{bindir}/psql", "-h", str(self.pgdata), "-p", str(port), "-U", "postgres", "-d",
                           "postgres", "-q", "-v", "ON_ERROR_STOP=1"], input=sql)  # fmt: skip
        pgpass = self.secrets / "pgpass"
        pgpass.write_text(f"{HOST}:{port}:*:{DB_USER}:{self.secret('pg_password')}\n")
        pgpass.chmod(0o600)  # libpq ignores a password file that others can read
        url = f"{DB_USER}@{HOST}:{port}"
        self.state["uris"] |= {
            "optuna": f"postgresql+psycopg://{url}/{DATABASES['optuna']}",
            "mlflow_backend": f"postgresql+psycopg://{url}/{DATABASES['mlflow']}",
            "mlflow_auth_db": f"postgresql+psycopg://{url}/{DATABASES['mlflow_auth']}",
        }
        self.save()

    def _start_mlflow(self) -> None:
        port = free_port(HOST)
        url = f"http://{HOST}:{port}"
        ini = self.secrets / "mlflow_auth.ini"
        ini.write_text(
            "[mlflow]\n"
            "default_permission = READ\n"  # a user edits only the experiments it creates or is granted
            f"database_uri = {self.uris['mlflow_auth_db']}\n"
            "admin_username = admin\n"
            "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
        )
        env = self._base_env() | {
            "MLFLOW_AUTH_CONFIG_PATH": str(ini),
            "MLFLOW_AUTH_ADMIN_PASSWORD": self.secret("mlflow_admin_password"),
            "MLFLOW_FLASK_SERVER_SECRET_KEY": self.secret("mlflow_flask_key"),
            "PGPASSFILE": str(self.secrets / "pgpass"),
            "AWS_ENDPOINT_URL": self.uris["s3_endpoint"],
            "AWS_ACCESS_KEY_ID": self.secret("aws_access_key_id"),
            "AWS_SECRET_ACCESS_KEY": self.secret("aws_secret_access_key"),
            "AWS_DEFAULT_REGION": "us-east-1",
        }
        command = [
            "mlflow", "server", "--app-name", "basic-auth", "--host", HOST, "--port", str(port), "--workers", "1",
            "--backend-store-uri", self.uris["mlflow_backend"],
            "--artifacts-destination", f"s3://{BUCKET}/mlartifacts",  # proxied: clients never see S3
        ]  # fmt: skip
        process = self._spawn("mlflow", command, env)
        _wait("mlflow server", lambda: _answers(f"{url}/health"), process, self.logs / "mlflow.log")
        self.state["uris"]["mlflow"] = url
        self.save()
        admin = _basic("admin", self.secret("mlflow_admin_password"))
        body = json.dumps({"username": MLFLOW_USER, "password": self.secret("mlflow_password")}).encode()
        request = urllib.request.Request(
            f"{url}/api/2.0/mlflow/users/create", data=body, method="POST",
            headers={"Authorization": admin, "Content-Type": "application/json"},
        )  # fmt: skip
        urllib.request.urlopen(request, timeout=30)

    def _start_ray(self) -> None:
        gcs, dashboard = free_port(HOST), free_port(HOST)
        self.state["uris"] |= {"ray_gcs": f"{HOST}:{gcs}", "ray_dashboard": f"http://{HOST}:{dashboard}"}
        self.save()
        env = self._base_env() | self.client_env()
        del env["RAY_ADDRESS"]

        # Every port a node listens on is a free one: fixed defaults (client server 10001,
        # agent 52365) would collide with another node or cluster on this machine. Each node
        # has a temp dir of its own: a node deletes the job packages its trials no longer
        # use, which would pull the working directory from under a driver on the other.
        def node(name: str, *args: str) -> list[str]:
            return ["ray", "start", *args, "--block", f"--node-ip-address={HOST}", f"--num-cpus={NODE_CPUS}",
                    "--num-gpus=0", f"--dashboard-agent-listen-port={free_port(HOST)}", f"--temp-dir={self.dir / name}",
                    "--disable-usage-stats"]  # fmt: skip

        head = self._spawn("ray_head", node(
            "ray", "--head", f"--port={gcs}", f"--ray-client-server-port={free_port(HOST)}", f"--dashboard-host={HOST}",
            f"--dashboard-port={dashboard}",
        ), env)  # fmt: skip
        token = {"Authorization": f"Bearer {self.secret('ray_token')}"}
        nodes_url = f"http://{HOST}:{dashboard}/api/v0/nodes?detail=false&limit=10"
        _wait("ray head", lambda: _alive_nodes(nodes_url, token) >= 1, head, self.logs / "ray_head.log")
        worker = self._spawn("ray_worker", node("ray-worker", f"--address={HOST}:{gcs}"), env)
        _wait("ray worker node", lambda: _alive_nodes(nodes_url, token) >= 2, worker, self.logs / "ray_worker.log")
        jobs = f"http://{HOST}:{dashboard}/api/jobs/"
        _wait("ray job API", lambda: _answers(jobs, token), head, self.logs / "ray_head.log")

    def _write_client_env(self) -> None:
        path = self.secrets / "client.env"
        path.write_text("".join(f"{k}={v}\n" for k, v in self.client_env().items()))
        path.chmod(0o600)

    # --- down ----------------------------------------------------------------------------

    def down(self) -> None:
        """Stops what `up` started; what is already gone is skipped."""
        _stop_groups(self.state.get("processes", {}))
        pg = self.state.get("postgres")
        if pg and (self.pgdata / "postmaster.pid").exists():
            self._as_db_owner([f"{pg['bindir']}/pg_ctl", "-D", str(self.pgdata), "-m", "fast", "-w", "stop"])
        self.state["processes"] = {}
        if self.state_file.parent.exists():
            self.save()


def _basic(user: str, password: str) -> str:
    return "Basic " + b64encode(f"{user}:{password}".encode()).decode()


def _alive_nodes(url: str, headers: dict) -> int:
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=5) as r:
            nodes = json.load(r)["data"]["result"]["result"]
    except (OSError, ValueError, KeyError):
        return 0
    return sum(n["state"] == "ALIVE" for n in nodes)


def _stop_groups(groups: dict[str, int], timeout_s: float = 15) -> None:
    """SIGTERM to each process group `up` started (each process of a Ray node exits on it),
    all at once; SIGKILL to what is left of them after `timeout_s` (a Ray head took 34 s to
    stop on its own, the MLflow server 19 s; what they hold is in PostgreSQL and S3)."""
    start = time.monotonic()
    running = {}
    for name, pid in groups.items():
        try:
            os.killpg(pid, signal.SIGTERM)
            running[name] = pid
        except ProcessLookupError:
            pass
    while any(_alive(pid) for pid in running.values()) and time.monotonic() < start + timeout_s:
        time.sleep(0.2)
    for name, pid in running.items():
        try:
            os.killpg(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    if running:
        print(f"stopped {', '.join(running)} in {time.monotonic() - start:.1f} s")


def _alive(pid: int) -> bool:
    """Whether the process runs: not gone, and not a zombie (its parent, when `up` failed this
    very process, has not reaped it yet; init may be slow to)."""
    try:
        if os.waitpid(pid, os.WNOHANG)[0] == pid:
            return False
    except ChildProcessError:
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat")
    return not (stat.exists() and stat.read_text().rsplit(")", 1)[1].split()[0] == "Z")


def postgres_bindir() -> str:
    """The server binaries: initdb on PATH, else the newest Debian install."""
    if found := shutil.which("initdb"):
        return str(Path(found).resolve().parent)
    versions = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"), key=lambda p: int(p.parts[-3]))
    if not versions:
        raise SystemExit("PostgreSQL is not installed: infra/local/install_postgres.sh (apt-get install postgresql)")
    return str(versions[-1].parent)


def spec_on_stack(stack: Stack, spec_path: str) -> str:
    """The spec's YAML with its storage URIs pointed at the stack; nothing else changes."""
    raw = yaml.safe_load(Path(spec_path).read_text())
    raw["storage"] = stack.storage(raw["name"])
    return yaml.safe_dump(raw, sort_keys=False)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", default=DEFAULT_DIR, help=f"the stack's directory (default {DEFAULT_DIR})")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("up", help="start the stack")
    down = commands.add_parser("down", help="stop the stack")
    down.add_argument("--purge", action="store_true", help="also delete its directory (data, logs, secrets)")
    spec = commands.add_parser("spec", help="print a study spec with its storage on the stack")
    spec.add_argument("spec", metavar="SPEC")
    args = parser.parse_args(argv)
    stack = Stack(args.dir)
    if args.command == "spec" and not stack.state:
        raise SystemExit(f"no stack in {stack.dir}: `up` starts one")
    if args.command == "up":
        stack.up()
    elif args.command == "down":
        stack.down()
        if args.purge:
            shutil.rmtree(stack.dir, ignore_errors=True)
    else:
        sys.stdout.write(spec_on_stack(stack, args.spec))
    return 0


if __name__ == "__main__":
    sys.exit(main())
