"""Secure aggregation between real nodes: same model as plain averaging (within the
fixed-point error), masked bytes on the wire, and a missing member never unmasks anyone."""

from __future__ import annotations

import asyncio
import types
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from p2pfl.errors import ConfigError, MessageError
from p2pfl.wire import DTYPE_FLOAT32, ParamsBegin

from .test_node import make_node, read_events, run_all

PEERS = ("alice", "bob", "carol", "dave")
SECURE = {"aggregation": {"secure": True, "clip": 64.0, "frac_bits": 20}}


@pytest.fixture
def four(make_network, tmp_path: Path) -> Any:
    """A factory of 4-peer networks, each peer with its own share of the digits."""
    from p2pfl.learning.prepare import load_digits_arrays, write_partitions

    x, y = load_digits_arrays()
    data = write_partitions(x, y, len(PEERS), tmp_path / "four", seed=3, names=list(PEERS))

    def make(**kwargs: Any) -> Any:
        net = make_network(PEERS, **kwargs)
        net.data = {p: data / f"{p}.npz" for p in PEERS}
        return net

    return make


def aggregates(path: Path) -> list[dict[str, Any]]:
    return [e for e in read_events(path) if e["type"] == "aggregate"]


async def test_secure_rounds_match_plain_averaging(four, tmp_path: Path) -> None:
    secure = four(rounds=4, extra=SECURE)
    nodes = [make_node(secure, p) for p in PEERS]
    assert await run_all(nodes) == [0] * 4
    for peer in PEERS:
        for e in aggregates(secure.state(peer) / "events.jsonl"):
            assert e["rule"] == "secure-metropolis" and e["missing"] == []
            assert set(e["members"]) == set(PEERS) and e["clipped"] == 0
    # The same network without masks (same seed and data, own state folders): the same
    # models, up to the fixed point's rounding (2**-21 per term per round).
    baseline = [make_node(secure_plain(secure, tmp_path), p) for p in PEERS]
    assert await run_all(baseline) == [0] * 4
    for masked, clear in zip(nodes, baseline, strict=True):
        assert np.max(np.abs(masked.params - clear.params)) < 1e-3


def secure_plain(net: Any, tmp_path: Path) -> Any:
    """``net`` with aggregation.secure off and its own state folders."""
    import dataclasses

    import yaml

    from p2pfl.config import load_config

    data = yaml.safe_load(net.config_path.read_text())
    data["aggregation"]["secure"] = False
    path = tmp_path / "plain.yaml"
    path.write_text(yaml.safe_dump(data))
    root = tmp_path / "plain-state"
    root.mkdir(exist_ok=True)
    clone = dataclasses.replace(net, config_path=path, config=load_config(path), root=root)
    return clone


async def test_what_a_neighbour_receives_is_masked(four, monkeypatch) -> None:
    """Capture bob's contribution to alice's group on its way out: it is uniform noise,
    uncorrelated with bob's parameters."""
    import p2pfl.node as node_mod

    net = four(rounds=1, extra=SECURE)
    sent: dict[tuple[str, str], np.ndarray] = {}
    original = node_mod.Node._masked_contributions

    def capture(self: Any, round_index: int) -> tuple[dict[str, np.ndarray], int]:
        out, clipped = original(self, round_index)
        for owner, y in out.items():
            sent[(self.id, owner)] = y.copy()
        sent[(self.id, "params")] = self.params.copy()
        return out, clipped

    monkeypatch.setattr(node_mod.Node, "_masked_contributions", capture)
    assert await run_all([make_node(net, p) for p in PEERS]) == [0] * 4
    y, x = sent[("bob", "alice")], sent[("bob", "params")]
    counts = np.bincount(y.view(np.uint8), minlength=256)
    expected = y.nbytes / 256
    assert float(np.sum((counts - expected) ** 2 / expected)) < 340
    assert abs(np.corrcoef(y.view(np.int32).astype(np.float64), x)[0, 1]) < 0.1
    assert not np.array_equal(sent[("bob", "alice")], sent[("bob", "carol")])


