"""What the certificate audit (lipnext.audit) costs a digits trial, and what it finds.

    python benchmarks/audit_cost.py            # writes benchmarks/results/audit_cost.json (~2 min)
    python benchmarks/audit_cost.py --smoke    # the tiny preset, 2 epochs: the code path, not the figure

A trial of the default study (preset digits, batch 128, 30 epochs, evaluated
every 5, one torch thread as Ray gives a one-CPU trial) runs through
lipnext.train.train, timed whole; every evaluation in it audits the trial's
sample. On its final weights, evaluate() with and without the audit sample is
then timed interleaved: audit = the difference, and share = evaluations x audit
/ trial is the audit's cost to the trial. Wall and CPU seconds both: on a
shared machine the process's CPU time is the steadier figure. The audit's
metrics at the trial's last evaluation go in the result too.
"""

import argparse
import dataclasses
import tempfile
import time
from pathlib import Path

import torch
from harness import time_interleaved, write_result

from lipnext import preset
from lipnext.audit import AuditConfig, audit_sample
from lipnext.checkpoint import latest, load_model
from lipnext.data import open_dataset
from lipnext.loader import ShardLoader
from lipnext.metrics import AUDIT, CLEAN_ACC
from lipnext.train import LocalSession, evaluate, train
from lipnext.train_config import CheckpointConfig, DataConfig, TrainConfig
from lipscale.data.convert import convert


def main(smoke: bool, repeats: int):
    torch.set_num_threads(1)
    cpu = torch.device("cpu")
    with tempfile.TemporaryDirectory() as tmp:
        data = str(Path(tmp) / "digits")
        convert("digits", None, data)
        config = TrainConfig(
            model=preset("tiny" if smoke else "digits"),
            data=DataConfig(uri=data, batch_size=128),
            checkpoint=CheckpointConfig(dir=str(Path(tmp) / "checkpoints")),
            epochs=2 if smoke else 30,
            eval_every_epochs=5,
        )
        session = LocalSession(config.checkpoint)
        start, cpu_start = time.perf_counter(), time.process_time()
        train(config, session)
        trial_s, trial_cpu_s = time.perf_counter() - start, time.process_time() - cpu_start
        evaluations = sum(CLEAN_ACC in report for report in session.history)

        model = load_model(latest(config.checkpoint.dir)).eval()
        dataset = open_dataset(data)
        sample = audit_sample(dataset, config.audit_points, config.seed)
        test = ShardLoader(dataset, "test", config.data.batch_size, shuffle=False)
        audited = lambda: evaluate(model, test, cpu, sample)  # noqa: E731
        plain = lambda: evaluate(model, test, cpu)  # noqa: E731
        seconds = time_interleaved({"evaluate": plain, "evaluate_and_audit": audited}, repeats)
        cpu_seconds = {}
        for name, fn in (("evaluate", plain), ("evaluate_and_audit", audited)):
            cpu_start = time.process_time()
            for _ in range(repeats):
                fn()
            cpu_seconds[name] = (time.process_time() - cpu_start) / repeats
    audit_s = seconds["evaluate_and_audit"] - seconds["evaluate"]
    audit_cpu_s = cpu_seconds["evaluate_and_audit"] - cpu_seconds["evaluate"]
    write_result(
        "audit_cost_smoke" if smoke else "audit_cost",
        {
            "preset": "tiny" if smoke else "digits",
            "audit_points": config.audit_points,
            "audit_config": dataclasses.asdict(AuditConfig()),
            "epochs": config.epochs,
            "evaluations": evaluations,
            "trial_s": trial_s,
            "epoch_s": trial_s / config.epochs,
            "evaluate_s": seconds["evaluate"],
            "audit_s": audit_s,
            "audit_per_epoch": audit_s / (trial_s / config.epochs),
            "audit_per_evaluate": audit_s / seconds["evaluate"],
            "share_of_trial": evaluations * audit_s / trial_s,
            "trial_cpu_s": trial_cpu_s,
            "audit_cpu_s": audit_cpu_s,
            "share_of_trial_cpu": evaluations * audit_cpu_s / trial_cpu_s,
            "audit": {k: v for k, v in session.history[-1].items() if k in AUDIT},
        },
    )


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="the tiny preset for 2 epochs")
    p.add_argument("--repeats", type=int, default=20)
    args = p.parse_args()
    main(args.smoke, args.repeats)
