"""The local stack of infra/local, brought up with the script users run: a Ray cluster
of two nodes with token authentication, PostgreSQL, an MLflow server with
authentication and its artifacts on S3 (moto). The digits smoke study is submitted to
it with `ray job submit`, its spec pointed at the stack by its storage URIs alone.
What it leaves is read back from each server; and what must not work does not: a job
without the token, an anonymous MLflow write, a secret in what the study logged."""

import base64
import importlib.util
import json
import os
import re
import subprocess
import sys
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import optuna
import pyarrow.parquet as pq
import pytest
import s3fs
import yaml

from lipnext.metrics import CONTRACT
from lipscale import cli
from lipscale.keys import CHECKPOINT_ATTR, PARENT_ATTR, RUN_ATTR
from lipscale.uris import redact

pytestmark = pytest.mark.slow

REPO = Path(__file__).parents[1]
SCRIPT = REPO / "infra" / "local" / "stack.py"
DIGITS = REPO / "studies" / "specs" / "digits.yaml"
_module = importlib.util.spec_from_file_location("stack", SCRIPT)
stack_script = importlib.util.module_from_spec(_module)
_module.loader.exec_module(stack_script)
STUDY = "digits-smoke"


def client_env(stack, **changes) -> dict[str, str]:
    """This process's environment as a client of the stack: its settings, no other cluster's."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_ADDRESS", "RAY_AUTH_", "MLFLOW_", "AWS_"))}
    return env | stack.client_env() | changes


@pytest.fixture(scope="module")
def stack():
    directory = f"/tmp/lipscale-stack-{uuid.uuid4().hex[:8]}"  # short: Ray's socket paths
    command = [sys.executable, str(SCRIPT), "--dir", directory]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    try:
        up = subprocess.run([*command, "up"], env=env, capture_output=True, text=True, timeout=600, check=False)
        logs = "".join(f"\n--- {log.name}\n{log.read_text()[-2000:]}" for log in Path(directory).glob("logs/*.log"))
        assert up.returncode == 0, up.stdout[-3000:] + up.stderr[-3000:] + logs
        yield stack_script.Stack(directory)
    finally:
        down = subprocess.run(
            [*command, "down", "--purge"], env=env, capture_output=True, text=True, timeout=300, check=False
        )
        assert down.returncode == 0, down.stderr[-3000:]


def ray_job(env: dict, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(["ray", "job", *args], env=env, capture_output=True, text=True, timeout=timeout, check=False)


def s3(stack) -> s3fs.S3FileSystem:
    env = stack.client_env()
    return s3fs.S3FileSystem(
        key=env["AWS_ACCESS_KEY_ID"], secret=env["AWS_SECRET_ACCESS_KEY"], endpoint_url=env["AWS_ENDPOINT_URL"],
        skip_instance_cache=True,
    )  # fmt: skip


def mlflow_rest(stack, method: str, path: str, body: dict | None = None, user: tuple[str, str] | None = None):
    """(status, JSON answer) of the MLflow server's REST API, as `user` (default: the study's)."""
    env = stack.client_env()
    user = user or (env["MLFLOW_TRACKING_USERNAME"], env["MLFLOW_TRACKING_PASSWORD"])
    headers = {"Content-Type": "application/json"}
    if user != ("", ""):
        headers["Authorization"] = "Basic " + base64.b64encode(":".join(user).encode()).decode()
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(f"{stack.uris['mlflow']}{path}", data=data, method=method, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=30) as answer:
            return answer.status, json.load(answer)
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode(errors="replace")


def digits_on_stack(stack) -> str:
    """`stack.py spec` of the default digits spec."""
    command = [sys.executable, str(SCRIPT), "--dir", str(stack.dir), "spec", str(DIGITS)]
    return subprocess.run(command, capture_output=True, text=True, check=True).stdout


@pytest.fixture(scope="module")
def study_job(stack, tmp_path_factory):
    """The digits spec with the stack's URIs (`stack.py spec`), its smoke test submitted as a
    job from the repository, as users do; returns the job's log and what `submit` printed."""
    tmp = tmp_path_factory.mktemp("job")
    (tmp / "digits.yaml").write_text(digits_on_stack(stack))
    env = client_env(stack)
    job = f"lipscale-{uuid.uuid4().hex[:8]}"
    submit = ray_job(
        env, "submit", "--submission-id", job, "--working-dir", str(REPO), "--",
        sys.executable, "studies/scaling_law.py", "--spec", str(tmp / "digits.yaml"), "--smoke-test",
        timeout=900,
    )  # fmt: skip
    logs = ray_job(env, "logs", job).stdout
    assert submit.returncode == 0, submit.stdout[-3000:] + submit.stderr[-3000:]
    assert f"Job '{job}' succeeded" in ray_job(env, "status", job).stdout
    return logs, submit.stdout + submit.stderr


