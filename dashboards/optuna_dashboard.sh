#!/usr/bin/env bash
# optuna-dashboard on a study's storage, on 127.0.0.1:8080: dashboards/optuna_dashboard.sh SPEC [--port P] [--root R]
exec python "$(dirname "$0")/launch.py" optuna "$@"
