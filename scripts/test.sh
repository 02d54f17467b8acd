#!/usr/bin/env bash
# Set up a virtualenv with the development tools, PyTorch (the `torch` extra: exactly
# torch==2.13.0, the CPU build) and Ray (the `ray` extra, for the --ray tests), and run
# the test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/pip install --quiet --upgrade pip
.venv/bin/pip install --quiet -e '.[dev,torch,ray]'
exec .venv/bin/python -m pytest -q "$@"
