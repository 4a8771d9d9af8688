"""`lipscale rehearse SPEC`: a cluster study run end to end on this machine, in minutes,
before the cluster is paid for.

    lipscale rehearse studies/specs/imagenet.yaml       # on the node types of infra/aws/cluster.yaml
    lipscale rehearse studies/specs/cifar10.yaml --cluster my-cluster.yaml --real-stores

It prints a checklist, one line per check with the field or trial it is about, and the
study's estimated GPU-hours; it exits 1 if anything failed. The checks, in order (a failed
one before the rehearsal study stops there: the study would only fail the same way):

- the spec validates (lipscale.spec);
- a worker's resources fit a GPU node type of the Ray cluster config, and the trials running
  at once fit its nodes;
- each full-size model shape of the space on that node type's GPU (lipscale.plan): that it
  fits, in what micro-batches, and the step time at a sustained FLOP rate (lipscale.cost);
- with --real-stores, that the spec's stores answer (lipscale.preflight); the rehearsal then
  writes there, as study <name>-rehearsal-<time> under <root>-rehearsal/;
- the rehearsal study: `lipscale run` of a copy of the spec on a local Ray cluster whose
  nodes advertise the node type's CPUs and GPUs (Ray resources only: the trials train on the
  CPU, with the spec's workers, FSDP2 world size, shift groups and patterns, precision and
  micro-batching); its models shrunk (width / 64, depth / 8, divisibility kept) on synthetic
  data of the dataset's shape and classes, 3 steps per epoch for 2 epochs, so every epoch end
  (evaluation and audit, checkpoint, projection) runs. It runs one trial per value of each
  model parameter the space searches (trial i takes the i-th value of each; every value is
  built once, not every combination), the others sampled by the study's own search. Its
  driver is SIGKILLed once a trial has evaluated, and the study resumed: every trial must then
  have ended once, none lost and none run twice.
"""

import contextlib
import dataclasses
import fractions
import functools
import math
import os
import secrets
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import optuna
import yaml

from lipnext.metrics import CLEAN_ACC, EPOCH
from lipscale import plan as planner
from lipscale import results, uris
from lipscale.cost import H100_SUSTAINED, TRAIN_SPLITS, trial_cost
from lipscale.data import parts
from lipscale.data.shards import write_dataset
from lipscale.keys import FAIL_REASON_ATTR, METRICS_ATTR, RUN_ATTR
from lipscale.ports import free_port
from lipscale.sections import RUNNER_OWNED
from lipscale.spec import GIB, Spec, SpecError, load_spec, parse_spec, plan_trial
from lipscale.store import open_store
from lipscale.tracking import Tracking

CLUSTER_CONFIG = "infra/aws/cluster.yaml"
"""The Ray cluster launcher config whose node types a rehearsal takes, unless told."""
GPU_MEMORY_GIB = {"p5.48xlarge": 80, "p4de.24xlarge": 80, "p4d.24xlarge": 40, "g5.48xlarge": 24,
                  "g6e.48xlarge": 48, "a2-ultragpu-8g": 80, "a3-highgpu-8g": 80}  # fmt: skip
"""Memory of one GPU of the 8-GPU instance types a cluster config may name (AWS, GCP)."""
WIDTH_DIVISOR, DEPTH_DIVISOR, MIN_DEPTH = 64, 8, 2
"""A rehearsal model's shrinking: width / 64 (rounded to whole shift groups and beta channels,
so imagenet's 1024-4096 become 16-64), depth / 8 but at least 2 (a dilated pattern alternates
distances over pairs of blocks)."""
EPOCHS, STEPS_PER_EPOCH, PER_RANK_BATCH = 2, 3, 2
"""Each rehearsal trial: 2 epochs of 3 steps (Lookahead's 6-step sync falls in the second) at 2
samples per rank, 4 in micro-batches of 2 where the full-size trial accumulates."""
FIRST_EVAL_TIMEOUT_S, RESUME_TIMEOUT_S = 300, 420
"""How long the rehearsal study may take to its first evaluation, and to its end once resumed."""


@dataclass(frozen=True)
class Check:
    passed: bool
    what: str
    """The field or trial it is about, then what was found."""

    def __str__(self) -> str:
        return f"  {'PASS' if self.passed else 'FAIL'}  {self.what}"


