"""Bad inputs - spec values, command lines, dataset files, URIs, environment
variables - each refused with its exact error, before anything is written:
the folder a test runs in (study root, stores, data) is byte for byte as it
was. (tests/test_spec.py, test_data.py and test_convert.py hold other bad
inputs; none is repeated here.)"""

import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import ray
import s3fs
import yaml
from lipnext import train as lipnext_train
from lipscale import cli
from servers import free_port, moto_server
from test_spec import changed, small

REPO = Path(__file__).parents[2]


def tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> Path:
    from lipscale.data.convert import convert

    root = tmp_path_factory.mktemp("data") / "digits"
    convert("digits", None, str(root))
    return root


@pytest.fixture(scope="module")
def s3():
    with moto_server("lipscale") as settings:
        yield settings


def edit_manifest(root: Path, **changes) -> None:
    manifest = json.loads((root / "manifest.json").read_text())
    (root / "manifest.json").write_text(json.dumps(manifest | changes))


def flip_a_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


OBJECTIVE = {"metric": "eval/cra_36", "direction": "maximize"}
# SQLAlchemy 2.1 reaches postgresql:// through psycopg 3, which only clusters install.
POSTGRES_ERROR = (
    '(psycopg.OperationalError) connection failed: connection to server at "127.0.0.1", port {port} failed: '
    "Connection refused"
    if importlib.util.find_spec("psycopg")
    else "No module named 'psycopg'"
)

# (what is wrong, changes to tests/test_spec.py's small spec as (dotted path, value) pairs, the error)
# {tmp} is the test's folder, {port} a port where nothing listens.
SPECS = [
    ("no epochs", [("budget.epochs", 0)], "budget.epochs: Input should be greater than or equal to 1, got 0"),
    ("eval period of zero", [("fixed.eval_every_epochs", 0)], "fixed: eval_every_epochs must be a positive integer, got 0"),
    ("no CPU per worker", [("budget.cpus_per_worker", 0)], "budget.cpus_per_worker: Input should be greater than 0, got 0"),
    ("negative retries", [("budget.max_failures", -1)],
     "budget.max_failures: Input should be greater than or equal to 0, got -1"),
    ("unknown launcher", [("budget.launcher", "slurm")], "budget.launcher: Input should be 'auto' or 'ray_train', got 'slurm'"),
    ("seed that is not a number", [("seed", "abc")],
     "seed: Input should be a valid integer, unable to parse string as an integer, got 'abc'"),
    ("width that is not a number", [("fixed.model.width", "wide")],
     "fixed.model.width: Input should be a valid integer, unable to parse string as an integer, got 'wide'"),
    ("fp16 precision", [("fixed.precision", "fp16")], "fixed.precision: Input should be 'fp32' or 'bf16', got 'fp16'"),
    ("no objective", [("objective", [])], "objective: List should have at least 1 item after validation, not 0"),
    ("objective named twice", [("objective", [OBJECTIVE, OBJECTIVE])], "objective: a metric is named twice"),
    ("ASHA that never halves", [("scheduler", {"reduction_factor": 1})],
     "scheduler.reduction_factor: Input should be greater than 1, got 1"),
    ("scheduler metric without a direction", [("scheduler", {"metric": "train/loss"})],
     "scheduler.direction: needed, train/loss is not an objective"),
    ("repeated choices", [("space.model.width", [32, 32])], "space.model.width: repeated choices [32, 32]"),
    ("range over a string field", [("space.data.augment", {"low": 1, "high": 2})],
     "space.data.augment: a range needs a numeric field; give a list of choices"),
    ("float range both log and stepped", [("space.optim.lr", {"low": 1e-3, "high": 1e-2, "log": True, "step": 1e-3})],
     "space.optim.lr: a float range is either log or stepped, not both"),
    ("negative step", [("space.optim.weight_decay", {"low": 0, "high": 0.1, "step": -0.05})],
     "space.optim.weight_decay: step must be positive, got -0.05"),
    ("fractional bounds of an integer field", [("space.model.depth", {"low": 1.5, "high": 4})],
     "space.model.depth: an integer field needs integer low, high and step"),
    ("a million model shapes", [("space.model.width", {"low": 16, "high": 16_000_016, "step": 16})],
     "space: 1,000,001 model shapes (over 1,000,000); give fewer choices or larger steps"),
    ("GPUs for a CPU trial", [("fixed.device", "cpu"), ("budget.gpus_per_worker", 1)],
     "budget.gpus_per_worker: GPUs requested for fixed.device: cpu"),
    ("zero loss temperature (a NaN loss from the first step)", [("fixed.loss", {"temperature": 0})],
     "fixed.loss: temperature must be positive, got 0.0"),
    ("root of an unknown scheme", [("storage.root", "ftp://host/study")],
     "storage.root: 'ftp://host/study' is neither a path nor an s3:// URI"),
    ("tracking store of an unknown scheme", [("storage.mlflow", "ftp://host/mlflow")],
     "storage.mlflow: 'ftp://host/mlflow' is not a URL of sqlite, http, https, postgresql, mysql, databricks, file"),
    ("dataset URI of an unknown scheme", [("dataset", {"name": "mnist", "uri": "nosuch://bucket/mnist"})],
     "dataset.uri: no converted dataset at nosuch://bucket/mnist: Protocol not known: nosuch"),
    ("PostgreSQL URL to a closed port", [("storage.optuna", "postgresql://lipscale:secret@127.0.0.1:{port}/optuna")],
     "storage.optuna: cannot connect to postgresql://lipscale:***@127.0.0.1:{port}/optuna: " + POSTGRES_ERROR),
]  # fmt: skip


