"""Opens a study's MLflow UI or optuna-dashboard on 127.0.0.1, on the stores its
spec names (the SQLite files under the study root by default; a study on an
MLflow server is shown by that server's own UI, whose address it prints):

    dashboards/mlflow_ui.sh studies/specs/digits.yaml          # http://127.0.0.1:5000
    dashboards/optuna_dashboard.sh studies/specs/digits.yaml   # http://127.0.0.1:8080
    python dashboards/launch.py optuna studies/specs/digits.yaml --port 8081 --root /data/runs/digits

optuna-dashboard is an extra: pip install -e ".[dashboards]".
"""

import argparse
import os
import shutil
import sys

from lipscale import uris
from lipscale.spec import SpecError, load_spec

HOST = "127.0.0.1"
"""Local only: neither server authenticates anyone. Reach a remote one through an SSH tunnel."""
TOOLS = {
    # One worker: a viewer needs no more, and MLflow's default 4 took ~30 s to start on 2 busy cores.
    "mlflow": (5000, lambda spec, port: ["mlflow", "ui", "--backend-store-uri", spec.mlflow_uri, "--host", HOST,
                                         "--port", str(port), "--workers", "1"]),
    "optuna": (8080, lambda spec, port: ["optuna-dashboard", spec.optuna_url, "--host", HOST, "--port", str(port)]),
}  # fmt: skip
"""Tool -> (default port, its command for a spec)."""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("tool", choices=list(TOOLS))
    parser.add_argument("spec", metavar="SPEC", help="study spec (YAML)")
    parser.add_argument("--root", help="study root (path or s3:// URI) in place of the spec's storage.root")
    parser.add_argument("--port", type=int, help="default 5000 (mlflow), 8080 (optuna)")
    args = parser.parse_args(argv)
    try:
        spec = load_spec(args.spec, args.root)
    except SpecError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.tool == "mlflow" and uris.is_server(spec.mlflow_uri):
        print(f"study {spec.name}: its MLflow server serves the UI: {uris.redact(spec.mlflow_uri)}")
        return 0
    default_port, command = TOOLS[args.tool]
    argv = command(spec, args.port or default_port)
    if shutil.which(argv[0]) is None:
        print(f"error: {argv[0]} is not installed: pip install -e '.[dashboards]'", file=sys.stderr)
        return 2
    url = f"http://{HOST}:{args.port or default_port}"
    if args.tool == "mlflow":  # the experiment's trials, as model training (lipscale.tracking)
        from lipscale.tracking import Tracking

        url = Tracking(spec).view_url(url)
    print(f"study {spec.name}: {url}  ({uris.redact(' '.join(argv))})", flush=True)
    os.execvp(argv[0], argv)  # the server replaces this process: Ctrl-C stops it


if __name__ == "__main__":
    sys.exit(main())
