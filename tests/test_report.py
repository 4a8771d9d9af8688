"""`lipscale fit` and `lipscale report` on a finished study, and the dashboards.

The study is real: four one-size-each trials of LipNeXt on digits, run by
lipscale.study (Ray Tune, Optuna, MLflow), two epochs each (~1 min). Its
report must exist as PNGs and one HTML page, be logged to the study's MLflow
parent run, and the page must render offline in headless Chromium. Studies
that cannot be fitted (one size, constant metrics, NaN rows) are described
by hand-made rows and must give reasons, not tracebacks.
"""

import contextlib
import io
import os
import re
import shutil
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

import numpy as np
import optuna
import pandas as pd
import pytest
import ray
import yaml
from mlflow.tracking import MlflowClient
from PIL import Image
from servers import _wait_until_answering, free_port

from lipnext.metrics import ACCURACIES, EPOCH, FLOPS_PER_SAMPLE, TRAIN_SAMPLES
from lipscale.cli import main
from lipscale.keys import FAIL_REASON_ATTR, PARENT_ATTR
from lipscale.report import figures, laws, plots, rows
from lipscale.spec import load_spec
from lipscale.store import open_store
from lipscale.study import run

REPO = Path(__file__).resolve().parents[1]
SHAPES = [(16, 1), (32, 1), (32, 2), (64, 2)]
"""(width, depth) of the four trials: four parameter counts, enough for a law in N."""
EPOCHS, BATCH = 2, 256


def _write_spec(root: Path) -> Path:
    spec = {
        "name": "report-test",
        "storage": {"root": str(root)},
        "dataset": {"name": "digits"},
        "space": {"model.width": [16, 32, 64], "model.depth": [1, 2]},
        "fixed": {"model": {"preset": "digits"}, "data": {"batch_size": BATCH}, "checkpoint": {"every_epochs": 0}},
        "budget": {"trials": len(SHAPES), "max_concurrent": 2, "epochs": EPOCHS},
        "scheduler": {"kind": "fifo"},
        "objective": {"metric": "eval/cra_36", "direction": "maximize"},
    }
    path = root.parent / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


@pytest.fixture(scope="module")
def study(tmp_path_factory) -> Path:
    """A finished 4-trial study; returns its spec file. The shapes are queued in
    Optuna before the run, which asks for queued trials first."""
    path = _write_spec(tmp_path_factory.mktemp("study") / "root")
    spec = load_spec(path)
    Path(spec.root).mkdir()
    study = open_store(spec, create=True).study
    for width, depth in SHAPES:
        study.enqueue_trial({"model.width": width, "model.depth": depth})
    try:
        states = [t.state.name for t in run(spec).trials]
    finally:
        ray.shutdown()
    assert states == ["COMPLETE"] * len(SHAPES), f"the study's trials did not all complete: {states} (Ray's log above)"
    return path


@pytest.fixture(scope="module")
def reported(study) -> tuple[Path, str]:
    """`lipscale report` of the study: (its output directory, what it printed)."""
    out = load_spec(study).root + "/report"
    printed = _run_cli(["report", str(study), "--resamples", "50"])
    return Path(out), printed


def _run_cli(argv: list[str]) -> str:
    """What `lipscale ARGV` prints; it must succeed."""
    with contextlib.redirect_stdout(io.StringIO()) as printed:
        assert main(argv) == 0
    return printed.getvalue()


# --- the report of a real study ------------------------------------------------------------