def run_refused(tmp_path, raw_or_text, capsys, *command) -> str:
    """Writes the spec, runs `lipscale <command> SPEC`, checks the exit code 2 and that nothing
    under tmp_path changed; returns the error line without its `error: SPEC: ` prefix."""
    path = tmp_path / "spec.yaml"
    path.write_text(raw_or_text if isinstance(raw_or_text, str) else yaml.safe_dump(raw_or_text))
    before = tree(tmp_path)
    assert cli.main([*(command or ["run"]), str(path)]) == 2
    assert tree(tmp_path) == before
    error = capsys.readouterr().err
    assert error.startswith("error: ") and error.endswith("\n"), error
    return error.removeprefix("error: ").removeprefix(f"{path}: ")


@pytest.mark.parametrize("what, changes, message", SPECS, ids=[s[0] for s in SPECS])
def test_a_bad_spec_value(what, changes, message, tmp_path, capsys, scoreboard):
    scoreboard.bad_input(f"spec: {what}")
    port = free_port()
    raw = small(tmp_path / "root")
    for path, value in changes:
        changed(raw, path, value.format(port=port) if isinstance(value, str) else value)
    assert run_refused(tmp_path, raw, capsys).startswith(message.format(port=port, tmp=tmp_path))


def test_a_spec_that_is_not_yaml(tmp_path, capsys, scoreboard):
    scoreboard.bad_input("spec: a YAML syntax error (an unclosed bracket)")
    text = yaml.safe_dump(small(tmp_path / "root")).replace("model.width:\n", "model.width: [32, 64\n")
    assert run_refused(tmp_path, text + "objective2: [", capsys).startswith("while parsing a flow sequence")


def test_a_spec_file_that_does_not_exist(tmp_path, capsys, scoreboard):
    scoreboard.bad_input("CLI: lipscale resume with a spec path that does not exist")
    assert cli.main(["resume", str(tmp_path / "nowhere.yaml")]) == 2
    path = tmp_path / "nowhere.yaml"
    assert capsys.readouterr().err == f"error: {path}: [Errno 2] No such file or directory: '{path}'\n"
    assert list(tmp_path.iterdir()) == []


def test_status_of_a_study_that_never_ran(tmp_path, capsys, scoreboard):
    scoreboard.bad_input("CLI: lipscale status of a study that never ran")
    error = run_refused(tmp_path, small(tmp_path / "root"), capsys, "status")
    assert (
        error == f"storage.optuna: no study 'small' to continue: sqlite:///{tmp_path}/root/optuna.db does not exist\n"
    )


def test_a_subcommand_without_its_spec(capsys, scoreboard):
    scoreboard.bad_input("CLI: lipscale run without SPEC")
    with pytest.raises(SystemExit) as exit:
        cli.main(["run"])
    assert exit.value.code == 2
    assert capsys.readouterr().err.endswith("lipscale run: error: the following arguments are required: SPEC\n")