async def test_with_one_contributor_left_every_owner_keeps_its_own_model(four) -> None:
    """carol and dave never come: alice's group has bob alone, and bob's contribution
    could only be unmasked by revealing it; so nobody averages, each keeps its own model
    and says why."""
    net = four(
        rounds=2,
        round_timeout=30,
        startup_timeout=0.5,
        extra={**SECURE, "net": {"down_grace": 0.2}},
    )
    nodes = [make_node(net, p) for p in ("alice", "bob")]
    assert await run_all(nodes) == [0, 0]
    for peer in ("alice", "bob"):
        for e in aggregates(net.state(peer) / "events.jsonl"):
            assert e["missing"] == ["carol", "dave"] and e["members"] == [peer]
            assert e["kept_own"] is True and "fewer than two" in e["reason"]


def test_secure_aggregation_needs_two_neighbours_everywhere(make_network) -> None:
    net = make_network(("alice", "bob"), rounds=1, extra=SECURE)
    with pytest.raises(ConfigError, match="at least 2 neighbours"):
        make_node(net, "alice")


async def test_plain_parameters_are_refused_by_a_secure_node(four) -> None:
    net = four(rounds=1, extra=SECURE)
    alice = make_node(net, "alice")
    try:
        with pytest.raises(MessageError, match="dtype code 1"):
            alice.message(
                types.SimpleNamespace(peer_id="bob"),  # type: ignore[arg-type]
                ParamsBegin(1, 0, alice.params.nbytes, DTYPE_FLOAT32),
            )
    finally:
        alice.events.close()
    await asyncio.sleep(0)


async def test_survivors_recover_the_average_without_a_member_that_left(four) -> None:
    """dave stops after round 1: from then on every owner asks its survivors for their masks
    with dave, removes them, and averages over those present, exactly."""
    net = four(rounds=5, round_timeout=30, extra={**SECURE, "net": {"down_grace": 0.2}})
    nodes = [make_node(net, p) for p in PEERS]
    tasks = [asyncio.ensure_future(n.run()) for n in nodes]
    dave_log = net.state("dave") / "events.jsonl"
    while '"round_end","round":1' not in (dave_log.read_text() if dave_log.exists() else ""):
        await asyncio.sleep(0.01)
    nodes[3].request_stop()
    assert await asyncio.wait_for(asyncio.gather(*tasks), 60) == [0] * 4
    for peer in PEERS[:3]:
        events = read_events(net.state(peer) / "events.jsonl")
        last = [e for e in events if e["type"] == "aggregate"][-1]
        assert last["missing"] == ["dave"] and last["recovered"] == ["dave"]
        assert "kept_own" not in last
        assert sorted(last["members"]) == ["alice", "bob", "carol"]
        assert sum(last["weights"].values()) == pytest.approx(1.0, abs=1e-5)
        helped = [e for e in events if e["type"] == "recovery" and e["role"] == "member"]
        assert helped and helped[-1]["missing"] == ["dave"]
    alice, bob, carol = (n.params for n in nodes[:3])
    assert np.max(np.abs(alice - bob)) < 1e-4 and np.max(np.abs(alice - carol)) < 1e-4


async def test_recovery_requests_that_could_unmask_are_refused(four) -> None:
    from p2pfl.wire import Recover

    net = four(rounds=1, extra=SECURE)
    bob = make_node(net, "bob")
    bob._contributed[(3, "alice")] = tuple(PEERS)
    bob._self_seeds[(3, "alice")] = b"s" * 32
    link = types.SimpleNamespace(peer_id="alice")
    try:
        for request, problem in (
            (Recover(1, 2, ("dave",)), "no contribution"),  # not a round bob took part in
            (Recover(1, 3, ("bob",)), "outside its group, or us"),
            (Recover(1, 3, ("zed",)), "outside its group, or us"),
            (Recover(1, 3, ("carol", "dave")), "fewer than two contributors"),
        ):
            bob._answer_recovery(link, request)  # type: ignore[arg-type]
            last = read_events(net.state("bob") / "events.jsonl")[-1]
            assert last["type"] == "reject" and problem in last["reason"], (request, last)
    finally:
        bob.events.close()


