"""Find and parse gossip event logs (``*.jsonl``), once or incrementally.

A bad line is never fatal: it becomes a :class:`Problem` (file, 1-based line, reason) and is
skipped, because a log is evidence after a crash and the rest of it is still worth reading.
Logs from several nodes are merged by ``(lamport, node, ts)``, which is a causal order:
a receive always carries a larger Lamport time than the matching send.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from p2pfl.errors import P2PFLError

#: Longest line accepted (an event is a few hundred bytes; a longer line is not ours).
MAX_LINE = 1 << 20
#: Bytes read at a time, so a huge file or a line without end never fills memory.
CHUNK = 4 << 20


class LogError(P2PFLError):
    """The logs cannot be read at all (missing path, no ``*.jsonl`` files, nothing valid)."""


@dataclass(frozen=True, slots=True)
class Event:
    """One valid log record. ``raw`` is the object as written, with every per-type field."""

    ts: float
    node: str
    type: str
    round: int | None
    lamport: int
    raw: dict[str, Any]
    file: Path
    line: int

    def get(self, key: str, default: Any = None) -> Any:
        """A per-type field (``peer``, ``bytes`` ...), or ``default`` if absent."""
        return self.raw.get(key, default)

    @property
    def sort_key(self) -> tuple[int, str, float]:
        return (self.lamport, self.node, self.ts)


@dataclass(frozen=True, slots=True)
class Problem:
    """A line that was skipped, and why."""

    file: Path
    line: int
    reason: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: {self.reason}"


@dataclass(slots=True)
class Logs:
    """Everything read from a path: merged events, skipped lines, and the files read."""

    files: list[Path]
    events: list[Event]
    problems: list[Problem]
    duplicates: int = 0


def merge(events: Iterable[Event]) -> list[Event]:
    """Causal order across nodes: Lamport time, then node id and wall time to break ties."""
    return sorted(events, key=lambda e: e.sort_key)


def finite(value: Any) -> float | None:
    """A log field as a finite number, or None (a log may hold anything: NaN, 1e999, text)."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        try:
            number = float(value)
        except OverflowError:
            return None
        return number if math.isfinite(number) else None
    return None


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def parse_record(text: str, file: Path, line: int) -> Event | Problem:
    """Validate one line. Extra fields and unknown event types are kept, never rejected."""
    try:
        obj = json.loads(text)
    except ValueError as exc:
        msg = exc.msg if isinstance(exc, json.JSONDecodeError) else str(exc)
        return Problem(file, line, f"not JSON ({msg})")
    except RecursionError:
        return Problem(file, line, "not JSON (nested too deeply)")
    if not isinstance(obj, dict):
        return Problem(file, line, f"not a JSON object (got {type(obj).__name__})")
    for key in ("ts", "node", "type", "lamport"):
        if key not in obj:
            return Problem(file, line, f"missing {key!r}")
    ts, node, kind = obj["ts"], obj["node"], obj["type"]
    lamport, round_index = obj["lamport"], obj.get("round")
    if not isinstance(ts, int | float) or isinstance(ts, bool) or not math.isfinite(ts):
        return Problem(file, line, "'ts' is not a finite number")
    if not isinstance(node, str) or not node:
        return Problem(file, line, "'node' is not a non-empty string")
    if not isinstance(kind, str) or not kind:
        return Problem(file, line, "'type' is not a non-empty string")
    if not _is_int(lamport) or lamport < 0:
        return Problem(file, line, "'lamport' is not a non-negative integer")
    if round_index is not None and (not _is_int(round_index) or round_index < 0):
        return Problem(file, line, "'round' is not a non-negative integer or null")
    return Event(float(ts), node, kind, round_index, lamport, obj, file, line)


