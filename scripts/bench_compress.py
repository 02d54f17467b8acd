"""CPU cost of compression per round, for a model of 10M parameters (or --size).

A node compresses once per round (``OwnCopy.advance``: encode the difference, decode it,
add it to its copy) and applies one payload per neighbour (``PeerCopies.apply``: decode,
add, check finite). Per neighbour that is advance / DEGREE + apply. The baseline, measured
in the same run, is what an uncompressed stream costs a receiver beyond moving the bytes:
the finiteness check of a float32 model.

Target (issue 22): under 50 ms per neighbour for 10M parameters.

    python scripts/bench_compress.py [--size 10000000] [--degree 4] [--repeat 5]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from p2pfl.core.compress import parse_compression
from p2pfl.core.public_copy import OwnCopy, PeerCopies


def measure(spelled: str, initial: np.ndarray, step: np.ndarray, repeat: int) -> tuple:  # type: ignore[type-arg]
    """Median ms of one round's ``advance`` and of one neighbour's ``apply``, and the
    payload's size."""
    compression = parse_compression(spelled)
    own = OwnCopy(compression, initial)
    copies = PeerCopies(compression, initial)
    params = initial.copy()
    send, receive, size = [], [], 0
    for r in range(repeat):
        params += step
        started = time.perf_counter()
        payload, _ = own.advance(params, r).for_version(r - 1 if r else None)
        send.append(time.perf_counter() - started)
        started = time.perf_counter()
        copies.apply("link", "bob", r, payload)
        receive.append(time.perf_counter() - started)
        size = payload.size
    return statistics.median(send) * 1000, statistics.median(receive) * 1000, size


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=10_000_000)
    parser.add_argument("--degree", type=int, default=4)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--kinds", default="fp16,int8,topk:0.1,topk:0.01")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    initial = (rng.normal(size=args.size) * 0.05).astype(np.float32)
    step = (rng.normal(size=args.size) * 0.002).astype(np.float32)
    checks = []
    for _ in range(args.repeat):
        started = time.perf_counter()
        np.isfinite(np.sum(initial, dtype=np.float64))
        checks.append(time.perf_counter() - started)
    baseline = statistics.median(checks) * 1000
    print(
        f"{args.size:,} parameters, {args.degree} neighbours; baseline (float32: the "
        f"receiver's finiteness check) {baseline:.1f} ms per neighbour"
    )
    for spelled in args.kinds.split(","):
        send, receive, size = measure(spelled, initial, step, args.repeat)
        per = send / args.degree + receive
        print(
            f"{spelled:>10}: compress {send:7.1f} ms/round, apply {receive:6.1f} ms/neighbour"
            f" -> {per:6.1f} ms per neighbour ({per - baseline:+.1f} vs float32); "
            f"{4 * args.size / size:4.1f}x fewer bytes; target < 50 ms: "
            f"{'met' if per < 50 else 'missed'}",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