@pytest.mark.slow
def test_report_prints_fits_with_intervals_and_the_1b_2b_extrapolation_with_its_warning(reported):
    _, printed = reported
    assert "report-test (search): 4 finished trials (4 COMPLETE)" in printed
    # FIFO: every trial to the end, each of its own size: all four are the envelope.
    assert f"envelope: 4 sizes, each the best by eval/cra_36 (maximize) among those trained to their full budget " \
           f"({EPOCHS} epochs)" in printed  # fmt: skip
    assert "left out of every law: none" in printed
    assert "1 - eval/clean_acc vs N: err = E + A N^-alpha  (90% bootstrap intervals, 50 resamples, 4 sizes)" in printed
    # 4 sizes: the largest can be held out; the extrapolations stand beside its verdict, with their reach.
    assert "    largest N held out (L2W64): " in printed
    verdict = printed.index("    largest N held out (L2W64): ")
    assert printed[verdict:].split("\n")[0].split(": ", 1)[1].startswith(("inside the 90%", "OUTSIDE the 90%"))
    assert "imagenet-1b (N = 1.08e+09, " in printed
    assert "decades beyond the data; beside the verdict above): err " in printed
    assert "imagenet-2b (N = 2.16e+09, " in printed
    assert "WARNING: the largest trained model has" in printed and "decades" in printed
    # Two epochs certify nothing at eps = 1: a constant, reported, not fitted.
    assert "1 - eval/cra_255 vs N: not fitted: every err equals 1.0" in printed


@pytest.mark.slow
def test_report_is_png_and_html_logged_to_the_studys_mlflow_parent_run(study, reported):
    out, _ = reported
    written = sorted(p.name for p in out.iterdir())
    assert written == sorted(["scaling_params.png", "validation.png", "scaling_compute.png", "cra_vs_eps.png",
                              "shapes.png", "cost.png", "pareto.png", "trials.png", "report.html",
                              "fits.txt"])  # fmt: skip
    for png in out.glob("*.png"):
        with Image.open(png) as image:
            assert image.format == "PNG" and min(image.size) >= 150
    page = (out / "report.html").read_text()
    assert "<script src=" not in page  # plotly.js is inline: it renders offline
    # scaling in N, its validation, in C, CRA against eps, width against depth, cost, Pareto
    assert page.count("Plotly.newPlot") == 7

    spec = load_spec(study)
    parent = optuna.load_study(study_name=spec.name, storage=spec.optuna_url).user_attrs[PARENT_ATTR]
    logged = [a.path for a in MlflowClient(spec.mlflow_uri).list_artifacts(parent, "report")]
    assert sorted(logged) == [f"report/{name}" for name in written]


@pytest.mark.slow
def test_the_html_report_renders_offline_in_headless_chromium(reported, tmp_path):
    out, _ = reported
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.fail("chromium is not installed (apt-get install -y chromium): the HTML report cannot be checked")
    shot = tmp_path / "page.png"
    subprocess.run(
        [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", f"--user-data-dir={tmp_path / 'profile'}",
         "--hide-scrollbars", "--window-size=1200,2000", "--virtual-time-budget=10000",
         f"--screenshot={shot}", (out / "report.html").as_uri()],
        capture_output=True, timeout=180, check=True,
    )  # fmt: skip
    pixels = np.asarray(Image.open(shot).convert("RGB")).reshape(-1, 3).astype(int)
    assert (pixels < 250).any(axis=1).mean() > 0.05  # not a blank page
    # The first metric's colour is drawn only by plotly.js: the script ran and plotted.
    first = np.array([int(plots.PALETTE[0][i : i + 2], 16) for i in (1, 3, 5)])
    assert (np.abs(pixels - first).sum(axis=1) < 30).sum() > 200


@pytest.mark.slow
def test_compute_is_flops_per_sample_times_the_samples_each_trial_trained_on(study):
    trials = rows.load_trials(load_spec(study))
    steps_per_epoch = 1500 // BATCH  # digits: 1500 training images, the last partial batch dropped
    f = trials.frame
    assert list(f[TRAIN_SAMPLES]) == [EPOCHS * steps_per_epoch * BATCH] * len(SHAPES)
    np.testing.assert_allclose(f[rows.COMPUTE], f[FLOPS_PER_SAMPLE] * EPOCHS * steps_per_epoch * BATCH)
    assert list(f[rows.SIZE]) == [f"L{d}W{w}" for w, d in SHAPES]


@pytest.mark.slow
def test_without_results_parquet_the_fits_come_from_the_mlflow_child_runs_unchanged(study, tmp_path):
    root = Path(load_spec(study).root)
    copy = tmp_path / "root"
    shutil.copytree(root, copy)
    (copy / "results.parquet").unlink()
    from_table = _run_cli(["fit", str(study), "--resamples", "20"])
    from_mlflow = _run_cli(["fit", str(study), "--root", str(copy), "--resamples", "20"])
    assert f"from {root}/results.parquet" in from_table.splitlines()[0]
    assert "from MLflow child runs of run" in from_mlflow.splitlines()[0]
    assert from_table.splitlines()[1:] == from_mlflow.splitlines()[1:]


