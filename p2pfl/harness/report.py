"""The result of a harness run: final test accuracy of every peer against the centralised
baseline, round times, traffic, faults; printed as a table and written as summary.json and
report.png.
"""

from __future__ import annotations

import json
import os
import statistics
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from p2pfl.harness.baseline import BaselineResult
from p2pfl.learning.base import Evaluation
from p2pfl.logs.read import Event, finite
from p2pfl.logs.summary import bytes_per_round, summarize

#: As in ``p2pfl logs`` (and ``ls -h``): 1 MB = 2**20 bytes.
MB = 2**20


#: The headline metric's label in tables and plots.
METRIC_LABELS = {"accuracy": "accuracy", "r2": "R^2"}


@dataclass(frozen=True)
class PeerResult:
    peer: str
    samples: int
    classes_held: int
    rounds_done: int
    #: Of the model in the peer's last checkpoint, on the held-out test set: accuracy, or
    #: R^2 for regression.
    test_score: float | None
    bytes_sent: int
    bytes_received: int
    median_round_s: float | None
    train_share: float | None
    peak_rss_mb: float | None
    finished: bool
    #: Regression only: the test mean squared error.
    test_mse: float | None = None


def final_models(
    state_dirs: Mapping[str, Path], config_path: Path, warn: Callable[[str], None]
) -> tuple[dict[str, np.ndarray], Any]:
    """Each peer's last checkpointed model. Peers without a checkpoint are left out, and
    so are those whose checkpoint a node would refuse (a model diverged to NaN): ``warn``
    says which and why, and the rest of the report is still made."""
    from p2pfl.config import load_config
    from p2pfl.learning import build_learner, flatten
    from p2pfl.store.checkpoint import CheckpointError, load_checkpoint

    config = load_config(config_path)
    learner = build_learner(
        config.training.model.as_mapping(),
        config.seed,
        source="harness",
        torch_threads=os.cpu_count() or 1,
    )
    size = flatten(learner.get_weights()).size
    models: dict[str, np.ndarray] = {}
    for peer, state in state_dirs.items():
        try:
            checkpoint = load_checkpoint(state, expected_digest=config.digest, expected_size=size)
        except CheckpointError as exc:
            warn(f"{peer}: no test score: {exc}")
            continue
        if checkpoint is not None:
            models[peer] = checkpoint.params
    return models, learner


def test_evaluation(learner: Any, params: np.ndarray, x: np.ndarray, y: np.ndarray) -> Evaluation:
    """The model ``params`` on the test set (accuracy, or R^2 and MSE for regression)."""
    from p2pfl.learning import unflatten

    learner.set_weights(unflatten(params, learner.get_weights()))
    result: Evaluation = learner.evaluate(x, y)
    return result


def consensus_distance(
    state_dirs: Mapping[str, Path], rounds: int, size: int, events: Sequence[Event]
) -> list[float | None]:
    """Per round: the root-mean-square distance of the peers' models from their average,
    relative to the average's norm (0 = everyone agrees). From ``--snapshots`` records of
    the rounds each peer completed (a peer that was down for a round has none)."""
    from p2pfl.store.checkpoint import SNAPSHOTS_NAME

    done = {(e.node, e.round) for e in events if e.type == "round_end"}
    record_bytes = size * 4
    snapshots = {}
    for peer, state in state_dirs.items():
        path = state / SNAPSHOTS_NAME
        if path.exists() and path.stat().st_size >= record_bytes:
            snapshots[peer] = np.memmap(path, dtype="<f4", mode="r")
    distances: list[float | None] = []
    for r in range(rounds):
        vectors = [
            np.asarray(data[r * size : (r + 1) * size], dtype=np.float64)
            for peer, data in snapshots.items()
            if (peer, r) in done and data.size >= (r + 1) * size
        ]
        if len(vectors) < 2:
            distances.append(None)
            continue
        stacked = np.stack(vectors)
        mean = stacked.mean(axis=0)
        rms = float(np.sqrt(np.mean(np.sum((stacked - mean) ** 2, axis=1))))
        norm = float(np.linalg.norm(mean))
        distances.append(rms / norm if norm > 0 else rms)
    return distances


