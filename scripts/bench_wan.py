"""Round time over WAN links, against the floor the link allows, measured.

Eight simulated hosts (``p2pfl harness --hosts``, as root), k-regular:4, digits, every
host's link shaped to RATE each way with a one-way DELAY (a path between two hosts has
both ends' delay: a round trip is 4 x DELAY), models of about 100k, 1M and 10M parameters
(MLPs on digits). For each combination:

- round: the median round time over every peer's rounds after its first;
- floor: the bytes each host put on the wire per round (parameter streams with their
  headers and AEAD tags, measured in the same run) / RATE, plus one round trip;
- ratio = round / floor; CPU: the median CPU time of a peer's process per round (all
  threads), and the mean train time (wall clock);
- ratio to train + floor: a model can only go out once trained, so a round is at least
  its training plus the transfer; this ratio is what the network path adds beyond that.

Target (issue 28): within 1.25x of the floor at 100 mbit for 1M and 10M parameters.
Eight peers share this machine's two cores, so where a round's CPU (times 8, over 2
cores) approaches the floor, the machine, not the link, bounds the round: the table shows
the CPU per round beside it.

    sudo .venv/bin/python scripts/bench_wan.py                      # the whole grid (long)
    sudo .venv/bin/python scripts/bench_wan.py --rates 100 --delays 0,20 --sizes 1M,10M
    sudo .venv/bin/python scripts/bench_wan.py --rates 100 --delays 0 --sizes 1M,10M \\
        --compressions none,int8          # issue 22: bytes and round time against none

With several ``--compressions``, each combination also prints how many times fewer bytes
a host sent per round and how many times shorter the rounds were than with the first one
(issue 22's target for int8 against none at 100 mbit: 3.5x fewer bytes, 3x shorter).
"""

from __future__ import annotations

import argparse
import statistics
import sys
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from hostruns import HostRun, hosts_unavailable, run_hosts

#: digits: 64 inputs, 10 classes. mlp:H has 75H + 10 parameters, mlp:H,H H^2 + 76H + 10.
MODELS = {
    "100k": ("mlp:1333", 99_985),
    "1M": ("mlp:963,963", 1_000_567),
    "10M": ("mlp:3125,3125", 10_003_135),
}
DEGREE = 4


def wire_bytes_per_round(run: HostRun) -> float:
    """The median over hosts and rounds (after the first) of what a host sent."""
    sent: dict[tuple[str, int], int] = defaultdict(int)
    for e in run.of("send"):
        if e.get("round") is not None and int(e["round"]) >= 1:
            sent[(e["node"], int(e["round"]))] += int(e.get("wire_bytes", e["bytes"]))
    return statistics.median(sent.values())


def one(
    rate_mbit: int, delay_ms: int, size: str, rounds: int, keep: Path | None, compression: str
) -> tuple[float, float]:
    """One run; returns (bytes a host sent per round, median round time)."""
    model, params = MODELS[size]
    # What a host sends per round, at the link's rate, bounds the round: give it room.
    expected = DEGREE * 4 * params * 8 / (rate_mbit * 1e6)
    round_timeout = max(60.0, 5 * expected)
    args = [
        *("--peers", "8", "--topology", f"k-regular:{DEGREE}", "--rounds", str(rounds)),
        *("--model", model, "--link", f"{rate_mbit}mbit,{delay_ms}ms"),
        *("--round-timeout", f"{round_timeout:g}", "--no-baseline", "--no-snapshots"),
        *("--compression", compression),
    ]
    label = f"{rate_mbit}mbit-{delay_ms}ms-{size}-{compression.replace(':', '')}"
    run = run_hosts(args, timeout=rounds * round_timeout + 300, keep=keep, label=label)
    per_round = wire_bytes_per_round(run)
    floor = per_round * 8 / (rate_mbit * 1e6) + 4 * delay_ms / 1000
    round_s = run.median_round_s()
    train = statistics.fmean(
        float(e["duration_s"]) for e in run.of("train") if int(e["round"]) >= 1
    )
    print(
        f"{rate_mbit:>5} mbit {delay_ms:>3} ms {size:>5} {compression:>8} | sent/host/round "
        f"{per_round / 1e6:8.2f} MB | round {round_s:8.3f} s | floor {floor:8.3f} s | "
        f"ratio {round_s / floor:5.2f} | cpu/round {run.cpu_per_round_s():6.3f} s | "
        f"train {train:6.3f} s | ratio to train + floor {round_s / (train + floor):5.2f}",
        flush=True,
    )
    return per_round, round_s


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rates", default="10,100,1000", help="mbit/s, comma-separated")
    parser.add_argument("--delays", default="0,20,50", help="one-way ms, comma-separated")
    parser.add_argument("--sizes", default="100k,1M,10M", help=f"of {', '.join(MODELS)}")
    parser.add_argument("--rounds", type=int, default=4, help="rounds per run (default 4)")
    parser.add_argument("--keep", type=Path, help="keep the run folders here")
    parser.add_argument("--compressions", default="none", help="comma-separated")
    args = parser.parse_args()
    why = hosts_unavailable()
    if why is not None:
        print(f"bench_wan: {why}", file=sys.stderr)
        return 2
    sizes = args.sizes.split(",")
    for size in sizes:
        if size not in MODELS:
            parser.error(f"--sizes: {size!r} is not one of {', '.join(MODELS)}")
    if args.keep is not None:
        args.keep.mkdir(parents=True, exist_ok=True)
    for rate in (int(r) for r in args.rates.split(",")):
        for delay in (int(d) for d in args.delays.split(",")):
            for size in sizes:
                first: tuple[float, float] | None = None
                for compression in args.compressions.split(","):
                    sent, round_s = one(rate, delay, size, args.rounds, args.keep, compression)
                    if first is None:
                        first = (sent, round_s)
                        continue
                    print(
                        f"    {compression} against the first: {first[0] / sent:.2f}x fewer "
                        f"bytes, rounds {first[1] / round_s:.2f}x shorter",
                        flush=True,
                    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
