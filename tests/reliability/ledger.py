"""What a study kept, counted from its real stores: trials lost or run twice,
MLflow runs missing or duplicated, results rows, and epochs logged."""

from collections import Counter

import mlflow
import optuna
import sqlalchemy
from lipscale import results, uris
from lipscale.keys import METRICS_ATTR, PARENT_ATTR, RUN_ATTR, TRIAL_TAG


def count(expected, found) -> dict[str, int]:
    """Items of `expected` missing from `found`, and items found more than once."""
    seen = Counter(found)
    return {"lost": len(set(expected) - set(seen)), "duplicated": sum(n - 1 for n in seen.values())}


def complete(spec) -> int:
    """The study's COMPLETE trials so far, read creating nothing (0 while its storage is down): a
    storage opened the usual way creates the tables, and one made while the driver creates them
    stops one of the two with "table ... already exists". Even with skip_table_creation Optuna
    stamps alembic's version when it finds none, and a stamp beside the driver's stops the driver
    (UNIQUE constraint failed: alembic_version): so nothing is opened through Optuna before the
    driver's own stamp, the last step of its storage's creation, is there."""
    if (db := uris.sqlite_path(spec.optuna_url)) is not None and not db.exists():
        return 0
    try:
        engine = sqlalchemy.create_engine(spec.optuna_url)
        try:
            with engine.connect() as connection:
                if not sqlalchemy.inspect(connection).has_table("alembic_version"):
                    return 0
                if connection.execute(sqlalchemy.text("SELECT COUNT(*) FROM alembic_version")).scalar() == 0:
                    return 0
        finally:
            engine.dispose()
        storage = optuna.storages.RDBStorage(spec.optuna_url, skip_table_creation=True, skip_compatibility_check=True)
        if spec.name not in optuna.get_all_study_names(storage):
            return 0
        study = optuna.load_study(study_name=spec.name, storage=storage)
        return len(study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)))
    except (sqlalchemy.exc.SQLAlchemyError, optuna.exceptions.StorageInternalError):  # no tables yet, or no server
        return 0


def study_ledger(spec, trials: int) -> dict[str, dict[str, int]]:
    """Lost and duplicated per store for a study that should have finished `trials` trials.

    - trials: finished trials in the Optuna storage (orphans re-queued by a resume excepted)
      against the budget; a trial number finished twice is a duplicate;
    - runs: one MLflow child run per finished trial, carrying its number;
    - rows: one results.parquet row per finished trial;
    - epochs: every epoch a finished trial reported, logged once under train/loss."""
    study = optuna.load_study(study_name=spec.name, storage=spec.optuna_url)
    finished = results.finished_trials(study)
    numbers = [t.number for t in finished]
    client = mlflow.MlflowClient(spec.mlflow_uri)
    experiment = client.get_experiment_by_name(spec.name).experiment_id
    children = client.search_runs([experiment], f"tags.`mlflow.parentRunId` = '{study.user_attrs[PARENT_ATTR]}'")
    counts = {
        "trials": {"lost": max(0, trials - len(set(numbers))), "duplicated": len(numbers) - len(set(numbers))},
        "runs": count(numbers, [int(r.data.tags[TRIAL_TAG]) for r in children]),
        "rows": count(numbers, [row["trial"] for row in results.read(spec.root).to_pylist()]),
        "epochs": {"lost": 0, "duplicated": 0},
    }
    runs = {r.info.run_id for r in children}
    counts["runs"]["lost"] += sum(t.user_attrs.get(RUN_ATTR) not in runs for t in finished)  # linked to no run
    for t in finished:
        last = t.user_attrs.get(METRICS_ATTR, {}).get("epoch", 0)
        logged = [m.step for m in client.get_metric_history(t.user_attrs[RUN_ATTR], "train/loss")]
        for key, n in count(range(1, last + 1), logged).items():
            counts["epochs"][key] += n
    return counts