def test_the_stack_spec_differs_from_the_users_only_in_its_storage_uris(stack):
    on_stack, original = yaml.safe_load(digits_on_stack(stack)), yaml.safe_load(DIGITS.read_text())
    assert on_stack.pop("storage") == {
        "root": "s3://lipscale/studies/digits",
        "optuna": stack.uris["optuna"],
        "mlflow": stack.uris["mlflow"],
    }
    assert on_stack == original
    assert all(redact(uri) == uri for uri in stack.uris.values())  # no URI carries a password


def test_the_ray_cluster_has_two_nodes_and_refuses_a_job_without_its_token(stack, tmp_path):
    env = client_env(stack)
    assert ray_job(env, "list").returncode == 0
    token = {"Authorization": f"Bearer {stack.secret('ray_token')}"}
    nodes = stack_script._alive_nodes(f"{stack.uris['ray_dashboard']}/api/v0/nodes?detail=false", token)
    assert nodes == 2

    # No token at all (and none in a ~/.ray to fall back on), then a wrong one.
    no_token = {k: v for k, v in env.items() if not k.startswith("RAY_AUTH_")} | {"HOME": str(tmp_path)}
    wrong = env | {"RAY_AUTH_TOKEN": uuid.uuid4().hex}
    del wrong["RAY_AUTH_TOKEN_PATH"]
    for client in (no_token, wrong):
        refused = ray_job(client, "submit", "--submission-id", f"intruder-{uuid.uuid4().hex[:8]}", "--", "true")
        assert refused.returncode != 0
    # Refused by the server, not merely by the client: its job API answers 401 or 403.
    for headers in ({}, {"Authorization": f"Bearer {uuid.uuid4().hex}"}):
        request = urllib.request.Request(
            f"{stack.uris['ray_dashboard']}/api/jobs/", data=json.dumps({"entrypoint": "true"}).encode(),
            method="POST", headers={"Content-Type": "application/json", **headers},
        )  # fmt: skip
        with pytest.raises(urllib.error.HTTPError) as answer:
            urllib.request.urlopen(request, timeout=30)
        assert answer.value.code in (401, 403)
    assert "intruder" not in ray_job(env, "list").stdout


def test_mlflow_refuses_an_anonymous_write_and_a_wrong_password(stack):
    create = ("POST", "/api/2.0/mlflow/experiments/create", {"name": f"intruder-{uuid.uuid4().hex[:8]}"})
    assert mlflow_rest(stack, *create, user=("", ""))[0] == 401
    assert mlflow_rest(stack, *create, user=("lipscale", "not-the-password"))[0] == 401
    assert mlflow_rest(stack, "GET", "/api/2.0/mlflow/experiments/search?max_results=10")[0] == 200


def test_a_wrong_mlflow_password_stops_a_study_before_anything_is_created(stack, tmp_path, monkeypatch, capsys):
    raw = yaml.safe_load(DIGITS.read_text())
    raw["storage"] = stack.storage("refused")
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(raw))
    for name, value in client_env(stack, MLFLOW_TRACKING_PASSWORD="not-the-password").items():
        monkeypatch.setenv(name, value)
    s3fs.S3FileSystem.clear_instance_cache()  # none made with another endpoint or keys
    try:
        assert cli.main(["run", str(tmp_path / "spec.yaml")]) == 2
    finally:
        s3fs.S3FileSystem.clear_instance_cache()
    assert re.search(r"storage.mlflow: http://127.0.0.1:\d+ refuses this client", capsys.readouterr().err)
    assert "refused" not in optuna.get_all_study_names(stack.uris["optuna"])
    assert not s3(stack).exists("lipscale/studies/refused")


