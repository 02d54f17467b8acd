#!/usr/bin/env bash
# Set up a virtualenv with p2pfl and run three nodes training on scikit-learn's digits.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/pip install --quiet --upgrade pip
.venv/bin/pip install --quiet -e '.[data]'
exec .venv/bin/python scripts/demo.py "$@"