def test_compute_is_nan_for_a_trial_that_did_not_report_its_samples(tmp_path):
    spec = load_spec(_write_spec(tmp_path / "root"))
    frame = pd.DataFrame({"trial": [0, 1], "state": "COMPLETE", EPOCH: EPOCHS,
                          "model.width": [16, 32], "model.depth": [1, 2],
                          FLOPS_PER_SAMPLE: [10.0, 20.0], TRAIN_SAMPLES: [100, np.nan]})  # fmt: skip
    f = rows.with_derived(spec, frame)
    assert list(f["model"]) == ["L1W16", "L2W32"]
    assert f.at[0, rows.COMPUTE] == 1000.0 and np.isnan(f.at[1, rows.COMPUTE])


def test_a_study_that_never_ran_is_an_error_naming_it(tmp_path, capsys):
    spec = _write_spec(tmp_path / "root")
    assert main(["fit", str(spec)]) == 2
    assert "no study 'report-test' to continue" in capsys.readouterr().err


# --- studies that cannot be fitted ---------------------------------------------------------


def _trials(state: str = "COMPLETE", **columns) -> rows.Trials:
    """Rows as load_trials gives them, made by hand: trials in `state`, each of its own size,
    trained for their one epoch, whose metrics are the given columns."""
    n = len(next(iter(columns.values())))
    frame = pd.DataFrame({"trial": range(n), "state": state, rows.SIZE: [f"L1W{16 + i}" for i in range(n)],
                          rows.WIDTH: [16 + i for i in range(n)], rows.DEPTH: 1, EPOCH: 1, rows.EPOCHS: 1,
                          **columns})  # fmt: skip
    frame[rows.LEFT_OUT] = rows.left_out(frame, "eval/cra_36", "maximize")
    return rows.Trials(frame, params=[], objective=("eval/cra_36", "maximize"), design="search",
                       source="rows made by hand", parent_run="none")  # fmt: skip


SIZES = [4640.0, 9168.0, 17440.0, 34000.0]
DEGENERATE = {
    "one size": (
        _trials(**{"model/params": [4640.0] * 4, "compute": [1e9, 2e9, 3e9, 4e9],
                   "eval/clean_acc": [0.3, 0.4, 0.5, 0.6], "eval/cra_36": [0.1] * 4}),
        "1 - eval/clean_acc vs N: not fitted: n takes 1 distinct values; a saturating power law needs at least 3",
    ),
    "constant metrics": (
        _trials(**{"model/params": SIZES, "compute": SIZES, "eval/clean_acc": [0.5] * 4, "eval/cra_36": [0.1] * 4}),
        "1 - eval/clean_acc vs N: not fitted: every err equals 0.5: a constant shows no trend to fit",
    ),
    "NaN rows": (
        _trials(**{"model/params": SIZES, "compute": SIZES, "eval/clean_acc": [0.3, np.nan, np.nan, 0.6],
                   "eval/cra_36": [0.1] * 4}),
        "1 - eval/clean_acc vs N (2 trials without a finite value left out): not fitted: 2 points cannot determine",
    ),
    "only failed trials": (
        _trials("FAIL", **{"model/params": SIZES, "compute": SIZES, "eval/clean_acc": [0.3, 0.4, 0.5, 0.6]}),
        "1 - eval/clean_acc vs N: not fitted: the envelope is empty: 4 FAIL",
    ),
    "no metric at all": (
        _trials(**{"model/params": SIZES, "compute": SIZES}),
        "1 - eval/cra_36 vs N: not fitted: the envelope is empty: 4 no eval/cra_36",
    ),
}


