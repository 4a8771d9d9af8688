"""What the certificate audit (lipnext.audit) costs a digits trial, and what it finds.

    python benchmarks/audit_cost.py            # writes benchmarks/results/audit_cost.json (~2 min)
    python benchmarks/audit_cost.py --smoke    # the tiny preset, 2 epochs: the code path, not the figure

A trial of the default study (preset digits, batch 128, 30 epochs, evaluated
every 5, one torch thread as Ray gives a one-CPU trial) runs through
lipnext.train.train, timed whole. On its final weights, an evaluation and an
audit of the study's sample are then timed interleaved, and share =
evaluations x audit / trial is the audit's cost to the trial. Wall and CPU
seconds both: on a shared machine the process's CPU time is the steadier
figure. The audit's metrics on those weights go in the result too.
"""

import argparse
import dataclasses
import tempfile
import time
from pathlib import Path

import torch
from harness import time_interleaved, write_result

from lipnext import LipNeXt, preset
from lipnext.audit import AuditConfig, audit, audit_sample
from lipnext.certify import certified_radius, feature_lipschitz_bound
from lipnext.checkpoint import latest, load_model
from lipnext.data import ShardLoader, open_dataset
from lipnext.train import LocalSession, evaluate, train
from lipnext.train_config import CheckpointConfig, DataConfig, TrainConfig
from lipscale.data.convert import convert


def main(smoke: bool, repeats: int):
    torch.set_num_threads(1)
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
        evaluations = sum("eval/clean_acc" in report for report in session.history)

        model = LipNeXt(config.model)
        load_model(model, latest(config.checkpoint.dir))
        model.eval()
        dataset = open_dataset(data)
        images, labels = audit_sample(dataset, AuditConfig.points, config.seed)
        radius = certified_radius(model, images, labels)
        bound = feature_lipschitz_bound(model)
        test = ShardLoader(dataset, "test", config.data.batch_size, shuffle=False)
        seconds = time_interleaved(
            {
                "evaluate": lambda: evaluate(model, test, torch.device("cpu")),
                "audit": lambda: audit(model, images, labels, radius, bound),
            },
            repeats,
        )
        cpu_start = time.process_time()
        for _ in range(repeats):
            found = audit(model, images, labels, radius, bound)
        audit_cpu_s = (time.process_time() - cpu_start) / repeats
    write_result(
        "audit_cost_smoke" if smoke else "audit_cost",
        {
            "preset": "tiny" if smoke else "digits",
            "audit_config": dataclasses.asdict(AuditConfig()),
            "epochs": config.epochs,
            "evaluations": evaluations,
            "trial_s": trial_s,
            "epoch_s": trial_s / config.epochs,
            "evaluate_s": seconds["evaluate"],
            "audit_s": seconds["audit"],
            "audit_per_epoch": seconds["audit"] / (trial_s / config.epochs),
            "audit_per_evaluate": seconds["audit"] / seconds["evaluate"],
            "share_of_trial": evaluations * seconds["audit"] / trial_s,
            "trial_cpu_s": trial_cpu_s,
            "audit_cpu_s": audit_cpu_s,
            "share_of_trial_cpu": evaluations * audit_cpu_s / trial_cpu_s,
            "audit": found,
        },
    )


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="the tiny preset for 2 epochs")
    p.add_argument("--repeats", type=int, default=20)
    args = p.parse_args()
    main(args.smoke, args.repeats)