@dataclass(frozen=True)
class NodeType:
    name: str
    cpus: float
    gpus: float
    max_workers: int
    priority: int
    gpu_memory_gib: float | None

    def holds(self, cpus: float, gpus: float) -> bool:
        return cpus <= self.cpus and gpus <= self.gpus

    def workers(self, spec: Spec) -> int:
        """How many of the spec's workers one node of this type holds."""
        b = spec.budget
        return int(
            min(self.cpus // b.cpus_per_worker, self.gpus // b.gpus_per_worker if b.gpus_per_worker else math.inf)
        )


def node_types(cluster_config: str) -> tuple[NodeType, list[NodeType]]:
    """The head and the worker node types of a Ray cluster launcher config."""
    config = yaml.safe_load(Path(cluster_config).read_text())

    def node(name: str, t: dict) -> NodeType:
        r = t.get("resources", {})
        instance = t.get("node_config", {}).get("InstanceType") or t.get("node_config", {}).get("machineType")
        return NodeType(name, r.get("CPU", 0), r.get("GPU", 0), t.get("max_workers", 0), t.get("priority", 0),
                        GPU_MEMORY_GIB.get(instance))  # fmt: skip

    types = [node(n, t) for n, t in config["available_node_types"].items()]
    head = next(t for t in types if t.name == config["head_node_type"])
    return head, [t for t in types if t is not head]


# --- the checks before the rehearsal study ---------------------------------------------------


def placement(spec: Spec, workers: list[NodeType]) -> tuple[Check, NodeType | None]:
    """Whether a trial's workers can be placed on the node types; the type the autoscaler would
    choose for them (the highest priority that holds a worker)."""
    b = spec.budget
    fitting = sorted((t for t in workers if t.holds(b.cpus_per_worker, b.gpus_per_worker)), key=lambda t: -t.priority)
    if not fitting:
        largest = ", ".join(f"{t.name}: {t.gpus:g} GPUs, {t.cpus:g} CPUs" for t in workers)
        field = (
            "budget.gpus_per_worker" if all(b.gpus_per_worker > t.gpus for t in workers) else "budget.cpus_per_worker"
        )
        return Check(False, f"{field}: a worker asks for {b.gpus_per_worker:g} GPUs and {b.cpus_per_worker:g} CPUs; "
                            f"no node type has them ({largest})"), None  # fmt: skip
    chosen = fitting[0]
    per_node = chosen.workers(spec)
    if (nodes := math.ceil(b.workers_per_trial / per_node)) > chosen.max_workers:
        return Check(False, f"budget.workers_per_trial: {b.workers_per_trial} workers need {nodes} {chosen.name} "
                            f"nodes ({per_node} per node), its max_workers is {chosen.max_workers}"), None  # fmt: skip
    return Check(True, f"budget: a worker ({b.cpus_per_worker:g} CPUs, {b.gpus_per_worker:g} GPUs) fits "
                       f"{', '.join(t.name for t in fitting)}; a trial's {b.workers_per_trial} take {nodes} "
                       f"{chosen.name} node(s)"), chosen  # fmt: skip


def verdicts(spec: Spec, node: NodeType, flops_per_s: float) -> tuple[list[Check], float | None]:
    """The planner's verdict on every full-size shape (one line per width and depth, its
    costliest variant), and the study's GPU-hours: its trials at the shapes' mean cost."""
    memory_gib = spec.budget.memory_per_worker_gib
    if memory_gib is None and node.gpu_memory_gib is not None:
        memory_gib = planner.usable_bytes(int(node.gpu_memory_gib * GIB)) / GIB
    if memory_gib is None:
        return [Check(False, f"budget.memory_per_worker_gib: not given, and node type {node.name}'s instance type "
                             f"is not one whose GPU memory is known ({', '.join(GPU_MEMORY_GIB)})")], None  # fmt: skip
    first = {p: spec.values(p)[0] for p in spec.params if not p.startswith("model.")}
    worst: dict[tuple[int, int], planner.Plan] = {}
    hours = []
    for shape in spec.model_shapes():
        config = spec.fitted(spec.train_config({**first, **shape}), memory_gib=memory_gib)
        if spec.dataset.name in TRAIN_SPLITS:  # the cost holds the plan, at flops_per_s
            cost = trial_cost(spec, flops_per_s, config)
            p = cost.plan
            hours.append(cost.gpu_hours)
        else:
            p = dataclasses.replace(plan_trial(config, spec.budget.workers_per_trial), flops_per_s=flops_per_s)
        key = (config.model.width, config.model.depth)
        if key not in worst or p.memory.peak > worst[key].memory.peak:
            worst[key] = p
    checks = []
    for (width, depth), p in sorted(worst.items()):
        step = p.step_time_s
        fits = p.fits(int(memory_gib * GIB))
        checks.append(Check(fits, f"width {width}, depth {depth} on {node.name}: {'' if fits else 'does not fit: '}"
                                  f"needs {p.memory.peak / GIB:.1f} of {memory_gib:.0f} GiB per GPU, micro-batches of "
                                  f"{p.micro_batch} x {p.micro_batches}, activation checkpointing "
                                  f"{p.activation_checkpointing}, step {step:.2f} s"))  # fmt: skip
    study_hours = spec.budget.trials * sum(hours) / len(hours) if hours else None
    return checks, study_hours


# --- the rehearsal spec and its data ---------------------------------------------------------


def _denominator(value: float) -> int:
    return fractions.Fraction(value).limit_denominator(1024).denominator


def shrink(spec: Spec) -> dict[str, dict]:
    """Full-size value -> rehearsal value of model.width and model.depth, for every value the
    spec can give them. Widths stay whole numbers of shift groups and beta channels for every
    shift ratio and beta the space searches."""
    base = spec.base_model()
    values = {p: spec.values(p) if p in spec.params else [getattr(base, p.split(".")[1])]
              for p in ("model.width", "model.depth", "model.beta", "model.shift_ratio")}  # fmt: skip
    unit = math.lcm(*(_denominator(v) for v in values["model.beta"] + values["model.shift_ratio"]))
    return {
        "model.width": {w: unit * max(1, round(w / WIDTH_DIVISOR / unit)) for w in values["model.width"]},
        "model.depth": {d: max(MIN_DEPTH, d // DEPTH_DIVISOR) for d in values["model.depth"]},
    }


@dataclass(frozen=True)
class Point:
    """A rehearsal trial's model parameters, and the full-size ones it stands for."""

    params: dict
    full: dict

    @property
    def key(self) -> tuple:
        return tuple(sorted(self.params.items()))


def trial_points(spec: Spec, shrunk: dict[str, dict]) -> list[Point]:
    """The rehearsal's trials: the i-th value of each searched model parameter (its last once
    it has fewer), shrunk; one trial per distinct result."""
    lists = {p: spec.values(p) for p in spec.params if p.startswith("model.")}
    points: dict[tuple, Point] = {}
    for i in range(max(map(len, lists.values()), default=1)):
        full = {p: values[min(i, len(values) - 1)] for p, values in lists.items()}
        point = Point({p: shrunk.get(p, {}).get(v, v) for p, v in full.items()}, full)
        points.setdefault(point.key, point)
    return list(points.values())


def rehearsal_spec(spec: Spec, root: str, name: str, real_stores: bool) -> tuple[Spec, list[Point]]:
    """The spec as rehearsed (see the module's doc), and its trials' model parameters."""
    if spec.design.kind != "search":
        raise SpecError(f"design.kind: rehearse runs a search's trials; a {spec.design.kind} design's smallest "
                        "points run with `lipscale run SPEC --smoke-test`")  # fmt: skip
    shrunk = shrink(spec)
    points = trial_points(spec, shrunk)
    b, base = spec.budget, spec.base_model()
    full = spec.fitted(spec.largest())
    accumulates = full.per_rank_batch(b.workers_per_trial)[1] > 1  # micro-batches per step at full size
    per_rank = 2 * PER_RANK_BATCH if accumulates else PER_RANK_BATCH
    raw = _dump(spec)
    raw["name"] = name
    raw["rehearsal"] = True
    raw["storage"] = {**raw["storage"], "root": root} if real_stores else {"root": root}
    raw["dataset"] = {"name": spec.dataset.name, "uri": f"{root}/data"}
    for path, mapping in shrunk.items():
        if path in raw["space"]:
            raw["space"][path] = list(dict.fromkeys(mapping.values()))
    fixed = raw["fixed"]
    fixed["model"] |= {"width": shrunk["model.width"][base.width], "depth": shrunk["model.depth"][base.depth]}
    fixed["data"] = {**fixed["data"], "batch_size": per_rank * b.workers_per_trial,
                     "micro_batch_size": PER_RANK_BATCH if accumulates else None}  # fmt: skip
    fixed["activation_checkpointing"] = full.activation_checkpointing
    fixed["compile"] = False  # minutes of compilation on a CPU, for nothing a rehearsal checks
    fixed["eval_every_epochs"] = 1
    fixed["checkpoint"] = {**fixed["checkpoint"], "every_epochs": 1}
    fixed["audit_points"] = min(fixed.get("audit_points", 64), per_rank * b.workers_per_trial)
    raw["budget"] = {
        **raw["budget"],
        "trials": len(points),
        "epochs": EPOCHS,
        "max_concurrent": min(b.max_concurrent, len(points)),
    }
    raw["budget"].pop("memory_per_worker_gib", None)  # the full-size shapes are the planner's (`verdicts`)
    if raw.get("scheduler", {}).get("kind") == "asha":
        # ASHA runs but stops no trial early: each goes through every epoch end, and its resume.
        raw["scheduler"]["grace_period"] = EPOCHS
    return parse_spec(raw, "the rehearsal spec"), points


def _dump(spec: Spec) -> dict:
    """The spec as its YAML would give it (JSON values, less what the runner sets)."""
    return spec.model_dump(mode="json", by_alias=True, exclude_none=True, exclude=RUNNER_OWNED)


def write_data(spec: Spec, uri: str) -> None:
    """Synthetic shards of the model's image shape and classes: STEPS_PER_EPOCH global batches
    to train on, one to test on."""
    m, batch = spec.base_model(), spec.fixed.data.batch_size
    shape = (m.in_channels, m.image_size, m.image_size)

    def part(split: str, count: int) -> parts.Part:
        load = functools.partial(_images, count, shape, m.num_classes, split)
        return parts.Part(f"rehearsal {split} {count} {shape}", count, load)

    classes = tuple(f"class{i:04d}" for i in range(m.num_classes))
    splits = {"train": [part("train", STEPS_PER_EPOCH * batch)], "test": [part("test", batch)]}
    write_dataset(parts.Plan(spec.dataset.name, shape, classes, "raw", splits), uri)


def _images(count: int, shape: tuple, classes: int, split: str) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0 if split == "train" else 1)
    return rng.integers(0, 256, (count, *shape), dtype=np.uint8), rng.integers(0, classes, count)


# --- the local cluster and the study's drivers ----------------------------------------------


@contextlib.contextmanager
def local_cluster(head: NodeType, node: NodeType, count: int, token_dir: str) -> Iterator[dict[str, str]]:
    """A Ray cluster on this machine: a head with the config's head resources and `count`
    nodes advertising `node`'s CPUs and GPUs, with token authentication, on 127.0.0.1. Yields
    the environment of a client; stops the nodes it started (only those) at the end."""
    token = Path(token_dir) / "ray_token"
    token.write_text(secrets.token_hex(32))
    token.chmod(0o600)
    env = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token),
           # Ray's switch for a cluster of one machine: nodes and clients on 127.0.0.1 (else a client
           # turns 127.0.0.1 into the machine's own address, where these nodes do not listen).
           "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
           # Every worker of 8 asking 12 CPUs would start 12 torch threads on this machine's few cores.
           "OMP_NUM_THREADS": "1"}  # fmt: skip
    saved = {k: os.environ.get(k) for k in (*env, "RAY_ADDRESS")}
    os.environ.update(env)
    os.environ.pop("RAY_ADDRESS", None)
    from ray.cluster_utils import Cluster  # after RAY_AUTH_MODE is set: Ray reads it at import

    cluster = None
    try:
        # The dashboard serves the state API, which Ray Train's PlacementGroupCleaner asks whether
        # a trial's controller lives: without it, a killed driver's trials kept their 16 GPUs
        # and the resumed trials waited for them.
        cluster = Cluster(initialize_head=True, head_node_args=dict(
            num_cpus=head.cpus, num_gpus=head.gpus, node_ip_address="127.0.0.1", include_dashboard=True,
            dashboard_host="127.0.0.1", dashboard_port=free_port("127.0.0.1"),
        ))  # fmt: skip
        for _ in range(count):
            cluster.add_node(num_cpus=node.cpus, num_gpus=node.gpus, node_ip_address="127.0.0.1")
        cluster.wait_for_nodes()
        yield {**env, "RAY_ADDRESS": cluster.address}
    finally:
        if cluster is not None:
            cluster.shutdown()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _driver(command: str, spec_file: Path, env: dict, log: Path) -> subprocess.Popen:
    with open(log, "w") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "lipscale.cli", command, str(spec_file)], env={**os.environ, **env},
            stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
        )  # fmt: skip


