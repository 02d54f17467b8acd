"""``p2pfl logs``: parsing, merging, summary, trace, filters, follow, plot, argv order."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from p2pfl.errors import P2PFLError
from p2pfl.logs import command
from p2pfl.logs.command import normalize_argv, parse_rounds, parse_since, register
from p2pfl.logs.plot import plot_logs
from p2pfl.logs.read import Event, LogError, Problem, Tail, parse_record, read_logs
from p2pfl.logs.summary import (
    bytes_per_round,
    format_summary,
    human_bytes,
    run_totals,
    summarize,
)
from p2pfl.logs.trace import format_event, format_trace, trace_round

from .conftest import TIMEOUT

REPO = Path(__file__).resolve().parent.parent
T0 = 1_700_000_000.0


def rec(
    node: str, kind: str, lamport: int, rnd: int | None = None, **fields: Any
) -> dict[str, Any]:
    """A record as EventLog writes it; ts follows the Lamport time so tests can predict it."""
    base = {"ts": T0 + lamport / 100, "node": node, "type": kind, "round": rnd, "lamport": lamport}
    return base | fields


def line(record: dict[str, Any]) -> str:
    return json.dumps(record, separators=(",", ":")) + "\n"


def write(path: Path, records: list[dict[str, Any]], extra: str = "") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(line(r) for r in records) + extra)
    return path


ALICE = [
    rec("alice", "node_start", 1, 0),
    rec("alice", "handshake_ok", 2, peer="bob"),
    rec("alice", "round_start", 3, 0, neighbours=["bob"]),
    rec("alice", "train", 4, 0, loss=1.0, duration_s=0.01, samples=10),
    rec("alice", "send", 5, 0, peer="bob", bytes=1000, duration_s=0.002),
    rec("alice", "recv", 9, 0, peer="bob", bytes=1000, duration_s=0.001, sent_lamport=6),
    rec("alice", "aggregate", 10, 0, members=["alice", "bob"], weights={}, missing=[]),
    rec("alice", "eval", 11, 0, data="validation", loss=0.9, accuracy=0.5),
    rec("alice", "round_end", 12, 0, duration_s=0.05, cpu_s=0.03, next_round=1),
    rec("alice", "round_start", 13, 1, neighbours=["bob"]),
    rec("alice", "train", 14, 1, loss=0.5, duration_s=0.02, samples=10),
    rec("alice", "send", 15, 1, peer="bob", bytes=1000, duration_s=0.003),
    rec("alice", "handshake_ok", 16, peer="bob"),
    rec("alice", "recv", 20, 1, peer="bob", bytes=2000, duration_s=0.001, buffered=False),
    rec("alice", "aggregate", 21, 1, members=["alice", "bob"], weights={}, missing=[]),
    rec("alice", "eval", 22, 1, data="validation", loss=0.4, accuracy=0.75),
    rec("alice", "round_end", 23, 1, duration_s=0.07, cpu_s=0.05, next_round=2),
    rec("alice", "node_stop", 24, 2, finished=True, peak_rss_mb=100.5, reason="completed"),
]
BOB = [
    rec("bob", "node_start", 1, 0),
    rec("bob", "handshake_ok", 3, peer="alice"),
    rec("bob", "round_start", 4, 0, neighbours=["alice", "carol"]),
    rec("bob", "train", 5, 0, loss=1.1, duration_s=0.01, samples=10),
    rec("bob", "send", 6, 0, peer="alice", bytes=1000, duration_s=0.002),
    rec("bob", "recv", 7, 0, peer="alice", bytes=1000, duration_s=0.001, sent_lamport=5),
    rec("bob", "eval", 8, 0, data="validation", loss=1.0, accuracy=0.4),
    rec("bob", "round_end", 9, 0, duration_s=0.04, next_round=1),
    rec("bob", "round_start", 10, 1, neighbours=["alice", "carol"]),
    rec("bob", "send", 17, 1, peer="alice", bytes=2000, duration_s=0.004),
    rec("bob", "send", 18, 1, peer="carol", bytes=2000, duration_s=0.004),
    rec("bob", "reject", 19, 1, peer="alice", reason="duplicate parameters"),
    rec("bob", "recv", 20, 1, peer="carol", bytes=500, duration_s=0.001, sent_lamport=12),
    rec("bob", "dp_budget", 21, 1, epsilon=0.5),  # a future event type with a new field
]
#: bob's machine clock is 5 s behind alice's: wall time must not decide the merge order.
SKEW = -5.0
BOB = [r | {"ts": r["ts"] + SKEW} for r in BOB]


@pytest.fixture
def two_machines(tmp_path: Path) -> Path:
    """Logs copied from two machines into one folder, under unrelated sub-folder names."""
    root = tmp_path / "collected"
    write(root / "machine-a" / "state" / "alice" / "events.jsonl", ALICE)
    # bob's last line has no newline yet: valid JSON, so batch reading still takes it.
    write(root / "b" / "bob.jsonl", BOB[:-1], extra=line(BOB[-1]).rstrip("\n"))
    (root / "b" / "notes.txt").write_text("not a log\n")
    return root


def run(argv: list[str]) -> int:
    """Parse like p2pfl's main() does after normalize_argv, and run the handler."""
    parser = argparse.ArgumentParser(prog="p2pfl")
    sub = parser.add_subparsers(dest="command", required=True)
    register(sub)
    args = parser.parse_args(normalize_argv(argv))
    return int(args.func(args))


