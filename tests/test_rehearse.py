"""`lipscale rehearse`: a cluster spec's study run on this machine before the cluster is paid
for - its checks, its shrunk trials on a local Ray cluster of the spec's node types, a driver
kill and resume - and the broken specs it catches, each with its problem named."""

import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import s3fs
import yaml

from lipscale.rehearse import NOT_RUN, rehearse, shrink, trial_points
from lipscale.spec import load_spec
from servers import s3_server  # noqa: F401 - a fixture

REPO = Path(__file__).resolve().parents[1]
SPECS = REPO / "studies" / "specs"
CLUSTER = REPO / "infra" / "aws" / "cluster.yaml"


def rehearse_command(spec: Path, root: Path, *more: str) -> tuple[subprocess.CompletedProcess, float]:
    start = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "lipscale.cli", "rehearse", str(spec), "--cluster", str(CLUSTER), "--root", str(root),
         *more], capture_output=True, text=True, timeout=900, cwd=REPO,
    )  # fmt: skip
    return done, time.monotonic() - start


def local_stores(tmp_path: Path, root: str) -> dict:
    """A spec's storage on S3 with its Optuna and MLflow stores in SQLite files."""
    return {"root": root, "optuna": f"sqlite:///{tmp_path}/optuna.db", "mlflow": f"sqlite:///{tmp_path}/mlflow.db"}


def checklist(stdout: str) -> list[str]:
    return [line.strip() for line in stdout.splitlines() if line.startswith(("  PASS", "  FAIL"))]


KILLED_TRIAL_LOSES_ITS_RESULTS = pytest.mark.xfail(
    strict=False,
    reason="a known fault, open in issue 18: in 2 of 3 cifar10 rehearsals a trial running when the driver was "
    "killed ended PRUNED with no metrics after the resume (Store.tell of a trial Tune restored ended?)",
)


@pytest.mark.slow
@pytest.mark.parametrize(
    "name,trials", [("imagenet", 3), pytest.param("cifar10", 4, marks=KILLED_TRIAL_LOSES_ITS_RESULTS)]
)
def test_a_cluster_spec_rehearses_on_this_machine_in_minutes(tmp_path, name, trials):
    done, seconds = rehearse_command(SPECS / f"{name}.yaml", tmp_path)
    lines = checklist(done.stdout)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert seconds < 600
    assert all(line.startswith("PASS") for line in lines)
    # One trial per value of each searched model parameter, each shrunk and trained to the end.
    ran = [line for line in lines if line.startswith("PASS  trial ")]
    assert len(ran) == trials and all("COMPLETE after 2 epoch(s)" in line for line in ran), ran
    assert f"{trials} of {trials} trials ended, 0 lost, 0 run twice, 0 left running or queued" in lines[-1]
    # The planner's verdict on every full-size width x depth, and the study's GPU-hours.
    spec = load_spec(SPECS / f"{name}.yaml")
    shapes = len(spec.values("model.width")) * len(spec.values("model.depth"))
    assert sum(" on gpu_h100: needs " in line for line in lines) == shapes
    assert "GPU-hours: about " in done.stdout


def test_with_real_stores_the_rehearsal_writes_beside_the_study_in_its_own_stores(tmp_path, s3_server):
    raw = yaml.safe_load((SPECS / "digits.yaml").read_text())
    raw["storage"] = local_stores(tmp_path, root=f"{s3_server['uri']}/studies/digits")
    (spec := tmp_path / "digits-s3.yaml").write_text(yaml.safe_dump(raw))
    done, _ = rehearse_command(spec, tmp_path / "unused", "--real-stores")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    lines = checklist(done.stdout)
    assert (
        f"PASS  storage: {s3_server['uri']}/studies/digits, its Optuna and MLflow stores and its data answer" in lines
    )
    assert "3 of 3 trials ended, 0 lost, 0 run twice" in lines[-1]
    # The rehearsal's study is in the spec's Optuna storage, its files under <root>-rehearsal/.
    (name,) = [
        n for n in optuna.get_all_study_names(f"sqlite:///{tmp_path}/optuna.db") if n.startswith("digits-rehearsal-")
    ]
    stamp = name.removeprefix("digits-rehearsal-")
    assert s3fs.S3FileSystem().exists(f"{s3_server['bucket']}/studies/digits-rehearsal/{stamp}/results.parquet")
    assert not (tmp_path / "unused").exists()