class _Cursor:
    """Read position in one file: byte offset, line count and any incomplete last line.

    Truncation (size below the offset) or replacement (new inode, or different first
    bytes) restarts the file from the top, as ``tail -F`` does.
    """

    _HEAD = 64

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offset = 0
        self.line = 0
        self.partial = b""
        self.inode: int | None = None
        self.head = b""
        #: Inside a line already reported as too long: drop bytes until its newline.
        self.skipping = False
        self.unreadable = False

    def _restart(self) -> None:
        self.offset = 0
        self.line = 0
        self.partial = b""
        self.head = b""
        self.skipping = False

    def read(self, final: bool) -> tuple[list[Event], list[Problem]]:
        """Parse the lines completed since the last read; ``final`` also parses the
        incomplete last line (batch mode, where nobody is still writing it). Reads in
        bounded chunks; a line longer than MAX_LINE bytes is reported and skipped."""
        try:
            st = self.path.stat()
        except OSError:
            return [], []  # deleted or not created yet: nothing to read now
        if self.inode is not None and st.st_ino != self.inode:
            self._restart()
        self.inode = st.st_ino
        if st.st_size < self.offset:
            self._restart()
        if st.st_size == self.offset and not (final and self.partial):
            return [], []
        events: list[Event] = []
        problems: list[Problem] = []
        try:
            with self.path.open("rb") as f:
                if self.head and f.read(len(self.head)) != self.head:
                    self._restart()
                f.seek(self.offset)
                while data := f.read(CHUNK):
                    if self.offset < self._HEAD:
                        self.head = (self.head + data)[: self._HEAD]
                    self.offset += len(data)
                    self._lines(data, events, problems)
        except OSError as exc:
            if not self.unreadable:
                self.unreadable = True
                problems.append(Problem(self.path, self.line, f"cannot read the file: {exc}"))
            return events, problems
        self.unreadable = False
        if final and self.partial:
            self._parse(self.partial, events, problems, incomplete=True)
            self.partial = b""
        return events, problems

    def _lines(self, data: bytes, events: list[Event], problems: list[Problem]) -> None:
        lines = data.split(b"\n")
        last = lines.pop()  # incomplete: keep it until its newline arrives
        for i, raw in enumerate(lines):
            if i == 0:
                raw = self.partial + raw
                self.partial = b""
                if self.skipping:  # the end of an over-long line, already reported
                    self.skipping = False
                    continue
            self._parse(raw, events, problems, incomplete=False)
        if lines:
            self.partial = last
        elif not self.skipping:
            self.partial += last
        if len(self.partial) > MAX_LINE and not self.skipping:
            self.line += 1
            problems.append(Problem(self.path, self.line, f"line longer than {MAX_LINE} bytes"))
            self.partial = b""
            self.skipping = True

    def _parse(
        self, raw: bytes, events: list[Event], problems: list[Problem], *, incomplete: bool
    ) -> None:
        self.line += 1
        if len(raw) > MAX_LINE:
            problems.append(Problem(self.path, self.line, f"line longer than {MAX_LINE} bytes"))
            return
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            problems.append(Problem(self.path, self.line, "not UTF-8 text"))
            return
        if not text.strip():
            return
        parsed = parse_record(text, self.path, self.line)
        if isinstance(parsed, Problem) and incomplete:
            parsed = Problem(
                self.path, self.line, f"incomplete last line (no newline), {parsed.reason}"
            )
        if isinstance(parsed, Problem):
            problems.append(parsed)
        else:
            events.append(parsed)


def _walk_jsonl(folder: Path) -> list[Path]:
    """Every ``*.jsonl`` file below ``folder``, following symlinked folders (a link to another
    machine's copied state dir is common) but never the same folder twice."""
    found: list[Path] = []
    visited: set[str] = set()
    for root, dirs, names in os.walk(folder, followlinks=True):
        real = os.path.realpath(root)
        if real in visited:
            dirs.clear()
            continue
        visited.add(real)
        dirs.sort()
        found.extend(Path(root, n) for n in names if n.endswith(".jsonl"))
    return sorted(p for p in found if p.is_file())


def find_logs(path: Path | str) -> list[Path]:
    """The log files under ``path``: the file itself, or every ``*.jsonl`` below a directory
    (so logs copied from several machines into sub-folders of one folder all count)."""
    path = Path(path)
    if path.is_file():
        return [path]
    if not path.exists():
        raise LogError(f"{path}: no such file or directory")
    if not path.is_dir():
        raise LogError(f"{path}: not a file or directory")
    files = _walk_jsonl(path)
    if not files:
        raise LogError(f"{path}: no event logs (*.jsonl) in this folder or below it")
    return files


def read_file(path: Path) -> tuple[list[Event], list[Problem]]:
    """Every event of one file, in file order, and its bad lines."""
    return _Cursor(path).read(final=True)


def read_logs(path: Path | str) -> Logs:
    """Read and merge every log under ``path``. The same record found twice (one log copied
    into two folders) is counted once."""
    files = find_logs(path)
    events: list[Event] = []
    problems: list[Problem] = []
    for file in files:
        got, bad = read_file(file)
        events.extend(got)
        problems.extend(bad)
    unique: list[Event] = []
    seen: set[tuple[str, int, float, str]] = set()
    for event in merge(events):
        key = (event.node, event.lamport, event.ts, event.type)
        if key not in seen:
            seen.add(key)
            unique.append(event)
    return Logs(files, unique, problems, len(events) - len(unique))


class Tail:
    """Incremental reader for ``follow`` and live progress displays.

    ``poll()`` returns the events and problems completed since the previous call. It never
    raises for a missing path or file (the nodes may not have started yet), picks up
    ``*.jsonl`` files that appear later, holds back a last line until its newline arrives,
    and rereads a file from the top if it was truncated or replaced. Each batch is in
    causal order; order across batches is arrival order.
    """

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        self._cursors: dict[Path, _Cursor] = {}

    def files(self) -> list[Path]:
        """The files being followed right now (discovered at the last poll)."""
        return sorted(self._cursors)

    def _discover(self) -> None:
        if self.path.is_dir():
            found = _walk_jsonl(self.path)
        else:
            found = [self.path] if self.path.is_file() else []
        for file in found:
            if file not in self._cursors:
                self._cursors[file] = _Cursor(file)

    def poll(self) -> tuple[list[Event], list[Problem]]:
        self._discover()
        events: list[Event] = []
        problems: list[Problem] = []
        for file in sorted(self._cursors):
            got, bad = self._cursors[file].read(final=False)
            events.extend(got)
            problems.extend(bad)
        return merge(events), problems