def test_a_study_job_with_a_relative_root_is_refused_saying_how_to_set_one_and_runs_where_it_says(stack, tmp_path):
    # Under `--working-dir` the driver runs in Ray's copy of it (.../working_dir_files/_ray_pkg_...), deleted with
    # the session: a relative root there would hold the study's results until they vanish, silently.
    raw = yaml.safe_load(digits_on_stack(stack))
    raw["name"], raw["storage"]["root"] = "digits-relative", "runs/digits"  # not the study_job's study
    (tmp_path / "digits.yaml").write_text(yaml.safe_dump(raw))
    env = client_env(stack)
    command = [sys.executable, "studies/scaling_law.py", "--spec", str(tmp_path / "digits.yaml"), "--smoke-test"]
    refused = ray_job(env, "submit", "--working-dir", str(REPO), "--", *command, timeout=600)
    assert refused.returncode != 0
    (error,) = {line for line in refused.stdout.splitlines() if line.startswith("error: ")}  # the log, then its tail
    assert re.fullmatch(
        r"error: \S+/digits\.yaml: storage\.root: 'runs/digits' is relative, and this study runs as a Ray job in Ray's "
        r"temporary copy of its working directory \(\S+/runtime_resources/working_dir_files/_ray_pkg_\w+\), deleted "
        r"with the job: give the study a lasting root, an absolute path or an s3:// URI, with --root or storage\.root",
        error,
    ), error
    lasting = tmp_path / "lasting"  # this machine's disk: both nodes of the local stack run here
    done = ray_job(env, "submit", "--working-dir", str(REPO), "--", *command, "--root", str(lasting), timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert f"results: {lasting}/results.parquet" in done.stdout
    assert [r["state"] for r in pq.read_table(lasting / "results.parquet").to_pylist()] == ["COMPLETE", "COMPLETE"]


def test_the_study_job_logs_its_runs_and_metrics_to_the_mlflow_server(stack, study_job):
    logs, _ = study_job
    assert "study digits-smoke: 2 trials (2 COMPLETE)" in logs
    status, found = mlflow_rest(stack, "GET", f"/api/2.0/mlflow/experiments/get-by-name?experiment_name={STUDY}")
    assert status == 200
    experiment = found["experiment"]
    assert experiment["artifact_location"].startswith("mlflow-artifacts:")  # proxied by the server to S3
    status, found = mlflow_rest(stack, "POST", "/api/2.0/mlflow/runs/search",
                                {"experiment_ids": [experiment["experiment_id"]]})  # fmt: skip
    runs = {r["info"]["run_name"]: r for r in found["runs"]}
    assert sorted(runs) == [STUDY, "trial-0000", "trial-0001"]
    parent = runs[STUDY]["info"]["run_id"]
    for name in ("trial-0000", "trial-0001"):
        data = runs[name]["data"]
        assert {t["key"]: t["value"] for t in data["tags"]}["mlflow.parentRunId"] == parent
        assert set(CONTRACT) <= {m["key"] for m in data["metrics"]}
        assert runs[name]["info"]["status"] == "FINISHED"


def test_the_trials_are_in_the_postgresql_optuna_storage(stack, study_job, monkeypatch):
    monkeypatch.setenv("PGPASSFILE", stack.client_env()["PGPASSFILE"])
    assert stack.uris["optuna"].startswith("postgresql+psycopg://lipscale@127.0.0.1:")
    study = optuna.load_study(study_name=STUDY, storage=optuna.storages.RDBStorage(stack.uris["optuna"]))
    assert [t.state.name for t in study.trials] == ["COMPLETE", "COMPLETE"]
    status, found = mlflow_rest(stack, "GET", f"/api/2.0/mlflow/runs/get?run_id={study.user_attrs[PARENT_ATTR]}")
    assert status == 200 and found["run"]["info"]["run_name"] == STUDY
    for t in study.trials:
        assert t.user_attrs["checkpoint_uri"].startswith(f"s3://lipscale/studies/{STUDY}/tune/trial-000")
        assert mlflow_rest(stack, "GET", f"/api/2.0/mlflow/runs/get?run_id={t.user_attrs[RUN_ATTR]}")[0] == 200


def test_checkpoints_artifacts_and_results_parquet_are_in_s3(stack, study_job, monkeypatch):
    monkeypatch.setenv("PGPASSFILE", stack.client_env()["PGPASSFILE"])
    study = optuna.load_study(study_name=STUDY, storage=optuna.storages.RDBStorage(stack.uris["optuna"]))
    fs = s3(stack)
    (best,) = study.best_trials
    for t in study.trials:  # the other finished trial's checkpoint is deleted as it finishes
        assert fs.exists(t.user_attrs[CHECKPOINT_ATTR] + "/.metadata") == (t.number == best.number)
    with fs.open(f"lipscale/studies/{STUDY}/results.parquet") as f:
        rows = pq.read_table(f).to_pylist()
    assert sorted((r["trial"], r["state"], r[RUN_ATTR]) for r in rows) == [
        (t.number, "COMPLETE", t.user_attrs[RUN_ATTR]) for t in study.trials
    ]
    # The best trial's checkpoint, logged to its run, went through the server to S3.
    logged = fs.glob(f"lipscale/mlartifacts/*/{best.user_attrs[RUN_ATTR]}/artifacts/checkpoint/model.pt")
    assert len(logged) == 1


def test_no_secret_appears_in_params_tags_artifacts_job_logs_or_anything_the_study_stored(stack, study_job):
    logs, submit_output = study_job
    secrets = stack.configured_secrets()
    assert set(secrets) >= {"ray_token", "pg_password", "mlflow_password", "aws_secret_access_key"}
    env = client_env(stack)
    texts = {"job log": logs, "submit output": submit_output, "job list": ray_job(env, "list").stdout}
    _, found = mlflow_rest(stack, "GET", f"/api/2.0/mlflow/experiments/get-by-name?experiment_name={STUDY}")
    _, runs = mlflow_rest(stack, "POST", "/api/2.0/mlflow/runs/search",
                          {"experiment_ids": [found["experiment"]["experiment_id"]]})  # fmt: skip
    for run in runs["runs"]:
        texts[f"params and tags of {run['info']['run_name']}"] = json.dumps(run["data"])
    fs = s3(stack)
    everything = fs.find("lipscale")  # MLflow's artifacts, Ray Tune's state and checkpoints, results, data
    assert any("/mlartifacts/" in p for p in everything) and any("/tune/" in p for p in everything)
    blobs = {path: fs.cat_file(path) for path in everything}
    leaks = [
        (secret, where)
        for secret, value in secrets.items()
        for where, text in [*texts.items(), *blobs.items()]
        if value.encode() in (text.encode() if isinstance(text, str) else text)
    ]
    assert not leaks
