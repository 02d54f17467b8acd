#!/usr/bin/env bash
# Set up a virtualenv with the development tools and run the test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/pip install --quiet --upgrade pip
.venv/bin/pip install --quiet -e '.[dev]'
exec .venv/bin/python -m pytest -q "$@"
