#!/usr/bin/env bash
# Install bgtask with its test dependencies and the Ray extra into a fresh virtual environment
# and run the tests: the suite two at a time (pytest-xdist; BGTASK_TEST_WORKERS=0 runs them one
# by one), then the Ray backend's tests, which share one Ray head node, in a run of their own.
# BGTASK_TEST_RAY=0 leaves Ray out (not installed, not tested).
# Usage: bash scripts/test.sh [PYTHON] [PYTEST-ARGS...]    (PYTHON defaults to python3)
set -euo pipefail
cd "$(dirname "$0")/.."
python="${1:-python3}"
shift || true
version=$("$python" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
venv=".venv/py$version"
"$python" -m venv --clear "$venv"
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check --upgrade pip
if [ "${BGTASK_TEST_RAY:-1}" = "0" ]; then
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check -e ".[test]"
else
    # The Ray release the backend is tested with, on every interpreter (3.9 included).
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check -e ".[test,ray]" \
        "ray==${BGTASK_RAY_VERSION:-2.51.0}"
fi
echo "== tests on $("$venv/bin/python" --version)"
"$venv/bin/python" -m pytest -n "${BGTASK_TEST_WORKERS:-2}" --ignore=tests/test_ray.py "$@"
if [ "${BGTASK_TEST_RAY:-1}" != "0" ]; then
    echo "== the Ray backend's tests on $("$venv/bin/python" --version)"
    BGTASK_REQUIRE_RAY=1 "$venv/bin/python" -m pytest -p no:xdist tests/test_ray.py
fi
