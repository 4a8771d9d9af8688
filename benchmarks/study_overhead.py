"""Where a study's wall time goes: training steps, or everything else.

    python benchmarks/study_overhead.py            # the default study (~10 min), then the launcher comparison (~3 min)
    python benchmarks/study_overhead.py --quick    # a 4-trial study in place of the default one (a check, not the figure)

1. The default study (studies/specs/digits.yaml), run as users run it
   (`python studies/scaling_law.py`, its own local Ray). Its trial slots
   (max_concurrent x wall time) are split into: training steps (the train
   loop's epochs: steps, data loading, the optimizer), evaluation, trial
   start-up (ask -> first epoch starts), the rest of a running trial (reports,
   checkpoints, waiting on the driver), and idle slots (driver start-up and
   shutdown, the end of the study when fewer trials than slots are left).
   overhead_share = 1 - training / slot time; the target is <= 0.10.
2. Per-trial start-up of the two launchers on one small spec: a one-worker
   trial inside its Tune trial process (launcher 'auto') against a one-worker
   Ray Train TorchTrainer (launcher 'ray_train').

Every time comes from the stores the study writes: Optuna's trial start and
end, and the MLflow metrics the driver logs as each report arrives (their
timestamps) with the train loop's own throughput figures. Writes
benchmarks/results/study_overhead.json.
"""

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from math import nan
from pathlib import Path

import mlflow
import optuna
import yaml

from lipnext.data import open_dataset
from lipnext.metrics import EVAL_SAMPLES_PER_S, TRAIN_LOSS, TRAIN_SAMPLES, TRAIN_SAMPLES_PER_S
from lipscale.keys import RUN_ATTR
from lipscale.spec import load_spec, parse_spec

REPO = Path(__file__).parents[1]
SCRIPT = REPO / "studies" / "scaling_law.py"
OUT = REPO / "benchmarks" / "results" / "study_overhead.json"


def run_study(spec_path: Path, root: Path) -> tuple[float, float]:
    """Runs the study in its own process and Ray; returns when it began and ended (epoch seconds)."""
    start = time.time()
    subprocess.run(
        [sys.executable, str(SCRIPT), "--spec", str(spec_path), "--root", str(root)],
        env={**os.environ, "RAY_ADDRESS": "local"}, check=True, stdout=subprocess.DEVNULL,
    )  # fmt: skip
    return start, time.time()


def trial_times(trial, client, manifest) -> dict:
    """One trial's seconds: its span, training steps, evaluation and start-up."""
    run_id = trial.user_attrs[RUN_ATTR]

    def history(key: str) -> dict:
        return {m.step: m for m in client.get_metric_history(run_id, key)}

    loss, rate, eval_rate, seen = (
        history(TRAIN_LOSS), history(TRAIN_SAMPLES_PER_S), history(EVAL_SAMPLES_PER_S), history(TRAIN_SAMPLES)
    )
    epochs = sorted(rate)
    # Samples of each epoch: the growth of the loop's own count of samples seen (all ranks).
    train = {e: (seen[e].value - (seen[p].value if p else 0)) / rate[e].value for p, e in zip([0, *epochs], epochs)}
    evaluate = {epoch: manifest.count("test") / m.value for epoch, m in eval_rate.items()}
    asked, ended = trial.datetime_start.timestamp(), trial.datetime_complete.timestamp()
    first = min(train)
    first_report = loss[first].timestamp / 1000  # logged by the driver as the report arrived
    return {
        "trial": trial.number, "state": trial.state.name, "epochs": len(train), "span_s": ended - asked,
        "train_s": sum(train.values()), "eval_s": sum(evaluate.values()),
        "startup_s": first_report - asked - train[first] - evaluate.get(first, 0.0),
        "start": asked, "end": ended,
    }  # fmt: skip


