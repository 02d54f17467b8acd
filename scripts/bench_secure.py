"""Per-round cost of secure aggregation against plain exchange, measured in the same run.

For each model size: five real ``p2pfl run`` processes on 127.0.0.1, a full graph (degree
4, every group has five members), a one-vector model (``scripts/big_model.py``) so that the
round is all exchange. Plain averaging (the baseline) and ``aggregation.secure`` runs
alternate ``--repeat`` times. Prints the median round time and the median time from the end of
local training to the aggregate (send, collect, mask/unmask), their ratios, and the largest
peak memory of one peer (plain/secure).

Then, per size, where the time goes: the median CPU time of one node's round (all its
threads, from the ``round_end`` events) in each mode, how many of the machine's cores the
five nodes kept busy, and the arithmetic that only secure aggregation does (a member's
four masks and encoding, the owner's ring sum and unmasking), timed with the real
functions on an otherwise idle core. With the cores saturated the round ratio follows the
CPU ratio, and plain CPU plus that arithmetic bounds it from below.

    python scripts/bench_secure.py --params 1000000,10000000 --rounds 6 --repeat 3
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from p2pfl.config import AggregationConfig  # noqa: E402
from p2pfl.config.local import build_local_config  # noqa: E402
from p2pfl.harness.layout import free_ports  # noqa: E402
from p2pfl.proto.keys import generate_key_file  # noqa: E402
from p2pfl.secure.arithmetic import FixedPoint, keystream_sum, sum_contributions, unmask_sum  # noqa: E402

PEERS = ["p0", "p1", "p2", "p3", "p4"]


def run_network(root: Path, size: int, rounds: int, secure: bool) -> dict[str, float]:
    root.mkdir(parents=True)
    keys = {p: root / f"{p}.key" for p in PEERS}
    public = {p: generate_key_file(keys[p]) for p in PEERS}
    shared = build_local_config(
        peers=PEERS,
        public_keys=public,
        host="127.0.0.1",
        ports=dict(zip(PEERS, free_ports(len(PEERS)), strict=True)),
        network="bench",
        seed=1,
        rounds=rounds,
        topology={"kind": "full"},
        model={"kind": "custom", "factory": "big_model:factory", "options": {"size": size}},
        inputs=8,
        classes=2,
        learning_rate=0.1,
        batch_size=32,
        round_timeout=60.0,
    )
    shared["aggregation"]["secure"] = secure
    config = root / "peers.yaml"
    config.write_text(yaml.safe_dump(shared))
    rng = np.random.default_rng(0)
    data = root / "data.npz"
    np.savez(data, x=rng.random((64, 8), dtype=np.float32), y=rng.integers(0, 2, 64))
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "scripts")]),
        "OPENBLAS_NUM_THREADS": "1",
    }
    procs = [
        subprocess.Popen(
            [
                *(sys.executable, "-m", "p2pfl", "-q", "run", str(config), "--id", p),
                *("--key", str(keys[p]), "--data", str(data), "--state-dir", str(root / p)),
            ],
            env=env,
        )
        for p in PEERS
    ]
    try:
        codes = [proc.wait(600) for proc in procs]
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    if codes != [0] * len(PEERS):
        raise SystemExit(f"a node failed: exit codes {codes}")
    rounds_s: list[float] = []
    cpu_s: list[float] = []
    exchange_s: list[float] = []
    peak_mb = 0.0
    for p in PEERS:
        events = [json.loads(line) for line in (root / p / "events.jsonl").open()]
        peak_mb = max([peak_mb, *(e["peak_rss_mb"] for e in events if e["type"] == "node_stop")])
        trained = {e["round"]: e["ts"] for e in events if e["type"] == "train"}
        for e in events:
            if e["type"] == "round_end" and e["round"] > 0:  # round 0 includes connecting
                rounds_s.append(e["duration_s"])
                cpu_s.append(e["cpu_s"])
            if e["type"] == "aggregate" and e["round"] > 0 and e["round"] in trained:
                exchange_s.append(e["ts"] - trained[e["round"]])
    return {
        "round": statistics.median(rounds_s),
        "exchange": statistics.median(exchange_s),
        "cpu": statistics.median(cpu_s),
        "peak_mb": peak_mb,
    }


def secure_arithmetic(size: int, repeat: int = 5) -> dict[str, float]:
    """Seconds of the work only secure aggregation does in one node's round at degree 4
    (groups of five), each step the fastest of ``repeat`` runs: four masks of four
    keystreams (three pair masks and a self-mask), encoding the parameters into them, and as
    owner the ring sum of four vectors plus its own term, then removing four self-masks
    and decoding."""
    fixed = FixedPoint(AggregationConfig.clip, AggregationConfig.frac_bits)  # (the defaults)
    rng = np.random.default_rng(0)
    params = rng.standard_normal(size, dtype=np.float32)
    masks = [np.empty(size, dtype=np.uint32) for _ in range(4)]
    total = np.empty(size, dtype=np.uint32)
    keys = [(bytes(rng.integers(0, 256, 32, dtype=np.uint8)), sign) for sign in (1, -1, 1, 1)]

    def best(step: Callable[[], object]) -> float:
        times = []
        for _ in range(repeat):
            started = time.perf_counter()
            step()
            times.append(time.perf_counter() - started)
        return min(times)

    return {
        "masks": best(lambda: [keystream_sum(size, keys, m) for m in masks]),
        "encode": best(lambda: fixed.encode_add_many(params, [(0.2, m) for m in masks])),
        "owner": best(
            lambda: unmask_sum(
                sum_contributions(masks, params, 0.2, fixed, total)[0], keys, 1.0, fixed
            )
        ),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--params", default="1000000,10000000")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument(
        "--repeat",
        type=int,
        default=3,
        help="plain and secure runs alternate this many times; medians are reported "
        "(one run on a shared 2-core machine varies by about 10%%)",
    )
    args = parser.parse_args()
    print(
        f"{'params':>10} {'plain round':>12} {'secure round':>13} {'x':>5} "
        f"{'plain exch':>11} {'secure exch':>12} {'x':>5} {'peak MB':>13}  x per repeat"
    )
    with tempfile.TemporaryDirectory(prefix="p2pfl-bench-secure-") as tmp:
        for size in [int(s) for s in args.params.split(",")]:
            plains, secures = [], []
            for i in range(args.repeat):
                plains.append(
                    run_network(Path(tmp) / f"plain-{size}-{i}", size, args.rounds, False)
                )
                secures.append(
                    run_network(Path(tmp) / f"secure-{size}-{i}", size, args.rounds, True)
                )
            keys = ("round", "exchange", "cpu", "peak_mb")
            plain = {k: statistics.median(r[k] for r in plains) for k in keys}
            secure = {k: statistics.median(r[k] for r in secures) for k in keys}
            ratios = " ".join(
                f"{s['round'] / p['round']:.2f}" for p, s in zip(plains, secures, strict=True)
            )
            print(
                f"{size:>10} {plain['round'] * 1000:>10.0f}ms {secure['round'] * 1000:>11.0f}ms "
                f"{secure['round'] / plain['round']:>5.2f} {plain['exchange'] * 1000:>9.0f}ms "
                f"{secure['exchange'] * 1000:>10.0f}ms "
                f"{secure['exchange'] / plain['exchange']:>5.2f} "
                f"{plain['peak_mb']:>6.0f}/{secure['peak_mb']:<6.0f}  {ratios}",
                flush=True,
            )
            work = secure_arithmetic(size)
            extra = sum(work.values())
            steps = ", ".join(f"{k} {v * 1000:.1f}" for k, v in work.items())
            print(
                f"{'':>10} CPU per node-round plain {plain['cpu'] * 1000:.0f} ms, secure "
                f"{secure['cpu'] * 1000:.0f} ms ({secure['cpu'] / plain['cpu']:.2f}x); cores "
                f"busy {len(PEERS) * plain['cpu'] / plain['round']:.2f} / "
                f"{len(PEERS) * secure['cpu'] / secure['round']:.2f} of {os.cpu_count()}; "
                f"secure-only arithmetic on an idle core {extra * 1000:.1f} ms ({steps}): "
                f"plain CPU plus it is {(plain['cpu'] + extra) / plain['cpu']:.2f}x",
                flush=True,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
