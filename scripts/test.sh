#!/usr/bin/env bash
# Install bgtask with its test dependencies into a fresh virtual environment and run the tests,
# two at a time (pytest-xdist; BGTASK_TEST_WORKERS=0 runs them one by one).
# Usage: bash scripts/test.sh [PYTHON] [PYTEST-ARGS...]    (PYTHON defaults to python3)
set -euo pipefail
cd "$(dirname "$0")/.."
python="${1:-python3}"
shift || true
version=$("$python" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
venv=".venv/py$version"
"$python" -m venv --clear "$venv"
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check --upgrade pip
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check -e ".[test]"
echo "== tests on $("$venv/bin/python" --version)"
"$venv/bin/python" -m pytest -n "${BGTASK_TEST_WORKERS:-2}" "$@"