def analyse(spec, began: float, ended: float) -> dict:
    study = optuna.load_study(study_name=spec.name, storage=spec.optuna_url)
    client = mlflow.MlflowClient(spec.mlflow_uri)
    manifest = open_dataset(spec.data_uri).manifest
    trials = sorted(
        (trial_times(t, client, manifest) for t in study.trials if t.state.is_finished()),
        key=lambda t: t["start"],
    )
    concurrent, wall = spec.budget.max_concurrent, ended - began
    train, evaluate, startup = (sum(t[k] for t in trials) for k in ("train_s", "eval_s", "startup_s"))
    busy = sum(t["span_s"] for t in trials)
    driver_start, driver_exit = trials[0]["start"] - began, ended - max(t["end"] for t in trials)
    slot_time = {
        "training_steps": train,
        "evaluation": evaluate,
        "trial_startup": startup,  # ask -> first epoch starts: process, imports, data, model
        "reports_checkpoints_other": busy - train - evaluate - startup,
        "driver_start_and_exit": concurrent * (driver_start + driver_exit),  # imports, ray.init, stores; results
        # the study's end, when fewer trials than slots are left, and hand-overs between trials
        "slots_waiting": concurrent * wall - busy - concurrent * (driver_start + driver_exit),
    }
    return {
        "trials": len(trials),
        "states": {s: sum(t["state"] == s for t in trials) for s in sorted({t["state"] for t in trials})},
        "wall_s": round(wall, 1),
        "slots": concurrent,
        "overhead_share": round(1 - train / (concurrent * wall), 4),
        "slot_time_s": {k: round(v, 1) for k, v in slot_time.items()},
        "trial_startup_s": {  # a slot's first trial starts a process; later ones reuse it
            "first_per_slot": [round(t["startup_s"], 2) for t in trials[:concurrent]],
            "median_later": round(statistics.median([t["startup_s"] for t in trials[concurrent:]] or [nan]), 3),
        },
        "driver_s": {"start_to_first_trial": round(driver_start, 1), "last_trial_to_exit": round(driver_exit, 1)},
        "per_trial": [
            {k: round(v, 2) if isinstance(v, float) else v for k, v in t.items() if k not in ("start", "end")}
            for t in trials
        ],
    }


def launcher_spec(root: Path, launcher: str) -> dict:
    return {
        "name": f"launcher-{launcher}",
        "storage": {"root": str(root)},
        "dataset": {"name": "digits"},
        "space": {"model.width": [32, 64], "model.depth": [1, 2]},
        "fixed": {"model": {"preset": "tiny"}, "data": {"batch_size": 128}},
        "budget": {"trials": 4, "max_concurrent": 2, "epochs": 3, "launcher": launcher},
        "scheduler": {"kind": "fifo"},
        "objective": {"metric": "eval/cra_36", "direction": "maximize"},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a 4-trial study in place of the default one")
    args = parser.parse_args()
    report = {
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "load_avg_start": os.getloadavg()},
    }
    with tempfile.TemporaryDirectory(prefix="study-overhead-") as tmp:
        tmp = Path(tmp)
        if args.quick:
            spec_path = tmp / "quick.yaml"
            spec_path.write_text(yaml.safe_dump(launcher_spec(tmp / "quick", "auto")))
        else:
            spec_path = REPO / "studies" / "specs" / "digits.yaml"
        spec = load_spec(spec_path, str(tmp / "default"))
        report["default_study"] = {"spec": spec.name, **analyse(spec, *run_study(spec_path, tmp / "default"))}
        report["launchers"] = {}
        for launcher in ("auto", "ray_train"):
            raw = launcher_spec(tmp / launcher, launcher)
            path = tmp / f"{launcher}.yaml"
            path.write_text(yaml.safe_dump(raw))
            result = analyse(parse_spec(raw), *run_study(path, tmp / launcher))
            report["launchers"][launcher] = {k: v for k, v in result.items() if k != "per_trial"}
    report["machine"]["load_avg_end"] = os.getloadavg()
    text = json.dumps(report, indent=2)
    print(text)
    if not args.quick:
        OUT.write_text(text + "\n")


if __name__ == "__main__":
    main()
