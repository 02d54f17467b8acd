"""What a node keeps on disk stays consistent: a checkpoint commit in flight is never
overtaken, a full disk does not stop training, and a restart continues the Lamport clock
past everything already logged. (Cases found by a review; each failed before its fix.)"""

from __future__ import annotations

import asyncio
import errno
import json
import os
import threading
import time
from pathlib import Path
from typing import Any

import p2pfl.persist as persist_mod
from p2pfl import checkpoint as ckpt
from p2pfl.events import EventLog, LamportClock, last_lamport

from .conftest import TIMEOUT
from .test_node import make_node, read_events


def slow_alice_commits(monkeypatch: Any, log: list[tuple[str, float]]) -> threading.Event:
    """alice's disk is slow (each fsync-and-rename takes 0.5 s); set once her second
    commit has begun (her next round then waits for it)."""
    real_commit = ckpt.commit_checkpoint
    second = threading.Event()
    count = 0

    def slow_commit(state_dir: Path, tmp: Path, **kwargs: Any) -> Path:
        nonlocal count
        if state_dir.name != "alice":
            return real_commit(state_dir, tmp, **kwargs)
        count += 1
        if count == 2:
            second.set()
        log.append(("commit_start", time.monotonic()))
        time.sleep(0.5)
        try:
            return real_commit(state_dir, tmp, **kwargs)
        finally:
            log.append(("commit_end", time.monotonic()))

    monkeypatch.setattr(persist_mod, "commit_checkpoint", slow_commit)
    return second


async def test_stop_during_a_slow_commit_waits_for_it(make_network, monkeypatch) -> None:
    net = make_network(("alice", "bob"), rounds=200)
    log: list[tuple[str, float]] = []
    second = slow_alice_commits(monkeypatch, log)
    real_save = ckpt.save_checkpoint

    def logged_save(state_dir: Path, checkpoint: ckpt.Checkpoint) -> Path:
        log.append(("final_save_start", time.monotonic()))
        return real_save(state_dir, checkpoint)

    monkeypatch.setattr(persist_mod, "save_checkpoint", logged_save)
    alice, bob = (make_node(net, p) for p in net.peers)
    tasks = [asyncio.ensure_future(alice.run()), asyncio.ensure_future(bob.run())]
    while not second.is_set():
        await asyncio.sleep(0.01)
    await asyncio.sleep(0.2)  # alice's next round now waits for that commit
    alice.request_stop()
    assert await asyncio.wait_for(tasks[0], 20 * TIMEOUT) == 0
    bob.request_stop()
    assert await asyncio.wait_for(tasks[1], 20 * TIMEOUT) == 0
    starts = [t for kind, t in log if kind == "final_save_start"]
    ends = [t for kind, t in log if kind == "commit_end"]
    assert starts and starts[0] >= max(ends), log  # the final save never overlaps a commit
    saved = ckpt.load_checkpoint(
        net.state("alice"), expected_digest=net.config.digest, expected_size=alice.params.size
    )
    assert saved is not None


async def test_full_disk_for_snapshots_and_checkpoints_does_not_stop_a_node(
    make_network, monkeypatch
) -> None:
    net = make_network(("alice", "bob"), rounds=5)
    real_pwrite, real_write = os.pwrite, ckpt.write_checkpoint
    calls = {"pwrite": 0, "write": 0}

    def full_pwrite(fd: int, data: Any, offset: int) -> int:
        calls["pwrite"] += 1
        if calls["pwrite"] == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_pwrite(fd, data, offset)

    def full_write(state_dir: Path, checkpoint: ckpt.Checkpoint) -> Path:
        if state_dir.name == "alice":
            calls["write"] += 1
            if calls["write"] == 3:
                raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(state_dir, checkpoint)

    monkeypatch.setattr(persist_mod.os, "pwrite", full_pwrite)
    monkeypatch.setattr(persist_mod, "write_checkpoint", full_write)
    nodes = [make_node(net, p, snapshots=p == "alice") for p in net.peers]
    results = await asyncio.wait_for(asyncio.gather(*(n.run() for n in nodes)), 60 * TIMEOUT)
    assert results == [0, 0]
    assert calls["pwrite"] >= 2 and calls["write"] >= 3  # the faults did happen
    rounds = [e for e in read_events(net.state("alice") / "events.jsonl") if e["type"] == "eval"]
    assert len(rounds) == 5


def test_a_restarted_log_continues_the_lamport_clock(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    first = EventLog(path, "alice", LamportClock())
    for _ in range(5):
        first.emit("round_start", 0)
    first.close()
    with path.open("a") as f:  # a torn last line (the node was killed mid-write)
        f.write('{"ts": 1, "node": "alice", "lamp')
    assert last_lamport(path) == 5
    clock = LamportClock(2)  # e.g. restored from a checkpoint one round older than the log
    again = EventLog(path, "alice", clock)
    again.emit("node_start", 0)
    again.close()
    lines = [json.loads(line) for line in path.read_text().splitlines() if line.endswith("}")]
    assert lines[-1]["lamport"] == 6


def test_last_lamport_ignores_what_it_cannot_use(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    assert last_lamport(path) == 0  # no log yet
    path.write_text('{"lamport": 7}\n{"lamport": 9007199254740993}\n[1]\n"x"\n')
    assert last_lamport(path) == 7  # above 2**53 would make every message invalid


async def test_resumed_node_does_not_wait_out_the_startup_timeout_for_a_dead_neighbour(
    make_network,
) -> None:
    """bob restarts from a checkpoint; alice is down for good. A fresh node would wait
    training.startup_timeout (60 s here) for her; a resumed node joins a running network,
    so it gives her net.down_grace, then goes on (and its live neighbours, who wait for
    its rounds, are not held up)."""
    net = make_network(
        ("alice", "bob"), rounds=3, startup_timeout=60, extra={"net": {"down_grace": 0.3}}
    )
    bob = make_node(net, "bob")
    ckpt.save_checkpoint(
        net.state("bob"), ckpt.Checkpoint(1, bob.params.copy(), 0, net.config.digest)
    )
    started = time.monotonic()
    assert await asyncio.wait_for(bob.run(), 20 * TIMEOUT) == 0
    assert time.monotonic() - started < 20 * TIMEOUT
    aggregates = [
        e for e in read_events(net.state("bob") / "events.jsonl") if e["type"] == "aggregate"
    ]
    assert [(e["round"], e["missing"]) for e in aggregates] == [(1, ["alice"]), (2, ["alice"])]
