"""Per-peer totals over merged event logs: the first thing to look at after a run."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
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
    #: Rounds aggregated with no neighbour's model (only the node's own).
    alone: int = 0
    #: Times a connected neighbour went silent past the failure detector's threshold
    #: (``suspect_link``).
    silences: int = 0
    #: ``aggregation.compression`` as the node logged it at start (None: an older log).
    compression: str | None = None
    #: The model's parameter count (node_start), for the float32 size of what was sent.
    parameters: int | None = None
    #: Compressed streams that were whole copies (a neighbour's copy was not in step).
    keyframes: int = 0

    @property
    def sent_per_round(self) -> float | None:
        """Parameter bytes sent per round (to all neighbours together)."""
        return self.bytes_sent / self.rounds if self.rounds else None

    @property
    def compression_ratio(self) -> float | None:
        """How many times fewer bytes went out than float32 models would have taken."""
        if not self.parameters or not self.bytes_sent:
            return None
        return self.sent * 4 * self.parameters / self.bytes_sent


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


@dataclass
class _Tally:
    """What one node's events add up to, one event at a time."""

    node: str
    counts: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    nbytes: dict[str, int] = field(default_factory=lambda: {"send": 0, "recv": 0})
    round_times: dict[int | None, float] = field(default_factory=dict)
    round_cpu: list[float] = field(default_factory=list)
    train_times: dict[int | None, list[float]] = field(default_factory=lambda: defaultdict(list))
    handshake_peers: set[str] = field(default_factory=set)
    suspects: set[str] = field(default_factory=set)
    alone: int = 0
    accuracy: float | None = None
    r2: float | None = None
    peak: float | None = None
    finished: bool | None = None
    stop_reason: str | None = None
    dp_epsilon: float | None = None
    dp_delta: float | None = None
    round_durations: list[float] = field(default_factory=list)
    compression: str | None = None
    parameters: int | None = None

    def add(self, e: Event) -> None:
        self.counts[e.type] += 1
        if e.type in self.nbytes:
            size = _number(e.get("bytes"))
            self.nbytes[e.type] += int(size) if size is not None else 0
            if e.type == "send" and e.get("keyframe") is True:
                self.counts["keyframe"] += 1
        elif e.type == "node_start":
            compression = e.get("compression")
            self.compression = compression[:32] if isinstance(compression, str) else None
            count = _number(e.get("parameters"))
            self.parameters = int(count) if count is not None and count > 0 else None
        elif e.type == "round_end":
            duration = _number(e.get("duration_s"))
            if duration is not None:
                self.round_durations.append(duration)
                self.round_times[e.round] = duration
            cpu = _number(e.get("cpu_s"))
            if cpu is not None:
                self.round_cpu.append(cpu)
        elif e.type == "train":
            duration = _number(e.get("duration_s"))
            if duration is not None:
                self.train_times[e.round].append(duration)
            if _number(e.get("dp_epsilon")) is not None:
                self.dp_epsilon = _number(e.get("dp_epsilon"))
                self.dp_delta = _number(e.get("dp_delta"))
        elif e.type == "handshake_ok":
            self.handshake_peers.add(str(e.get("peer", e.get("addr", "?"))))
        elif e.type == "aggregate":
            members = e.get("members")
            if isinstance(members, list) and not set(map(str, members)) - {self.node}:
                self.alone += 1
        elif e.type == "suspect":
            self.suspects.add(str(e.get("peer", "?")))
        elif e.type == "eval":
            self.accuracy = _number(e.get("accuracy"))
            self.r2 = _number(e.get("r2"))
        elif e.type == "node_stop":
            self._stopped(e)

    def _stopped(self, e: Event) -> None:
        rss = _number(e.get("peak_rss_mb"))
        if rss is not None:
            self.peak = rss if self.peak is None else max(self.peak, rss)
        done = e.get("finished")
        self.finished = done if isinstance(done, bool) else None
        reason = e.get("reason")
        self.stop_reason = reason if isinstance(reason, str) else None