def per_round_score(
    events: Sequence[Event], peers: Sequence[str], metric: str = "accuracy"
) -> dict[str, list[Any]]:
    """Test accuracy (or ``metric``) after each round, per peer (None where the peer did
    not evaluate)."""
    rounds = 1 + max(
        (e.round for e in events if e.type == "eval" and e.round is not None), default=-1
    )
    table: dict[str, list[Any]] = {p: [None] * rounds for p in peers}
    for e in events:
        if e.type == "eval" and e.round is not None and e.node in table:
            table[e.node][e.round] = e.get(metric)
    return table


def _number(value: Any) -> float:
    """A finite number from a log field, else 0 (the logs are read as untrusted)."""
    return finite(value) or 0.0


def peer_stats(events: Sequence[Event]) -> dict[str, dict[str, Any]]:
    grouped: dict[str, dict[str, Any]] = defaultdict(
        lambda: {"sent": 0, "recv": 0, "rounds": [], "trains": [], "rss": None, "finished": False}
    )
    for e in events:
        s = grouped[e.node]
        if e.type == "send":
            s["sent"] += int(_number(e.get("bytes")))
        elif e.type == "recv":
            s["recv"] += int(_number(e.get("bytes")))
        elif e.type == "round_end":
            s["rounds"].append(_number(e.get("duration_s")))
        elif e.type == "train":
            s["trains"].append(_number(e.get("duration_s")))
        elif e.type == "node_stop":
            s["rss"] = e.get("peak_rss_mb")
            s["finished"] = bool(e.get("finished"))
    return grouped


def build_summary(
    *,
    options: Mapping[str, Any],
    peers: Sequence[PeerResult],
    events: Sequence[Event],
    baseline: BaselineResult | None,
    consensus: Sequence[float | None],
    wall_s: float,
    record: Mapping[str, Any],
    metric: str = "accuracy",
) -> dict[str, Any]:
    """Everything summary.json holds (plain JSON types only).

    The headline metric is ``metric``: ``accuracy`` (classification) or ``r2`` (regression);
    the keys that carry it are named after it (``accuracy``, ``centralized_accuracy``,
    ``accuracy_per_round``, peers' ``test_accuracy``; or ``r2``, ``centralized_r2`` ...).
    """
    m = metric
    # Poisoning peers (--byzantine) are not what the network is for: left out of the mean.
    attackers = set(options.get("byzantine") or {})
    headline, mean = _headline_score(peers, attackers)
    summary: dict[str, Any] = {
        **options,
        "metric": m,
        "wall_s": round(wall_s, 3),
        m: headline,
        **_baseline_scores(baseline, m, mean),
        **_round_times(events),
        "bytes_sent": sum(p.bytes_sent for p in peers),
        "bytes_received": sum(p.bytes_received for p in peers),
        **_bytes(events, int(options.get("rounds") or 0)),
        "peak_rss_mb": {
            "per_peer": {p.peer: p.peak_rss_mb for p in peers},
            "max": max((p.peak_rss_mb or 0.0 for p in peers), default=0.0),
            "total_sampled": record.get("peak_total_rss_mb"),
        },
        "peers_cpu_s": record.get("peers_cpu_s"),
        "peers_detail": [_peer_detail(p, m) for p in peers],
        f"{m}_per_round": per_round_score(events, [p.peer for p in peers], m),
        "consensus_distance": [None if d is None else float(f"{d:.6g}") for d in consensus],
        f"centralized_{m}_per_epoch": (
            [round(a, 6) for a in baseline.score_per_epoch] if baseline else None
        ),
        "privacy": privacy_spent(events),
        "faults": record.get("faults", []),
        "faults_not_done": record.get("faults_not_done", []),
        "exit_codes": record.get("exit_codes", {}),
        "log_problems": record.get("log_problems", []),
        "stranded": record.get("stranded", []),
        # Ctrl-C or SIGTERM stopped the run: these are the rounds done until then.
        "interrupted": bool(record.get("interrupted", False)),
    }
    return summary


