"""Secure aggregation across rounds with real nodes: clipping counted once, no keys ahead
without buffered rounds, a stop while the owner sums (the session's rules one by one are in
``test_secure_session``)."""

from __future__ import annotations

import asyncio
from typing import Any

import numpy as np

from p2pfl.secure.session import SecureSession

from .test_node import make_node, run_all
from .test_secure_node import PEERS, SECURE, aggregates, four  # noqa: F401


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
    real_ask = SecureSession.ask_present

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

    def ask_then_stop(self: SecureSession, *args: Any) -> Any:
        nodes[PEERS.index(self.me)].request_stop()  # SIGTERM arrives as we ask for shares
        return real_ask(self, *args)

    monkeypatch.setattr(exchange, "sum_contributions", slow_sum)
    monkeypatch.setattr(p2pfl.daemon.pool.ArrayPool, "give", give)
    monkeypatch.setattr(SecureSession, "ask_present", ask_then_stop)
    net = four(rounds=2, extra=SECURE)
    nodes = [make_node(net, p) for p in PEERS]
    assert await run_all(nodes) == [0] * 4
    assert sums, "no owner was stopped while summing"
    # (the stopped nodes left their sums running: let them end before looking)
    assert await asyncio.to_thread(lambda: all(done.wait(10) for done in sums))
    assert not given_while_read, f"{len(given_while_read)} vectors given back while summed"
