"""Secure aggregation across rounds at one node: keys one round ahead, restarts that sit
rounds out, reconnects, a round that ends while its masks are being made, clipping counts
(cases from the fifth review)."""

from __future__ import annotations

import asyncio
import types
from typing import Any

import numpy as np

from p2pfl.proto.wire import Keys, MessageType, decode_message
from p2pfl.secure.group import MemberRound

from .test_node import make_node, run_all
from .test_secure_node import PEERS, SECURE, aggregates, four  # noqa: F401


def _recorder() -> tuple[list[bytes], Any]:
    sent: list[bytes] = []

    async def send_message(message: bytes) -> None:
        sent.append(message)

    return sent, send_message


async def test_a_node_sitting_out_round_0_does_not_own_round_1_it_also_sits_out(four) -> None:  # noqa: F811
    """bob crashed during round 0 after joining round 1 ahead (journal: contributed 1): he
    sits out rounds 0 and 1, as member and as owner. Round-1 KEYS that reach him in round 0
    get an empty SHARES (the members stop waiting), not a key exchange he would never
    finish (and his earlier life may have sent other SHARES for round 1)."""
    net = four(rounds=5, extra=SECURE)
    net.state("bob").mkdir(parents=True)
    (net.state("bob") / "secagg.log").write_text("contributed 1\n")
    bob = make_node(net, "bob")
    assert bob.exchange is not None
    sent, send_message = _recorder()
    secrets = {p: b"s" * 32 for p in PEERS}
    group = [p for p in PEERS if p != "bob"]
    rounds = {m: MemberRound(m, "bob", group, 1, secrets) for m in group}
    try:
        bob.tracker.start_round(0)
        bob.exchange.start_round(0)
        for m in group:
            link = types.SimpleNamespace(peer_id=m, send_message=send_message)
            bob.message(link, Keys(1, 1, rounds[m].public, rounds[m].boxes))  # type: ignore[arg-type]
        await asyncio.sleep(0)
        assert 1 not in bob.exchange.owners
        assert not [
            m
            for m in sent
            if m[0] == MessageType.SHARES and decode_message(m, max_chunk=1 << 20).boxes
        ]  # type: ignore[union-attr]
    finally:
        bob.events.close()
        bob.exchange.close()


async def test_identical_keys_after_a_reconnect_get_the_lost_shares_again(four) -> None:  # noqa: F811
    """bob's link dropped just as alice sent round 0's SHARES (on the dead link). He
    reconnects and resends the very same KEYS: alice sends his SHARES again (the same
    boxes), so he can still contribute instead of leaving her waiting for the deadline."""
    net = four(rounds=3, extra=SECURE)
    alice = make_node(net, "alice")
    assert alice.exchange is not None
    sent, send_message = _recorder()
    state = alice.exchange._owner(0)
    assert state is not None
    secrets = {p: b"s" * 32 for p in PEERS}
    group = [p for p in PEERS if p != "alice"]
    rounds = {m: MemberRound(m, "alice", group, 0, secrets) for m in group}
    for m in group:
        state.add_keys(m, rounds[m].public, rounds[m].boxes)
    expected = state.dispatch()["bob"]  # ... and lost with bob's old link
    try:
        bob = types.SimpleNamespace(peer_id="bob", send_message=send_message)
        alice.message(bob, Keys(2, 0, rounds["bob"].public, rounds["bob"].boxes))  # type: ignore[arg-type]
        await asyncio.sleep(0)
        shares = [decode_message(m, max_chunk=1 << 20) for m in sent if m[0] == MessageType.SHARES]
        assert [s.boxes for s in shares] == [expected]  # type: ignore[union-attr]
    finally:
        alice.events.close()
        alice.exchange.close()


async def test_clipped_entries_are_counted_once_per_round(four, monkeypatch) -> None:  # noqa: F811
    """Every node's trained parameters have exactly 3 entries beyond the clip range: the
    aggregate event says 3, though the same parameters are encoded as member and owner."""
    from p2pfl.learning.trainer import LocalModel

    original = LocalModel.train

    def with_outliers(self: Any, params: np.ndarray, round_index: int) -> Any:
        result = original(self, params, round_index)
        result.params = np.clip(result.params, -1.0, 1.0)
        result.params[:3] = 1000.0
        return result

    monkeypatch.setattr(LocalModel, "train", with_outliers)
    net = four(rounds=1, extra=SECURE)
    assert await run_all([make_node(net, p) for p in PEERS]) == [0] * 4
    for peer in PEERS:
        (agg,) = aggregates(net.state(peer) / "events.jsonl")
        assert "kept_own" not in agg
        assert agg["clipped"] == 3, agg["clipped"]


