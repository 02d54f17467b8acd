"""Per-peer totals over merged event logs: the first thing to look at after a run."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from p2pfl.logs.read import Event, finite


@dataclass(frozen=True, slots=True)
class PeerSummary:
    """What one node's own log says about it. ``None`` means the log has no such event."""

    peer: str
    rounds: int
    sent: int
    received: int
    bytes_sent: int
    bytes_received: int
    rejections: int
    reconnects: int
    mean_round_s: float | None
    mean_train_s: float | None
    train_share: float | None
    last_accuracy: float | None
    peak_rss_mb: float | None
    finished: bool | None
    stop_reason: str | None
    #: Differential privacy spent so far (the last train event's), if the network uses it.
    dp_epsilon: float | None = None
    dp_delta: float | None = None
    #: Mean CPU time of the node's process per round (all threads; logs from before
    #: round_end carried ``cpu_s`` have none).
    mean_round_cpu_s: float | None = None
    #: Regression networks: the latest eval's R^2 (their ``accuracy`` stays None).
    last_r2: float | None = None
    #: Neighbours this node logged ``suspect`` events for (robust aggregation kept
    #: rejecting their updates), sorted.
    suspects: list[str] = field(default_factory=list)


def _number(value: Any) -> float | None:
    return finite(value)


def _mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


def summarize(events: Iterable[Event]) -> list[PeerSummary]:
    """One summary per node that wrote events, sorted by node id. Expects causal order, so
    "last accuracy" and "finished" come from the node's latest eval and node_stop."""
    by_node: dict[str, list[Event]] = defaultdict(list)
    for event in events:
        by_node[event.node].append(event)
    return [_summarize_node(node, by_node[node]) for node in sorted(by_node)]


def _summarize_node(node: str, events: list[Event]) -> PeerSummary:
    counts: dict[str, int] = defaultdict(int)
    nbytes = {"send": 0, "recv": 0}
    round_times: dict[int | None, float] = {}
    round_durations: list[float] = []
    round_cpu: list[float] = []
    train_times: dict[int | None, list[float]] = defaultdict(list)
    handshake_peers: set[str] = set()
    accuracy: float | None = None
    r2: float | None = None
    suspects: set[str] = set()
    peak: float | None = None
    finished: bool | None = None
    stop_reason: str | None = None
    dp_epsilon: float | None = None
    dp_delta: float | None = None
    for e in events:
        counts[e.type] += 1
        if e.type in nbytes:
            size = _number(e.get("bytes"))
            nbytes[e.type] += int(size) if size is not None else 0
        elif e.type == "round_end":
            duration = _number(e.get("duration_s"))
            if duration is not None:
                round_durations.append(duration)
                round_times[e.round] = duration
            cpu = _number(e.get("cpu_s"))
            if cpu is not None:
                round_cpu.append(cpu)
        elif e.type == "train":
            duration = _number(e.get("duration_s"))
            if duration is not None:
                train_times[e.round].append(duration)
            if _number(e.get("dp_epsilon")) is not None:
                dp_epsilon = _number(e.get("dp_epsilon"))
                dp_delta = _number(e.get("dp_delta"))
        elif e.type == "handshake_ok":
            handshake_peers.add(str(e.get("peer", e.get("addr", "?"))))
        elif e.type == "suspect":
            suspects.add(str(e.get("peer", "?")))
        elif e.type == "eval":
            accuracy = _number(e.get("accuracy"))
            r2 = _number(e.get("r2"))
        elif e.type == "node_stop":
            rss = _number(e.get("peak_rss_mb"))
            if rss is not None:
                peak = rss if peak is None else max(peak, rss)
            done = e.get("finished")
            finished = done if isinstance(done, bool) else None
            reason = e.get("reason")
            stop_reason = reason if isinstance(reason, str) else None
    # The share counts training only in rounds that ended, so an interrupted last round
    # does not inflate it.
    completed_train = sum(sum(train_times[r]) for r in round_times if r in train_times)
    completed_round = sum(round_times.values())
    return PeerSummary(
        peer=node,
        rounds=counts["round_end"],
        sent=counts["send"],
        received=counts["recv"],
        bytes_sent=nbytes["send"],
        bytes_received=nbytes["recv"],
        rejections=counts["reject"],
        reconnects=counts["handshake_ok"] - len(handshake_peers),
        mean_round_s=_mean(round_durations),
        mean_train_s=_mean([t for times in train_times.values() for t in times]),
        train_share=completed_train / completed_round if completed_round > 0 else None,
        last_accuracy=accuracy,
        peak_rss_mb=peak,
        finished=finished,
        stop_reason=stop_reason,
        dp_epsilon=dp_epsilon,
        dp_delta=dp_delta,
        mean_round_cpu_s=_mean(round_cpu),
        last_r2=r2,
        suspects=sorted(suspects),
    )