def _headline_score(
    peers: Sequence[PeerResult], attackers: set[str]
) -> tuple[dict[str, Any], float | None]:
    """The headline entry (every peer's test score; mean, min and max over the honest
    peers) and the mean, which the baseline ratio needs too. Counted are the honest peers
    that finished or, when none did, every honest peer with a checkpoint (``over`` says
    which)."""
    finals = {p.peer: p.test_score for p in peers if p.test_score is not None}
    honest = [p for p in peers if p.peer not in attackers]
    finished = [p.test_score for p in honest if p.finished and p.test_score is not None]
    counted = finished or [p.test_score for p in honest if p.test_score is not None]
    over = "peers that finished" if finished else "all peers with a checkpoint"
    mean = statistics.fmean(counted) if counted else None
    headline = {
        "per_peer": {k: round(v, 6) for k, v in finals.items()},
        "mean": None if mean is None else round(mean, 6),
        "min": round(min(counted), 6) if counted else None,
        "max": round(max(counted), 6) if counted else None,
        "over": f"honest {over}" if attackers else over,
    }
    return headline, mean


def _baseline_scores(baseline: BaselineResult | None, m: str, mean: float | None) -> dict[str, Any]:
    """The centralised model's results and the peers' mean as a fraction of its score: the
    question a run answers is how close decentralised training gets to pooled data."""
    central = baseline.final_score if baseline else None
    return {
        f"centralized_{m}": None if central is None else round(central, 6),
        f"centralized_best_{m}": round(baseline.best_score, 6) if baseline else None,
        "centralized_epochs": baseline.epochs if baseline else None,
        "centralized_seconds": round(baseline.seconds, 3) if baseline else None,
        "ratio": round(mean / central, 6) if mean is not None and central else None,
    }


def _bytes(events: Sequence[Event], rounds: int) -> dict[str, Any]:
    """Parameter bytes all peers sent in each round, and how many times fewer than float32
    models would have taken (1.0 without compression)."""
    summaries = summarize(events)
    ratio = [s.compression_ratio for s in summaries if s.compression_ratio is not None]
    return {
        "bytes_sent_per_round": bytes_per_round(events, rounds),
        "compression_ratio": round(statistics.fmean(ratio), 4) if ratio else None,
    }


def _compressed(summary: Mapping[str, Any]) -> str:
    """ " (int8: 3.9x fewer bytes than float32)", or nothing without compression."""
    compression, ratio = summary.get("compression"), summary.get("compression_ratio")
    if compression in (None, "none") or ratio is None:
        return ""
    return f" ({compression}: {ratio:.1f}x fewer bytes than float32)"


def _round_times(events: Sequence[Event]) -> dict[str, Any]:
    """Round durations (median, mean, 90th percentile) and the share of a round spent
    training, over every peer's rounds."""
    durations = [_number(e.get("duration_s")) for e in events if e.type == "round_end"]
    trains = [_number(e.get("duration_s")) for e in events if e.type == "train"]
    return {
        "round_time_s": round(statistics.median(durations), 6) if durations else None,
        "round_time_s_mean": round(statistics.fmean(durations), 6) if durations else None,
        "round_time_s_p90": round(float(np.percentile(durations, 90)), 6) if durations else None,
        # median training time / median round time: one slow round (a dead neighbour's grace)
        # would otherwise dominate a ratio of sums
        "train_share": (
            round(statistics.median(trains) / statistics.median(durations), 4)
            if trains and durations and statistics.median(durations) > 0
            else None
        ),
    }


