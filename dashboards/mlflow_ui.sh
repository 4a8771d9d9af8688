#!/usr/bin/env bash
# The MLflow UI of a study, on 127.0.0.1:5000: dashboards/mlflow_ui.sh SPEC [--port P] [--root R]
exec python "$(dirname "$0")/launch.py" mlflow "$@"
