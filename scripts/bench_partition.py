"""How long a silent partition stalls the peers, and how often a live link is suspected.

Eight simulated hosts (``p2pfl harness --hosts``, k-regular:4, digits), as root:

- LAN: unshaped links, MLP 64 (rounds of a few tens of milliseconds);
- WAN: 100 mbit and 20 ms per host, MLP 963,963 (1M parameters, 4 MB per model: rounds
  of over a second).

Each network runs twice with the same seed: without faults (its median round time is the
baseline of this run) and split into halves by iptables drops (nothing closes a
connection, as with a cut cable). A peer's stall: the longest stretch without one of its
rounds ending, from the cut until its first round after the heal. Target (issue 24): at
most 5 round times or 1 s, whichever is larger. Before the failure detector, the same
cut stalled every node for ~15.5 s (the 10 s heartbeat timeout, then net.down_grace).

Then false suspicions: ``suspect_link`` events in runs of ``--false-rounds`` rounds
without faults, unshaped and at 100 mbit with 20 ms (target: none).

    sudo .venv/bin/python scripts/bench_partition.py [--false-rounds 1000] [--keep DIR]
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from hostruns import HostRun, hosts_unavailable, run_hosts

COMMON = ["--peers", "8", "--topology", "k-regular:4", "--no-baseline", "--no-snapshots"]
NETWORKS = {
    # name: (harness arguments, rounds, split)
    "LAN": (["--model", "mlp:64"], 400, "half@5s-8s"),
    "WAN 100mbit,20ms": (["--model", "mlp:963,963", "--link", "100mbit,20ms"], 14, "half@4-9"),
}


def stalls(run: HostRun) -> list[float]:
    """Each peer's longest stretch without a round ending, from the cut to its first
    round end after the heal."""
    fault = run.summary["faults"][0]
    cut, heal = float(fault["at_unix"]), float(fault["healed_unix"])
    result = []
    for peer in run.peers:
        ends = run.round_ends(peer)
        inside = [t for t in ends if cut < t <= heal]
        after = [t for t in ends if t > heal][:1]
        points = [cut, *inside, *after]
        result.append(max(b - a for a, b in itertools.pairwise(points)))
    return result


def partition(name: str, extra: list[str], rounds: int, split: str, keep: Path | None) -> None:
    args = [*COMMON, *extra, "--rounds", str(rounds)]
    timeout = 900
    whole = run_hosts(args, timeout=timeout, keep=keep, label=f"{name}-whole")
    cut = run_hosts([*args, "--split", split], timeout=timeout, keep=keep, label=f"{name}-split")
    round_s = whole.median_round_s()
    peers = stalls(cut)
    bound = max(5 * round_s, 1.0)
    fault = cut.summary["faults"][0]
    worst = max(peers)
    print(
        f"{name:18s} round {round_s * 1000:7.1f} ms | split {fault['fault']} lasted "
        f"{fault['healed_s'] - fault['at_s']:.2f} s | stall median "
        f"{statistics.median(peers):.2f} s, worst {worst:.2f} s = "
        f"{worst / round_s:.1f} rounds | target <= {bound:.2f} s: "
        f"{'met' if worst <= bound else 'MISSED'} | suspicions {len(cut.of('suspect_link'))}"
    )


def false_suspicions(rounds: int, keep: Path | None) -> None:
    for name, extra in (("unshaped", []), ("100mbit,20ms", ["--link", "100mbit,20ms"])):
        args = [*COMMON, "--model", "mlp:64", "--rounds", str(rounds), *extra]
        run = run_hosts(args, timeout=3600, keep=keep, label=f"false-{name}")
        suspected = run.of("suspect_link")
        peer_rounds = len(run.of("round_end"))
        print(
            f"false suspicions, {name:12s}: {len(suspected)} in {peer_rounds} peer-rounds "
            f"({rounds} rounds of 8 peers, median round {run.median_round_s() * 1000:.1f} ms)"
            + "".join(
                f"\n    {e['node']} suspected {e['peer']} in round {e['round']} after "
                f"{e['silent_s']} s (phi {e['phi']})"
                for e in suspected[:5]
            )
        )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--false-rounds", type=int, default=1000)
    parser.add_argument("--keep", type=Path, help="keep the run folders here")
    parser.add_argument(
        "--only", choices=("partition", "false"), help="one half of the benchmark only"
    )
    args = parser.parse_args()
    why = hosts_unavailable()
    if why is not None:
        print(f"bench_partition: {why}", file=sys.stderr)
        return 2
    if args.keep is not None:
        args.keep.mkdir(parents=True, exist_ok=True)
    if args.only in (None, "partition"):
        for name, (extra, rounds, split) in NETWORKS.items():
            partition(name.replace(" ", "-"), extra, rounds, split, args.keep)
    if args.only in (None, "false"):
        false_suspicions(args.false_rounds, args.keep)
    return 0


if __name__ == "__main__":
    sys.exit(main())
