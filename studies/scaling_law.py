"""Scaling-law study of LipNeXt: a ladder of sizes, an IsoFLOP design or an
Optuna search (the spec's `design`), run by Ray Tune, every trial tracked in
MLflow.

On a laptop (the default spec, specs/shapes.yaml, a ladder: 5 minutes on 2 CPU cores):

    python studies/scaling_law.py
    python studies/scaling_law.py --smoke-test          # two one-epoch trials: seconds

On a cluster: as a job (its driver runs on the head node), or from a node of it:

    ray job submit --address http://HEAD:8265 --working-dir . -- \\
        python studies/scaling_law.py --spec studies/specs/cifar10.yaml
    RAY_ADDRESS=HEAD:6379 python studies/scaling_law.py --spec studies/specs/cifar10.yaml

Stopped or killed, the same command continues the study from its Optuna
storage and Ray Tune state; `--resume` insists on continuing (and refuses a
spec whose design, space, fixed settings, budget, data or seed changed).
`lipscale status SPEC` lists the trials.

Before paying for the cluster, `--rehearse` runs the spec's trials here, shrunk, on
a local Ray cluster of its node types (`lipscale rehearse`):

    python studies/scaling_law.py --spec studies/specs/imagenet.yaml --rehearse
"""

import sys
from pathlib import Path

from lipscale.study import main

if __name__ == "__main__":
    sys.exit(main(default_spec=str(Path(__file__).parent / "specs" / "shapes.yaml"), doc=__doc__))
