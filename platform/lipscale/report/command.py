"""`lipscale fit` and `lipscale report` (their arguments: lipscale.cli)."""

import sys

from mlflow.tracking import MlflowClient

from lipscale import uris
from lipscale.report.figures import write_report
from lipscale.report.laws import FitOptions, fit_isoflops, fit_laws, format_fits, targets
from lipscale.report.rows import ReportError, Trials, load_trials
from lipscale.spec import Spec, SpecError, load_spec

REPORT_DIR = "report"
"""Under the study root, and the parent run's artifact path."""


def report_command(args) -> int:
    """The fits printed; with `report`, also the report's files, logged to the study's MLflow parent run."""
    try:
        spec = load_spec(args.spec, args.root)
        trials = load_trials(spec)
    except (SpecError, ReportError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    options = FitOptions(link=args.link, shared=args.shared_exponent, resamples=args.resamples, level=args.level)
    laws, isoflops = fit_laws(trials, options), fit_isoflops(trials, options)
    text = format_fits(spec, trials, laws, isoflops, targets(), options)
    print(text)
    if args.command == "report":
        out = args.out or default_out(spec)
        files = write_report(spec, trials, laws, isoflops, text, out)
        log_report(spec, trials, out)
        print(f"\nreport: {', '.join(f.name for f in files)} in {out}")
        print(f"logged to MLflow run {trials.parent_run} under {REPORT_DIR}/ ({uris.redact(spec.mlflow_uri)})")
    return 0


def default_out(spec: Spec) -> str:
    """<root>/report for a local root; ./report-<name> when the root is remote (MLflow keeps a copy)."""
    root = uris.local_path(spec.root)
    return f"report-{spec.name}" if root is None else str(root / REPORT_DIR)


def log_report(spec: Spec, trials: Trials, out: str) -> None:
    """The report's files as artifacts of the study's MLflow parent run, under report/."""
    MlflowClient(spec.mlflow_uri).log_artifacts(trials.parent_run, out, REPORT_DIR)
