"""Robust aggregation against poisoning peers: honest accuracy and cost per rule.

Runs ``p2pfl harness`` (real processes) on digits, 8 peers, k-regular:4, 30 rounds: once
without an attack (Metropolis), then with one ``sign-flip`` and one ``random`` Byzantine
peer under each rule. Prints, per run, the honest peers' mean final test accuracy, its
gap to the no-attack run, the median round time and how many honest peers flagged an
attacker as a suspect; then the cost of each rule on its own (``aggregate`` on 5 members,
median of repeats) at the digits MLP's size and at 1M parameters, against Metropolis.

    python scripts/bench_robust.py [--rounds 30] [--seed 1] [--rules median,...]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from p2pfl.core.aggregate import aggregate, parse_rule

RULES = "metropolis,median,trimmed-mean:0.25,clipped:1"
ATTACK = ("--byzantine", "p03:sign-flip", "--byzantine", "p05:random")


def harness(out: Path, args: argparse.Namespace, *extra: str) -> dict[str, object]:
    command = [
        *(sys.executable, "-m", "p2pfl", "-q", "harness", "--out", str(out)),
        *("--dataset", "digits", "--partition", args.partition, "--peers", "8"),
        *("--topology", "k-regular:4", "--rounds", str(args.rounds), "--seed", str(args.seed)),
        *("--no-baseline", "--no-snapshots"),
        *extra,
    ]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"harness failed:\n{done.stdout}\n{done.stderr}")
    summary: dict[str, object] = json.loads((out / "summary.json").read_text())
    return summary


def suspects_found(out: Path) -> int:
    """Honest peers that logged a suspect event for an attacker."""
    found = set()
    for log in (out / "state").glob("*/events.jsonl"):
        for line in log.read_text().splitlines():
            event = json.loads(line)
            if event["type"] == "suspect" and event["peer"] in ("p03", "p05"):
                found.add(event["node"])
    return len(found - {"p03", "p05"})


def rule_cost(rule: str, size: int, repeats: int) -> float:
    """Median seconds of one ``aggregate`` call with 4 neighbours (fresh copies each time:
    the rules consume their inputs)."""
    rng = np.random.default_rng(0)
    own = rng.standard_normal(size).astype(np.float32)
    others = {p: own + 0.01 * rng.standard_normal(size).astype(np.float32) for p in "bcde"}
    weights = dict.fromkeys("abcde", 0.2)
    parsed = parse_rule(rule)
    times = []
    for _ in range(repeats):
        mine, theirs = own.copy(), {p: v.copy() for p, v in others.items()}
        started = time.perf_counter()
        aggregate(parsed, "a", mine, theirs, weights)
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--partition", default="iid")
    parser.add_argument("--rules", default=RULES)
    parser.add_argument("--out")
    args = parser.parse_args()
    out = Path(args.out or f"runs/bench-robust-{time.strftime('%Y%m%d-%H%M%S')}")
    out.mkdir(parents=True, exist_ok=True)

    clean = harness(out / "no-attack", args)
    reference = clean["accuracy"]["mean"]  # type: ignore[index]
    print(
        f"no attack, metropolis: honest mean {reference:.4f}, "
        f"round {clean['round_time_s'] * 1000:.1f} ms"  # type: ignore[operator]
    )
    print(f"attack: {' '.join(ATTACK)} ({args.partition}, seed {args.seed})")
    print(f"{'rule':<18} {'honest acc':>10} {'vs none':>8} {'round ms':>9} {'suspected by':>12}")
    for rule in args.rules.split(","):
        run = out / rule.replace(":", "-")
        summary = harness(run, args, "--rule", rule, *ATTACK)
        mean = summary["accuracy"]["mean"]  # type: ignore[index]
        print(
            f"{rule:<18} {mean:>10.4f} {mean - reference:>+8.4f} "
            f"{summary['round_time_s'] * 1000:>9.1f} "  # type: ignore[operator]
            f"{suspects_found(run):>9} / 6",
            flush=True,
        )
    print("\ncost of the rule alone (5 members, median of repeats):")
    for size, repeats in ((4810, 200), (1_000_000, 7)):
        base = rule_cost("metropolis", size, repeats)
        costs = ", ".join(
            f"{rule} {rule_cost(rule, size, repeats) * 1000:.2f} ms"
            for rule in args.rules.split(",")
            if rule != "metropolis"
        )
        print(f"  {size} parameters: metropolis {base * 1000:.2f} ms; {costs}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
