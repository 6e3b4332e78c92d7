#!/usr/bin/env bash
# The test command of the README: create .venv if needed, install cfo with its test extras, run pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install --quiet -e '.[test]'
.venv/bin/python -m pytest "$@"