def _peer_detail(p: PeerResult, m: str) -> dict[str, Any]:
    """One peer's row of ``peers_detail`` (``test_mse`` only for regression)."""
    return {
        "peer": p.peer,
        "samples": p.samples,
        "classes_held": p.classes_held,
        "rounds_done": p.rounds_done,
        f"test_{m}": p.test_score,
        **({} if p.test_mse is None else {"test_mse": round(p.test_mse, 6)}),
        "bytes_sent": p.bytes_sent,
        "bytes_received": p.bytes_received,
        "median_round_s": p.median_round_s,
        "train_share": p.train_share,
        "finished": p.finished,
    }


def privacy_spent(events: Sequence[Event]) -> dict[str, Any] | None:
    """The largest (epsilon, delta) any peer has spent (from its last train event)."""
    latest: dict[str, tuple[float, float]] = {}
    for e in events:
        eps, delta = finite(e.get("dp_epsilon")), finite(e.get("dp_delta"))
        if e.type == "train" and eps is not None and delta is not None:
            latest[e.node] = (eps, delta)
    if not latest:
        return None
    return {
        "epsilon": max(eps for eps, _ in latest.values()),
        "delta": max(delta for _, delta in latest.values()),
        "per_peer": {peer: eps for peer, (eps, _) in sorted(latest.items())},
    }


def write_summary(path: Path, summary: Mapping[str, Any]) -> None:
    path.write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def render_table(summary: Mapping[str, Any]) -> str:
    """The human result: one row per peer, then the comparison with the centralised model."""
    m = summary.get("metric", "accuracy")
    label = METRIC_LABELS.get(m, m)
    held = "classes" if m == "accuracy" else "bins"
    short = "test acc" if m == "accuracy" else f"test {label}"
    rows = [
        f"{'peer':<5} {'samples':>7} {held:>7} {'rounds':>6} {short:>8} "
        f"{'sent MB':>8} {'recv MB':>8} {'round ms':>8} {'train %':>7}"
    ]
    for p in summary["peers_detail"]:
        median = p["median_round_s"]
        share = p["train_share"]
        rows.append(
            f"{p['peer']:<5} {p['samples']:>7} {p['classes_held']:>7} {p['rounds_done']:>6} "
            f"{_fmt(p[f'test_{m}'], '.4f'):>8} {p['bytes_sent'] / MB:>8.2f} "
            f"{p['bytes_received'] / MB:>8.2f} "
            f"{_fmt(None if median is None else median * 1000, '.1f'):>8} "
            f"{_fmt(None if share is None else share * 100, '.0f'):>7}"
        )
    acc = summary[m]
    rows.append("")
    rows.append(
        f"peers' test {label}: mean {_fmt(acc['mean'], '.4f')}, min {_fmt(acc['min'], '.4f')}"
        f" ({acc['over']})"
    )
    attackers = summary.get("byzantine") or {}
    if attackers:
        rows.append(
            "byzantine, left out of the mean: "
            + ", ".join(f"{peer} ({kind})" for peer, kind in sorted(attackers.items()))
            + f"; rule {summary.get('rule', 'metropolis')}"
        )
    mses = [p["test_mse"] for p in summary["peers_detail"] if p.get("test_mse") is not None]
    if mses:
        rows.append(f"peers' test MSE: mean {statistics.fmean(mses):.4f}, max {max(mses):.4f}")
    if summary[f"centralized_{m}"] is not None:
        rows.append(
            f"centralised model (same learner, pooled data, {summary['centralized_epochs']} "
            f"epochs): {summary[f'centralized_{m}']:.4f}"
            f"  ->  ratio {_fmt(summary['ratio'], '.4f')}"
        )
    median = summary["round_time_s"]
    share = summary["train_share"]
    rows.append(
        f"round time: median {_fmt(None if median is None else median * 1000, '.1f')} ms, "
        f"training {_fmt(None if share is None else share * 100, '.0f')}% of it; "
        f"wall {summary['wall_s']:.1f} s; {summary['bytes_sent'] / MB:.1f} MB of parameters sent"
        + _compressed(summary)
    )
    rss = summary["peak_rss_mb"]
    rows.append(
        f"memory: peak {rss['max']:.0f} MB per peer, {_fmt(rss['total_sampled'], '.0f')} MB "
        "all peers together"
    )
    if summary.get("hosts"):
        rows.append(f"hosts: a network namespace per peer; links {summary['hosts']}")
    rows.extend(_fault_lines(summary["faults"]))
    if summary.get("privacy"):
        privacy = summary["privacy"]
        rows.append(
            f"differential privacy spent: epsilon {privacy['epsilon']:.2f} at delta "
            f"{privacy['delta']:g} (the most of any peer)"
        )
    for peer in summary["stranded"]:
        rows.append(f"{peer} was stopped early: none of its neighbours was running any more")
    for fault in summary["faults_not_done"]:
        rows.append(f"fault not carried out (the run ended first): {fault}")
    if summary["log_problems"]:
        rows.append(f"{len(summary['log_problems'])} bad log lines skipped (see summary.json)")
    return "\n".join(rows)