@pytest.mark.parametrize("case", DEGENERATE)
def test_a_study_that_cannot_be_fitted_says_why_and_still_gets_its_report(case, tmp_path):
    trials, reason = DEGENERATE[case]
    spec = load_spec(_write_spec(tmp_path / "root"))
    fitted = laws.fit_laws(trials, laws.FitOptions(resamples=10))
    text = laws.format_fits(spec, trials, fitted, [], laws.targets())
    assert reason in text
    files = figures.write_report(spec, trials, fitted, [], text, str(tmp_path / "report"))
    assert all(f.stat().st_size > 0 for f in files)


def test_the_envelope_is_each_sizes_best_trial_among_those_trained_to_their_full_budget():
    frame = pd.DataFrame({
        "trial": range(7),
        "state": ["COMPLETE", "COMPLETE", "PRUNED", "COMPLETE", "FAIL", "COMPLETE", "COMPLETE"],
        rows.SIZE: ["L4W16", "L4W16", "L4W16", "L4W32", "L4W32", "L4W32", "L4W64"],
        EPOCH: [10, 10, 5, 10, 3, 10, 10],
        rows.EPOCHS: 10,
        "eval/cra_36": [0.2, 0.3, 0.9, 0.4, np.nan, 0.4, np.nan],  # the PRUNED trial led when ASHA stopped it
        FAIL_REASON_ATTR: [None, None, None, None, "diverged at step 7", None, None],
    })  # fmt: skip
    assert rows.left_out(frame, "eval/cra_36", "maximize") == [
        "not the best L4W16", "", "PRUNED at epoch 5 of 10", "", "FAIL: diverged at step 7",
        "not the best L4W32",  # of equals, the first
        "no eval/cra_36",
    ]  # fmt: skip
    assert rows.left_out(frame, "eval/cra_36", "minimize")[:2] == ["", "not the best L4W16"]
    # An IsoFLOP study's envelope is each size's best at each budget.
    frame[rows.BUDGET] = [1e9, 4e9, 1e9, 1e9, 1e9, 4e9, 1e9]
    assert rows.left_out(frame, "eval/cra_36", "maximize")[:6] == [
        "", "", "PRUNED at epoch 5 of 10", "", "FAIL: diverged at step 7", ""
    ]


def test_the_printout_counts_the_trials_left_out_of_every_law_and_why(tmp_path):
    trials = _trials(**{"model/params": SIZES, "compute": SIZES, "eval/cra_36": [0.1, 0.2, np.nan, 0.3]})
    trials.frame.loc[3, ["state", EPOCH]] = ["PRUNED", 0]
    trials.frame[rows.LEFT_OUT] = rows.left_out(trials.frame, "eval/cra_36", "maximize")
    spec = load_spec(_write_spec(tmp_path / "root"))
    text = laws.format_fits(spec, trials, laws.fit_laws(trials, laws.FitOptions(resamples=10)), [], laws.targets())
    assert "envelope: 2 sizes, each the best by eval/cra_36 (maximize) among those trained to their full budget" in text
    assert "left out of every law: 1 no eval/cra_36, 1 PRUNED at epoch 0 of 1" in text


def _isoflop_trials() -> rows.Trials:
    """Runs at three budgets whose errors, at each, are a parabola in ln N around the
    compute-optimal N_opt = 0.5 C^0.5, every accuracy alike."""
    records = []
    for budget in (1e9, 3e9, 9e9):
        optimum = 0.5 * budget**0.5
        for i, factor in enumerate((0.25, 0.5, 1.0, 2.0, 4.0)):
            n = optimum * factor
            err = 0.3 + 0.05 * np.log(factor) ** 2 + 0.1 * (1e9 / budget) ** 0.3
            records.append({"trial": len(records), "state": "COMPLETE", rows.SIZE: f"L4W{8 * (i + 1)}",
                            rows.WIDTH: 8 * (i + 1), rows.DEPTH: 4, EPOCH: 4, rows.EPOCHS: 4, "model/params": n,
                            rows.BUDGET: budget, rows.COMPUTE: budget * 1.05, **dict.fromkeys(ACCURACIES, 1 - err)})
    frame = pd.DataFrame(records)
    frame[rows.LEFT_OUT] = rows.left_out(frame, "eval/cra_36", "maximize")
    return rows.Trials(frame, params=[], objective=("eval/cra_36", "maximize"), design="isoflop",
                       source="rows made by hand", parent_run="none")  # fmt: skip


