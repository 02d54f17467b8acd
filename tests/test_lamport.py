"""The Lamport clock against a hostile roster peer (security review, finding 1).

A STATUS with a lamport just under the wire's limit used to spread to every clock; after a
few more ticks every node's own messages were above the limit, every neighbour refused
them, and a restart brought the wedged clock back from the checkpoint. The rule now
(docs/protocol.md): one message moves a clock at most MAX_LAMPORT_STEP, and a clock
saturates at MAX_LAMPORT instead of passing it.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from typing import Any

from websockets.asyncio.client import connect

from p2pfl.core.clock import MAX_LAMPORT, MAX_LAMPORT_STEP, LamportClock
from p2pfl.daemon.events import EventLog
from p2pfl.proto.channel import Channel
from p2pfl.proto.handshake import IKHandshake
from p2pfl.proto.keys import load_private_key
from p2pfl.proto.wire import PROLOGUE, REPLY_OK, decode_reply, encode_hello, encode_status

from .conftest import TIMEOUT, LocalNetwork
from .test_node import make_node, read_events

# --- the pure clock ----------------------------------------------------------------------


def test_observe_follows_an_honest_sender() -> None:
    clock = LamportClock(10)
    assert clock.observe(25) == 26
    assert clock.observe(3) == 27  # an older time still counts as an event
    assert clock.tick() == 28


def test_one_message_moves_the_clock_at_most_one_step() -> None:
    clock = LamportClock(100)
    assert clock.observe(MAX_LAMPORT - 5) == 100 + MAX_LAMPORT_STEP + 1
    assert clock.observe(MAX_LAMPORT) == 100 + 2 * MAX_LAMPORT_STEP + 2


def test_a_node_that_lost_its_state_catches_up_in_a_few_messages() -> None:
    clock = LamportClock()
    network_time = 10**8
    messages = 0
    while clock.value <= network_time:
        clock.observe(network_time)
        messages += 1
    assert messages <= 6


def test_the_clock_saturates_at_the_limit_instead_of_passing_it() -> None:
    clock = LamportClock(MAX_LAMPORT - 2)
    assert [clock.tick() for _ in range(4)] == [MAX_LAMPORT - 1] + [MAX_LAMPORT] * 3
    assert clock.observe(MAX_LAMPORT) == MAX_LAMPORT
    assert LamportClock(2**63).value == MAX_LAMPORT


def test_a_restored_wedge_is_clamped(tmp_path: Any) -> None:
    """A checkpoint written by a version without the cap may hold a clock past the limit."""
    clock = LamportClock()
    clock.restore(2**60)
    assert clock.value == MAX_LAMPORT
    log = EventLog(tmp_path / "events.jsonl", "alice", clock)
    log.emit("node_start", 0)
    log.close()
    assert read_events(tmp_path / "events.jsonl")[-1]["lamport"] == MAX_LAMPORT


# --- real nodes -------------------------------------------------------------------------

ROUNDS = 8
#: The attack of the review: a value k ticks below the wire's limit.
HOSTILE = MAX_LAMPORT - 40


async def _status_as(
    net: LocalNetwork, attacker: str, victim: str, lamport: int, digest: bytes
) -> None:
    """Authenticate to ``victim`` with ``attacker``'s real key and send one STATUS."""
    config = net.config
    async with connect(
        config.peers[victim].address, proxy=None, compression=None, open_timeout=5 * TIMEOUT
    ) as ws:
        hs = IKHandshake(
            initiator=True,
            static=load_private_key(net.keys[attacker]),
            prologue=PROLOGUE,
            remote_static=config.peers[victim].public_key,
        )
        await ws.send(hs.write_message(encode_hello(digest, attacker)))
        reply = decode_reply(hs.read_message(await ws.recv(decode=False)))
        assert reply.status == REPLY_OK
        channel = Channel(hs.session_keys(), max_plaintext=1 << 16)
        await ws.send(channel.seal(encode_status(1, 0)))  # key confirmation
        await ws.send(channel.seal(encode_status(lamport, 0)))
        with contextlib.suppress(asyncio.TimeoutError, Exception):
            async with asyncio.timeout(1 * TIMEOUT):
                await ws.recv()  # the victim's own STATUS: it has read ours by now


async def _wait_for(path: Any, kind: str, round_index: int, task: asyncio.Task[int]) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 30 * TIMEOUT
    while True:
        if path.exists() and any(
            e["type"] == kind and e["round"] == round_index for e in read_events(path)
        ):
            return
        assert not task.done(), f"node stopped before {kind} of round {round_index}"
        assert loop.time() < deadline, f"no {kind} of round {round_index}"
        await asyncio.sleep(0.01 * TIMEOUT)


async def test_a_hostile_lamport_neither_splits_the_network_nor_survives_a_restart(
    make_network: Callable[..., LocalNetwork],
) -> None:
    net = make_network(rounds=ROUNDS, extra={"net": {"down_grace": 0.5 * TIMEOUT}})
    alice, carol = make_node(net, "alice"), make_node(net, "carol")
    tasks = {"alice": asyncio.ensure_future(alice.run())}
    tasks["carol"] = asyncio.ensure_future(carol.run())
    alice_log = net.state("alice") / "events.jsonl"
    try:
        await _wait_for(alice_log, "listen", None, tasks["alice"])  # type: ignore[arg-type]
        # bob's key, before the real bob starts: any roster peer can do this.
        await _status_as(net, "bob", "alice", HOSTILE, alice.net.digest)
        # alice reads it (her clock takes one step) but does not follow it to the limit
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 5 * TIMEOUT
        while alice.clock.value <= MAX_LAMPORT_STEP and loop.time() < deadline:
            await asyncio.sleep(0.01 * TIMEOUT)
        assert MAX_LAMPORT_STEP < alice.clock.value <= MAX_LAMPORT_STEP + 10_000
        bob = make_node(net, "bob")
        tasks["bob"] = asyncio.ensure_future(bob.run())
        # alice stops after round 3 and comes back from her checkpoint and log.
        await _wait_for(alice_log, "round_end", 3, tasks["alice"])
        alice.request_stop()
        assert await asyncio.wait_for(tasks["alice"], 20 * TIMEOUT) == 0
        again = make_node(net, "alice")
        tasks["alice"] = asyncio.ensure_future(again.run())
        codes = await asyncio.wait_for(asyncio.gather(*tasks.values()), 60 * TIMEOUT)
    finally:
        for task in tasks.values():
            task.cancel()
            with contextlib.suppress(BaseException):
                await task
    assert codes == [0, 0, 0]
    for peer in net.peers:
        events = read_events(net.state(peer) / "events.jsonl")
        refused = [e for e in events if "above the limit" in str(e.get("reason", ""))]
        assert refused == [], (peer, refused)
        assert max(e["lamport"] for e in events) < MAX_LAMPORT // 2, peer
        aggregates = {e["round"]: e for e in events if e["type"] == "aggregate"}
        # Every round after alice is back is a full one: all three present, nobody missing.
        # (A peer may skip a round: on a loaded machine alice's restart can outlast
        # down_grace, bob and carol go on, and she jumps to their round when back.)
        late = [a for r, a in aggregates.items() if r >= ROUNDS - 2]
        assert late, (peer, sorted(aggregates))
        for aggregate in late:
            assert set(aggregate["members"]) == set(net.peers), (peer, aggregate)
            assert aggregate["missing"] == [], (peer, aggregate)
