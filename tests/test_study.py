"""Studies on a real local Ray with SQLite Optuna and MLflow stores: what a
finished study leaves behind, continuing one, and the trials a dead driver
orphaned."""

import errno
import json
import logging
import sqlite3
from pathlib import Path

import mlflow
import optuna
import pytest
import ray
import torch
import yaml
from ray.tune.search import Searcher
from test_design import ladder
from test_spec import small

from lipnext.certify import lipschitz_bound
from lipnext.checkpoint import EXPORT, load_model
from lipnext.metrics import CONTRACT
from lipscale import cli, results
from lipscale.keys import (
    BEST_TRIALS_TAG, CHECKPOINT_ATTR, METRICS_ATTR, PARENT_ATTR, REQUEUED_ATTR, RETRY_OF_ATTR, RUN_ATTR, STATE_TAG,
    TRIAL_TAG,
)  # fmt: skip
from lipscale.report.laws import FitOptions, fit_laws, format_fits, targets
from lipscale.report.rows import LEFT_OUT, SIZE, load_trials
from lipscale.search import StudySearch
from lipscale.spec import SpecError, parse_spec
from lipscale.store import Store, distributions, open_store
from lipscale.study import run
from lipscale.tracking import Tracking, flatten
from lipscale.trial import StorageFull, storage_full

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def local_ray():
    # System metrics 5 times a second (MLflow's default: every 10 s), so a trial of a second records some.
    env = {"MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL": "0.2"}
    ray.init(num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1", runtime_env={"env_vars": env})
    yield
    ray.shutdown()


def four_trial_spec(root) -> dict:
    raw = small(root)
    raw["space"]["model.depth"] = [1, 2]
    raw["budget"] = {"trials": 4, "max_concurrent": 2, "epochs": 2}
    raw["scheduler"] = {"kind": "fifo"}  # every trial to the end: 4 COMPLETE
    return raw


TUNE_WARNINGS: list[str] = []
"""What Ray Tune warned of while the `finished` study ran."""


class _Recorder(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        if record.levelno >= logging.WARNING:
            TUNE_WARNINGS.append(record.getMessage())


@pytest.fixture(scope="module")
def finished(local_ray, tmp_path_factory):
    """A 4-trial study on digits, run to the end; the spec is also written to spec.yaml."""
    tmp = tmp_path_factory.mktemp("study")
    raw = four_trial_spec(tmp / "root")
    (tmp / "spec.yaml").write_text(yaml.safe_dump(raw))
    spec = parse_spec(raw)
    recorder, tune_log = _Recorder(), logging.getLogger("ray.tune")
    tune_log.addHandler(recorder)
    try:
        return spec, run(spec), tmp / "spec.yaml"
    finally:
        tune_log.removeHandler(recorder)


def child_runs(spec, parent: str):
    client = mlflow.MlflowClient(spec.mlflow_uri)
    experiment = client.get_experiment_by_name(spec.name).experiment_id
    return client.search_runs([experiment], f"tags.`mlflow.parentRunId` = '{parent}'")


def test_four_trials_complete_with_a_parent_and_a_child_run_each(finished):
    spec, study, _ = finished
    assert [t.state for t in study.trials] == [optuna.trial.TrialState.COMPLETE] * 4
    client = mlflow.MlflowClient(spec.mlflow_uri)
    experiment = client.get_experiment_by_name(spec.name).experiment_id
    everything = client.search_runs([experiment])
    parent = study.user_attrs[PARENT_ATTR]
    children = child_runs(spec, parent)
    assert len(everything) == 5 and len(children) == 4
    assert client.get_run(parent).info.status == "FINISHED"
    by_id = {r.info.run_id: r for r in children}
    for trial in study.trials:
        run_ = by_id[trial.user_attrs[RUN_ATTR]]
        assert run_.data.tags[TRIAL_TAG] == str(trial.number)
        assert (run_.info.status, run_.data.tags[STATE_TAG]) == ("FINISHED", "COMPLETE")
        config = spec.train_config(trial.params)
        assert run_.data.params == {k: str(v) for k, v in flatten(config.to_dict()).items()}


def test_every_contract_metric_is_logged_at_every_evaluated_epoch(finished):
    spec, study, _ = finished
    client = mlflow.MlflowClient(spec.mlflow_uri)
    for trial in study.trials:
        run_id = trial.user_attrs[RUN_ATTR]
        for metric in CONTRACT:
            assert [m.step for m in client.get_metric_history(run_id, metric)] == [1, 2], metric
        assert trial.values[0] == client.get_run(run_id).data.metrics["eval/cra_36"]
        assert any(k.startswith("system/") for k in client.get_run(run_id).data.metrics), "no system metrics"


def test_the_results_table_has_a_row_per_trial(finished):
    spec, study, _ = finished
    table = results.read(spec.root).to_pylist()
    assert [row["trial"] for row in table] == [0, 1, 2, 3]
    for row, trial in zip(table, study.trials):
        assert row["state"] == "COMPLETE" and row[RUN_ATTR] == trial.user_attrs[RUN_ATTR]
        assert {k: row[k] for k in trial.params} == trial.params
        assert row["objective/eval/cra_36"] == trial.values[0] == row["eval/cra_36"]
        assert set(CONTRACT) <= set(row) and row["epoch"] == 2
        assert trial.user_attrs[CHECKPOINT_ATTR].startswith(f"{spec.root}/tune/trial-{trial.number:04d}/")
        assert row[CHECKPOINT_ATTR] == (trial.user_attrs[CHECKPOINT_ATTR] if trial == study.best_trial else None)


def test_only_the_best_trials_checkpoints_are_kept_the_finished_others_are_deleted(finished):
    spec, study, _ = finished
    kept = sorted(str(p) for p in Path(spec.root, "tune").glob("trial-*/checkpoint_*"))
    assert kept == [study.best_trial.user_attrs[CHECKPOINT_ATTR]]
    assert len(list(Path(spec.root, "tune").glob("trial-*/result.json"))) == 4  # the rest of Tune's record stays


def test_the_best_trials_final_checkpoint_is_an_artifact_of_its_run(finished, tmp_path):
    spec, study, _ = finished
    best = study.best_trial
    assert _parent_tag(spec, study, BEST_TRIALS_TAG) == str(best.number)
    local = mlflow.artifacts.download_artifacts(
        run_id=best.user_attrs[RUN_ATTR],
        artifact_path="checkpoint",
        dst_path=str(tmp_path),
        tracking_uri=spec.mlflow_uri,
    )
    assert sorted(p.name for p in Path(local).iterdir()) == sorted(EXPORT)  # the weights, not the optimizer
    model = load_model(local)
    with torch.no_grad():
        assert lipschitz_bound(model) == pytest.approx(best.user_attrs[METRICS_ATTR]["model/lipschitz_bound"])


def _parent_tag(spec, study, tag: str) -> str:
    return mlflow.MlflowClient(spec.mlflow_uri).get_run(study.user_attrs[PARENT_ATTR]).data.tags[tag]


def test_status_prints_every_trial_with_its_run(finished, capsys):
    _, study, path = finished
    assert cli.main(["status", str(path)]) == 0
    out = capsys.readouterr().out
    assert "4 trials (4 COMPLETE)" in out
    for trial in study.trials:
        assert trial.user_attrs[RUN_ATTR] in out
    assert out.count("\n*") == 1  # the best, marked
    assert out.endswith("\nnot running\n")  # its driver gave its lease back


def test_the_experiment_opens_as_model_training_with_its_trials_cra_throughput_and_swept_params(finished):
    spec, study, _ = finished
    client = mlflow.MlflowClient(spec.mlflow_uri)
    experiment = client.get_experiment_by_name(spec.name)
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    view = json.loads(experiment.tags["mlflow.sharedViewState.lipscale"])
    assert view == {
        "selectedColumns": ["metrics.`eval/cra_36`", "metrics.`eval/clean_acc`", "metrics.`perf/train_samples_per_s`",
                            "metrics.`model/params`", "params.`model.width`", "params.`model.depth`",
                            "params.`optim.lr`"],
        "orderByKey": "metrics.`eval/cra_36`",
        "orderByAsc": False,
    }  # fmt: skip
    # Every column is one the runs have: the trials' metrics and params, the parent's summary.
    runs = child_runs(spec, study.user_attrs[PARENT_ATTR])
    columns = {f"metrics.`{k}`" for r in runs for k in r.data.metrics} | {f"params.`{k}`" for r in runs for k in r.data.params}
    assert set(view["selectedColumns"]) <= columns
    parent = client.get_run(study.user_attrs[PARENT_ATTR]).data.metrics
    assert {k: parent[k] for k in CONTRACT} == {k: study.best_trial.user_attrs[METRICS_ATTR][k] for k in CONTRACT}
    assert Tracking(spec).view_url("http://127.0.0.1:5000") == (
        f"http://127.0.0.1:5000/#/experiments/{experiment.experiment_id}/runs"
        "?workflowType=machine_learning&viewStateShareKey=lipscale"
    )


def test_optuna_dashboard_names_the_objective(finished):
    _, study, _ = finished
    assert study.metric_names == ["eval/cra_36"]


def test_the_study_log_carries_no_repeated_ray_tune_warning(finished):
    # Each trial checkpoints every epoch and keeps 2: Tune snapshots the experiment after every
    # second checkpoint of a trial and warned each time two snapshots came within 5 s.
    assert not [w for w in TUNE_WARNINGS if "snapshotting has been triggered multiple times" in w]
    assert len(set(TUNE_WARNINGS)) == len(TUNE_WARNINGS), TUNE_WARNINGS


def test_running_a_finished_study_again_changes_nothing(finished):
    spec, study, _ = finished
    before = results.read(spec.root).to_pylist()
    again = run(spec)
    assert len(again.trials) == 4
    assert len(child_runs(spec, study.user_attrs[PARENT_ATTR])) == 4
    assert results.read(spec.root).to_pylist() == before


def test_continuing_with_another_search_space_is_refused_naming_only_what_changed(finished):
    spec, _, _ = finished
    raw = four_trial_spec(spec.root)
    raw["space"]["model.width"] = [32, 64, 128]
    with pytest.raises(SpecError, match=r"space.model.width: changed since study 'small' began"):
        run(parse_spec(raw), resume=True)


def _files(root) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_a_resume_with_a_changed_fixed_field_is_refused_naming_it_and_nothing_is_written(finished):
    spec, _, _ = finished
    before = _files(Path(spec.root))
    raw = four_trial_spec(spec.root)
    raw["fixed"]["data"]["batch_size"] = 32  # trains otherwise: its trials could not share a law with these
    with pytest.raises(SpecError) as refused:
        run(parse_spec(raw), resume=True)
    message = str(refused.value)
    assert message.startswith(
        "fixed.data.batch_size: changed since study 'small' began (fixed.data.batch_size: 64 -> 32)"
    )
    assert "optim" not in message and "eval/cra_36" not in message  # what changed, not both whole identities
    assert _files(Path(spec.root)) == before  # the stores byte for byte, the Tune state, the results


@pytest.mark.parametrize("field, value", [("seed", 1), ("dataset", {"name": "digits", "uri": "{root}/data/digits"}),
                                          ("budget.epochs", 3)])  # fmt: skip
def test_a_resume_with_another_seed_dataset_or_budget_is_refused_naming_it(finished, field, value):
    spec, _, _ = finished
    raw = four_trial_spec(spec.root)
    if field == "dataset":  # the same digits, given as converted shards: another source of data
        value = {**value, "uri": value["uri"].format(root=spec.root)}
    section, _, name = field.rpartition(".")
    (raw[section] if section else raw)[name] = value
    with pytest.raises(SpecError, match=rf"^{field}\b.*: changed since study 'small' began"):
        run(parse_spec(raw), resume=True)


def test_resume_refuses_a_study_that_never_began(tmp_path):
    with pytest.raises(SpecError, match="no study 'small'"):
        run(parse_spec(small(tmp_path / "root")), resume=True)
    assert not (tmp_path / "root" / "optuna.db").exists()


def test_a_trial_orphaned_by_a_dead_driver_is_rerun_with_its_params_and_run(local_ray, tmp_path):
    spec = parse_spec(small(tmp_path / "root"))
    study = open_store(spec, create=True).study
    tracking = Tracking(spec)
    orphan = study.ask(distributions(spec))  # handed out, then the driver died
    run_id = tracking.child_run(tracking.parent_run(study, spec), orphan.number, spec.train_config(orphan.params))
    orphan.set_user_attr(RUN_ATTR, run_id)

    study = run(spec)

    states = [t.state.name for t in study.trials]
    assert states.count("COMPLETE") == spec.budget.trials and states[0] == "FAIL"
    retry = next(t for t in study.trials if t.user_attrs.get(RETRY_OF_ATTR) == orphan.number)
    assert retry.params == orphan.params and retry.user_attrs[RUN_ATTR] == run_id
    assert study.trials[0].user_attrs[REQUEUED_ATTR] == retry.number
    assert len(child_runs(spec, study.user_attrs[PARENT_ATTR])) == spec.budget.trials
    assert [row["trial"] for row in results.read(spec.root).to_pylist()] == [1, 2]


def test_a_trial_ended_in_optuna_but_running_in_tunes_last_snapshot_is_not_run_again(local_ray, tmp_path):
    # Ray copies its snapshot to the root after the trial's tell: a driver killed between the two
    # left the trial RUNNING there, its checkpoint already pruned; Tune ran it again.
    spec = parse_spec(small(tmp_path / "root"))
    study = run(spec)
    client = mlflow.MlflowClient(spec.mlflow_uri)

    def history(t):
        return [m.step for m in client.get_metric_history(t.user_attrs[RUN_ATTR], "train/loss")]

    before = {t.number: (t.datetime_complete, history(t)) for t in study.trials}
    (snapshot,) = (tmp_path / "root" / "tune").glob("experiment_state-*.json")
    state = json.loads(snapshot.read_text())
    for entry in state["trial_data"]:
        trial = json.loads(entry[0])
        trial["status"] = "RUNNING"
        entry[0] = json.dumps(trial)
    snapshot.write_text(json.dumps(state))

    study = run(spec)

    assert {t.number: (t.datetime_complete, history(t)) for t in study.trials} == before  # nothing trained or told again
    assert {json.loads(t)["status"] for t, _ in json.loads(snapshot.read_text())["trial_data"]} == {"TERMINATED"}


def test_a_trial_whose_end_did_not_reach_the_optuna_storage_is_told_when_the_run_ends(local_ray, tmp_path, monkeypatch):
    # Ray's OptunaSearch logged a failed tell and counted the trial done: RUNNING in Optuna for good, its row lost.
    spec = parse_spec(small(tmp_path / "root"))
    tell, failed = Store.tell, []

    def the_first_tell_fails(self, number, result, error=False):
        if not failed:
            failed.append(number)
            raise optuna.exceptions.StorageInternalError("the storage did not answer")
        tell(self, number, result, error)

    monkeypatch.setattr(Store, "tell", the_first_tell_fails)
    study = run(spec)

    (number,) = failed
    assert [t.state.name for t in study.trials] == ["COMPLETE", "COMPLETE"]
    told = study.trials[number]
    assert told.value == told.user_attrs[METRICS_ATTR]["eval/cra_36"]  # from Ray Tune's last result of it
    assert mlflow.MlflowClient(spec.mlflow_uri).get_run(told.user_attrs[RUN_ATTR]).info.status == "FINISHED"
    assert sorted(row["trial"] for row in results.read(spec.root).to_pylist()) == [0, 1]


def test_a_trial_stopped_early_by_the_scheduler_is_pruned(tmp_path):
    raw = small(tmp_path / "root")
    raw["budget"]["epochs"] = 4
    spec = parse_spec(raw)
    store = open_store(spec, create=True)
    study, tracking = store.study, Tracking(spec)
    search = StudySearch(spec, store, tracking, tracking.parent_run(study, spec), 0)
    config = search.suggest("a")
    search.on_trial_result("a", {"epoch": 1, "training_iteration": 1, "eval/cra_36": 0.3})
    # The report that made ASHA stop it reaches the searcher only as the trial's last result.
    search.on_trial_complete("a", {"epoch": 2, "training_iteration": 2, "eval/cra_36": 0.5})
    pruned = study.trials[config["trial"]["number"]]
    assert pruned.state == optuna.trial.TrialState.PRUNED
    assert pruned.value == 0.5 == pruned.user_attrs[METRICS_ATTR]["eval/cra_36"]  # as results.parquet shows it
    search.suggest("b")
    search.on_trial_complete("b", {"epoch": 4, "training_iteration": 4, "eval/cra_36": 0.5})
    assert study.trials[1].state == optuna.trial.TrialState.COMPLETE and study.trials[1].value == 0.5


def test_a_restored_search_finds_its_trials_budget_and_slots_in_the_optuna_storage_alone(tmp_path):
    # A driver killed while Ray copied its state to the root left the searcher's pickle truncated
    # (0 bytes, seen in CI) and Ray started the experiment over: the search keeps no state there.
    spec = parse_spec(small(tmp_path / "root"))
    store = open_store(spec, create=True)
    tracking = Tracking(spec)
    first = StudySearch(spec, store, tracking, tracking.parent_run(store.study, spec), 0)
    numbers = {tune_id: first.suggest(tune_id)["trial"]["number"] for tune_id in ("a", "b")}
    assert first.suggest("c") is None  # max_concurrent 2: both slots taken
    first.on_trial_complete("a", {"epoch": 1, "training_iteration": 1, "eval/cra_36": 0.4})
    state = tmp_path / "tune"
    state.mkdir()
    first.save_to_dir(str(state))
    assert not list(state.iterdir())  # nothing a kill could truncate

    again = StudySearch(spec, store, tracking, tracking.parent_run(store.study, spec), 0)  # as tuner.pkl holds it
    again.restore_from_dir(str(state))
    assert again.suggest("c") == Searcher.FINISHED  # the budget of 2, counted in the storage
    again.on_trial_complete("b", {"epoch": 1, "training_iteration": 1, "eval/cra_36": 0.6})  # Tune resumed b
    study = optuna.load_study(study_name=spec.name, storage=spec.optuna_url)
    assert [(t.number, t.state.name, t.value) for t in study.trials] == [
        (numbers["a"], "COMPLETE", 0.4), (numbers["b"], "COMPLETE", 0.6)
    ]  # fmt: skip


def test_a_ladder_fits_each_sizes_best_full_budget_trial_and_no_trial_asha_stopped(local_ray, tmp_path):
    # Two sizes x two lrs, one trial at a time, in queue order: at each size the good lr reaches
    # ASHA's rung (epoch 1 of 2) first, the tiny one after it, behind: ASHA stops it there.
    raw = ladder(tmp_path / "root", sizes=((16, 1), (32, 1)), lrs=(1e-2, 1e-5))
    raw["budget"] = {"max_concurrent": 1, "epochs": 2}
    raw["scheduler"] = {"kind": "asha", "metric": "eval/clean_acc", "direction": "maximize", "grace_period": 1,
                        "reduction_factor": 2}  # fmt: skip
    spec = parse_spec(raw)
    study = run(spec)

    by_lr = {(t.params["model.width"], t.params["optim.lr"]): t for t in study.trials}
    assert {k: t.state.name for k, t in by_lr.items()} == {
        (32, 1e-2): "COMPLETE", (32, 1e-5): "PRUNED", (16, 1e-2): "COMPLETE", (16, 1e-5): "PRUNED"
    }  # within its size: one ASHA over both sizes would have set L1W16's good trial against L1W32's
    table = {row["trial"]: row for row in results.read(spec.root).to_pylist()}
    for t in study.trials:  # a PRUNED trial's value is its last evaluation, as results.parquet has it
        assert t.value == table[t.number]["eval/cra_36"]

    trials = load_trials(spec)
    envelope = trials.envelope
    assert sorted(envelope[SIZE]) == ["L1W16", "L1W32"]
    for size, rows in trials.frame.groupby(SIZE):
        full = rows[(rows["state"] == "COMPLETE") & (rows["epoch"] == 2)]
        assert envelope.loc[envelope[SIZE] == size, "trial"].item() == full.loc[full["eval/cra_36"].idxmax(), "trial"]
    pruned = {t.number for t in study.trials if t.state.name == "PRUNED"}
    assert set(trials.frame.loc[trials.frame["trial"].isin(pruned), LEFT_OUT]) == {"PRUNED at epoch 1 of 2"}
    fitted = fit_laws(trials, FitOptions(resamples=10))
    assert fitted and all(set(law.trials) <= set(envelope["trial"]) - pruned for law in fitted)
    assert "left out of every law: 2 PRUNED at epoch 1 of 2" in format_fits(spec, trials, fitted, [], targets())


def test_a_trial_of_two_workers_runs_as_a_ray_train_job(local_ray, tmp_path):
    raw = small(tmp_path / "root")
    raw["space"] = {"model.width": [32]}
    # Half a CPU each: the trial's own process holds a sliver of one of the two.
    raw["budget"] = {"trials": 1, "epochs": 1, "workers_per_trial": 2, "cpus_per_worker": 0.5}
    spec = parse_spec(raw)
    (trial,) = run(spec).trials
    assert trial.state.name == "COMPLETE"
    assert trial.user_attrs[CHECKPOINT_ATTR].startswith(f"{spec.root}/train/trial-0000/")
    history = mlflow.MlflowClient(spec.mlflow_uri).get_metric_history(trial.user_attrs[RUN_ATTR], "eval/cra_36")
    assert [m.step for m in history] == [1] and history[0].value == trial.value


def test_a_full_disk_is_recognised_in_every_form_it_reaches_the_driver():
    no_space = OSError(errno.ENOSPC, "No space left on device", "checkpoint/__0_0.distcp")
    sqlite_full = sqlite3.OperationalError("database or disk is full")
    assert storage_full(no_space) is no_space and storage_full(sqlite_full) is sqlite_full
    reported = StorageFull(str(no_space))  # a trial's report of it carries the message only
    assert storage_full(reported) is reported
    try:
        raise RuntimeError("Tune's wrapping of a callback's error") from reported
    except RuntimeError as wrapped:
        assert storage_full(wrapped) is reported
    assert storage_full(OSError(errno.EACCES, "Permission denied")) is None