def _summarize_node(node: str, events: list[Event]) -> PeerSummary:
    t = _Tally(node)
    for e in events:
        t.add(e)
    # The share counts training only in rounds that ended, so an interrupted last round
    # does not inflate it.
    completed_train = sum(sum(t.train_times[r]) for r in t.round_times if r in t.train_times)
    completed_round = sum(t.round_times.values())
    return PeerSummary(
        peer=node,
        rounds=t.counts["round_end"],
        sent=t.counts["send"],
        received=t.counts["recv"],
        bytes_sent=t.nbytes["send"],
        bytes_received=t.nbytes["recv"],
        rejections=t.counts["reject"],
        reconnects=t.counts["handshake_ok"] - len(t.handshake_peers),
        mean_round_s=_mean(t.round_durations),
        mean_train_s=_mean([x for times in t.train_times.values() for x in times]),
        train_share=completed_train / completed_round if completed_round > 0 else None,
        last_accuracy=t.accuracy,
        peak_rss_mb=t.peak,
        finished=t.finished,
        stop_reason=t.stop_reason,
        dp_epsilon=t.dp_epsilon,
        dp_delta=t.dp_delta,
        mean_round_cpu_s=_mean(t.round_cpu),
        last_r2=t.r2,
        suspects=sorted(t.suspects),
        alone=t.alone,
        silences=t.counts["suspect_link"],
        compression=t.compression,
        parameters=t.parameters,
        keyframes=t.counts["keyframe"],
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
    ("alone", ">"),
    ("sent", ">"),
    ("recv", ">"),
    ("bytes sent", ">"),
    ("bytes recv", ">"),
    ("sent/round", ">"),
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
        str(s.alone),
        str(s.sent),
        str(s.received),
        human_bytes(s.bytes_sent),
        human_bytes(s.bytes_received),
        "-" if s.sent_per_round is None else human_bytes(s.sent_per_round),
        str(s.rejections),
        str(s.reconnects),
        _opt(s.mean_round_s, ".1f", 1000),
        _opt(s.mean_round_cpu_s, ".1f", 1000),
        _opt(s.mean_train_s, ".1f", 1000),
        _opt(s.train_share, ".0f", 100),
        _opt(s.last_accuracy, ".4f"),
        "-" if s.peak_rss_mb is None else f"{s.peak_rss_mb:.0f} MB",
        "-" if s.finished is None else "alone" if s.stop_reason == "alone" else _yes(s.finished),
    ]


def _yes(flag: bool) -> str:
    return "yes" if flag else "no"


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
    if any(s.silences for s in summaries):  # links that went silent (a cut, a partition)
        columns.append(("silences", ">"))
        rows[0].append("silences")
        for row, s in zip(rows[1:], summaries, strict=True):
            row.append(str(s.silences))
    compressed = any(s.compression not in (None, "none") for s in summaries)
    if compressed:  # what each node sends, and how much smaller than float32 models
        columns.append(("compression", "<"))
        rows[0].append("compression")
        for row, s in zip(rows[1:], summaries, strict=True):
            ratio = s.compression_ratio
            row.append(f"{s.compression or '-'}" + ("" if ratio is None else f" {ratio:.1f}x"))
        columns.append(("keyframes", ">"))
        rows[0].append("keyframes")
        for row, s in zip(rows[1:], summaries, strict=True):
            row.append(str(s.keyframes))
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
    if compressed:
        lines.append(
            "compression: aggregation.compression, and how many times fewer bytes were sent "
            "than float32 models; keyframes: whole copies sent to a neighbour out of step"
        )
    if any(s.alone for s in summaries):
        lines.append("alone: rounds averaged with no neighbour's model")
    if any(s.silences for s in summaries):
        lines.append(
            "silences: neighbours suspected by the failure detector (connected, but silent "
            "for longer than their history makes plausible: suspect_link events)"
        )
    if any(s.stop_reason == "alone" for s in summaries):
        lines.append(
            "finished 'alone': stopped with exit code 3, too few neighbours "
            "(training.min_neighbours)"
        )
    if any(s.finished is None for s in summaries):
        lines.append("finished '-': no node_stop logged (still running, or killed)")
    return "\n".join(lines)