def out_lines(capsys: pytest.CaptureFixture[str]) -> tuple[list[str], list[str]]:
    captured = capsys.readouterr()
    return captured.out.splitlines(), captured.err.splitlines()


# --- reading -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("garbage", "not JSON"),
        ("[1, 2]", "not a JSON object (got list)"),
        ('"text"', "not a JSON object (got str)"),
        ('{"node":"a","type":"send","lamport":1}', "missing 'ts'"),
        ('{"ts":1,"type":"send","lamport":1}', "missing 'node'"),
        ('{"ts":1,"node":"a","lamport":1}', "missing 'type'"),
        ('{"ts":1,"node":"a","type":"send"}', "missing 'lamport'"),
        ('{"ts":"now","node":"a","type":"send","lamport":1}', "'ts' is not a finite number"),
        ('{"ts":NaN,"node":"a","type":"send","lamport":1}', "'ts' is not a finite number"),
        ('{"ts":1,"node":"","type":"send","lamport":1}', "'node' is not a non-empty string"),
        ('{"ts":1,"node":"a","type":7,"lamport":1}', "'type' is not a non-empty string"),
        ('{"ts":1,"node":"a","type":"send","lamport":true}', "'lamport' is not"),
        ('{"ts":1,"node":"a","type":"send","lamport":1.5}', "'lamport' is not"),
        ('{"ts":1,"node":"a","type":"send","lamport":-1}', "'lamport' is not"),
        ('{"ts":1,"node":"a","type":"send","lamport":1,"round":"3"}', "'round' is not"),
        ('{"ts":1,"node":"a","type":"send","lamport":1,"round":false}', "'round' is not"),
    ],
)
def test_bad_records_are_problems(text: str, reason: str) -> None:
    parsed = parse_record(text, Path("x.jsonl"), 7)
    assert isinstance(parsed, Problem)
    assert reason in parsed.reason
    assert str(parsed).startswith("x.jsonl:7: ")


def test_unknown_types_and_extra_fields_are_kept() -> None:
    text = '{"ts":1,"node":"a","type":"dp_budget","lamport":3,"round":null,"epsilon":0.5}'
    parsed = parse_record(text, Path("x.jsonl"), 1)
    assert isinstance(parsed, Event)
    assert (parsed.type, parsed.round, parsed.get("epsilon")) == ("dp_budget", None, 0.5)
    # 'round' absent counts as null, as for events outside any round
    parsed = parse_record('{"ts":1,"node":"a","type":"listen","lamport":2}', Path("x"), 1)
    assert isinstance(parsed, Event) and parsed.round is None


def test_bad_lines_reported_with_line_numbers_and_skipped(tmp_path: Path) -> None:
    log = tmp_path / "events.jsonl"
    log.write_bytes(
        (
            line(rec("a", "node_start", 1, 0))
            + "garbage\n"
            + "\n"  # a blank line is skipped silently but still counts as a line
            + "[1]\n"
            + '{"ts":1,"node":"a","type":"send"}\n'
        ).encode()
        + b"\xff\xfe\n"
        + line(rec("a", "node_stop", 2, 0)).encode()
        + b'{"ts":1,"node":"a","type":"x","lam'  # a partial line that is not valid JSON
    )
    logs = read_logs(log)
    assert [e.type for e in logs.events] == ["node_start", "node_stop"]
    assert [e.line for e in logs.events] == [1, 7]
    assert [(p.line, p.reason.split(" (")[0]) for p in logs.problems] == [
        (2, "not JSON"),
        (4, "not a JSON object"),
        (5, "missing 'lamport'"),
        (6, "not UTF-8 text"),
        (8, "incomplete last line"),
    ]
    assert all(p.file == log for p in logs.problems)


def test_merge_across_machines_in_causal_order(two_machines: Path) -> None:
    logs = read_logs(two_machines)
    assert [f.name for f in logs.files] == ["bob.jsonl", "events.jsonl"]
    assert logs.problems == []
    assert len(logs.events) == len(ALICE) + len(BOB)  # including bob's unterminated last line
    keys = [(e.lamport, e.node) for e in logs.events]
    assert keys == sorted(keys)
    # ties on Lamport time are broken by node id, so the order is the same everywhere
    assert [(e.node, e.type) for e in logs.events if e.lamport == 20] == [
        ("alice", "recv"),
        ("bob", "recv"),
    ]
    # bob's send (L=6) precedes alice's recv of it (L=9) although alice's file comes first
    order = [(e.node, e.lamport) for e in logs.events]
    assert order.index(("bob", 6)) < order.index(("alice", 9))


def test_same_log_copied_twice_is_counted_once(two_machines: Path) -> None:
    copy = two_machines / "backup" / "alice" / "events.jsonl"
    write(copy, ALICE)
    logs = read_logs(two_machines)
    assert logs.duplicates == len(ALICE)
    assert len(logs.events) == len(ALICE) + len(BOB)


def test_missing_path_and_empty_folder_are_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(LogError, match="no such file or directory"):
        read_logs(tmp_path / "nope")
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    with pytest.raises(LogError, match=r"no event logs \(\*\.jsonl\)"):
        read_logs(tmp_path / "empty")
    assert issubclass(LogError, P2PFLError)


