"""What a node keeps on disk stays consistent: a checkpoint commit in flight is never
overtaken, a full disk does not stop training, and a restart continues the Lamport clock
past everything already logged, and the privacy budget spent survives a lost event log
and a power cut. (Cases found by a review; each failed before its fix.)"""

from __future__ import annotations

import asyncio
import dataclasses
import errno
import json
import os
import threading
import time
from pathlib import Path
from typing import Any

import pytest

import p2pfl.daemon.persist as persist_mod
from p2pfl.core.clock import LamportClock
from p2pfl.daemon.events import EventLog, last_lamport
from p2pfl.learning import build_learner, flatten
from p2pfl.learning.trainer import restore_dp_releases
from p2pfl.store import checkpoint as ckpt

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


def test_sync_makes_the_log_and_its_directory_entry_durable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "events.jsonl"
    log = EventLog(path, "alice", LamportClock())
    synced: list[tuple[int, int]] = []  # (inode, bytes in the log then) per fsync

    def fsync(fd: int) -> None:
        synced.append((os.fstat(fd).st_ino, path.stat().st_size))

    monkeypatch.setattr(os, "fsync", fsync)
    log.emit("train", 0, loss=1.0)
    log.sync()
    size = path.stat().st_size
    log.emit("train", 1, loss=1.0)
    log.sync()
    log.close()
    log.sync()  # closed: nothing to do
    file_ino, dir_ino = path.stat().st_ino, tmp_path.stat().st_ino
    # Each train event was written out before its fsync; the directory is fsynced once.
    assert synced == [(file_ino, size), (dir_ino, size), (file_ino, path.stat().st_size)]


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
        ("alice", "bob"),
        rounds=3,
        startup_timeout=60,
        extra={"net": {"down_grace": 0.3}, **ALONE},  # (bob may go on alone)
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


# --- the privacy budget lives in the checkpoint (not in the event log) --------------------

DP = {"aggregation": {"dp": {"clip_norm": 1.0, "noise_multiplier": 1.1, "delta": 1.0e-5}}}
#: A node that may train alone (``training.min_neighbours`` 0), for tests of one node.
ALONE = {"training": {"min_neighbours": 0}}


def log_with_trains(state: Path, count: int) -> Path:
    """An event log holding ``count`` train events (and a few others)."""
    state.mkdir(parents=True, exist_ok=True)
    path = state / "events.jsonl"
    log = EventLog(path, "bob", LamportClock())
    for r in range(count):
        log.emit("round_start", r)
        log.emit("train", r, loss=1.0)
    log.close()
    return path


def checkpoint(net: Any, dp_releases: int | None) -> ckpt.Checkpoint:
    """A checkpoint of ``net``'s model (resume at round 4) with that accountant state."""
    model = net.config.training.model.as_mapping()
    params = flatten(build_learner(model, net.config.seed, source="test").get_weights())
    return ckpt.Checkpoint(4, params.copy(), 9, net.config.digest, dp_releases)


def test_the_checkpoint_alone_restores_the_budget_when_the_log_is_gone(make_network) -> None:
    net = make_network(("alice", "bob"), extra=DP)
    log = net.state("bob") / "events.jsonl"
    assert restore_dp_releases(net.config, checkpoint(net, 7), log) == 7  # no log at all
    log_with_trains(net.state("bob"), 2)  # a rotated log: fewer lines than releases
    assert restore_dp_releases(net.config, checkpoint(net, 7), log) == 7


def test_a_log_a_round_ahead_of_its_checkpoint_counts_the_larger_number(make_network) -> None:
    """The checkpoint of round r - 1 may still be on disk when the log has trained rounds r
    and r + 1 (the commit of round r was in flight): never count less than was spent."""
    net = make_network(("alice", "bob"), extra=DP)
    log = log_with_trains(net.state("bob"), 9)
    assert restore_dp_releases(net.config, checkpoint(net, 7), log) == 9
    assert restore_dp_releases(net.config, None, log) == 9  # no checkpoint yet: the log's
    assert restore_dp_releases(net.config, None, net.state("alice") / "events.jsonl") == 0


def test_a_checkpoint_the_log_outruns_is_refused_with_a_way_out(make_network) -> None:
    net = make_network(("alice", "bob"), extra=DP)
    log = log_with_trains(net.state("bob"), 10)
    with pytest.raises(ckpt.CheckpointError) as info:
        restore_dp_releases(net.config, checkpoint(net, 7), log)
    message = str(info.value)
    assert "counts 7 differential-privacy release(s)" in message and "records 10" in message
    assert f"move {net.state('bob') / 'checkpoint.npz'} away" in message
    assert f"move {net.state('bob')} away" in message


def test_a_checkpoint_without_a_budget_is_refused_when_dp_is_on(make_network) -> None:
    net = make_network(("alice", "bob"), extra=DP)
    log = log_with_trains(net.state("bob"), 3)
    with pytest.raises(ckpt.CheckpointError, match="has no differential-privacy budget") as info:
        restore_dp_releases(net.config, checkpoint(net, None), log)
    assert "records 3 release(s)" in str(info.value) and "move" in str(info.value)
    plain = dataclasses.replace(  # without DP there is no budget to lose
        net.config, aggregation=dataclasses.replace(net.config.aggregation, dp=None)
    )
    assert restore_dp_releases(plain, checkpoint(net, None), log) == 0


