"""Three real p2pfl nodes on this machine, training on scikit-learn's digits.

What it does, step by step (each step is what an operator would do by hand):
  1. ``p2pfl init`` writes a peers.yaml and one private key per peer;
  2. the digits are split: each peer gets its own third, all share one held-out set;
  3. three ``p2pfl run`` processes start and talk over encrypted websockets on 127.0.0.1;
  4. when they exit, their event logs are read and a summary table is printed.

The multi-peer harness (``p2pfl harness``) will replace this script.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

PEERS = ["alice", "bob", "carol"]


def free_port_run(count: int) -> int:
    """A first port such that it and the next count-1 ports are free on 127.0.0.1."""
    for _ in range(100):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            base = int(probe.getsockname()[1])
        socks: list[socket.socket] = []
        try:
            for port in range(base, min(base + count, 65536)):
                s = socket.socket()
                socks.append(s)
                s.bind(("127.0.0.1", port))
            if len(socks) == count:
                return base
        except OSError:
            pass
        finally:
            for s in socks:
                s.close()
    raise SystemExit("no free ports found on 127.0.0.1")


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--out", default=None, help="run directory (default runs/demo-<time>)")
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--base-port", type=int, help="first of 3 ports (default: free ones)")
    args = parser.parse_args()
    out = Path(args.out or f"runs/demo-{time.strftime('%Y%m%d-%H%M%S')}").resolve()
    p2pfl = [sys.executable, "-m", "p2pfl"]

    subprocess.run(
        [
            *p2pfl,
            "init",
            "--peers",
            ",".join(PEERS),
            "--out",
            str(out),
            "--rounds",
            str(args.rounds),
            "--base-port",
            str(args.base_port or free_port_run(len(PEERS))),
        ],
        check=True,
    )
    from p2pfl.learning.prepare import load_digits_arrays, write_partitions

    x, y = load_digits_arrays()
    write_partitions(x, y, len(PEERS), out / "data", seed=7, names=PEERS)
    print(f"split {len(y)} digits: one share per peer, same held-out validation set for all")

    procs: dict[str, subprocess.Popen[bytes]] = {}
    started = time.monotonic()
    try:
        for peer in PEERS:
            log = open(out / f"{peer}.log", "wb")  # noqa: SIM115
            procs[peer] = subprocess.Popen(
                [
                    *p2pfl,
                    "run",
                    str(out / "peers.yaml"),
                    "--id",
                    peer,
                    "--key",
                    str(out / "keys" / f"{peer}.key"),
                    "--data",
                    str(out / "data" / f"{peer}.npz"),
                    "--state-dir",
                    str(out / "state" / peer),
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        print(f"started {len(PEERS)} nodes; logs in {out}/<peer>.log")
        codes = {peer: proc.wait() for peer, proc in procs.items()}
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                proc.wait(10)
    wall = time.monotonic() - started

    header = ("peer", "exit", "rounds", "sent", "recv", "round ms", "val acc")
    print("\n{:<6} {:>4} {:>6} {:>5} {:>5} {:>8} {:>8}".format(*header))
    accuracies = []
    for peer in PEERS:
        events = [json.loads(line) for line in (out / "state" / peer / "events.jsonl").open()]
        evals = [e for e in events if e["type"] == "eval"]
        ends = [e["duration_s"] for e in events if e["type"] == "round_end"]
        sent = sum(e["type"] == "send" for e in events)
        recv = sum(e["type"] == "recv" for e in events)
        acc = evals[-1]["accuracy"] if evals else float("nan")
        accuracies.append(acc)
        ms = 1000 * sorted(ends)[len(ends) // 2] if ends else float("nan")
        print(
            f"{peer:<6} {codes[peer]:>4} {len(evals):>6} {sent:>5} {recv:>5} {ms:>8.1f} {acc:>8.4f}"
        )
    print(f"\nwall time {wall:.1f}s; final accuracies {min(accuracies):.4f}..{max(accuracies):.4f}")
    print(f"event logs: {out}/state/<peer>/events.jsonl")
    return 0 if all(code == 0 for code in codes.values()) else 1


if __name__ == "__main__":
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    sys.exit(main())
