"""A study whose root is on S3 (a moto server): Ray Tune's trials and
checkpoints, the results table and the MLflow artifacts all land there."""

import mlflow
import pytest
import ray
from servers import s3_server  # noqa: F401 - a fixture
from test_spec import small

from lipscale import results
from lipscale.keys import CHECKPOINT_ATTR, RUN_ATTR
from lipscale.spec import parse_spec
from lipscale.study import run

pytestmark = pytest.mark.slow


@pytest.fixture
def ray_with_s3(s3_server):
    """A local Ray started after the S3 settings are in the environment, so its workers have them."""
    ray.init(num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1")
    yield s3_server
    ray.shutdown()


def test_a_study_rooted_on_s3(ray_with_s3, tmp_path):
    raw = small(f"{ray_with_s3['uri']}/study")
    # SQLite needs a local file: on S3 roots the stores are given explicitly
    raw["storage"] |= {"optuna": f"sqlite:///{tmp_path}/optuna.db", "mlflow": f"sqlite:///{tmp_path}/mlflow.db"}
    raw["budget"]["trials"] = 1
    spec = parse_spec(raw)
    (trial,) = run(spec).trials
    assert trial.state.name == "COMPLETE"
    assert trial.user_attrs[CHECKPOINT_ATTR].startswith("s3://lipscale/study/tune/trial-0000/checkpoint_")
    assert results.read(spec.root).to_pylist()[0][RUN_ATTR] == trial.user_attrs[RUN_ATTR]
    client = mlflow.MlflowClient(spec.mlflow_uri)
    assert client.get_experiment_by_name(spec.name).artifact_location == "s3://lipscale/study/mlartifacts"
    logged = [a.path for a in client.list_artifacts(trial.user_attrs[RUN_ATTR], "checkpoint")]
    assert {"checkpoint/config.json", "checkpoint/model.pt"} == set(logged)  # the model, not the optimizer