async def test_dp_noise_is_added_and_the_budget_is_logged_every_round(four) -> None:
    from p2pfl.privacy import epsilon

    dp = {"clip_norm": 1.0, "noise_multiplier": 1.1, "delta": 1.0e-5}
    net = four(rounds=3, extra={"aggregation": {**SECURE["aggregation"], "dp": dp}})
    nodes = [make_node(net, p) for p in PEERS]
    assert await run_all(nodes) == [0] * 4
    for peer in PEERS:
        trains = [e for e in read_events(net.state(peer) / "events.jsonl") if e["type"] == "train"]
        assert [e["dp_epsilon"] for e in trains] == [
            pytest.approx(epsilon(k, 1.1, 1e-5), abs=1e-5) for k in (1, 2, 3)
        ]
        assert all(e["dp_delta"] == 1e-5 and e["dp_update_norm"] > 0 for e in trains)
    # A restarted node counts its earlier releases too.
    again = make_node(net, "alice")
    try:
        assert again._dp_releases == 3
    finally:
        again.events.close()


async def test_a_restarted_node_never_contributes_twice_to_a_round(four) -> None:
    """bob's journal says he already sent masked vectors for round 0 (before a crash that
    lost his checkpoint). Sending round-0 vectors again would put two different models
    under the same masks: he sits round 0 out, and the others recover without him."""
    net = four(rounds=2, extra={**SECURE, "net": {"down_grace": 0.2}})
    net.state("bob").mkdir(parents=True)
    (net.state("bob") / "secagg.log").write_text("contributed 0\nanswered 0 alice\n")
    assert await run_all([make_node(net, p) for p in PEERS]) == [0] * 4
    bob = read_events(net.state("bob") / "events.jsonl")
    assert not [e for e in bob if e["type"] == "send" and e["round"] == 0]
    assert [e for e in bob if e["type"] == "send" and e["round"] == 1]
    (first, second) = aggregates(net.state("alice") / "events.jsonl")
    assert first["missing"] == ["bob"] and first["recovered"] == ["bob"]
    assert second["missing"] == []
    journal = (net.state("bob") / "secagg.log").read_text().split("\n")
    assert "contributed 1" in journal and any(line.startswith("answered 1 ") for line in journal)


async def test_unmask_requests_are_answered_once_even_across_restarts(four) -> None:
    from p2pfl.wire import Recover

    net = four(rounds=1, extra=SECURE)
    net.state("bob").mkdir(parents=True)
    (net.state("bob") / "secagg.log").write_text("answered 3 alice\n")
    bob = make_node(net, "bob")
    bob._contributed[(3, "alice")] = tuple(PEERS)
    bob._self_seeds[(3, "alice")] = b"s" * 32
    try:
        bob._answer_recovery(types.SimpleNamespace(peer_id="alice"), Recover(1, 3, ()))  # type: ignore[arg-type]
        last = read_events(net.state("bob") / "events.jsonl")[-1]
        assert last["type"] == "reject" and "already answered" in last["reason"]
    finally:
        bob.events.close()


async def test_a_node_whose_model_turns_nan_neither_crashes_nor_spreads_it(
    four, monkeypatch
) -> None:
    """alice's training diverges to NaN in round 1: she contributes nothing (the others
    recover without her) and, as an owner, keeps her own model and says why."""
    import p2pfl.node as node_mod

    original = node_mod.Node._train

    def diverging(self: Any, round_index: int) -> Any:
        loss, trained, extra = original(self, round_index)
        if self.id == "alice" and round_index == 1:
            trained = np.full_like(trained, np.nan)
        return loss, trained, extra

    monkeypatch.setattr(node_mod.Node, "_train", diverging)
    net = four(rounds=2, extra={**SECURE, "net": {"down_grace": 0.2}})
    assert await run_all([make_node(net, p) for p in PEERS]) == [0] * 4
    last = aggregates(net.state("alice") / "events.jsonl")[-1]
    assert last["kept_own"] is True and "not finite" in last["reason"]
    for peer in ("bob", "carol", "dave"):
        final = aggregates(net.state(peer) / "events.jsonl")[-1]
        assert final["missing"] == ["alice"] and final["recovered"] == ["alice"]


async def test_a_flood_of_unrequested_seeds_is_logged_sparingly(four) -> None:
    from p2pfl.wire import Seed

    net = four(rounds=1, extra=SECURE)
    alice = make_node(net, "alice")
    try:
        for i in range(1000):
            alice.message(types.SimpleNamespace(peer_id="bob"), Seed(i, 0, b"x" * 32))  # type: ignore[arg-type]
        rejects = [
            e for e in read_events(net.state("alice") / "events.jsonl") if e["type"] == "reject"
        ]
        assert 1 <= len(rejects) <= 10
    finally:
        alice.events.close()
