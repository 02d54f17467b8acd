"""Unmasking goes on without a member that stays silent or was not asked: each step waits
only for members asked on the link they are still on, and once the threshold answered,
only as long again for the rest (third review's finding: one silent member used to cost
the whole round)."""

from __future__ import annotations

import asyncio
import time
import types
from typing import Any

import pytest

from p2pfl.proto.wire import Confirm, Present, Reveal, Unmask, decode_message
from p2pfl.secure.group import MemberRound, OwnerRound

from .test_node import make_node
from .test_secure_group import secrets_for
from .test_secure_node import SECURE, four  # noqa: F401  (the fixture)

ROUND = 2
MEMBERS = ["bob", "carol", "dave"]


@pytest.mark.parametrize("case", ["reconnects", "silent"])
async def test_one_member_that_does_not_answer_costs_little_time(four: Any, case: str) -> None:  # noqa: F811
    """dave either reconnects after PRESENT went out (the new link was never asked) or
    stays connected and says nothing; bob and carol answer after 0.2 s each step."""
    aggregation = {**SECURE["aggregation"], "recovery_timeout": 3.0}
    net = four(rounds=5, extra={"aggregation": aggregation})
    alice = make_node(net, "alice")
    exchange = alice.exchange
    assert exchange is not None
    alice._changed = asyncio.Event()
    secrets = secrets_for([*MEMBERS, "alice"])
    members = {m: MemberRound(m, "alice", MEMBERS, ROUND, secrets[m]) for m in MEMBERS}
    state = OwnerRound("alice", MEMBERS, ROUND)
    for m in MEMBERS:
        state.add_keys(m, members[m].public, members[m].boxes)
    for m, boxes in state.dispatch().items():
        members[m].accept_shares(boxes)
        members[m].contributed = True
    state.unmask_request(MEMBERS)

    def link_of(member: str, *, silent: bool = False) -> Any:
        async def send_message(raw: bytes) -> None:
            if silent:
                return
            msg = decode_message(raw, max_chunk=1 << 20)
            peer = types.SimpleNamespace(peer_id=member)
            await asyncio.sleep(0.2)
            if isinstance(msg, Present):
                answer: Any = Confirm(1, ROUND, members[member].confirm(msg.present))
            else:
                assert isinstance(msg, Unmask)
                answer = Reveal(1, ROUND, members[member].reveal(msg.tags))
            alice.message(peer, answer)

        return types.SimpleNamespace(peer_id=member, send_message=send_message)

    alice.net.links.clear()
    alice.net.links.update({m: link_of(m) for m in ("bob", "carol")})
    if case == "silent":
        alice.net.links["dave"] = link_of("dave", silent=True)
    exchange.owners[ROUND] = state

    async def dave_reconnects() -> None:
        await asyncio.sleep(0.05)
        alice.net.links["dave"] = link_of("dave")
        alice.notify()

    try:
        back = asyncio.ensure_future(
            dave_reconnects() if case == "reconnects" else asyncio.sleep(0)
        )
        started = time.monotonic()
        await exchange._collect_reveals(state, MEMBERS, [])
        elapsed = time.monotonic() - started
        await back
        assert state.enough() and set(state.reveals) == {"bob", "carol"}
        assert elapsed < 1.5, f"waited {elapsed:.2f} s"
    finally:
        alice.net.links.clear()
        alice.events.close()
        exchange.close()