def test_command_errors_on_a_folder_without_logs(tmp_path: Path) -> None:
    with pytest.raises(P2PFLError, match="no event logs"):
        run(["logs", str(tmp_path)])
    write(tmp_path / "x.jsonl", [], extra="junk\n")
    with pytest.raises(P2PFLError, match="no valid events"):
        run(["logs", "summary", str(tmp_path)])


# --- summary -----------------------------------------------------------------------------


def test_summary_numbers(two_machines: Path) -> None:
    alice, bob = summarize(read_logs(two_machines).events)
    assert alice.peer == "alice"
    assert (alice.rounds, alice.sent, alice.received) == (2, 2, 2)
    assert (alice.bytes_sent, alice.bytes_received) == (2000, 3000)
    assert (alice.rejections, alice.reconnects) == (0, 1)
    assert alice.mean_round_s == pytest.approx(0.06)
    assert alice.mean_round_cpu_s == pytest.approx(0.04)
    assert alice.mean_train_s == pytest.approx(0.015)
    assert alice.train_share == pytest.approx(0.25)  # (0.01 + 0.02) / (0.05 + 0.07)
    assert alice.last_accuracy == 0.75
    assert (alice.peak_rss_mb, alice.finished, alice.stop_reason) == (100.5, True, "completed")

    assert (bob.rounds, bob.sent, bob.received) == (1, 3, 2)
    assert (bob.bytes_sent, bob.bytes_received) == (5000, 1500)
    assert (bob.rejections, bob.reconnects) == (1, 0)
    assert bob.mean_round_s == pytest.approx(0.04)
    assert bob.mean_round_cpu_s is None  # (a log from before round_end carried cpu_s)
    assert bob.train_share == pytest.approx(0.25)  # 0.01 / 0.04
    assert bob.last_accuracy == 0.4
    assert (bob.peak_rss_mb, bob.finished) == (None, None)


