#!/usr/bin/env bash
# Installs the PostgreSQL server (Debian package) that infra/local/stack.py runs, unless
# one is there: initdb on PATH or under /usr/lib/postgresql/*/bin. The package's own
# cluster is not used; the stack makes its own, on a free port.
set -euo pipefail
if command -v initdb >/dev/null || compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null; then
    exit 0
fi
apt-get update -qq && apt-get install -y -qq postgresql >/dev/null
