"""Feature scaling across peers, measured: scikit-learn's breast-cancer data (30 features
from 0.001 to 4254) split over three hospitals by a Dirichlet(0.5) label skew, one
``p2pfl run`` process per hospital on 127.0.0.1, the same softmax model, two settings:

- ``input_scale: 8192``: one power of two for every peer (what a node asks for once its
  neighbours' data gave other automatic scales);
- ``standardize: federated``: the network's mean and deviation, computed before round 0
  from every peer's masked feature totals.

Prints each hospital's validation accuracy after the last round, the accuracy of the
first hospital's model on a held-out test set, and the centralised baseline (pooled,
standardised data, the same model trained by the same code for as many epochs).

    python scripts/bench_standardize.py --rounds 30
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from p2pfl.config.local import build_local_config  # noqa: E402
from p2pfl.learning.models import SoftmaxRegression  # noqa: E402
from p2pfl.proto.keys import generate_key_file  # noqa: E402

PEERS = ["alice", "bob", "carol"]


def split(seed: int) -> tuple[dict[str, dict[str, np.ndarray]], np.ndarray, np.ndarray]:
    from sklearn.datasets import load_breast_cancer

    x, y = load_breast_cancer(return_X_y=True)
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(y))
    test, rest = order[:100], order[100:]
    shares: dict[str, list[int]] = {p: [] for p in PEERS}
    for label in (0, 1):
        rows = rest[y[rest] == label]
        cuts = (np.cumsum(rng.dirichlet([0.5] * len(PEERS))) * len(rows)).astype(int)[:-1]
        for p, part in zip(PEERS, np.split(rows, cuts), strict=True):
            shares[p] += part.tolist()
    data = {}
    for p, rows in shares.items():
        idx = rng.permutation(rows)
        val = max(1, len(idx) // 5)
        data[p] = {
            "x": x[idx[val:]].astype(np.float32),
            "y": y[idx[val:]].astype(np.int64),
            "x_val": x[idx[:val]].astype(np.float32),
            "y_val": y[idx[:val]].astype(np.int64),
        }
    return data, x[test].astype(np.float32), y[test].astype(np.int64)


def run(folder: Path, data: dict, training: dict, rounds: int, base_port: int) -> dict[str, float]:
    keys = folder / "keys"
    keys.mkdir(parents=True)
    public = {p: generate_key_file(keys / f"{p}.key") for p in PEERS}
    config = build_local_config(
        peers=PEERS,
        public_keys=public,
        host="127.0.0.1",
        ports={p: base_port + i for i, p in enumerate(PEERS)},
        network="bench-standardize",
        seed=1,
        rounds=rounds,
        topology={"kind": "full"},
        model={"kind": "softmax"},
        inputs=30,
        classes=2,
        learning_rate=0.1,
        batch_size=16,
        round_timeout=30,
    )
    config["training"].update(training)
    path = folder / "peers.yaml"
    path.write_text(yaml.safe_dump(config))
    procs = []
    for p in PEERS:
        np.savez(folder / f"{p}.npz", **data[p])
        cmd = [sys.executable, "-m", "p2pfl", "-q", "run", str(path), "--id", p]
        cmd += ["--key", str(keys / f"{p}.key"), "--data", str(folder / f"{p}.npz")]
        cmd += ["--state-dir", str(folder / "state" / p)]
        procs.append(subprocess.Popen(cmd, cwd=ROOT))
    codes = [proc.wait(timeout=600) for proc in procs]
    if any(codes):
        raise SystemExit(f"a node failed: exit codes {codes}")
    accuracy = {}
    for p in PEERS:
        events = [json.loads(line) for line in (folder / "state" / p / "events.jsonl").open()]
        accuracy[p] = [e for e in events if e["type"] == "eval"][-1]["accuracy"]
    return accuracy


def centralised(data: dict, x_test: np.ndarray, y_test: np.ndarray, epochs: int) -> float:
    x = np.concatenate([d["x"] for d in data.values()])
    y = np.concatenate([d["y"] for d in data.values()])
    mean, std = x.mean(axis=0), x.std(axis=0)
    model = SoftmaxRegression(30, 2, seed=1)
    rng = np.random.default_rng(1)
    model.fit((x - mean) / std, y, epochs=epochs, batch_size=16, learning_rate=0.1, rng=rng)
    return float(model.evaluate((x_test - mean) / std, y_test).score)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--seed", type=int, default=3)
    parser.add_argument("--base-port", type=int, default=7610)
    args = parser.parse_args()
    data, x_test, y_test = split(args.seed)
    sizes = ", ".join(
        f"{p} {len(d['y'])} rows ({int(d['y'].mean() * 100)}% benign)" for p, d in data.items()
    )
    print(f"breast cancer, Dirichlet 0.5 label skew: {sizes}")
    settings = {
        "input_scale: 8192": {"input_scale": 8192},
        "standardize: federated": {"standardize": "federated"},
    }
    with tempfile.TemporaryDirectory() as tmp:
        for i, (name, training) in enumerate(settings.items()):
            port = args.base_port + 10 * i
            acc = run(Path(tmp) / f"s{i}", data, training, args.rounds, port)
            shown = "  ".join(f"{p} {a:.3f}" for p, a in acc.items())
            print(f"{name:24s} validation accuracy after {args.rounds} rounds: {shown}")
    print(
        f"centralised (pooled, standardised, {args.rounds} epochs): test accuracy "
        f"{centralised(data, x_test, y_test, args.rounds):.3f}"
    )


if __name__ == "__main__":
    main()