def _first_evaluation(spec: Spec, driver: subprocess.Popen, timeout_s: float) -> bool:
    """Waits until a trial of the study has logged an evaluation to its MLflow run (Optuna keeps
    no intermediate values of a multi-objective study); False if the driver ended or the time
    ran out first."""
    client = Tracking(spec).client
    study = optuna.load_study(study_name=spec.name, storage=spec.optuna_url)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and driver.poll() is None:
        runs = [t.user_attrs[RUN_ATTR] for t in study.get_trials(deepcopy=False) if RUN_ATTR in t.user_attrs]
        if any(CLEAN_ACC in client.get_run(run).data.metrics for run in runs):
            return True
        time.sleep(1)
    return False


def _kill(driver: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(driver.pid, signal.SIGKILL)
    driver.wait()


def ledger(spec: Spec, points: list[Point]) -> list[Check]:
    """Every rehearsal trial ended once: a line per trial, then one for the study."""
    study = optuna.load_study(study_name=spec.name, storage=spec.optuna_url)
    finished = results.finished_trials(study)
    by_key = {p.key: p for p in points}
    checks = []

    def key(t) -> tuple:
        return tuple(sorted((p, v) for p, v in t.params.items() if p.startswith("model.")))

    def shown(params: dict) -> str:
        return ", ".join(f"{p.removeprefix('model.')} {v}" for p, v in params.items())

    for t in sorted(finished, key=lambda t: t.number):
        point = by_key.get(key(t))
        stands_for = f"; for {shown(point.full)}" if point else ""
        epochs = t.user_attrs.get(METRICS_ATTR, {}).get(EPOCH, 0)
        ok = t.state.name in ("COMPLETE", "PRUNED") and epochs > 0  # ended, with no results: lost
        reason = "" if ok else f": {t.user_attrs.get(FAIL_REASON_ATTR) or 'no results recorded, see the driver logs'}"
        params = shown(point.params if point else dict(key(t)))
        checks.append(Check(ok, f"trial {t.number} ({params}{stands_for}): {t.state.name} after {epochs} epoch(s)"
                                f"{reason}"))  # fmt: skip
    keys, wanted = [key(t) for t in finished], list(by_key)
    left = [t.number for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,
                                                                        optuna.trial.TrialState.WAITING))]  # fmt: skip
    lost = [p for p in wanted if p not in keys]
    twice = sorted({k for k in keys if keys.count(k) > 1})
    ok = not lost and not twice and not left and len(finished) == len(points)
    checks.append(Check(ok, f"driver killed after the first evaluation and the study resumed: {len(finished)} of "
                            f"{len(points)} trials ended, {len(lost)} lost, {len(twice)} run twice, {len(left)} left "
                            "running or queued"))  # fmt: skip
    return checks