async def test_a_contribution_whose_round_ended_while_its_mask_was_made_fails_quietly(four) -> None:  # noqa: F811
    """The round ends while a contribution waits for its mask: it returns quietly, and
    never encodes another round's parameters into this round's mask."""
    net = four(rounds=5, extra=SECURE)
    alice = make_node(net, "alice")
    ex = alice.exchange
    assert ex is not None
    loop = asyncio.get_running_loop()
    gate: asyncio.Future[np.ndarray] = loop.create_future()
    ex._masks[(0, "bob")] = gate
    ex._trained = (0, np.zeros(alice.params.size, dtype=np.float32))
    alice.outbox.open(0, {})
    try:
        task = asyncio.ensure_future(ex._contribute(0, "bob"))
        await asyncio.sleep(0)
        ex._trained = None  # the round ended (start_round of the next round)
        alice.outbox.close()
        gate.set_result(np.zeros(alice.params.size, dtype=np.uint32))
        await task  # should return quietly
    finally:
        alice.events.close()
        ex.close()


async def test_without_buffered_rounds_no_keys_go_ahead(four) -> None:  # noqa: F811
    """max_buffered_rounds 0: no keys ahead, and every round still aggregates all."""
    net = four(rounds=3, extra={**SECURE, "limits": {"max_buffered_rounds": 0}})
    assert await run_all([make_node(net, p) for p in PEERS]) == [0] * 4
    for peer in PEERS:
        aggs = aggregates(net.state(peer) / "events.jsonl")
        assert [a["missing"] for a in aggs] == [[], [], []] and not any(
            "kept_own" in a for a in aggs
        )
        journal = (net.state(peer) / "secagg.log").read_text().split()
        assert journal.count("contributed") == 3


async def test_a_stop_while_the_owner_sums_never_hands_its_vectors_out(four, monkeypatch) -> None:  # noqa: F811
    """A stop cancels the owner while it asks for shares and a thread still sums the
    received vectors: those must not go back to the pool, where a new stream or mask could
    overwrite them mid-sum (found by review)."""
    import threading
    import time

    import p2pfl.daemon.pool
    import p2pfl.daemon.secure_exchange as exchange

    lock = threading.Lock()
    reading: set[int] = set()
    given_while_read: list[int] = []
    sums: list[threading.Event] = []
    real_sum, real_give = exchange.sum_contributions, p2pfl.daemon.pool.ArrayPool.give
    real_collect = exchange.SecureExchange._collect_reveals

    def address(array: np.ndarray) -> int:
        return int(array.__array_interface__["data"][0])

    def slow_sum(contributions: Any, *args: Any) -> Any:
        done = threading.Event()
        with lock:
            reading.update(address(c) for c in contributions)
            sums.append(done)
        try:
            time.sleep(0.3)  # a big model: summing takes a while
            return real_sum(contributions, *args)
        finally:
            with lock:
                reading.difference_update(address(c) for c in contributions)
            done.set()

    def give(self: Any, array: np.ndarray) -> None:
        with lock:
            if address(array) in reading:
                given_while_read.append(address(array))
        real_give(self, array)

    async def collect_then_stop(self: Any, *args: Any) -> None:
        self.node.request_stop()  # SIGTERM arrives while we ask for shares
        await real_collect(self, *args)

    monkeypatch.setattr(exchange, "sum_contributions", slow_sum)
    monkeypatch.setattr(p2pfl.daemon.pool.ArrayPool, "give", give)
    monkeypatch.setattr(exchange.SecureExchange, "_collect_reveals", collect_then_stop)
    net = four(rounds=2, extra=SECURE)
    assert await run_all([make_node(net, p) for p in PEERS]) == [0] * 4
    assert sums, "no owner was stopped while summing"
    # (the stopped nodes left their sums running: let them end before looking)
    assert await asyncio.to_thread(lambda: all(done.wait(10) for done in sums))
    assert not given_while_read, f"{len(given_while_read)} vectors given back while summed"