def summary_json(summaries: Sequence[PeerSummary]) -> list[dict[str, Any]]:
    """The JSON form: one object per peer, durations in seconds, sizes in bytes."""
    return [
        {
            **asdict(s),
            "sent_per_round": s.sent_per_round,
            "compression_ratio": s.compression_ratio,
        }
        for s in summaries
    ]


def bytes_per_round(events: Iterable[Event], rounds: int) -> list[int]:
    """Parameter bytes all nodes sent in each round (``send`` events), rounds 0..rounds-1."""
    totals = [0] * rounds
    for e in events:
        if e.type == "send" and isinstance(e.round, int) and 0 <= e.round < rounds:
            size = _number(e.get("bytes"))
            totals[e.round] += int(size) if size is not None else 0
    return totals


def run_totals(summaries: Sequence[PeerSummary]) -> dict[str, Any]:
    """One run in a few numbers (``logs compare``): over its peers, the round count, mean
    round and CPU time, bytes, rejects, rounds averaged alone, and the last accuracy (or
    R^2) as a mean and a minimum."""
    scores = [s.last_r2 if s.last_r2 is not None else s.last_accuracy for s in summaries]
    known = [x for x in scores if x is not None]
    rounds = [s.mean_round_s for s in summaries if s.mean_round_s is not None]
    cpu = [s.mean_round_cpu_s for s in summaries if s.mean_round_cpu_s is not None]
    return {
        "peers": len(summaries),
        "finished": sum(1 for s in summaries if s.finished),
        "rounds": max((s.rounds for s in summaries), default=0),
        "round_ms": None if not rounds else 1000 * sum(rounds) / len(rounds),
        "cpu_ms": None if not cpu else 1000 * sum(cpu) / len(cpu),
        "bytes_sent": sum(s.bytes_sent for s in summaries),
        "bytes_per_round": None
        if not any(s.rounds for s in summaries)
        else sum(s.bytes_sent for s in summaries) / max(s.rounds for s in summaries),
        "compression": ", ".join(sorted({s.compression or "none" for s in summaries})) or "-",
        "rejects": sum(s.rejections for s in summaries),
        "alone": sum(s.alone for s in summaries),
        "metric": "R^2" if any(s.last_r2 is not None for s in summaries) else "accuracy",
        "score_mean": None if not known else sum(known) / len(known),
        "score_min": None if not known else min(known),
    }


def format_compare(names: Sequence[str], totals: Sequence[Mapping[str, Any]]) -> str:
    """Runs side by side: one column per run, one row per figure."""
    rows: list[tuple[str, Callable[[Mapping[str, Any]], str]]] = [
        ("peers (finished)", lambda t: f"{t['peers']} ({t['finished']})"),
        ("rounds", lambda t: str(t["rounds"])),
        ("round ms (mean)", lambda t: _opt(t["round_ms"], ".1f")),
        ("cpu ms per round", lambda t: _opt(t["cpu_ms"], ".1f")),
        ("bytes sent", lambda t: human_bytes(t["bytes_sent"])),
        (
            "bytes sent per round",
            lambda t: "-" if t["bytes_per_round"] is None else human_bytes(t["bytes_per_round"]),
        ),
        ("compression", lambda t: str(t["compression"])),
        ("rejects", lambda t: str(t["rejects"])),
        ("rounds alone", lambda t: str(t["alone"])),
        ("last score, mean", lambda t: f"{_opt(t['score_mean'], '.4f')} {t['metric']}"),
        ("last score, min", lambda t: _opt(t["score_min"], ".4f")),
    ]
    table = [["", *names]] + [[label, *(cell(t) for t in totals)] for label, cell in rows]
    widths = [max(len(r[i]) for r in table) for i in range(len(table[0]))]
    return "\n".join(
        "  ".join(
            c.ljust(w) if i == 0 else c.rjust(w)
            for i, (c, w) in enumerate(zip(r, widths, strict=True))
        ).rstrip()
        for r in table
    )
