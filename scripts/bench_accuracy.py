"""Accuracy of the peers against the centralised model, over several seeds.

Runs ``p2pfl harness`` (real processes) once per seed for each setting given and prints,
per setting: the peers' mean and min final test accuracy (R^2 for a regression set), the
centralised model's at equal epochs (its final and its best epoch), the ratio, the median
round time and the share of it spent training.

    python scripts/bench_accuracy.py --dataset digits --partition dirichlet:0.5 \\
        --rounds 30 --seeds 1,2,3 [--batch-size 8] [--peers 8] [--topology k-regular:4]
    python scripts/bench_accuracy.py --dataset fashion-mnist --partition dirichlet:0.5 \\
        --model torch:cnn --seeds 1,2      # the PyTorch CNN (needs the torch extra)

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
    parser.add_argument("--out")
    parser.add_argument("extra", nargs="*", help="more harness arguments (after --)")
    args = parser.parse_args()
    out = Path(args.out or f"runs/bench-accuracy-{time.strftime('%Y%m%d-%H%M%S')}")
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for seed in [int(s) for s in args.seeds.split(",")]:
        run = out / f"{args.dataset.split(':')[0]}-{args.partition}-seed{seed}"
        command = [
            *(sys.executable, "-m", "p2pfl", "-q", "harness", "--out", str(run)),
            *("--dataset", args.dataset, "--partition", args.partition),
            *("--peers", str(args.peers), "--topology", args.topology),
            *("--rounds", str(args.rounds), "--seed", str(seed)),
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
            return 1
        summary = json.loads((run / "summary.json").read_text())
        rows.append(summary)
        m = summary.get("metric", "accuracy")
        print(
            f"seed {seed}: {m} mean {summary[m]['mean']:.4f} "
            f"min {summary[m]['min']:.4f} "
            f"centralised {summary[f'centralized_{m}']:.4f} "
            f"(best {summary[f'centralized_best_{m}']:.4f}) "
            f"ratio {summary['ratio']:.4f} "
            f"round {summary['round_time_s'] * 1000:.1f} ms "
            f"train {summary['train_share'] * 100:.0f}% wall {summary['wall_s']:.1f} s",
            flush=True,
        )
    m = rows[0].get("metric", "accuracy")
    ratios = [r["ratio"] for r in rows]
    best_ratios = [r[m]["mean"] / r[f"centralized_best_{m}"] for r in rows]
    print(
        f"\n{args.dataset} {args.partition}, {args.peers} peers {args.topology}, "
        f"{args.model or 'mlp:64'}, {args.rounds} rounds, {len(rows)} seeds: ratio mean "
        f"{statistics.fmean(ratios):.4f} (min {min(ratios):.4f}); vs the centralised best "
        f"epoch {statistics.fmean(best_ratios):.4f}; peers' mean {m} "
        f"{statistics.fmean(r[m]['mean'] for r in rows):.4f}; centralised "
        f"{statistics.fmean(r[f'centralized_{m}'] for r in rows):.4f}; median round "
        f"{statistics.median(r['round_time_s'] for r in rows) * 1000:.1f} ms, training "
        f"{statistics.median(r['train_share'] for r in rows) * 100:.0f}% of it"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
