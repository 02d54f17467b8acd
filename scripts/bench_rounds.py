"""Round time of real peers against the compute floor, measured in the same run.

For each peer count: run ``p2pfl harness`` (real processes, digits, MLP 64, one local
epoch, no baseline model) and read the median round time, the share of it spent training
and the peak memory. Then, in this process, measure the floor: one round's training of
every peer's share done back to back, divided by the cores (what a perfect lockstep
round on this machine would cost, with no network, logging or checkpoint at all). Last,
the median time of each phase of a round, from the peers' event timestamps.

    python scripts/bench_rounds.py --peers 4,8,32 --rounds 30
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import numpy as np


def compute_floor(run: Path, repeats: int = 5) -> float:
    """Seconds per round if every peer's local epoch ran back to back on all cores."""
    from p2pfl.config import load_config
    from p2pfl.learning import build_learner, load_dataset

    config = load_config(run / "peers.yaml")
    training = config.training
    shares = sorted((run / "data").glob("p*.npz"))
    learner = build_learner(training.model.as_mapping(), config.seed)
    start = learner.get_weights()
    times = []
    for _ in range(repeats):
        began = time.perf_counter()
        for share in shares:
            data = load_dataset(share)
            learner.set_weights(start)
            learner.fit(
                data.x,
                data.y,
                epochs=training.local_epochs,
                batch_size=training.batch_size,
                learning_rate=training.learning_rate,
                rng=np.random.default_rng(0),
            )
        times.append(time.perf_counter() - began)
    return statistics.median(times) / (os.cpu_count() or 1)


PHASES = (
    ("train", "round_start", "train"),
    ("collect", "train", "aggregate"),
    ("evaluate", "aggregate", "eval"),
    ("checkpoint", "eval", "checkpoint"),
    ("close", "checkpoint", "round_end"),
)


def phase_medians(run: Path) -> dict[str, float]:
    """Median milliseconds of each phase of a round (from consecutive events' timestamps,
    over every peer's rounds), and the median CPU milliseconds per peer and round."""
    spans: dict[str, list[float]] = {name: [] for name, _, _ in PHASES}
    cpu: list[float] = []
    for log in sorted((run / "state").glob("*/events.jsonl")):
        stamps: dict[tuple[int, str], float] = {}
        for line in log.read_text(encoding="utf-8").splitlines():
            event = json.loads(line)
            if event.get("round") is not None and not event.get("final"):
                stamps.setdefault((event["round"], event["type"]), event["ts"])
            if event["type"] == "round_end" and event.get("cpu_s") is not None:
                cpu.append(event["cpu_s"])
        for r in {r for r, kind in stamps if kind == "round_end"}:
            for name, first, last in PHASES:
                if (r, first) in stamps and (r, last) in stamps:
                    spans[name].append(stamps[(r, last)] - stamps[(r, first)])
    medians = {name: statistics.median(v) * 1000 for name, v in spans.items() if v}
    if cpu:
        medians["cpu"] = statistics.median(cpu) * 1000
    return medians


def print_phases(rows: list[tuple[int, dict[str, float]]]) -> None:
    names = [name for name, _, _ in PHASES] + ["cpu"]
    print("\nmedian ms per phase of a round (cpu: CPU per peer and round, all threads)")
    print(f"{'peers':>5} " + " ".join(f"{name:>10}" for name in names))
    for n, medians in rows:
        print(f"{n:>5} " + " ".join(f"{medians.get(name, float('nan')):>10.2f}" for name in names))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--peers", default="4,8")
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--topology", default="k-regular:4")
    parser.add_argument("--out")
    parser.add_argument(
        "--phases-of",
        nargs="+",
        metavar="RUN",
        help="only print the phase table of earlier runs (harness run folders)",
    )
    args, extra = parser.parse_known_args()
    if args.phases_of:
        print_phases(
            [(len(list(Path(r).glob("state/*"))), phase_medians(Path(r))) for r in args.phases_of]
        )
        return 0
    out = Path(args.out or f"runs/bench-rounds-{time.strftime('%Y%m%d-%H%M%S')}")
    out.mkdir(parents=True, exist_ok=True)
    print(
        f"{'peers':>5} {'topology':>12} {'round ms':>9} {'p90 ms':>7} {'train %':>7} "
        f"{'floor ms':>8} {'x floor':>7} {'wall s':>6} {'MB/peer':>7} {'MB total':>8}"
    )
    phases: list[tuple[int, dict[str, float]]] = []
    for n in [int(p) for p in args.peers.split(",")]:
        topology = args.topology if n > 4 else "full"
        run = out / f"peers{n}"
        command = [
            *(sys.executable, "-m", "p2pfl", "-q", "harness", "--out", str(run)),
            *("--peers", str(n), "--topology", topology, "--rounds", str(args.rounds)),
            *("--no-baseline", "--no-snapshots", *extra),
        ]
        done = subprocess.run(command, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            print(done.stdout, done.stderr, file=sys.stderr)
            return 1
        summary = json.loads((run / "summary.json").read_text())
        floor = compute_floor(run)
        rss = summary["peak_rss_mb"]
        print(
            f"{n:>5} {topology:>12} {summary['round_time_s'] * 1000:>9.1f} "
            f"{summary['round_time_s_p90'] * 1000:>7.1f} {summary['train_share'] * 100:>7.0f} "
            f"{floor * 1000:>8.1f} {summary['round_time_s'] / floor:>7.1f} "
            f"{summary['wall_s']:>6.1f} {rss['max']:>7.0f} {rss['total_sampled']:>8.0f}",
            flush=True,
        )
        phases.append((n, phase_medians(run)))
    print_phases(phases)
    return 0


if __name__ == "__main__":
    sys.exit(main())
