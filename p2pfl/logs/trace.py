"""One-line renderings of events: the message trace of a round, and the generic form.

The trace pairs each ``recv`` with the ``send`` it came from, so a lost, late or rejected
transfer, or a log that was never collected, stands out in the causal sequence.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from p2pfl.logs.read import Event, merge
from p2pfl.logs.summary import human_bytes

#: The event types a round trace shows.
TRACE_TYPES = frozenset({"round_start", "send", "recv", "reject", "aggregate", "round_end"})

_BASE_FIELDS = ("ts", "node", "type", "round", "lamport")


@dataclass(frozen=True, slots=True)
class TraceEntry:
    """An event of the trace; for a send or recv, its counterpart or why there is none."""

    event: Event
    match: Event | None = None
    note: str | None = None


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _peer(event: Event) -> str:
    peer = event.get("peer", event.get("addr"))
    return str(peer) if peer is not None else "?"


def trace_round(events: Iterable[Event], round_index: int) -> list[TraceEntry]:
    """The round's transfers and milestones across all nodes, in causal order, with each
    recv paired to its send: by ``sent_lamport`` when the receiver logged it, otherwise by
    (sender, receiver, round), earliest unmatched earlier send first."""
    everything = list(events)
    have_log = {e.node for e in everything}
    chosen = merge(e for e in everything if e.round == round_index and e.type in TRACE_TYPES)
    sends = [k for k, e in enumerate(chosen) if e.type == "send"]
    recvs = [k for k, e in enumerate(chosen) if e.type == "recv"]
    partner: dict[int, int] = {}  # position in chosen -> its counterpart's, both directions

    def pair(recv: int, candidates: Iterable[int]) -> None:
        r = chosen[recv]
        for s in candidates:
            send = chosen[s]
            if (
                s not in partner
                and send.node == _peer(r)
                and send.get("peer") == r.node
                and send.lamport < r.lamport
            ):
                partner[s], partner[recv] = recv, s
                return

    exact = [k for k in recvs if _is_int(chosen[k].get("sent_lamport"))]
    for k in exact:
        pair(k, (s for s in sends if chosen[s].lamport == chosen[k].get("sent_lamport")))
    for k in recvs:
        if k not in exact:  # an exact reference that did not match is not guessed at
            pair(k, sends)

    rejects = [k for k, e in enumerate(chosen) if e.type == "reject"]
    explained: set[int] = set()  # rejections already blamed for a missing recv
    entries: list[TraceEntry] = []
    for k, event in enumerate(chosen):
        match = chosen[partner[k]] if k in partner else None
        note: str | None = None
        if event.type == "send" and match is None:
            receiver = str(event.get("peer"))
            note = "no recv logged (lost or late)"
            if receiver not in have_log:
                note = f"no recv: {receiver}'s log is missing"
            for j in rejects:
                rej = chosen[j]
                if (
                    j not in explained
                    and rej.node == receiver
                    and _peer(rej) == event.node
                    and rej.lamport > event.lamport
                ):
                    explained.add(j)
                    note = f"no recv: rejected by {receiver} ({rej.get('reason', '?')})"
                    break
        elif event.type == "recv" and match is None:
            sender = _peer(event)
            if sender not in have_log:
                note = f"no send: {sender}'s log is missing"
            else:
                note = f"no matching send in {sender}'s log"
        entries.append(TraceEntry(event, match, note))
    return entries


def human_duration(seconds: Any) -> str:
    """0.0012 -> '1.2 ms'; 12.5 -> '12.50 s'; not a number -> '?'."""
    if not isinstance(seconds, int | float) or isinstance(seconds, bool):
        return "?"
    return f"{seconds * 1000:.1f} ms" if seconds < 10 else f"{seconds:.2f} s"


def _size(event: Event) -> str:
    n = event.get("bytes")
    return human_bytes(n) if isinstance(n, int | float) and not isinstance(n, bool) else "? B"


def _names(value: Any) -> str:
    if isinstance(value, list) and value:
        return ",".join(str(v) for v in value)
    return "-"


def format_trace(entries: Sequence[TraceEntry]) -> list[str]:
    """One line per entry, e.g. ``L=  123  alice -> bob    19.2 KB  sent in 1.2 ms``."""
    names = [e.event.node for e in entries] + [_peer(e.event) for e in entries]
    w = max((len(n) for n in names), default=1)
    lines: list[str] = []
    for entry in entries:
        e = entry.event
        head = f"L={e.lamport:>6}  "
        if e.type == "send":
            text = (
                f"{e.node:<{w}} -> {_peer(e):<{w}}  {_size(e):>9}"
                f"  sent in {human_duration(e.get('duration_s'))}"
            )
        elif e.type == "recv":
            text = f"{e.node:<{w}} <- {_peer(e):<{w}}  {_size(e):>9}"
            if entry.match is not None:
                text += f"  (sent at L={entry.match.lamport})"
            if e.get("buffered") is True:
                text += "  buffered for a later round"
        elif e.type == "reject":
            text = f"{e.node:<{w}} x- {_peer(e):<{w}}  rejected: {e.get('reason', '?')}"
        elif e.type == "aggregate":
            text = f"{e.node:<{w}}    aggregate of {_names(e.get('members'))}"
            if e.get("missing"):
                text += f"; missing {_names(e.get('missing'))}"
        elif e.type == "round_start":
            text = f"{e.node:<{w}}    round {e.round} starts"
            if isinstance(e.get("neighbours"), list):
                text += f" (neighbours {_names(e.get('neighbours'))})"
        elif e.type == "round_end":
            text = (
                f"{e.node:<{w}}    round {e.round} ends after {human_duration(e.get('duration_s'))}"
            )
        else:
            text = f"{e.node:<{w}}    {e.type}"
        if entry.note:
            text += f"  !! {entry.note}"
        lines.append(head + text)
    return lines


def _value(value: Any) -> str:
    if isinstance(value, str):
        return value if value and " " not in value and "=" not in value else json.dumps(value)
    return json.dumps(value, separators=(",", ":"))


def format_event(event: Event, node_width: int = 8) -> str:
    """The generic one-line form: local time, Lamport time, node, type, round, then every
    other field as ``key=value`` (unknown fields included, so nothing is hidden)."""
    clock = time.strftime("%H:%M:%S", time.localtime(event.ts))
    millis = int(event.ts * 1000) % 1000
    rnd = "-" if event.round is None else f"r{event.round}"
    extra = " ".join(f"{k}={_value(v)}" for k, v in event.raw.items() if k not in _BASE_FIELDS)
    line = (
        f"{clock}.{millis:03d}  L={event.lamport:>6}  {event.node:<{node_width}}  "
        f"{event.type:<12}  {rnd:<4}  {extra}"
    )
    return line.rstrip()
