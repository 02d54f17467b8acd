"""Benchmark: move a large model (default 100 MB) between two real ``p2pfl run`` processes.

Prints, per round, how long each parameter stream took and the throughput, the peak
resident memory of each node process against the model size, and, as the baseline
measured in the same run, raw loopback TCP throughput for the same number of bytes.

    python scripts/bench_transfer.py --megabytes 100 --rounds 3
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from p2pfl.config.local import build_local_config  # noqa: E402
from p2pfl.proto.keys import generate_key_file  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def raw_tcp_seconds(nbytes: int) -> float:
    """Baseline: plain loopback TCP, 256 KiB writes, same byte count."""
    server = socket.create_server(("127.0.0.1", 0))
    port = server.getsockname()[1]
    done = threading.Event()

    def sink() -> None:
        conn, _ = server.accept()
        buf = bytearray(1 << 20)
        got = 0
        while got < nbytes:
            n = conn.recv_into(buf)
            if not n:
                break
            got += n
        conn.close()
        done.set()

    threading.Thread(target=sink, daemon=True).start()
    payload = bytes(256 * 1024)
    client = socket.create_connection(("127.0.0.1", port))
    start = time.perf_counter()
    sent = 0
    while sent < nbytes:
        client.sendall(payload)
        sent += len(payload)
    client.close()
    done.wait()
    server.close()
    return time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--megabytes", type=float, default=100.0)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    size = int(args.megabytes * 1e6 / 4)
    model_mb = size * 4 / 1e6

    with tempfile.TemporaryDirectory(prefix="p2pfl-bench-") as tmp:
        root = Path(tmp)
        peers = ["alice", "bob"]
        public = {p: generate_key_file(root / f"{p}.key") for p in peers}
        ports = {p: free_port() for p in peers}
        config = build_local_config(
            peers=peers,
            public_keys=public,
            host="127.0.0.1",
            ports=ports,
            network="bench",
            seed=1,
            rounds=args.rounds,
            topology={"kind": "full"},
            model={"kind": "custom", "factory": "big_model:factory", "options": {"size": size}},
            inputs=8,
            classes=2,
            learning_rate=0.1,
            batch_size=32,
            round_timeout=120,
        )
        (root / "peers.yaml").write_text(yaml.safe_dump(config))
        rng = np.random.default_rng(0)
        for p in peers:
            np.savez(
                root / f"{p}.npz", x=rng.random((64, 8), dtype=np.float32), y=rng.integers(0, 2, 64)
            )
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "scripts"), str(ROOT)])}
        procs = [
            subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "p2pfl",
                    "-q",
                    "run",
                    str(root / "peers.yaml"),
                    "--id",
                    p,
                    "--key",
                    str(root / f"{p}.key"),
                    "--data",
                    str(root / f"{p}.npz"),
                    "--state-dir",
                    str(root / p),
                ],
                env=env,
            )
            for p in peers
        ]
        codes = [proc.wait(600) for proc in procs]
        if any(codes):
            print(f"a node failed: exit codes {codes}")
            return 1
        print(
            f"model: {size:,} float32 parameters = {model_mb:.1f} MB; {args.rounds} rounds, 2 nodes"
        )
        print(f"{'node':<6} {'round':>5} {'send s':>8} {'MB/s':>8} {'round s':>8}")
        for p in peers:
            events = [json.loads(line) for line in (root / p / "events.jsonl").open()]
            ends = {e["round"]: e["duration_s"] for e in events if e["type"] == "round_end"}
            for e in events:
                if e["type"] == "send":
                    mbps = e["bytes"] / 1e6 / e["duration_s"]
                    r, secs = e["round"], e["duration_s"]
                    print(f"{p:<6} {r:>5} {secs:>8.3f} {mbps:>8.0f} {ends[r]:>8.3f}")
        for p in peers:
            stop = [json.loads(line) for line in (root / p / "events.jsonl").open()][-1]
            rss = stop["peak_rss_mb"]
            print(f"{p}: peak RSS {rss:.0f} MB = {rss / model_mb:.2f} x model size")
    tcp = raw_tcp_seconds(size * 4)
    print(f"baseline raw loopback TCP, same bytes: {tcp:.3f} s = {size * 4 / 1e6 / tcp:.0f} MB/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
