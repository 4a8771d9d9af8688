"""The names a study writes into its stores, once: Optuna user attrs, MLflow tags,
trial names, the keys of a Tune trial's config and of a trial's own report.

The metric names a trial reports live in lipnext.metrics; these are the
platform's bookkeeping around them. Every module that writes or reads one of
these imports it from here (a renamed key would otherwise strand the studies
written before it in half the code).
"""

# --- Optuna study user attrs ----------------------------------------------------------------

PARENT_ATTR = "mlflow_parent_run_id"
"""The study's MLflow parent run."""
IDENTITY_ATTR = "identity"
"""Everything that changes the study's results, as it began (lipscale.store.identity): a
continued study must match it."""
OBJECTIVE_ATTR = "objective"
"""The objective(s) the study began with: JSON, a list of {metric, direction}."""

# --- Optuna trial user attrs ----------------------------------------------------------------

RUN_ATTR = "mlflow_run_id"
"""The trial's MLflow child run."""
METRICS_ATTR = "metrics"
"""The metrics of the trial's last report."""
CHECKPOINT_ATTR = "checkpoint_uri"
"""The trial's latest checkpoint."""
FAIL_REASON_ATTR = "fail_reason"
"""Why a FAIL trial failed (e.g. its loss diverged)."""
REQUEUED_ATTR = "requeued_as_retry"
"""On a trial that a killed driver orphaned: the number its params were queued again as."""
RETRY_OF_ATTR = "retry_of"
"""On that retry: the number of the orphan it re-runs."""
TUNE_ID_ATTR = "tune_trial_id"
"""The Ray Tune trial id the trial runs as: how a restored search finds its trials again."""

# --- MLflow tags ------------------------------------------------------------------------------

STUDY_TAG = "lipscale.study"
"""On the parent run: the study's name."""
TRIAL_TAG = "lipscale.trial"
"""On a child run: the Optuna trial number."""
STATE_TAG = "lipscale.state"
"""On a finished child run: the trial's Optuna state (COMPLETE, PRUNED or FAIL)."""
FAIL_REASON_TAG = "lipscale.fail_reason"
"""On a FAIL child run: why it failed."""
BEST_TRIALS_TAG = "best_trials"
"""On the parent run: the best trial's number, or the Pareto front's, comma-separated."""

# --- a trial's name, its Tune config and its report ------------------------------------------


def trial_name(number: int) -> str:
    """Optuna trial `number`'s name: its Ray Tune trial and directory, Ray Train run, MLflow run."""
    return f"trial-{number:04d}"


PARAMS_KEY = "params"
"""Config: the sampled params, by dotted path."""
TRIAL_KEY = "trial"
"""Config: {NUMBER_KEY: the Optuna trial number, RUN_ATTR: its MLflow run}."""
NUMBER_KEY = "number"
STORAGE_FULL_KEY = "storage_full"
"""Report: the study's storage ran out of space; the value is the error."""