def test_the_rehearsal_builds_every_searched_model_value_once_at_a_shrunk_size():
    spec = load_spec(SPECS / "cifar10.yaml")
    shrunk = shrink(spec)
    points = trial_points(spec, shrunk)
    for path in ("model.width", "model.depth", "model.beta", "model.shift_ratio", "model.shift_pattern"):
        assert {p.full[path] for p in points} == set(spec.values(path)), path
    # Widths keep whole shift groups (1/16) and beta channels (1/4, 3/4); depths keep a pair
    # of blocks, so a dilated pattern alternates its distances.
    assert shrunk["model.width"] == {256: 16, 512: 16, 1024: 16, 2048: 32}
    assert shrunk["model.depth"] == {8: 2, 16: 2, 32: 4}
    # The largest width and depth are rehearsed together, in the last trial.
    assert points[-1].full["model.width"] == 2048 and points[-1].full["model.depth"] == 32


def broken_imagenet(tmp_path: Path, change) -> Path:
    raw = yaml.safe_load((SPECS / "imagenet.yaml").read_text())
    change(raw)
    path = tmp_path / "imagenet-broken.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def failures(path: Path, **options) -> list[str]:
    checks, _ = rehearse(str(path), str(CLUSTER), **options)
    return [c.what for c in checks if not c.passed]


def test_a_worker_asking_for_more_gpus_than_any_node_type_has_fails_before_anything_runs(tmp_path):
    path = broken_imagenet(tmp_path, lambda raw: raw["budget"].update(gpus_per_worker=16))
    first, *rest = failures(path, root=str(tmp_path / "runs"))
    assert first.startswith("budget.gpus_per_worker: a worker asks for 16 GPUs and 12 CPUs; no node type has them")
    assert "gpu_h100: 8 GPUs" in first and rest == [NOT_RUN.what]
    assert not (tmp_path / "runs").exists()


def test_workers_that_do_not_split_the_batch_fail_with_the_field_named(tmp_path):
    path = broken_imagenet(tmp_path, lambda raw: raw["budget"].update(workers_per_trial=3))
    assert failures(path) == [
        f"{path}: data.batch_size: 1024 does not split over budget.workers_per_trial=3",
        NOT_RUN.what,
    ]


def test_a_full_size_trial_that_does_not_fit_the_gpu_fails_with_its_shape_named(tmp_path):
    def too_big(raw):
        del raw["budget"]["memory_per_worker_gib"]  # left to the node type's GPU: 80 GiB
        raw["fixed"]["data"].update(batch_size=2048, micro_batch_size=256)

    found = failures(broken_imagenet(tmp_path, too_big), root=str(tmp_path / "runs"))
    assert [f.split(":")[0] for f in found[:-1]] == ["width 4096, depth 64 on gpu_h100"]
    assert "does not fit: needs " in found[0] and "of 71 GiB per GPU" in found[0]
    assert found[-1] == NOT_RUN.what


def test_a_storage_bucket_that_does_not_exist_fails_with_real_stores(tmp_path, s3_server):
    def elsewhere(raw):
        raw["storage"] = local_stores(tmp_path, root="s3://no-such-bucket/studies/imagenet")

    found = failures(broken_imagenet(tmp_path, elsewhere), real_stores=True)
    assert found == ["storage.root: bucket 'no-such-bucket' does not exist", NOT_RUN.what]


def test_scaling_law_rehearse_is_lipscale_rehearse(tmp_path):
    path = broken_imagenet(tmp_path, lambda raw: raw["budget"].update(gpus_per_worker=16))
    done = subprocess.run(
        [sys.executable, str(REPO / "studies" / "scaling_law.py"), "--spec", str(path), "--rehearse", "--cluster",
         str(CLUSTER)], capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 1, done.stderr[-2000:]
    assert "FAIL  budget.gpus_per_worker: a worker asks for 16 GPUs" in done.stdout
    assert "FAILED: 2 of 3 checks failed" in done.stdout