def test_an_isoflop_study_reports_each_budgets_optimal_size_and_the_frontier(tmp_path):
    trials = _isoflop_trials()
    options = laws.FitOptions(resamples=20)
    assert laws.fit_laws(trials, options) == []  # its runs trained for different budgets: no law across them
    isoflops = laws.fit_isoflops(trials, options)
    fit = isoflops[0].fit
    np.testing.assert_allclose([c.minimum.predicted.n for c in fit.curves], [0.5 * c**0.5 for c in (1e9, 3e9, 9e9)],
                               rtol=1e-6)  # fmt: skip
    assert fit.a == pytest.approx(0.5)
    spec = load_spec(_write_spec(tmp_path / "root"))
    text = laws.format_fits(spec, trials, [], isoflops, laws.targets(), options)
    assert "envelope: 15 points (5 sizes at 3 budgets)" in text
    assert "1 - eval/clean_acc: IsoFLOP curves (Chinchilla's approach 2): N_opt = k C^a" in text
    assert "    C = 3e+09: N_opt 2.74e+04 [" in text
    assert "    largest budget held out (N_opt): inside the 90% interval" in text
    assert "    C = 9e+10 (1.0 decades beyond the budgets; beside the verdict above): N_opt 1.5e+05 [" in text
    files = figures.write_report(spec, trials, [], isoflops, text, str(tmp_path / "report"))
    assert {"isoflop.png", "cra_vs_eps.png", "cost.png"} <= {f.name for f in files}
    assert not {"scaling_params.png", "validation.png"} & {f.name for f in files}


def test_the_laws_of_every_eps_may_share_one_exponent():
    n = np.array([1e3, 3e3, 1e4, 3e4, 1e5])
    trials = _trials(**{"model/params": n, "compute": n, "eval/clean_acc": 1 - (0.1 + 2 * n**-0.3),
                        **{m: 1 - (0.1 * k + 0.5 * k * n**-0.3) for k, m in enumerate(list(ACCURACIES)[1:4], 1)},
                        "eval/cra_255": [0.0] * 5})  # fmt: skip
    shared = laws.fit_laws(trials, laws.FitOptions(shared=True, resamples=20))
    in_n = {law.metric: law.fit for law in shared if law.axis == "N"}
    alphas = [in_n[m].params["alpha"] for m in ("eval/cra_36", "eval/cra_72", "eval/cra_108")]
    assert alphas == pytest.approx([0.3] * 3, rel=1e-6)
    assert in_n["eval/cra_36"].shared and in_n["eval/cra_255"] is None  # nothing certified at 255: no trend
    assert in_n["eval/clean_acc"].shared == ()  # clean accuracy keeps its own exponent


def test_the_pareto_front_keeps_each_trial_that_no_cheaper_one_beats():
    cost = np.array([4.0, 1.0, 2.0, 3.0, 2.0])
    value = np.array([0.9, 0.2, 0.5, 0.4, 0.6])
    # 1.0 -> 0.2, then 2.0 -> 0.6 (not 0.5, at the same cost), 3.0 -> 0.4 is beaten, 4.0 -> 0.9.
    assert list(figures.pareto_front(cost, value)) == [1, 4, 0]


# --- the dashboards ------------------------------------------------------------------------


def test_dashboards_report_py_is_lipscale_report():
    done = subprocess.run([sys.executable, REPO / "dashboards" / "report.py", "--help"], capture_output=True, text=True)
    assert done.returncode == 0 and done.stdout.startswith("usage: lipscale report [-h]"), done.stderr