def human_bytes(n: float) -> str:
    """1536 -> '1.5 KB' (powers of 1024, as ``ls -h``)."""
    value = float(n)
    for unit in ("B", "KB", "MB", "GB"):
        if abs(value) < 1024 or unit == "GB":
            return f"{int(value)} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def _opt(value: float | None, fmt: str, scale: float = 1.0) -> str:
    return "-" if value is None else format(value * scale, fmt)


_COLUMNS = (
    ("peer", "<"),
    ("rounds", ">"),
    ("sent", ">"),
    ("recv", ">"),
    ("bytes sent", ">"),
    ("bytes recv", ">"),
    ("rejects", ">"),
    ("reconn", ">"),
    ("round ms", ">"),
    ("cpu ms", ">"),
    ("train ms", ">"),
    ("train %", ">"),
    ("accuracy", ">"),
    ("peak RSS", ">"),
    ("finished", "<"),
)


def _row(s: PeerSummary) -> list[str]:
    return [
        s.peer,
        str(s.rounds),
        str(s.sent),
        str(s.received),
        human_bytes(s.bytes_sent),
        human_bytes(s.bytes_received),
        str(s.rejections),
        str(s.reconnects),
        _opt(s.mean_round_s, ".1f", 1000),
        _opt(s.mean_round_cpu_s, ".1f", 1000),
        _opt(s.mean_train_s, ".1f", 1000),
        _opt(s.train_share, ".0f", 100),
        _opt(s.last_accuracy, ".4f"),
        "-" if s.peak_rss_mb is None else f"{s.peak_rss_mb:.0f} MB",
        "-" if s.finished is None else "yes" if s.finished else "no",
    ]


def format_summary(summaries: Sequence[PeerSummary]) -> str:
    """A plain-text table, one row per peer, columns padded to their widest cell."""
    columns = list(_COLUMNS)
    rows = [[name for name, _ in columns]] + [_row(s) for s in summaries]
    if any(s.last_r2 is not None for s in summaries):  # a regression network
        at = [name for name, _ in columns].index("accuracy") + 1
        columns.insert(at, ("R^2", ">"))
        rows[0].insert(at, "R^2")
        for row, s in zip(rows[1:], summaries, strict=True):
            row.insert(at, _opt(s.last_r2, ".4f"))
    if any(s.suspects for s in summaries):  # robust aggregation found lying neighbours
        columns.append(("suspects", "<"))
        rows[0].append("suspects")
        for row, s in zip(rows[1:], summaries, strict=True):
            row.append(",".join(s.suspects) or "-")
    if any(s.dp_epsilon is not None for s in summaries):  # a DP network: its budget so far
        columns.append(("epsilon", ">"))
        rows[0].append("epsilon")
        for row, s in zip(rows[1:], summaries, strict=True):
            row.append(_opt(s.dp_epsilon, ".2f"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(columns))]
    lines = [
        "  ".join(
            format(cell, f"{align}{width}")
            for cell, (_, align), width in zip(row, columns, widths, strict=True)
        ).rstrip()
        for row in rows
    ]
    deltas = {s.dp_delta for s in summaries if s.dp_delta is not None}
    if deltas:
        lines.append(f"epsilon: differential privacy spent so far, at delta {min(deltas):g}")
    if any(s.finished is None for s in summaries):
        lines.append("finished '-': no node_stop logged (still running, or killed)")
    return "\n".join(lines)


def summary_json(summaries: Sequence[PeerSummary]) -> list[dict[str, Any]]:
    """The JSON form: one object per peer, durations in seconds, sizes in bytes."""
    return [asdict(s) for s in summaries]