def test_the_entry_script_resuming_a_study_that_never_ran(tmp_path, scoreboard):
    scoreboard.bad_input("CLI: studies/scaling_law.py --resume of a study that never ran")
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(small(tmp_path / "root")))
    before = tree(tmp_path)
    done = subprocess.run(
        [sys.executable, REPO / "studies" / "scaling_law.py", "--spec", tmp_path / "spec.yaml", "--resume"],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert done.returncode == 2
    db = f"sqlite:///{tmp_path}/root/optuna.db"
    assert done.stderr.endswith(f"error: storage.optuna: no study 'small' to continue: {db} does not exist\n")
    assert tree(tmp_path) == before


@pytest.mark.parametrize(
    "argv, message",
    [
        (["data", "convert", "digits", "{tmp}/out", "--shard-size", "0"],
         "lipscale data convert digits: error: argument --shard-size: must be a positive integer, got 0"),
        (["data", "convert", "digits", "{tmp}/out", "--workers", "-2"],
         "lipscale data convert digits: error: argument --workers: must be a positive integer, got -2"),
        (["data", "convert", "mnist", "src", "{tmp}/out"],
         "lipscale data convert: error: argument NAME: invalid choice: 'mnist'"),
    ],
    ids=["shard size 0", "negative workers", "unknown converter"],
)  # fmt: skip
def test_a_bad_convert_command_line(argv, message, tmp_path, capsys, scoreboard):
    scoreboard.bad_input(f"CLI: lipscale {' '.join(argv[:3])} ... {' '.join(argv[4:])}")
    with pytest.raises(SystemExit) as exit:
        cli.main([a.format(tmp=tmp_path) for a in argv])
    assert exit.value.code == 2
    assert message in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--epochs", "0"], "error: epochs must be positive, got 0"),
        (["--batch-size", "0"], "error: batch_size must be positive, got 0"),
        (["--lr", "-1"], "error: lr must be positive, got -1.0"),
        (["--data", "{tmp}/nowhere"],
         "error: {tmp}/nowhere/manifest.json: missing: no dataset here (write one with `lipscale data convert`)"),
    ],
    ids=["no epochs", "no batch", "negative lr", "no dataset"],
)  # fmt: skip
def test_a_bad_training_command_line(argv, message, tmp_path, scoreboard):
    scoreboard.bad_input(f"CLI: python -m lipnext.train {' '.join(argv)}")
    with pytest.raises(SystemExit) as exit:
        lipnext_train.main([a.format(tmp=tmp_path) for a in argv] + ["--checkpoint-dir", str(tmp_path / "ckpt")])
    assert exit.value.code == message.format(tmp=tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_training_on_a_corrupt_shard(digits, tmp_path, scoreboard):
    scoreboard.bad_input("dataset: a Parquet shard with a flipped byte, given to python -m lipnext.train")
    shutil.copytree(digits, tmp_path / "digits")
    flip_a_byte(tmp_path / "digits" / "train" / "part-00000.parquet")
    before = tree(tmp_path)
    with pytest.raises(SystemExit) as exit:
        lipnext_train.main(
            ["--preset", "tiny", "--data", str(tmp_path / "digits"), "--checkpoint-dir", str(tmp_path / "c")]
        )
    assert str(exit.value.code).startswith(f"error: {tmp_path}/digits/train/part-00000.parquet: corrupt: sha256 ")
    assert tree(tmp_path) == before


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda root: (root / "manifest.json").unlink(),
         "dataset.uri: no converted dataset at {uri}: {uri}/manifest.json: missing: no dataset here "
         "(write one with `lipscale data convert`); convert it there: `lipscale data convert NAME SOURCE {uri}`"),
        (lambda root: edit_manifest(root, shape=[1, 16, 16]),
         "fixed.model: mnist holds (1, 16, 16) images of 10 classes; the model takes (1, 8, 8) and 10"),
        (lambda root: edit_manifest(root, classes=[str(k) for k in range(12)]),
         "fixed.model: mnist holds (1, 8, 8) images of 12 classes; the model takes (1, 8, 8) and 10"),
    ],
    ids=["shards without a manifest", "images of another size", "labels of another range"],
)  # fmt: skip
def test_a_study_on_a_bad_dataset(damage, message, digits, tmp_path, capsys, scoreboard):
    scoreboard.bad_input(f"dataset: {message.split(':')[0]}: {message.split(': ', 1)[1][:40]}...")
    uri = tmp_path / "mnist"
    shutil.copytree(digits, uri)
    damage(uri)
    raw = changed(small(tmp_path / "root"), "dataset", {"name": "mnist", "uri": str(uri)})
    assert run_refused(tmp_path, raw, capsys) == message.format(uri=uri) + "\n"


