#!/usr/bin/env bash
# Set up a virtualenv with p2pfl, then run 8 real peers on this machine (k-regular:4 gossip
# over encrypted websockets on 127.0.0.1) training on scikit-learn's digits, split
# non-IID (Dirichlet 0.5), and compare them with the centralised model. Any argument is
# passed on to `p2pfl harness` (e.g. --dataset fashion-mnist --rounds 50).
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/pip install --quiet --upgrade pip
.venv/bin/pip install --quiet -e '.[tools]'
exec .venv/bin/p2pfl harness --peers 8 --topology k-regular:4 --rounds 30 \
    --dataset digits --partition dirichlet:0.5 "$@"