def _fault_lines(faults: Sequence[Mapping[str, Any]]) -> list[str]:
    """One line per fault the harness carried out: when, and how it ended."""
    rows = []
    for fault in faults:
        line = f"fault: {fault['fault']} at {fault['at_s']:.2f} s (round {fault['round']})"
        if fault.get("rejoined_round") is not None:
            line += (
                f", back in round {fault['rejoined_round']} "
                f"{fault['rejoin_s']:.2f} s after the restart"
            )
        if fault.get("paused_s") is not None:
            line += f" (the others paused {fault['paused_s']:.2f} s while it started)"
        if fault.get("healed_s") is not None:
            line += f", healed at {fault['healed_s']:.2f} s (round {fault['healed_round']})"
        elif fault["fault"].startswith(("split", "cut")):
            line += ", never healed (the run ended first)"
        rows.append(line)
    return rows


def plot_report(summary: Mapping[str, Any], path: Path) -> Path:
    """report.png: test accuracy (regression: R^2) per round for each peer with the
    centralised curve, and the consensus distance per round."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    m = summary.get("metric", "accuracy")
    label = METRIC_LABELS.get(m, m)
    dist = summary["consensus_distance"]
    with_dist = any(d is not None for d in dist)  # (no snapshots: no empty panel)
    fig, axes = plt.subplots(1, 2 if with_dist else 1, figsize=(13 if with_dist else 7, 5))
    ax_acc = axes[0] if with_dist else axes
    attackers = summary.get("byzantine") or {}
    for peer, accs in summary[f"{m}_per_round"].items():
        xs = [r for r, a in enumerate(accs) if a is not None]
        ys = [a for a in accs if a is not None]
        if peer in attackers:
            name = f"{peer} (byzantine: {attackers[peer]})"
            ax_acc.plot(xs, ys, "r--", linewidth=1.5, label=name)
        else:
            ax_acc.plot(xs, ys, linewidth=1, alpha=0.7, label=peer)
    central = summary.get(f"centralized_{m}_per_epoch")
    if central:
        epochs_per_round = max(1, int(summary.get("local_epochs", 1)))
        # epoch e+1 of the baseline matches the end of round e (rounds count from 0)
        xs_central = [(e + 1) / epochs_per_round - 1 for e in range(len(central))]
        ax_acc.plot(xs_central, central, "k--", linewidth=2, label="centralised (same epochs)")
        ax_acc.axhline(central[-1], color="k", linewidth=0.8, alpha=0.5)
    for fault in summary.get("faults", []):
        color = "red" if fault["fault"].startswith("kill") else "green"
        if fault["fault"].startswith(("split", "cut")):  # a span: from the cut to the heal
            color = "purple"
            end = fault.get("healed_round")
            end = len(summary[f"{m}_per_round"]) - 1 if end is None else end
            ax_acc.axvspan(fault["round"], end, color=color, alpha=0.08)
        ax_acc.axvline(fault["round"], color=color, linestyle=":", linewidth=1)
        ax_acc.annotate(
            fault["fault"],
            (fault["round"], 0.02),
            xycoords=("data", "axes fraction"),
            rotation=90,
            fontsize=7,
            color=color,
        )
    ax_acc.set_xlabel("round (from 0, as in the event logs)")
    ax_acc.set_ylabel(f"test {label}")
    ax_acc.set_title(report_title(summary), fontsize=10)
    ax_acc.grid(alpha=0.3)
    if len(summary[f"{m}_per_round"]) <= 12:
        ax_acc.legend(fontsize=8, loc="lower right")
    else:  # (the attackers and the centralised curve keep their labels)
        handles, labels = ax_acc.get_legend_handles_labels()
        keep = [i for i, t in enumerate(labels) if "byzantine" in t or "centralised" in t]
        ax_acc.legend([handles[i] for i in keep], [labels[i] for i in keep], fontsize=8)
    if with_dist:
        _plot_distance(axes[1], dist)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def report_title(summary: Mapping[str, Any]) -> str:
    """What ran, in one or two lines: data, peers, topology, and every setting that changes
    what the curves mean (secure aggregation, DP, a robust rule, attackers, an interrupt)."""
    first = (
        f"{summary['dataset']}, {summary['partition']}, {summary['peers']} peers, "
        f"{summary['topology']}"
    )
    settings = []
    if summary.get("hosts"):
        settings.append(f"simulated hosts, {summary['hosts']}")
    if summary.get("secure"):
        settings.append("secure aggregation")
    if summary.get("dp"):
        dp = summary["dp"]
        settings.append(
            f"DP noise {dp.get('noise_multiplier', '?')}, clip {dp.get('clip_norm', '?')}"
        )
    if summary.get("rule") and summary.get("rule") != "metropolis":
        settings.append(f"rule {summary['rule']}")
    attackers = summary.get("byzantine") or {}
    if attackers:
        settings.append("byzantine " + ", ".join(f"{p}: {a}" for p, a in sorted(attackers.items())))
    if summary.get("faults"):
        settings.append(f"{len(summary['faults'])} fault(s) (dotted lines)")
    if summary.get("interrupted"):
        settings.append("INTERRUPTED: the rounds done")
    return first if not settings else first + "\n" + "; ".join(settings)


def _plot_distance(ax_dist: Any, dist: Sequence[float | None]) -> None:
    xs = [r for r, d in enumerate(dist) if d is not None]
    ys = [d for d in dist if d is not None]
    ax_dist.plot(xs, ys, "o-", markersize=3)
    if all(d > 0 for d in ys):
        ax_dist.set_yscale("log")
    ax_dist.set_xlabel("round (from 0, as in the event logs)")
    ax_dist.set_ylabel("RMS distance from the mean model / its norm")
    ax_dist.set_title("consensus distance (spread of the peers' models)")
    ax_dist.grid(alpha=0.3)


def write_rounds_csv(path: Path, summary: Mapping[str, Any]) -> Path:
    """rounds.csv: one row per round and peer (``round, peer, <metric>, consensus_distance``)
    for a spreadsheet or pandas; empty cells where a value is unknown."""
    import csv

    m = summary.get("metric", "accuracy")
    distance = summary.get("consensus_distance", [])
    with path.open("w", newline="", encoding="utf-8") as fh:
        out = csv.writer(fh)
        out.writerow(["round", "peer", m, "consensus_distance"])
        for peer, scores in sorted(summary[f"{m}_per_round"].items()):
            for r, score in enumerate(scores):
                d = distance[r] if r < len(distance) else None
                out.writerow([r, peer, "" if score is None else score, "" if d is None else d])
    return path
