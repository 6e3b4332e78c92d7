#!/usr/bin/env bash
# The main job of the README: create .venv if needed, install cfo, run the 2D toy CFO demo (table + plots in runs/toy).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install --quiet -e .
.venv/bin/cfo toy "$@"