def test_the_mlflow_dashboard_of_a_study_on_a_tracking_server_is_that_server(tmp_path):
    spec = yaml.safe_load(_write_spec(tmp_path / "root").read_text())
    spec["storage"]["mlflow"] = "https://lipscale:secret@mlflow.example.org"
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(spec))
    done = subprocess.run([REPO / "dashboards" / "mlflow_ui.sh", tmp_path / "spec.yaml"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout == "study report-test: its MLflow server serves the UI: https://lipscale:***@mlflow.example.org\n"


@pytest.mark.slow
@pytest.mark.parametrize(
    "script, path",
    [
        ("mlflow_ui.sh", "/api/2.0/mlflow/experiments/get-by-name?experiment_name=report-test"),
        ("optuna_dashboard.sh", "/api/studies"),
    ],
)
def test_each_dashboard_serves_the_studys_own_store_on_localhost(study, script, path):
    port = free_port()
    server = subprocess.Popen([REPO / "dashboards" / script, str(study), "--port", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)  # fmt: skip
    try:
        _wait_until_answering(f"http://127.0.0.1:{port}{path}", server, timeout_s=120)
        assert "report-test" in urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10).read().decode()
    finally:
        os.killpg(server.pid, signal.SIGTERM)  # its session: the server and its workers (MLflow's uvicorn)
        server.wait(timeout=30)


def test_cra_vs_eps_tells_thirty_trials_apart_by_a_colour_bar_not_a_legend_over_the_panels():
    # The default study's 30 trials named in a legend covered both panels of cra_vs_eps.png.
    sizes = np.geomspace(4e3, 4e5, 30)
    accuracies = {m: np.linspace(0.9, 0.1, 30) * (1 - k / 5) for k, m in enumerate(ACCURACIES)}
    panels = figures.eps_panels(_trials(**{"model/params": sizes, **accuracies}))
    plt = plots._pyplot()
    for panel in panels:
        assert len(panel.series) == 30 and not any(s.legend for s in panel.series)
        assert panel.colorbar[0] == "parameters" and list(panel.colorbar[1]) == list(sizes)
        fig, ax = plt.subplots()
        plots._draw(ax, panel)
        assert ax.get_legend() is None and len(ax.lines) == 30
        plt.close(fig)
    colours = plots.shades(sizes)  # smallest darkest, along viridis in log space
    assert colours[0] != colours[-1] and len(set(colours)) == 30


def test_a_runaway_bootstrap_band_is_clipped_to_the_points_lines_and_intervals_in_both_renderings():
    # The default study's validation panels: the band of 1 - CRA at 72/255 reached 7 at the
    # smallest size (its A's interval runs to 1e14), and the points, all in 0.72-0.89, lay in
    # a sliver at the foot of the panel.
    x = np.geomspace(1e3, 4e4, 20)
    law = plots.Series("law", x, 0.7 + x**-0.2, style="line", low=0.6 + 0 * x, high=7 * (x / 1e3) ** -2 + 0.8)
    held = plots.Series("held out", [4e4], [0.72], low=[0.68], high=[0.78])
    panel = plots.Panel("validation", "N", "error", [law, plots.Series("fitted", x[:4], law.y[:4]), held], logx=True,
                        logy=True)  # fmt: skip
    low, high = panel.y_range
    assert 0.6 < low < 0.68 and 0.89 < high < 1.0
    plt = plots._pyplot()
    fig, ax = plt.subplots()
    plots._draw(ax, panel)
    assert ax.get_ylim() == pytest.approx((low, high))
    plt.close(fig)
    axis = plots.plotly_figure([panel], title="t").layout.yaxis
    assert axis.type == "log" and axis.range == pytest.approx((np.log10(low), np.log10(high)))


def test_the_html_trials_table_scrolls_in_its_own_box_instead_of_widening_the_page():
    table = plots.html_table(["trial", *(f"a long column name {k}" for k in range(40))], [["0", *["0.5"] * 40]])
    assert table.startswith("<div class='wide'><table>") and table.endswith("</table></div>")
    page = plots.html_page("a study", [("trials", table)])
    assert ".wide{overflow-x:auto;max-width:100%}" in page and "white-space:nowrap" in page


def test_the_report_needs_nothing_beyond_the_default_install():
    # `lipscale report` after the README's main command failed until `pip install -e '.[dashboards]'`.
    import tomllib

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    default = {re.split(r"[<>=\[ ]", d)[0] for d in project["dependencies"]}
    assert {"plotly", "matplotlib"} <= default
    assert not {"plotly", "matplotlib"} & {re.split(r"[<>=\[ ]", d)[0] for d in project["optional-dependencies"]["dashboards"]}