def test_summary_table_and_json(two_machines: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run(["logs", str(two_machines)]) == 0
    out, err = out_lines(capsys)
    assert out[0].split()[:5] == ["peer", "rounds", "alone", "sent", "recv"]
    alice = out[1].split()
    assert alice[:5] == ["alice", "2", "0", "2", "2"]
    assert alice[-1] == "yes" and "0.7500" in alice
    end = out[0].index("cpu ms") + len("cpu ms")  # (a right-aligned column)
    assert out[1][end - 4 : end] == "40.0" and out[2][end - 1 : end] == "-"
    assert out[2].split()[-1] == "-"  # bob logged no node_stop
    assert any("no node_stop" in row for row in out)
    assert err == []

    assert run(["logs", "summary", str(two_machines), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert [d["peer"] for d in data] == ["alice", "bob"]
    assert data[0]["bytes_received"] == 3000 and data[1]["finished"] is None


def test_human_bytes() -> None:
    assert [human_bytes(n) for n in (0, 1023, 1536, 3 * 1024**2, 5 * 1024**4)] == [
        "0 B",
        "1023 B",
        "1.5 KB",
        "3.0 MB",
        "5120.0 GB",
    ]


def test_summary_survives_odd_fields() -> None:
    events = [
        Event(T0, "a", "eval", 0, 1, {"accuracy": "high"}, Path("x"), 1),
        Event(T0, "a", "send", 0, 2, {"bytes": None}, Path("x"), 2),
        Event(T0, "a", "round_end", 0, 3, {"duration_s": "slow"}, Path("x"), 3),
        Event(T0, "a", "node_stop", 0, 4, {"finished": "yes", "peak_rss_mb": []}, Path("x"), 4),
    ]
    (s,) = summarize(events)
    assert (s.sent, s.bytes_sent, s.rounds, s.mean_round_s) == (1, 0, 1, None)
    assert (s.last_accuracy, s.finished, s.peak_rss_mb) == (None, None, None)
    assert "a" in format_summary([s])


# --- trace -------------------------------------------------------------------------------


def test_trace_orders_and_pairs(two_machines: Path) -> None:
    entries = trace_round(read_logs(two_machines).events, 1)
    assert [(e.event.lamport, e.event.node, e.event.type) for e in entries] == [
        (10, "bob", "round_start"),
        (13, "alice", "round_start"),
        (15, "alice", "send"),
        (17, "bob", "send"),
        (18, "bob", "send"),
        (19, "bob", "reject"),
        (20, "alice", "recv"),
        (20, "bob", "recv"),
        (21, "alice", "aggregate"),
        (23, "alice", "round_end"),
    ]
    by_lamport = {(e.event.node, e.event.lamport): e for e in entries}
    # no sent_lamport: paired by (sender, receiver, round)
    recv = by_lamport[("alice", 20)]
    assert recv.match is not None and (recv.match.node, recv.match.lamport) == ("bob", 17)
    sent = by_lamport[("bob", 17)]
    assert sent.match is recv.event and sent.note is None
    # alice's send was rejected by bob: flagged, with the reason
    assert by_lamport[("alice", 15)].note == "no recv: rejected by bob (duplicate parameters)"
    # carol's log was never collected: both directions say so
    assert by_lamport[("bob", 18)].note == "no recv: carol's log is missing"
    assert by_lamport[("bob", 20)].note == "no send: carol's log is missing"

    round0 = trace_round(read_logs(two_machines).events, 0)
    pairs = {(e.event.node, e.event.lamport): e.match for e in round0 if e.event.type == "recv"}
    assert {k: (m.node, m.lamport) for k, m in pairs.items() if m} == {
        ("bob", 7): ("alice", 5),
        ("alice", 9): ("bob", 6),
    }


def test_trace_fallback_pairing_rules(tmp_path: Path) -> None:
    logs = write(
        tmp_path / "e.jsonl",
        [
            rec("a", "send", 1, 0, peer="b", bytes=10, duration_s=0.1),
            rec("b", "recv", 5, 0, peer="a", bytes=10, sent_lamport=3),
            rec("b", "recv", 6, 0, peer="a", bytes=10),
            # fallback pairing respects causality: a recv cannot come from a later send
            rec("b", "recv", 12, 0, peer="a", bytes=10),
            rec("a", "send", 13, 0, peer="b", bytes=10, duration_s=0.1),
            rec("b", "recv", 15, 0, peer="a", bytes=10),
        ],
    )
    entries = trace_round(read_logs(logs).events, 0)
    notes = {e.event.lamport: (e.match.lamport if e.match else None, e.note) for e in entries}
    assert notes == {
        1: (6, None),
        5: (None, "no matching send in a's log"),
        6: (1, None),
        12: (None, "no matching send in a's log"),
        13: (15, None),
        15: (13, None),
    }


def test_trace_command_output(two_machines: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run(["logs", "trace", str(two_machines), "--round", "0"]) == 0
    out, _ = out_lines(capsys)
    sends = [row for row in out if "->" in row]
    assert sends[0].split() == [
        "L=",
        "5",
        "alice",
        "->",
        "bob",
        "1000",
        "B",
        "sent",
        "in",
        "2.0",
        "ms",
    ]
    assert "(sent at L=6)" in next(row for row in out if "alice <- bob" in row)
    assert out[-1] == "round 0: 2 sends, 2 recvs, 0 unmatched"

    assert run(["logs", str(two_machines), "trace", "--round", "1"]) == 0
    out, _ = out_lines(capsys)
    assert sum("!!" in row for row in out) == 3
    assert out[-1] == "round 1: 3 sends, 2 recvs, 3 unmatched"

    with pytest.raises(P2PFLError, match=r"no events in round 9 \(the logs have rounds 0-2\)"):
        run(["logs", "trace", str(two_machines), "--round", "9"])


def test_format_trace_lines() -> None:
    fields = {"peer": "bob", "bytes": 19660, "duration_s": 0.0012}
    send = Event(T0, "alice", "send", 3, 123, fields, Path("x"), 1)
    recv = Event(T0, "bob", "recv", 3, 130, {"peer": "alice", "bytes": 19660}, Path("x"), 1)
    entries = trace_round([send, recv], 3)
    assert format_trace(entries) == [
        "L=   123  alice -> bob      19.2 KB  sent in 1.2 ms",
        "L=   130  bob   <- alice    19.2 KB  (sent at L=123)",
    ]


# --- events and its filters --------------------------------------------------------------


def events_of(capsys: pytest.CaptureFixture[str], argv: list[str]) -> list[dict[str, Any]]:
    assert run([*argv, "--json"]) == 0
    return [json.loads(row) for row in capsys.readouterr().out.splitlines()]


def test_events_json_is_the_raw_records(
    two_machines: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    got = events_of(capsys, ["logs", "events", str(two_machines)])
    expected = sorted(ALICE + BOB, key=lambda r: (r["lamport"], r["node"], r["ts"]))
    assert got == expected


def test_events_filters(two_machines: Path, capsys: pytest.CaptureFixture[str]) -> None:
    base = ["logs", "events", str(two_machines)]

    def pick(*extra: str) -> list[tuple[str, int]]:
        return [(r["node"], r["lamport"]) for r in events_of(capsys, [*base, *extra])]

    assert {n for n, _ in pick("--peer", "bob")} == {"bob"}
    assert len(pick("--peer", "alice,bob")) == len(ALICE) + len(BOB)
    assert pick("--peer", "alice", "--peer", "bob") == pick("--peer", "alice,bob")
    assert pick("--type", "send,recv") == pick("--type", "send", "--type", "recv")
    assert len(pick("--type", "send,recv")) == 9
    assert pick("--type", "reject") == [("bob", 19)]
    assert {r for r in pick("--round", "1", "--type", "round_start")} == {
        ("bob", 10),
        ("alice", 13),
    }
    assert len(pick("--round", "0-1")) == len(pick("--round", "0")) + len(pick("--round", "1"))
    assert pick("--round", "2") == [("alice", 24)]  # node_stop; null rounds never match
    assert pick("--since", str(T0 + 0.2), "--peer", "alice") == [
        ("alice", n) for n in (20, 21, 22, 23, 24)
    ]
    assert pick(
        "--peer", "bob", "--type", "send", "--round", "1", "--since", str(T0 + SKEW + 0.175)
    ) == [("bob", 18)]


def test_events_notes_a_peer_without_a_log(
    two_machines: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run(["logs", "events", str(two_machines), "--peer", "carol"]) == 0
    out, err = out_lines(capsys)
    assert out == []
    assert err == ["note: no log from peer 'carol' (peers with logs: alice, bob)"]


def test_events_human_format(two_machines: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run(["logs", "events", str(two_machines), "--type", "reject"]) == 0
    (row,) = capsys.readouterr().out.splitlines()
    assert row.split()[1:] == [
        "L=",
        "19",
        "bob",
        "reject",
        "r1",
        "peer=alice",
        'reason="duplicate',
        'parameters"',
    ]
    (event,) = [e for e in read_logs(two_machines).events if e.type == "dp_budget"]
    assert format_event(event).endswith("dp_budget     r1    epsilon=0.5")


def test_unknown_type_is_an_error_listing_the_known(
    two_machines: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exc:
        run(["logs", "events", str(two_machines), "--type", "send,sned"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "unknown event type 'sned'" in err
    assert "known types: aggregate, checkpoint, connect" in err


@pytest.mark.parametrize("bad", ["x", "3-1", "-2", "1-", "1.5"])
def test_bad_round_ranges(bad: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError):
        parse_rounds(bad)


def test_round_ranges() -> None:
    assert parse_rounds("4") == (4, 4)
    assert parse_rounds("2-5") == (2, 5)


def test_since_parsing() -> None:
    now = 1_000_000.0
    assert parse_since("30s", now=now) == now - 30
    assert parse_since("5m", now=now) == now - 300
    assert parse_since("2h", now=now) == now - 7200
    assert parse_since("1d", now=now) == now - 86400
    assert parse_since("1.5h", now=now) == now - 5400
    assert parse_since("1700000000") == 1_700_000_000.0
    assert parse_since("1700000000.25") == 1_700_000_000.25
    assert parse_since("2023-11-14T22:13:20Z") == 1_700_000_000.0
    assert parse_since("2023-11-15T00:13:20+02:00") == 1_700_000_000.0
    naive = datetime(2024, 1, 31, 14, 5)
    assert parse_since("2024-01-31T14:05:00") == naive.timestamp()  # local time
    assert parse_since("2024-01-31") == datetime(2024, 1, 31).timestamp()
    assert abs(parse_since("10m") - (time.time() - 600)) < 60
    for bad in ("yesterday", "5x", "-5m", "2024-13-01"):
        with pytest.raises(argparse.ArgumentTypeError):
            parse_since(bad)
    assert datetime.fromtimestamp(parse_since("2023-11-14T22:13:20Z"), UTC).hour == 22


# --- Tail --------------------------------------------------------------------------------


def test_tail_waits_for_the_rest_of_a_line(tmp_path: Path) -> None:
    log = tmp_path / "a" / "events.jsonl"
    log.parent.mkdir()
    tail = Tail(tmp_path)
    assert tail.poll() == ([], [])
    first = line(rec("a", "node_start", 1, 0))
    log.write_text(first + first[:20])
    events, problems = tail.poll()
    assert [e.lamport for e in events] == [1] and problems == []
    assert tail.poll() == ([], [])  # the half line is held back, not reported as bad
    with log.open("a") as f:
        f.write(first.rstrip("\n")[20:])
    assert tail.poll() == ([], [])  # complete JSON, but no newline yet: still held
    with log.open("a") as f:
        f.write("\nnot json\n")
    events, problems = tail.poll()
    assert [(e.lamport, e.line) for e in events] == [(1, 2)]
    assert [(p.line, p.reason.split(" (")[0]) for p in problems] == [(3, "not JSON")]


def test_tail_picks_up_new_files_and_merges_a_batch(tmp_path: Path) -> None:
    tail = Tail(tmp_path / "run")  # does not exist yet: the nodes have not started
    assert tail.poll() == ([], [])
    write(tmp_path / "run" / "bob" / "events.jsonl", [rec("bob", "node_start", 2, 0)])
    write(tmp_path / "run" / "alice" / "events.jsonl", [rec("alice", "node_start", 2, 0)])
    events, _ = tail.poll()
    assert [(e.node, e.lamport) for e in events] == [("alice", 2), ("bob", 2)]
    write(tmp_path / "run" / "deep" / "er" / "carol.jsonl", [rec("carol", "listen", 1)])
    events, _ = tail.poll()
    assert [e.node for e in events] == ["carol"]
    assert len(tail.files()) == 3


def test_tail_restarts_a_truncated_or_replaced_file(tmp_path: Path) -> None:
    log = write(tmp_path / "events.jsonl", [rec("a", "node_start", n, 0) for n in (1, 2, 3)])
    tail = Tail(log)
    assert len(tail.poll()[0]) == 3
    write(log, [rec("a", "node_start", 9, 0)])  # truncated: shorter than what was read
    events, _ = tail.poll()
    assert [(e.lamport, e.line) for e in events] == [(9, 1)]
    # replaced by a same-size-or-longer file under the same name (log rotation)
    fresh = write(tmp_path / "new.tmp", [rec("b", "node_start", n, 0) for n in (4, 5)])
    os.replace(fresh, log)
    events, _ = tail.poll()
    assert [(e.node, e.line) for e in events] == [("b", 1), ("b", 2)]
    # rewritten in place to a longer file with different first bytes
    log.write_text("".join(line(rec("c", "listen", n)) for n in (6, 7, 8)))
    events, _ = tail.poll()
    assert [(e.node, e.line) for e in events] == [("c", 1), ("c", 2), ("c", 3)]
    assert tail.poll() == ([], [])


# --- follow ------------------------------------------------------------------------------


def scripted_sleep(steps: list[Callable[[], None]]) -> Callable[[float], None]:
    """Stands in for time.sleep in follow: each call performs the next step of a scenario."""

    def sleep(_seconds: float) -> None:
        if not steps:
            raise AssertionError("follow kept polling after the scenario ended")
        steps.pop(0)()

    return sleep


def test_follow_shows_the_last_n_then_ends_when_all_stopped(
    two_machines: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    bob_log = two_machines / "b" / "bob.jsonl"

    def bob_finishes_line() -> None:
        with bob_log.open("a") as f:
            f.write("\n")

    def bob_writes_garbage() -> None:
        with bob_log.open("a") as f:
            f.write("oops\n")

    def bob_stops() -> None:
        with bob_log.open("a") as f:
            f.write(line(rec("bob", "node_stop", 30, 2, finished=True)))

    steps: list[Callable[[], None]] = [bob_finishes_line, bob_writes_garbage, bob_stops]
    monkeypatch.setattr("p2pfl.logs.command.time.sleep", scripted_sleep(steps))
    argv = ["logs", "follow", str(two_machines), "-n", "3", "--until-stopped", "--json"]
    assert run(argv) == 0
    assert steps == []
    out, err = out_lines(capsys)
    lamports = [json.loads(row)["lamport"] for row in out]
    # bob's unterminated last line (L=21) is held back until its newline arrives
    assert lamports == [22, 23, 24, 21, 30]
    assert err == [f"{bob_log}:15: not JSON (Expecting value)"]


def test_follow_filters_and_restart_is_not_a_stop(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    first_run = [rec("a", "node_start", 1, 0), rec("a", "node_stop", 2, 0)]
    log = write(tmp_path / "a.jsonl", [*first_run, rec("a", "node_start", 3, 0)])
    write(tmp_path / "b.jsonl", [rec("b", "node_stop", 1, 0)])

    def train() -> None:
        with log.open("a") as f:
            f.write(line(rec("a", "resume", 4, 0)) + line(rec("a", "train", 5, 0)))

    def stop() -> None:
        with log.open("a") as f:
            f.write(line(rec("a", "node_stop", 6, 1)))

    steps: list[Callable[[], None]] = [train, stop]
    monkeypatch.setattr("p2pfl.logs.command.time.sleep", scripted_sleep(steps))
    argv = ["logs", str(tmp_path), "follow", "--type", "node_start,node_stop", "--peer", "a"]
    assert run([*argv, "--until-stopped", "--json"]) == 0
    assert steps == []
    out, _ = out_lines(capsys)
    assert [json.loads(row)["lamport"] for row in out] == [1, 2, 3, 6]


def test_follow_exits_cleanly_on_ctrl_c(
    two_machines: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    def interrupt() -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr("p2pfl.logs.command.time.sleep", scripted_sleep([interrupt]))
    assert run(["logs", "follow", str(two_machines), "-n", "0"]) == 0
    assert capsys.readouterr().out == ""


def test_follow_waits_for_a_run_folder_that_does_not_exist_yet(
    two_machines: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: Any
) -> None:
    """Like tail -F: started before the run, follow picks the logs up once they appear."""
    import shutil

    later = tmp_path / "later"

    def appear() -> None:
        shutil.copytree(two_machines, later)

    def interrupt() -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr("p2pfl.logs.command.time.sleep", scripted_sleep([appear, interrupt]))
    assert run(["logs", "follow", str(later), "-n", "0"]) == 0
    assert "round_start" in capsys.readouterr().out


def test_merging_runs_of_different_configurations_is_warned_about(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    for ts, (name, digest) in enumerate((("run1", "aaaa"), ("run2", "bbbb"))):
        folder = tmp_path / name
        folder.mkdir()
        (folder / "events.jsonl").write_text(
            json.dumps(
                {
                    "ts": 1 + ts,
                    "node": "p00",
                    "type": "node_start",
                    "round": 0,
                    "lamport": 1,
                    "config_digest": digest,
                }
            )
            + "\n"
        )
    assert run(["logs", "summary", str(tmp_path)]) == 0
    assert "2 different configurations" in capsys.readouterr().err


def test_follow_really_polls(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The real loop with real sleeps: a writer thread stops the node after a few polls."""
    import threading

    log = write(tmp_path / "events.jsonl", [rec("a", "node_start", 1, 0)])

    def later() -> None:
        time.sleep(0.05)
        with log.open("a") as f:
            f.write(line(rec("a", "node_stop", 2, 0)))

    writer = threading.Thread(target=later)
    writer.start()
    try:
        started = time.monotonic()
        assert run(["logs", "follow", str(log), "--until-stopped", "--interval", "0.01"]) == 0
        assert time.monotonic() - started < 10 * TIMEOUT
    finally:
        writer.join()
    out, _ = out_lines(capsys)
    assert [row.split()[4] for row in out] == ["node_start", "node_stop"]


# --- plot --------------------------------------------------------------------------------


def test_plot_writes_a_png(two_machines: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("matplotlib")
    assert run(["logs", "plot", str(two_machines)]) == 0
    png = two_machines / "events.png"
    assert capsys.readouterr().out.strip() == f"wrote {png}"
    data = png.read_bytes()
    assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 10_000
    out = two_machines / "plots" / "run.png"
    assert run(["logs", str(two_machines), "plot", "-o", str(out)]) == 0
    assert out.read_bytes().startswith(b"\x89PNG")


def test_plot_without_data_or_matplotlib(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("matplotlib")
    only_start = [Event(T0, "a", "node_start", 0, 1, {}, Path("x"), 1)]
    with pytest.raises(P2PFLError, match="nothing to plot"):
        plot_logs(only_start, tmp_path / "x.png")
    monkeypatch.setitem(sys.modules, "matplotlib.backends.backend_agg", None)
    with pytest.raises(P2PFLError, match="pip install matplotlib"):
        plot_logs(only_start, tmp_path / "x.png")


# --- argv --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["logs", "D"], ["logs", "summary", "D"]),
        (["logs", "D", "--json"], ["logs", "summary", "D", "--json"]),
        (["logs", "D", "summary"], ["logs", "summary", "D"]),
        (["logs", "summary", "D"], ["logs", "summary", "D"]),
        (
            ["-v", "logs", "D", "trace", "--round", "3"],
            ["-v", "logs", "trace", "D", "--round", "3"],
        ),
        (["logs", "D", "events", "--peer", "bob"], ["logs", "events", "D", "--peer", "bob"]),
        # an option's value that happens to be a sub-command name is left alone
        (["logs", "events", "D", "--peer", "trace"], ["logs", "events", "D", "--peer", "trace"]),
        (["logs", "D", "--peer", "plot"], ["logs", "summary", "D", "--peer", "plot"]),
        (["logs", "--json", "D", "summary"], ["logs", "summary", "--json", "D"]),
        (["logs"], ["logs"]),
        (["logs", "-h"], ["logs", "-h"]),
        (["run", "peers.yaml", "--id", "a"], ["run", "peers.yaml", "--id", "a"]),
        (["init", "--out", "logs"], ["init", "--out", "logs"]),
        ([], []),
    ],
)
def test_normalize_argv(argv: list[str], expected: list[str]) -> None:
    assert normalize_argv(argv) == expected


def test_both_orders_parse_to_the_same_command() -> None:
    parser = argparse.ArgumentParser(prog="p2pfl")
    parser.add_argument("-v", action="store_true")
    register(parser.add_subparsers(dest="command", required=True))
    a = parser.parse_args(
        normalize_argv(["logs", "D", "events", "--type", "send", "--round", "2-3"])
    )
    b = parser.parse_args(
        normalize_argv(["logs", "events", "D", "--type", "send", "--round", "2-3"])
    )
    assert vars(a) == vars(b)
    assert (a.logs_command, a.path, a.type, a.round) == ("events", "D", [["send"]], (2, 3))
    c = parser.parse_args(normalize_argv(["logs", "D"]))
    assert (c.logs_command, c.func) == ("summary", command.cmd_summary)


# --- a real run --------------------------------------------------------------------------


@pytest.mark.slow
def test_real_run_logs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Three real nodes (``p2pfl harness``, a few seconds): the reader must agree with them."""
    pytest.importorskip("sklearn")
    out = tmp_path / "run"
    subprocess.run(
        [
            *(sys.executable, "-m", "p2pfl", "harness", "--out", str(out), "--peers", "3"),
            *("--rounds", "3", "--topology", "full", "--no-baseline", "--no-snapshots"),
        ],
        check=True,
        capture_output=True,
        timeout=60 * TIMEOUT,
        cwd=REPO,
    )
    logs = read_logs(out / "state")
    assert logs.problems == []
    summaries = summarize(logs.events)
    assert [s.peer for s in summaries] == ["p00", "p01", "p02"]
    for s in summaries:
        # (a crossing dial at start-up may replace a link after a round's model went out on
        # it: the new link gets it again and the copy is dropped, so 6 or a few more sends)
        assert (s.rounds, s.finished, s.received) == (3, True, 6) and 6 <= s.sent <= 8
        assert s.last_accuracy is not None and s.mean_round_s is not None
    for r in range(3):
        recvs = [e for e in trace_round(logs.events, r) if e.event.type == "recv"]
        assert len(recvs) == 6 and all(e.match is not None for e in recvs)
        assert all(e.match.lamport == e.event.get("sent_lamport") for e in recvs if e.match)
        assert all(e.match.lamport < e.event.lamport for e in recvs if e.match)
    assert run(["logs", str(out / "state")]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 1 + 3 + 2


# --- hostile content (found by a review) ------------------------------------------------


def test_hostile_lines_are_reported_not_fatal(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    good = '{"ts": 1.0, "node": "a", "type": "send", "round": 0, "lamport": 1, "peer": "b"'
    path.write_text(
        "[" * 5000
        + "]" * 5000
        + "\n"  # nested deeper than the JSON parser recurses
        + good
        + ', "bytes": NaN}\n'
        + good.replace('"lamport": 1', '"lamport": 2')
        + ', "bytes": 1e999}\n'
        + '{"x": "'
        + "y" * (2 << 20)
        + '"}\n'  # a 2 MiB line
        + good.replace('"lamport": 1', '"lamport": 3')
        + ', "bytes": 10}\n'
    )
    logs = read_logs(path)
    assert [p.line for p in logs.problems] == [1, 4]
    assert "nested too deeply" in logs.problems[0].reason
    assert "longer than" in logs.problems[1].reason
    (summary,) = summarize(logs.events)
    assert summary.sent == 3 and summary.bytes_sent == 10  # NaN and inf count as nothing


def test_tail_skips_an_endless_line_in_bounded_memory(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    tail = Tail(path)
    with path.open("w") as f:
        f.write("z" * (3 << 20))  # no newline yet, longer than a line may be
        f.flush()
        assert tail.poll()[1][0].reason.startswith("line longer than")
        f.write("z" * 1000 + "\n")  # its end: dropped, not reported again
        f.write('{"ts": 1, "node": "a", "type": "eval", "round": 0, "lamport": 4}\n')
    events, problems = tail.poll()
    assert problems == [] and [e.lamport for e in events] == [4]
    assert events[0].line == 2


def test_summary_counts_rounds_aggregated_alone_and_a_node_that_stopped_alone() -> None:
    events = [
        Event(T0, "a", "aggregate", 0, 1, {"members": ["a", "b"]}, Path("x"), 1),
        Event(T0, "a", "aggregate", 1, 2, {"members": ["a"]}, Path("x"), 2),
        Event(T0, "a", "aggregate", 2, 3, {"members": "a"}, Path("x"), 3),  # (malformed)
        Event(T0, "b", "node_stop", 0, 4, {"finished": False, "reason": "alone"}, Path("x"), 4),
    ]
    a, b = summarize(events)
    assert (a.alone, b.alone) == (1, 0)
    table = format_summary([a, b])
    assert table.splitlines()[2].split()[-1] == "alone"
    assert "alone: rounds averaged with no neighbour's model" in table


def test_compare_puts_runs_side_by_side(
    two_machines: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import shutil

    other = tmp_path / "other-run"
    shutil.copytree(two_machines, other)
    log = next(other.rglob("*.jsonl"))
    lines = log.read_text().splitlines()
    log.write_text("\n".join(line for line in lines if '"type":"reject"' not in line) + "\n")
    assert run(["logs", "compare", str(two_machines), str(other)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split() == [two_machines.name, "other-run"]
    rows = {line[:18].strip(): line[18:].split() for line in out[1:]}
    assert rows["rounds"] == ["2", "2"] and rows["peers (finished)"] == ["2", "(1)", "2", "(1)"]
    assert run(["logs", "compare", str(two_machines), str(other), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert set(data) == {str(two_machines), str(other)}
    assert data[str(two_machines)]["score_mean"] is not None
    with pytest.raises(LogError, match="two or more paths"):  # one run: nothing to compare
        run(["logs", "compare", str(two_machines)])


def test_summary_counts_silent_neighbours() -> None:
    events = [
        Event(T0, "a", "suspect_link", 3, 1, {"peer": "b", "phi": 8.1}, Path("x"), 1),
        Event(T0, "a", "unsuspect_link", None, 2, {"peer": "b"}, Path("x"), 2),
        Event(T0, "b", "round_end", 0, 3, {"duration_s": 0.1}, Path("x"), 3),
    ]
    a, b = summarize(events)
    assert (a.silences, b.silences) == (1, 0)
    table = format_summary([a, b])
    assert table.splitlines()[0].split()[-1] == "silences"
    assert [line.split()[-1] for line in table.splitlines()[1:3]] == ["1", "0"]
    assert "silences: neighbours suspected by the failure detector" in table


def test_summary_shows_bytes_per_round_and_the_compression() -> None:
    def e(node: str, kind: str, r: int | None, fields: dict[str, object]) -> Event:
        return Event(T0, node, kind, r, 1, fields, Path("x"), 1)

    events = [
        e("a", "node_start", 0, {"parameters": 1000, "compression": "int8"}),
        e("a", "send", 0, {"peer": "b", "bytes": 4009, "keyframe": True}),
        e("a", "send", 1, {"peer": "b", "bytes": 1000}),
        e("a", "round_end", 0, {"duration_s": 0.1}),
        e("a", "round_end", 1, {"duration_s": 0.1}),
        e("b", "node_start", 0, {"parameters": 1000, "compression": "<script>x"}),
        e("b", "send", 0, {"peer": "a", "bytes": 4000}),
        e("b", "round_end", 0, {"duration_s": 0.1}),
    ]
    a, b = summarize(events)
    assert (a.keyframes, a.sent_per_round, b.keyframes) == (1, 2504.5, 0)
    assert a.compression_ratio == pytest.approx(8000 / 5009)
    table = format_summary([a, b])
    header = table.splitlines()[0].split()
    assert header[-2:] == ["compression", "keyframes"] and "sent/round" in header
    assert table.splitlines()[1].split()[-3:] == ["int8", "1.6x", "1"]
    assert bytes_per_round(events, 3) == [8009, 1000, 0]
    totals = run_totals([a, b])
    assert totals["compression"] == "<script>x, int8" and totals["bytes_per_round"] == 4504.5
    plain = summarize([e("c", "send", 0, {"bytes": 4}), e("c", "round_end", 0, {})])
    assert "compression" not in format_summary(plain)