def test_digits_named_at_a_uri_that_holds_no_dataset_is_refused_with_the_command_that_converts_it(
    tmp_path, capsys, scoreboard
):
    scoreboard.bad_input("dataset: digits at a uri that holds no dataset (before: converted there, silently)")
    uri = tmp_path / "nowhere"
    raw = changed(small(tmp_path / "root"), "dataset", {"name": "digits", "uri": str(uri)})
    assert run_refused(tmp_path, raw, capsys) == (
        f"dataset.uri: no converted dataset at {uri}: {uri}/manifest.json: missing: no dataset here (write one with "
        f"`lipscale data convert`); convert it there: `lipscale data convert digits {uri}`\n"
    )


def test_a_root_in_a_bucket_that_does_not_exist(s3, tmp_path, capsys, scoreboard):
    scoreboard.bad_input("URI: an s3:// root in a bucket that does not exist")
    raw = small("s3://no-such-bucket/study")
    raw["storage"] |= {"optuna": f"sqlite:///{tmp_path}/optuna.db", "mlflow": f"sqlite:///{tmp_path}/mlflow.db"}
    assert run_refused(tmp_path, raw, capsys) == "storage.root: bucket 'no-such-bucket' does not exist\n"
    assert s3fs_buckets() == [s3["bucket"]]


def s3fs_buckets() -> list[str]:
    return s3fs.S3FileSystem(skip_instance_cache=True).ls("")


def test_a_dataset_in_a_bucket_that_does_not_exist(s3, tmp_path, capsys, scoreboard):
    scoreboard.bad_input("URI: dataset.uri in an s3 bucket that does not exist")
    raw = changed(small(tmp_path / "root"), "dataset", {"name": "mnist", "uri": "s3://no-such-bucket/mnist"})
    error = run_refused(tmp_path, raw, capsys)
    assert error.startswith("dataset.uri: no converted dataset at s3://no-such-bucket/mnist: "), error
    assert s3fs_buckets() == [s3["bucket"]]


def test_an_s3_endpoint_where_nothing_answers(s3, tmp_path, capsys, monkeypatch, request, scoreboard):
    scoreboard.bad_input("environment: AWS_ENDPOINT_URL at a closed port, with an s3:// root")
    closed = f"http://127.0.0.1:{free_port()}"
    monkeypatch.setenv("AWS_ENDPOINT_URL", closed)
    s3fs.S3FileSystem.clear_instance_cache()  # s3fs keeps a filesystem per arguments, not per environment
    request.addfinalizer(s3fs.S3FileSystem.clear_instance_cache)
    raw = small(f"{s3['uri']}/study")
    raw["storage"] |= {"optuna": f"sqlite:///{tmp_path}/optuna.db", "mlflow": f"sqlite:///{tmp_path}/mlflow.db"}
    error = run_refused(tmp_path, raw, capsys)
    assert error.startswith(f"storage.root: cannot reach {s3['uri']}/study: "), error
    assert closed in error


def test_a_tracking_uri_where_no_server_answers(tmp_path, capsys, monkeypatch, scoreboard):
    scoreboard.bad_input("environment: MLFLOW_TRACKING_URI at a closed port, for a spec that names no MLflow store")
    closed = f"http://127.0.0.1:{free_port()}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", closed)
    error = run_refused(tmp_path, small(tmp_path / "root"), capsys)
    assert error.startswith(f"storage.mlflow: {closed} does not answer: "), error


@pytest.mark.parametrize(
    "address, message",
    [
        ("127.0.0.1:{port}", "RAY_ADDRESS: nothing answers at 127.0.0.1:{port} (Connection refused)"),
        ("ray://127.0.0.1:{port}", "RAY_ADDRESS: nothing answers at ray://127.0.0.1:{port} (Connection refused)"),
        ("head-node", "RAY_ADDRESS: 'head-node' is not HOST:PORT, ray://HOST:PORT, 'auto' or 'local'"),
    ],
    ids=["closed port", "ray client at a closed port", "no port"],
)
def test_a_ray_address_where_no_cluster_answers(address, message, tmp_path, capsys, monkeypatch, scoreboard):
    scoreboard.bad_input(f"environment: RAY_ADDRESS={address}")
    assert not ray.is_initialized()  # a connected driver would not look at RAY_ADDRESS
    port = free_port()
    monkeypatch.setenv("RAY_ADDRESS", address.format(port=port))
    assert run_refused(tmp_path, small(tmp_path / "root"), capsys) == message.format(port=port) + "\n"
