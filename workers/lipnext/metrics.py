"""What a trial reports: the names of the metric contract (../shared/DESIGN.md), once.

Every report of lipnext.train is a flat dict whose metric keys carry one of
NAMESPACES; the platform (objectives, MLflow, the results table, the fits)
imports these names instead of spelling them.
"""

EPS_255 = (36, 72, 108, 255)
"""Certified radii reported as eval/cra_<k>, for eps = k / 255 (L2, raw [0, 1] pixels)."""


def cra(k: int) -> str:
    """The metric of accuracy certified at radius k / 255."""
    return f"eval/cra_{k}"


CLEAN_ACC = "eval/clean_acc"
ACCURACIES: dict[str, float] = {CLEAN_ACC: 0.0, **{cra(k): k / 255 for k in EPS_255}}
"""Accuracy metrics and the radius each is certified at (clean accuracy: radius 0)."""

TRAIN_LOSS = "train/loss"
TRAIN_LR = "train/lr"
TRAIN_EPS = "train/eps"
"""The training radius of the epoch's last step."""
TRAIN_SAMPLES = "train/samples"
"""Training samples seen so far, over all ranks: with model/flops_per_sample, the compute."""
TRAIN_SAMPLES_PER_S = "perf/train_samples_per_s"
EVAL_SAMPLES_PER_S = "perf/eval_samples_per_s"
STEP_TIME_S = "perf/step_time_s"
PARAMS = "model/params"
FLOPS_PER_SAMPLE = "model/flops_per_sample"
LIPSCHITZ_BOUND = "model/lipschitz_bound"
ORTHO_ERROR = "model/ortho_error"

AUDIT_POINTS = "audit/points"
"""Points of the audit's fixed sample certified at this evaluation, and so attacked (lipnext.audit)."""
AUDIT_FLIPS = "audit/flips_at_radius"
"""Of them, flipped by PGD inside their certified radius: 0, or the trial fails (an unsound certificate)."""
AUDIT_MARGIN_SPENT = "audit/margin_spent_at_radius"
"""The largest share of a point's clean margin that PGD at its radius took away: < 1 while sound."""
AUDIT_FLIP_RATE_2X = "audit/flip_rate_at_2x"
"""Share flipped by the same attack at twice their radius: most, once trained. Early evaluations can
show few (digits, width 32 depth 2, epoch 5: 0.02) where the certificate is loose by more than 2x:
100 steps flip no more there than the audit's 3."""
AUDIT_LIPSCHITZ_LOWER = "audit/lipschitz_lower_bound"
"""An empirical lower bound on the feature map's Lipschitz constant (power iteration on its Jacobian)."""
AUDIT_LIPSCHITZ_BOUND = "audit/lipschitz_feature_bound"
"""The certified bound L_f of the feature map (from the weights) that the radii divide by."""
AUDIT_LIPSCHITZ_RATIO = "audit/lipschitz_bound_ratio"
"""lower / certified: <= 1 for a sound bound, near 1 for a tight one."""
AUDIT_SECONDS = "audit/seconds"
"""Wall time of the audit."""
AUDIT = (
    AUDIT_POINTS, AUDIT_FLIPS, AUDIT_MARGIN_SPENT, AUDIT_FLIP_RATE_2X,
    AUDIT_LIPSCHITZ_LOWER, AUDIT_LIPSCHITZ_BOUND, AUDIT_LIPSCHITZ_RATIO, AUDIT_SECONDS,
)  # fmt: skip
"""Every evaluation's audit of its certificate."""

CONTRACT = (
    *ACCURACIES, TRAIN_LOSS, TRAIN_SAMPLES_PER_S, EVAL_SAMPLES_PER_S, STEP_TIME_S,
    PARAMS, FLOPS_PER_SAMPLE, LIPSCHITZ_BOUND, ORTHO_ERROR,
)  # fmt: skip
"""The metrics every trial reports, and that an objective or a scheduler may name."""

NAMESPACES = ("eval/", "train/", "perf/", "model/", "audit/")
"""Prefixes of the keys of a report that are metrics (the rest is bookkeeping)."""

EPOCH = "epoch"
"""Epochs completed (the MLflow step of a report's metrics)."""
STEP = "step"
"""Optimizer steps taken."""
DIVERGED = "diverged"
"""Key of a trial's last report when its loss stopped being finite: the reason."""
UNSOUND = "unsound_certificate"
"""Key of a trial's last report when the audit flipped a point inside its certified radius: the reason."""
STOPPED = (DIVERGED, UNSOUND)
"""Keys of a last report that ends its trial as failed (a rerun would stop the same way)."""


def is_metric(key: str) -> bool:
    return key.startswith(NAMESPACES)
