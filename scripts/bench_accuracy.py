"""Accuracy of the peers against the centralised model, over several seeds.

Runs ``p2pfl harness`` (real processes) once per seed for each setting given and prints,
per setting: the peers' mean and min final test accuracy (R^2 for a regression set), the
centralised model's at equal epochs (its final and its best epoch), the ratio, the median
round time and the share of it spent training.

    python scripts/bench_accuracy.py --dataset digits --partition dirichlet:0.5 \\
        --rounds 30 --seeds 1,2,3 [--batch-size 8] [--peers 8] [--topology k-regular:4]
    python scripts/bench_accuracy.py --dataset fashion-mnist --partition dirichlet:0.5 \\
        --model torch:cnn --seeds 1,2      # the PyTorch CNN (needs the torch extra)
    python scripts/bench_accuracy.py --partition dirichlet:0.5 --batch-size 8 \\
        --compressions none,fp16,int8,topk:0.1   # issue 22: compression against none

With several ``--compressions`` it ends with a comparison: each one's accuracy against
the first's (at equal rounds), the bytes sent, and the accuracy at equal bytes: each
setting's mean accuracy at the round where its cumulative bytes reached what the
cheapest setting sent in all its rounds.

Every extra argument after ``--`` goes to the harness unchanged. Summaries are kept under
--out (default runs/bench-accuracy-<time>), one folder per run.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", default="digits")
    parser.add_argument("--partition", default="iid")
    parser.add_argument("--peers", type=int, default=8)
    parser.add_argument("--topology", default="k-regular:4")
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--seeds", default="1,2,3")
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--learning-rate", type=float)
    parser.add_argument("--model")
    parser.add_argument("--compressions", default="none", help="comma-separated")
    parser.add_argument("--out")
    parser.add_argument("extra", nargs="*", help="more harness arguments (after --)")
    args = parser.parse_args()
    out = Path(args.out or f"runs/bench-accuracy-{time.strftime('%Y%m%d-%H%M%S')}")
    out.mkdir(parents=True, exist_ok=True)
    compressions = args.compressions.split(",")
    results: dict[str, list[dict]] = {}  # type: ignore[type-arg]
    for compression in compressions:
        rows = run_setting(args, out, compression)
        if rows is None:
            return 1
        results[compression] = rows
    if len(compressions) > 1:
        compare(results)
    return 0


def run_setting(args: argparse.Namespace, out: Path, compression: str) -> list[dict] | None:  # type: ignore[type-arg]
    rows = []
    for seed in [int(s) for s in args.seeds.split(",")]:
        name = f"{args.dataset.split(':')[0]}-{args.partition}-seed{seed}"
        if compression != "none":
            name += f"-{compression.replace(':', '')}"
        run = out / name
        command = [
            *(sys.executable, "-m", "p2pfl", "-q", "harness", "--out", str(run)),
            *("--dataset", args.dataset, "--partition", args.partition),
            *("--peers", str(args.peers), "--topology", args.topology),
            *("--rounds", str(args.rounds), "--seed", str(seed)),
            *("--compression", compression),
        ]
        if args.batch_size:
            command += ["--batch-size", str(args.batch_size)]
        if args.learning_rate:
            command += ["--learning-rate", str(args.learning_rate)]
        if args.model:
            command += ["--model", args.model]
        command += args.extra
        done = subprocess.run(command, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            print(done.stdout, done.stderr, file=sys.stderr)
            return None
        summary = json.loads((run / "summary.json").read_text())
        rows.append(summary)
        m = summary.get("metric", "accuracy")
        print(
            f"{compression} seed {seed}: {m} mean {summary[m]['mean']:.4f} "
            f"min {summary[m]['min']:.4f} "
            f"centralised {summary[f'centralized_{m}']:.4f} "
            f"(best {summary[f'centralized_best_{m}']:.4f}) "
            f"ratio {summary['ratio']:.4f} "
            f"round {summary['round_time_s'] * 1000:.1f} ms "
            f"train {summary['train_share'] * 100:.0f}% wall {summary['wall_s']:.1f} s "
            f"sent {summary['bytes_sent'] / 1e6:.2f} MB",
            flush=True,
        )
    m = rows[0].get("metric", "accuracy")
    ratios = [r["ratio"] for r in rows]
    best_ratios = [r[m]["mean"] / r[f"centralized_best_{m}"] for r in rows]
    print(
        f"\n{args.dataset} {args.partition}, {args.peers} peers {args.topology}, "
        f"{args.model or 'mlp:64'}, {args.rounds} rounds, compression {compression}, "
        f"{len(rows)} seeds: ratio mean "
        f"{statistics.fmean(ratios):.4f} (min {min(ratios):.4f}); vs the centralised best "
        f"epoch {statistics.fmean(best_ratios):.4f}; peers' mean {m} "
        f"{statistics.fmean(r[m]['mean'] for r in rows):.4f}; centralised "
        f"{statistics.fmean(r[f'centralized_{m}'] for r in rows):.4f}; median round "
        f"{statistics.median(r['round_time_s'] for r in rows) * 1000:.1f} ms, training "
        f"{statistics.median(r['train_share'] for r in rows) * 100:.0f}% of it\n",
        flush=True,
    )
    return rows


def mean_curve(summary: dict, metric: str) -> list[float]:  # type: ignore[type-arg]
    """The peers' mean score after each round."""
    curves = [c for c in summary[f"{metric}_per_round"].values() if None not in c]
    return [statistics.fmean(values) for values in zip(*curves, strict=True)]


def at_bytes(summary: dict, metric: str, budget: float) -> float:  # type: ignore[type-arg]
    """The mean score at the last round whose cumulative bytes stay within ``budget``."""
    curve, spent, score = mean_curve(summary, metric), 0, float("nan")
    for value, sent in zip(curve, summary["bytes_sent_per_round"], strict=False):
        spent += sent
        if spent > budget * 1.0001:
            break
        score = value
    return score


def compare(results: dict[str, list[dict]]) -> None:  # type: ignore[type-arg]
    first = next(iter(results))
    m = results[first][0].get("metric", "accuracy")
    mean = {c: statistics.fmean(r[m]["mean"] for r in rows) for c, rows in results.items()}
    sent = {c: statistics.fmean(r["bytes_sent"] for r in rows) for c, rows in results.items()}
    budget = min(sent.values())
    print(f"compared with {first} (means over seeds); equal bytes: {budget / 1e6:.2f} MB")
    for compression, rows in results.items():
        equal = statistics.fmean(at_bytes(r, m, budget) for r in rows)
        print(
            f"{compression:>10}: {m} {mean[compression]:.4f} "
            f"({mean[compression] - mean[first]:+.4f} at equal rounds), "
            f"sent {sent[compression] / 1e6:7.2f} MB ({sent[first] / sent[compression]:4.1f}x "
            f"fewer), {m} at equal bytes {equal:.4f}"
        )


if __name__ == "__main__":
    sys.exit(main())
