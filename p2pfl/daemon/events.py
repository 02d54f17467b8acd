"""The gossip event log: one JSON object per line, one file per node, flushed per event.

Flushed, not fsynced: a power cut may take back the last events. The exception is the
``train`` event of a run with differential privacy, which the node makes durable
(:meth:`EventLog.sync`) before its update leaves: the log then never counts fewer releases
than were made, whatever a power cut does to the checkpoint.

Every event carries ``ts`` (unix seconds), ``node``, ``type``, ``round`` (or null) and
``lamport``, a Lamport clock: each message carries the sender's clock and the receiver moves
its clock past it, so logs gathered from several machines merge into causal order by
(lamport, node). Event-specific fields follow (``peer``, ``bytes``, ``duration_s``,
``loss``, ``accuracy``, ``reason`` ...). Secrets never go into the log.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

from p2pfl.core.clock import MAX_LAMPORT, LamportClock

#: Every event type a node writes. ``p2pfl logs`` relies on these names.
EVENT_TYPES = frozenset(
    {
        "node_start",
        "node_stop",
        "listen",
        "connect",
        "disconnect",
        "handshake_ok",
        "handshake_fail",
        "late",
        "standardize",
        "round_start",
        "train",
        "send",
        "recv",
        "reject",
        "aggregate",
        "eval",
        "checkpoint",
        "round_end",
        "resume",
        "suspect",
        "suspect_link",
        "unsuspect_link",
        "recovery",
    }
)


def last_lamport(path: Path, window: int = 65536) -> int:
    """The Lamport time of the last complete event in an existing log (0 if none), so a
    restarted node's clock continues past everything it logged before: its checkpoint can
    be a round older than its log."""
    try:
        with open(path, "rb") as f:
            size = f.seek(0, os.SEEK_END)
            f.seek(max(0, size - window))
            tail = f.read()
    except OSError:
        return 0
    for line in reversed(tail.split(b"\n")):
        try:
            value = json.loads(line).get("lamport")
        except (ValueError, AttributeError, RecursionError):
            continue
        if isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= MAX_LAMPORT:
            return value
    return 0


def _ends_mid_line(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            if f.seek(0, os.SEEK_END) == 0:
                return False
            f.seek(-1, os.SEEK_END)
            return f.read(1) != b"\n"
    except OSError:
        return False


def _fsync_dir(path: Path) -> None:
    """Make ``path``'s entries (a file created in it) durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class EventLog:
    """Append-only JSONL writer. Each line is flushed so ``tail -f`` and ``jq`` see it at once."""

    def __init__(self, path: Path, node_id: str, clock: LamportClock) -> None:
        self.path = path
        self.node_id = node_id
        self.clock = clock
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        clock.restore(last_lamport(path))
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        self._file: IO[str] | None = os.fdopen(fd, "a", encoding="utf-8")
        #: Called with every record after it is written (metrics, the status board). A
        #: listener must be quick and must not raise: it runs on the node's event loop.
        self.listeners: list[Callable[[dict[str, Any]], None]] = []
        #: Whether sync() has made the log's directory entry durable yet.
        self._dir_synced = False
        if _ends_mid_line(path):  # killed mid-write: start on a fresh line, keep the rest whole
            self._file.write("\n")

    def emit(self, event_type: str, round_index: int | None = None, **fields: Any) -> None:
        """Write one event stamped with the current time and a fresh Lamport tick."""
        if event_type not in EVENT_TYPES:
            raise ValueError(f"unknown event type {event_type!r}")
        record: dict[str, Any] = {
            "ts": round(time.time(), 6),
            "node": self.node_id,
            "type": event_type,
            "round": round_index,
            "lamport": fields.pop("lamport", None) or self.clock.tick(),
        }
        record.update(fields)
        if self._file is not None:
            self._file.write(json.dumps(record, separators=(",", ":")) + "\n")
            self._file.flush()
        for listener in self.listeners:
            listener(record)

    def sync(self) -> None:
        """Make every event written so far durable (fsync; the first call also fsyncs the
        directory, which may hold a log created by this run).

        The node calls it after a ``train`` event with differential privacy, before the
        update leaves: the count of releases a restart rebuilds the privacy budget from must
        survive a power cut. ~0.2 ms of wall time (0.08 ms of CPU) per call on an ext4
        virtual disk, measured while writing this.
        """
        if self._file is None:
            return
        self._file.flush()
        os.fsync(self._file.fileno())
        if not self._dir_synced:
            _fsync_dir(self.path.parent)
            self._dir_synced = True

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
