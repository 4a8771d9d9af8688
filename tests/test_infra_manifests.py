"""infra/'s cluster definitions, checked offline: the KubeRay manifests against the
CRDs they are written for (tests/kuberay: vendored, see each file's $comment), the
cluster-launcher YAML against the schema the installed Ray ships, both against what a
study needs; the Dockerfile linted with hadolint, and built where a Docker daemon answers."""

import copy
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import jsonschema
import pytest
import ray
import yaml

from lipscale.rehearse import GPU_MEMORY_GIB
from lipscale.spec import GIB, load_spec, plan_trial

REPO = Path(__file__).parents[1]
INFRA = REPO / "infra"
CRDS = Path(__file__).parent / "kuberay"
IMAGENET = REPO / "studies" / "specs" / "imagenet.yaml"
SECRETS = {"lipscale-mlflow", "lipscale-s3"}
"""The Secrets every Ray container takes its environment from (infra/README.md)."""


def closed(schema):
    """The schema with unknown fields refused: Kubernetes prunes them silently instead, so
    a misspelt field would be dropped, not reported."""
    schema = copy.deepcopy(schema)

    def close(node):
        if isinstance(node, dict):
            open_ = "additionalProperties" in node or node.get("x-kubernetes-preserve-unknown-fields")
            if "properties" in node and not open_:
                node["additionalProperties"] = False
            for value in node.values():
                close(value)
        elif isinstance(node, list):
            for value in node:
                close(value)

    close(schema)
    return schema


def crd_validator(kind: str) -> jsonschema.Draft7Validator:
    return jsonschema.Draft7Validator(closed(json.loads((CRDS / f"ray.io_{kind.lower()}s.v1.json").read_text())))


def manifest(name: str) -> dict:
    return yaml.safe_load((INFRA / "kubernetes" / name).read_text())


def containers(spec: dict) -> list[dict]:
    groups = [spec["headGroupSpec"], *spec["workerGroupSpecs"]]
    return [c for g in groups for c in g["template"]["spec"]["containers"]]


@pytest.mark.parametrize("name, kind", [("raycluster.yaml", "RayCluster"), ("rayjob.yaml", "RayJob")])
def test_kuberay_manifests_use_only_fields_of_the_crds(name, kind):
    doc = manifest(name)
    assert (doc["apiVersion"], doc["kind"]) == ("ray.io/v1", kind)
    errors = [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in crd_validator(kind).iter_errors(doc)]
    assert not errors


def test_a_misspelt_field_is_reported_not_dropped():
    doc = manifest("raycluster.yaml")
    doc["spec"]["enableInTreeAutoScaling"] = doc["spec"].pop("enableInTreeAutoscaling")
    doc["spec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["envFrom"] = [{"secretRef": {"nam": "x"}}]
    errors = {e.message for e in crd_validator("RayCluster").iter_errors(doc)}
    assert any("'enableInTreeAutoScaling' was unexpected" in e for e in errors)
    assert any("'nam' was unexpected" in e for e in errors)


def test_the_raycluster_authenticates_autoscales_gpu_workers_and_reads_credentials_from_secrets():
    spec = manifest("raycluster.yaml")["spec"]
    assert spec["authOptions"] == {"mode": "token", "secretName": "lipscale-ray-token"}
    assert spec["enableInTreeAutoscaling"] is True
    (gpu,) = spec["workerGroupSpecs"]
    assert gpu["minReplicas"] == 0 < gpu["maxReplicas"]
    (worker,) = gpu["template"]["spec"]["containers"]
    assert worker["resources"]["limits"]["nvidia.com/gpu"] == "8"
    for container in containers(spec):
        assert {s["secretRef"]["name"] for s in container["envFrom"]} == SECRETS
        env = {e["name"]: e for e in container["env"]}
        assert env["PGPASSWORD"]["valueFrom"]["secretKeyRef"]["name"] == "lipscale-postgres"
        assert not [e for e in env.values() if "value" in e]  # no literal settings, credentials least of all


def test_the_rayjob_runs_the_study_entry_with_a_committed_spec_on_that_cluster():
    job, cluster = manifest("rayjob.yaml"), manifest("raycluster.yaml")
    assert job["spec"]["clusterSelector"] == {"ray.io/cluster": cluster["metadata"]["name"]}
    workdir = re.search(r"^WORKDIR (\S+)$", (INFRA / "docker" / "Dockerfile").read_text(), re.MULTILINE).group(1)
    python, script, flag, spec = job["spec"]["entrypoint"].split()
    assert (python, flag) == ("python", "--spec")
    assert (REPO / Path(script).relative_to(workdir)) == REPO / "studies" / "scaling_law.py"
    assert load_spec(REPO / Path(spec).relative_to(workdir)).fixed.device == "cuda"


def launcher_config() -> dict:
    return yaml.safe_load((INFRA / "aws" / "cluster.yaml").read_text())


def test_the_cluster_launcher_config_fits_rays_schema():
    schema = json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())
    jsonschema.validate(launcher_config(), schema)


def test_each_gpu_node_type_autoscales_and_holds_the_largest_imagenet_trial():
    config = launcher_config()
    spec = load_spec(IMAGENET)
    b = spec.budget
    peak_gib = plan_trial(spec.largest(), b.workers_per_trial).memory.peak / GIB
    gpu_types = {n: t for n, t in config["available_node_types"].items() if t["resources"].get("GPU")}
    assert gpu_types and config["available_node_types"][config["head_node_type"]]["resources"] == {"CPU": 0}
    for name, node in gpu_types.items():
        assert node["min_workers"] == 0 < node["max_workers"], name
        assert node["resources"]["GPU"] >= b.workers_per_trial * b.gpus_per_worker, name
        assert node["resources"]["CPU"] >= b.workers_per_trial * b.cpus_per_worker, name
        assert peak_gib < GPU_MEMORY_GIB[node["node_config"]["InstanceType"]], name
    assert peak_gib > GPU_MEMORY_GIB["p4d.24xlarge"]  # why A100 40GB nodes are not among them


def test_the_dockerfile_passes_hadolint():
    lint = subprocess.run(
        ["hadolint", str(INFRA / "docker" / "Dockerfile")], capture_output=True, text=True, check=False
    )
    assert lint.returncode == 0, lint.stdout + lint.stderr


def _docker_answers() -> bool:
    if shutil.which("docker") is None:
        return False
    return subprocess.run(["docker", "info"], capture_output=True, check=False).returncode == 0


@pytest.mark.slow
@pytest.mark.skipif(not _docker_answers(), reason="no Docker daemon answers here")
def test_the_cpu_image_builds_and_imports_the_project():
    tag = f"lipscale-test:{os.getpid()}"
    subprocess.run(["docker", "build", "-f", str(INFRA / "docker" / "Dockerfile"), "-t", tag, str(REPO)], check=True)
    try:
        run = subprocess.run(
            ["docker", "run", "--rm", tag, "python", "-c", "import lipscale.study, lipnext, psycopg2; print('ok')"],
            capture_output=True, text=True, check=True,
        )  # fmt: skip
        assert run.stdout.strip() == "ok"
    finally:
        subprocess.run(["docker", "rmi", "-f", tag], capture_output=True, check=False)
