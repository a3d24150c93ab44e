#!/usr/bin/env bash
# Install bgtask into a fresh virtual environment and run the main example, examples/logger.py.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv --clear .venv/example
.venv/example/bin/python -m pip install --quiet --disable-pip-version-check .
.venv/example/bin/python examples/logger.py
