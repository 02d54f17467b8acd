"""``p2pfl logs``: the command-line front of the log reader.

``register(sub)`` adds the ``logs`` command to the main parser; ``normalize_argv`` lets the
path come before or after the sub-command (``p2pfl logs DIR summary``) and makes
``p2pfl logs DIR`` mean ``summary``. Bad lines go to stderr as ``FILE:LINE: reason`` and
never change the exit code; an unreadable path raises a ``P2PFLError``.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import re
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from p2pfl.daemon.events import EVENT_TYPES
from p2pfl.logs.plot import plot_logs
from p2pfl.logs.read import Event, LogError, Logs, Problem, Tail, read_logs
from p2pfl.logs.summary import (
    format_compare,
    format_summary,
    run_totals,
    summarize,
    summary_json,
)
from p2pfl.logs.trace import format_event, format_trace, trace_round

SUBCOMMANDS = ("summary", "compare", "events", "trace", "follow", "plot")
#: Options of the sub-commands that take a value (``normalize_argv`` must skip the value).
_VALUE_OPTIONS = frozenset(
    {"--peer", "--type", "--round", "--since", "-n", "--lines", "-o", "--output", "--interval"}
)
_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_RELATIVE = re.compile(r"(\d+(?:\.\d+)?)\s*([smhd])")
_NUMBER = re.compile(r"\d+(?:\.\d+)?")
#: Bad lines shown per file; a stray non-log ``*.jsonl`` (a dataset) would flood the terminal.
PROBLEMS_PER_FILE = 20

Handler = Callable[[argparse.Namespace], int]


# --- argument parsing --------------------------------------------------------------------


def parse_since(text: str, now: float | None = None) -> float:
    """A start time as unix seconds, from a relative duration (``30s``, ``5m``, ``2h``,
    ``1d``: that long before ``now``), a unix timestamp (a bare number) or an ISO-8601
    time (local time unless it names a zone)."""
    value = text.strip()
    relative = _RELATIVE.fullmatch(value)
    if relative:
        base = time.time() if now is None else now
        return base - float(relative[1]) * _UNITS[relative[2]]
    if _NUMBER.fullmatch(value):
        return float(value)
    try:
        return datetime.fromisoformat(value).timestamp()
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"cannot read {text!r} as a time: use 30s, 5m, 2h, 1d, a unix timestamp, "
            "or ISO-8601 such as 2025-01-31T14:05:00"
        ) from None


def parse_rounds(text: str) -> tuple[int, int]:
    """``N`` or ``A-B`` (inclusive) as a (first, last) pair."""
    match = re.fullmatch(r"(\d+)(?:-(\d+))?", text.strip())
    if not match:
        raise argparse.ArgumentTypeError(f"expected a round N or a range A-B, got {text!r}")
    first = int(match[1])
    last = int(match[2]) if match[2] is not None else first
    if last < first:
        raise argparse.ArgumentTypeError(f"empty round range {text!r}")
    return first, last


def _split(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


def parse_types(text: str) -> list[str]:
    """A comma list of event types; a name the nodes never write is an error, not an empty
    result, since it is almost always a typo."""
    types = _split(text)
    unknown = [t for t in types if t not in EVENT_TYPES]
    if unknown or not types:
        raise argparse.ArgumentTypeError(
            f"unknown event type {', '.join(map(repr, unknown)) or repr(text)}; "
            f"known types: {', '.join(sorted(EVENT_TYPES))}"
        )
    return types


def parse_peers(text: str) -> list[str]:
    peers = _split(text)
    if not peers:
        raise argparse.ArgumentTypeError("expected a peer id or a comma list of them")
    return peers


@dataclass(frozen=True, slots=True)
class EventFilter:
    """The ``events``/``follow`` filters; ``None`` means "no constraint"."""

    peers: frozenset[str] | None = None
    types: frozenset[str] | None = None
    rounds: tuple[int, int] | None = None
    since: float | None = None

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> EventFilter:
        def flat(groups: list[list[str]] | None) -> frozenset[str] | None:
            return frozenset(x for group in groups for x in group) if groups else None

        return cls(flat(args.peer), flat(args.type), args.round, args.since)

    def match(self, event: Event) -> bool:
        if self.peers is not None and event.node not in self.peers:
            return False
        if self.types is not None and event.type not in self.types:
            return False
        if self.rounds is not None and (
            event.round is None or not self.rounds[0] <= event.round <= self.rounds[1]
        ):
            return False
        return self.since is None or event.ts >= self.since


# --- output helpers ----------------------------------------------------------------------


class ProblemPrinter:
    """Prints bad lines to stderr as ``FILE:LINE: reason``, at most PROBLEMS_PER_FILE per file."""

    def __init__(self, limit: int = PROBLEMS_PER_FILE) -> None:
        self.limit = limit
        self.counts: dict[Path, int] = {}

    def show(self, problems: Iterable[Problem]) -> None:
        for problem in problems:
            seen = self.counts.get(problem.file, 0) + 1
            self.counts[problem.file] = seen
            if seen <= self.limit:
                print(problem, file=sys.stderr)
            elif seen == self.limit + 1:
                print(
                    f"{problem.file}: more bad lines, not shown (is it an event log?)",
                    file=sys.stderr,
                )

    def finish(self) -> None:
        for file, count in self.counts.items():
            if count > self.limit:
                print(f"{file}: {count} bad lines skipped in all", file=sys.stderr)


def _load(path: str) -> Logs:
    """Read the logs, report bad lines, and insist on at least one valid event."""
    logs = read_logs(path)
    printer = ProblemPrinter()
    printer.show(logs.problems)
    printer.finish()
    if logs.duplicates:
        print(
            f"note: {logs.duplicates} duplicate events skipped (a log copied twice?)",
            file=sys.stderr,
        )
    if not logs.events:
        raise LogError(f"{path}: no valid events in {len(logs.files)} log file(s)")
    digests = sorted({str(e.get("config_digest")) for e in logs.events if e.type == "node_start"})
    if len(digests) > 1:
        print(
            f"warning: these logs come from {len(digests)} different configurations (config "
            f"digests {', '.join(digests)}): separate runs are being merged; point p2pfl logs "
            "at one run's folder",
            file=sys.stderr,
        )
    return logs


def _pipe_safe(handler: Handler) -> Handler:
    """``p2pfl logs DIR events | head`` closes stdout early; that is not an error."""

    @functools.wraps(handler)
    def wrapper(args: argparse.Namespace) -> int:
        try:
            return handler(args)
        except BrokenPipeError:
            try:  # keep the interpreter's final flush from failing again
                devnull = os.open(os.devnull, os.O_WRONLY)
                os.dup2(devnull, sys.stdout.fileno())
            except (OSError, ValueError):
                pass
            return 0

    return wrapper


def _emit(events: Iterable[Event], as_json: bool, width: int) -> None:
    for event in events:
        if as_json:
            print(json.dumps(event.raw, separators=(",", ":")))
        else:
            print(format_event(event, width))


# --- handlers ----------------------------------------------------------------------------


@_pipe_safe
def cmd_summary(args: argparse.Namespace) -> int:
    logs = _load(args.path)
    summaries = summarize(logs.events)
    if args.json:
        print(json.dumps(summary_json(summaries), indent=2))
    else:
        print(format_summary(summaries))
        bad = f", {len(logs.problems)} bad lines skipped" if logs.problems else ""
        print(f"\n{len(logs.events)} events from {len(logs.files)} log file(s){bad}")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    if len(args.paths) < 2:
        raise LogError("compare needs two or more paths (logs or run folders)")
    totals = [run_totals(summarize(_load(path).events)) for path in args.paths]
    if args.json:
        print(json.dumps(dict(zip(args.paths, totals, strict=True)), indent=2))
    else:
        print(format_compare([Path(p).name or p for p in args.paths], totals))
    return 0


@_pipe_safe
def cmd_events(args: argparse.Namespace) -> int:
    logs = _load(args.path)
    selected = EventFilter.from_args(args)
    nodes = {e.node for e in logs.events}
    for peer in sorted((selected.peers or frozenset()) - nodes):
        print(
            f"note: no log from peer {peer!r} (peers with logs: {', '.join(sorted(nodes))})",
            file=sys.stderr,
        )
    width = max(len(n) for n in nodes)
    _emit((e for e in logs.events if selected.match(e)), args.json, width)
    return 0


@_pipe_safe
def cmd_trace(args: argparse.Namespace) -> int:
    logs = _load(args.path)
    entries = trace_round(logs.events, args.round)
    if not entries:
        rounds = sorted({e.round for e in logs.events if e.round is not None})
        known = f"rounds {rounds[0]}-{rounds[-1]}" if rounds else "no rounds"
        raise LogError(f"{args.path}: no events in round {args.round} (the logs have {known})")
    for line in format_trace(entries):
        print(line)
    sends = sum(e.event.type == "send" for e in entries)
    recvs = sum(e.event.type == "recv" for e in entries)
    flagged = sum(e.note is not None for e in entries)
    print(f"\nround {args.round}: {sends} sends, {recvs} recvs, {flagged} unmatched")
    return 0


@_pipe_safe
def cmd_follow(args: argparse.Namespace) -> int:
    """``tail -f`` over every log: the last ``-n`` events first, then new ones as they come."""
    path = Path(args.path)  # it may not exist yet: like tail -F, wait for it
    tail = Tail(path)
    selected = EventFilter.from_args(args)
    printer = ProblemPrinter()
    stopped: dict[str, bool] = {}  # node -> its latest lifecycle event was node_stop
    width = 8

    def absorb(events: list[Event]) -> None:
        for event in events:
            if event.type in ("node_start", "node_stop"):
                stopped[event.node] = event.type == "node_stop"
            else:
                stopped.setdefault(event.node, False)

    def all_stopped() -> bool:
        return bool(args.until_stopped and stopped and all(stopped.values()))

    try:
        events, problems = tail.poll()
        printer.show(problems)
        shown = [e for e in events if selected.match(e)]
        width = max([width, *(len(e.node) for e in events)])
        _emit(shown[-args.lines :] if args.lines > 0 else [], args.json, width)
        sys.stdout.flush()
        absorb(events)
        while not all_stopped():
            time.sleep(args.interval)
            events, problems = tail.poll()
            printer.show(problems)
            width = max([width, *(len(e.node) for e in events)])
            _emit((e for e in events if selected.match(e)), args.json, width)
            sys.stdout.flush()
            absorb(events)
    except KeyboardInterrupt:
        pass
    return 0


@_pipe_safe
def cmd_plot(args: argparse.Namespace) -> int:
    logs = _load(args.path)
    path = Path(args.path)
    if args.output:
        out = Path(args.output)
    else:
        out = path / "events.png" if path.is_dir() else path.with_suffix(".png")
    written = plot_logs(logs.events, out, title=str(path))
    print(f"wrote {written}")
    return 0


# --- wiring ------------------------------------------------------------------------------


def _add_path(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "path", help="an events.jsonl file, or a folder searched recursively for *.jsonl"
    )


def _add_filters(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--peer",
        action="append",
        type=parse_peers,
        metavar="ID[,ID...]",
        help="only events logged by these peers (repeatable)",
    )
    p.add_argument(
        "--type",
        action="append",
        type=parse_types,
        metavar="TYPE[,TYPE...]",
        help="only these event types (repeatable), e.g. send,recv,reject",
    )
    p.add_argument(
        "--round", type=parse_rounds, metavar="N|A-B", help="only rounds N, or A to B inclusive"
    )
    p.add_argument(
        "--since",
        type=parse_since,
        metavar="TIME",
        help="only events at or after TIME: 30s, 5m, 2h, 1d ago, a unix timestamp, or ISO-8601",
    )
    p.add_argument("--json", action="store_true", help="print the raw events as JSON lines")


def register(
    subparsers: argparse._SubParsersAction[argparse.ArgumentParser],
) -> argparse.ArgumentParser:
    """Add ``logs`` and its sub-commands; each sets ``func`` to a handler returning an exit
    code."""
    logs = subparsers.add_parser(
        "logs",
        help="read event logs: summary, compare, events, trace, follow, plot",
        description="Read the nodes' events.jsonl logs (one file, or every *.jsonl below a "
        "folder, merged in causal order by Lamport time).",
        epilog="'p2pfl logs PATH' means 'p2pfl logs summary PATH'; the path may also come "
        "first: 'p2pfl logs PATH events --type send'.",
    )
    sub = logs.add_subparsers(dest="logs_command", required=True, metavar="COMMAND")

    p = sub.add_parser("summary", help="per-peer table: rounds, traffic, timing, accuracy")
    _add_path(p)
    p.add_argument("--json", action="store_true", help="a JSON list, one object per peer")
    p.set_defaults(func=cmd_summary)

    p = sub.add_parser("compare", help="runs side by side: rounds, time, bytes, accuracy")
    p.add_argument("paths", nargs="+", metavar="PATH", help="two or more logs or run folders")
    p.add_argument("--json", action="store_true", help="a JSON object per run")
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("events", help="print events, filtered, in causal order")
    _add_path(p)
    _add_filters(p)
    p.set_defaults(func=cmd_events)

    p = sub.add_parser("trace", help="every message of one round, sends paired with recvs")
    _add_path(p)
    p.add_argument("--round", type=int, required=True, metavar="R", help="the round to trace")
    p.set_defaults(func=cmd_trace)

    p = sub.add_parser("follow", help="like tail -f over every log, with the events filters")
    _add_path(p)
    _add_filters(p)
    p.add_argument(
        "-n",
        "--lines",
        type=int,
        default=10,
        metavar="N",
        help="show the last N events first (default 10)",
    )
    p.add_argument(
        "--until-stopped",
        action="store_true",
        help="exit once every node seen so far has logged node_stop",
    )
    p.add_argument("--interval", type=float, default=0.2, help=argparse.SUPPRESS)
    p.set_defaults(func=cmd_follow)

    p = sub.add_parser("plot", help="PNG: accuracy, loss, round time, bytes sent per round")
    _add_path(p)
    p.add_argument("-o", "--output", metavar="FILE", help="default PATH/events.png for a folder")
    p.set_defaults(func=cmd_plot)
    return logs


def normalize_argv(argv: list[str]) -> list[str]:
    """Accept ``logs PATH [SUBCOMMAND]`` as well as ``logs SUBCOMMAND PATH``, and default the
    sub-command to ``summary``. Anything that is not a ``logs`` command passes unchanged."""
    position = next((i for i, arg in enumerate(argv) if not arg.startswith("-")), None)
    if position is None or argv[position] != "logs":
        return list(argv)
    head, rest = argv[: position + 1], argv[position + 1 :]
    first_positional: int | None = None
    i = 0
    while i < len(rest):
        arg = rest[i]
        if arg == "--":
            break
        if arg.startswith("-"):
            i += 2 if arg in _VALUE_OPTIONS else 1
            continue
        if arg in SUBCOMMANDS:
            if first_positional is None:
                return list(argv)  # already in the usual order
            return [*head, arg, *rest[:i], *rest[i + 1 :]]
        if first_positional is None:
            first_positional = i
        i += 1
    if first_positional is None and "--" in rest:
        first_positional = rest.index("--")
    if first_positional is None:
        return list(argv)  # 'logs' or 'logs -h': let argparse explain
    return [*head, "summary", *rest]