def run_rehearsal(spec: Spec, points: list[Point], head: NodeType, node: NodeType, workdir: Path) -> list[Check]:
    """The rehearsal study on a local cluster, its driver killed once and the study resumed."""
    b = spec.budget
    count = min(node.max_workers, math.ceil(b.max_concurrent * b.workers_per_trial / node.workers(spec)))
    spec_file = workdir / "spec.yaml"
    spec_file.write_text(yaml.safe_dump(_dump(spec), sort_keys=False))
    write_data(spec, spec.data_uri)
    study = open_store(spec, create=True).study
    for point in points:  # asked for first: the sampler draws only the rest of the space
        study.enqueue_trial(point.params)
    with local_cluster(head, node, count, str(workdir)) as env:
        first = _driver("run", spec_file, env, workdir / "driver-1.log")
        if not _first_evaluation(spec, first, FIRST_EVAL_TIMEOUT_S):
            _kill(first)
            return [Check(False, f"the rehearsal study: no trial evaluated in {FIRST_EVAL_TIMEOUT_S} s "
                                 f"(driver exit {first.returncode}); see {workdir / 'driver-1.log'}")]  # fmt: skip
        _kill(first)
        resumed = _driver("resume", spec_file, env, workdir / "driver-2.log")
        try:
            code = resumed.wait(RESUME_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            _kill(resumed)
            code = None
    checks = ledger(spec, points)
    if code != 0:
        ended = "ran out of time" if code is None else f"exited {code}"
        checks.append(Check(False, f"the resumed driver {ended}; see {workdir / 'driver-2.log'}"))
    return checks


# --- the command -----------------------------------------------------------------------------

NOT_RUN = Check(False, "the rehearsal study: not run, as the checks above failed")


def rehearse(path: str, cluster_config: str = CLUSTER_CONFIG, root: str | None = None, real_stores: bool = False,
             flops_per_s: float | None = None) -> tuple[list[Check], float | None]:  # fmt: skip
    """The checklist of a rehearsal of the spec at `path` and the study's GPU-hours (None when
    unknown)."""
    try:
        spec = load_spec(path)
    except SpecError as e:
        return [Check(False, str(e)), NOT_RUN], None
    checks = [Check(True, f"spec: {path} validates")]
    head, workers = node_types(cluster_config)
    check, node = placement(spec, workers)
    checks.append(check)
    if node is None:
        return [*checks, NOT_RUN], None
    plans, hours = verdicts(spec, node, flops_per_s or H100_SUSTAINED)
    checks += plans
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S")
    name = f"{spec.name}-rehearsal-{stamp}"
    if real_stores:
        at = f"{spec.root.rstrip('/')}-rehearsal/{stamp}"
    else:
        at = os.path.abspath(f"{root or f'runs/{spec.name}-rehearsal'}/{stamp}")
    try:
        if real_stores:  # the spec's own stores and data: the rehearsal's data is written later
            from lipscale.preflight import check_storage

            check_storage(spec)
            checks.append(
                Check(True, f"storage: {uris.redact(spec.root)}, its Optuna and MLflow stores and its data answer")
            )
        rehearsal, points = rehearsal_spec(spec, at, name, real_stores)
    except SpecError as e:
        return [*checks, Check(False, str(e)), NOT_RUN], hours
    if not all(c.passed for c in checks):
        return [*checks, NOT_RUN], hours
    b = rehearsal.budget
    checks.append(Check(True, f"the rehearsal study: {len(points)} trials of {b.workers_per_trial} workers, "
                              f"{b.max_concurrent} at once, under {rehearsal.root}"))  # fmt: skip
    # Its spec file, driver logs and Ray token: beside its stores when they are local.
    workdir = uris.local_path(at) or Path(tempfile.mkdtemp(prefix=f"{name}-"))
    workdir.mkdir(parents=True, exist_ok=True)
    checks += run_rehearsal(rehearsal, points, head, node, workdir)
    return checks, hours


def rehearse_command(args) -> int:
    """`lipscale rehearse` and studies/scaling_law.py --rehearse."""
    start = time.monotonic()
    checks, hours = rehearse(args.spec, args.cluster, args.root, args.real_stores, args.flops_per_s)
    print(f"rehearsal of {args.spec} on the node types of {args.cluster}:")
    print("\n".join(map(str, checks)))
    if hours is not None:
        print(f"GPU-hours: about {hours:,.0f} for the study's trials at the mean cost of its shapes (ASHA's early "
              "stops make it less)")  # fmt: skip
    failed = sum(not c.passed for c in checks)
    verdict = "FAILED" if failed else "PASSED"
    print(f"{verdict}: {failed} of {len(checks)} checks failed, in {time.monotonic() - start:.0f} s")
    return 1 if failed else 0