def test_without_a_checkpoint_a_log_of_releases_counts_with_a_warning(
    make_network, caplog: pytest.LogCaptureFixture
) -> None:
    """The checkpoint moved away, the log kept: its count is all there is, and if it was
    rotated too the budget is undercounted where nothing can tell. The operator is told."""
    net = make_network(("alice", "bob"), extra=DP)
    log = log_with_trains(net.state("bob"), 3)
    with caplog.at_level("WARNING", logger="p2pfl.learning.trainer"):
        assert restore_dp_releases(net.config, None, log) == 3
    assert f"{log} records 3 release(s)" in caplog.text
    assert "counted from the event log alone" in caplog.text
    caplog.clear()
    plain = dataclasses.replace(
        net.config, aggregation=dataclasses.replace(net.config.aggregation, dp=None)
    )
    with caplog.at_level("WARNING", logger="p2pfl.learning.trainer"):
        assert restore_dp_releases(net.config, None, net.state("alice") / "events.jsonl") == 0
        assert restore_dp_releases(net.config, checkpoint(net, 3), log) == 3
        assert restore_dp_releases(plain, None, log) == 0
    assert not caplog.records  # a fresh start, a checkpoint, or no DP: nothing to say


@pytest.mark.parametrize("dp", [True, False], ids=["dp", "no-dp"])
async def test_with_dp_each_train_event_is_durable_before_the_update_leaves(
    make_network, monkeypatch: pytest.MonkeyPatch, dp: bool
) -> None:
    """A power cut may roll back the round's checkpoint (committed without a directory
    fsync) and an unsynced log together: the budget would restart below what was released.
    With DP the train event is fsynced before the update is handed to the outbox; without
    DP there is no budget, and no fsync on the round path."""
    net = make_network(
        ("alice", "bob"),
        rounds=2,
        round_timeout=0.3,
        startup_timeout=0.3,
        extra={**(DP if dp else {}), **ALONE},
    )
    alice = make_node(net, "alice")
    order: list[str] = []
    alice.events.listeners.append(lambda record: order.append(record["type"]))
    real_sync, real_open = alice.events.sync, alice.outbox.open

    def sync() -> None:
        order.append("sync")
        real_sync()

    def outbox_open(*args: Any) -> None:
        order.append("outbox")
        real_open(*args)

    monkeypatch.setattr(alice.events, "sync", sync)
    monkeypatch.setattr(alice.outbox, "open", outbox_open)
    assert await asyncio.wait_for(alice.run(), 10 * TIMEOUT) == 0
    seen = [kind for kind in order if kind in ("train", "sync", "outbox")]
    assert seen == (["train", "sync", "outbox"] if dp else ["train", "outbox"]) * 2


async def test_a_node_refuses_to_resume_a_dp_run_from_a_checkpoint_without_its_budget(
    make_network,
) -> None:
    net = make_network(("alice", "bob"), extra=DP)
    bob = make_node(net, "bob")
    ckpt.save_checkpoint(net.state("bob"), checkpoint(net, None))
    try:
        with pytest.raises(ckpt.CheckpointError, match="no differential-privacy budget"):
            await bob.run()
    finally:
        bob.events.close()


async def test_deleting_the_event_log_does_not_reset_the_privacy_budget(make_network) -> None:
    """bob runs alone (alice never comes), stops after a round, loses his event log, and
    runs again: his epsilon goes on from what he spent, not from zero."""
    from p2pfl.core.privacy import epsilon

    net = make_network(
        ("alice", "bob"),
        rounds=4,
        startup_timeout=0.3,
        extra={**DP, "net": {"down_grace": 0.3}, **ALONE},
    )
    first = make_node(net, "bob")

    def stop_after_a_round(record: dict[str, Any]) -> None:
        if record["type"] == "eval":
            first.request_stop()

    first.events.listeners.append(stop_after_a_round)
    assert await asyncio.wait_for(first.run(), 20 * TIMEOUT) == 0
    log = net.state("bob") / "events.jsonl"
    spent = len([e for e in read_events(log) if e["type"] == "train"])
    saved = ckpt.load_checkpoint(
        net.state("bob"), expected_digest=net.config.digest, expected_size=first.params.size
    )
    assert saved is not None and saved.dp_releases is not None
    assert saved.dp_releases >= spent >= 1 and saved.next_round < 4
    log.unlink()

    again = make_node(net, "bob")
    assert await asyncio.wait_for(again.run(), 20 * TIMEOUT) == 0
    trains = [e for e in read_events(log) if e["type"] == "train"]
    assert trains, "the second run trained"
    assert trains[0]["dp_epsilon"] == pytest.approx(
        epsilon(saved.dp_releases + 1, 1.1, 1e-5), abs=1e-5
    )
    assert again.local.dp_releases == saved.dp_releases + len(trains)
