"""Secure aggregation between real nodes: same model as plain averaging (within the
fixed-point error), masked bytes on the wire, and a missing member never unmasks anyone."""

from __future__ import annotations

import asyncio
import time
import types
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from p2pfl.daemon.startup import EXIT_ALONE
from p2pfl.errors import ConfigError, MessageError
from p2pfl.proto.wire import DTYPE_FLOAT32, ParamsBegin

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
        # A clean run refuses nothing (members' answers after the owner went on are
        # ``late`` events, not rejects).
        events = read_events(secure.state(peer) / "events.jsonl")
        assert [e for e in events if e["type"] == "reject"] == []
    # The same network without masks (same seed and data, own state folders): the same
    # models, up to the fixed point's rounding (2**-21 per term per round).
    baseline = [make_node(secure_plain(secure, tmp_path), p) for p in PEERS]
    assert await run_all(baseline) == [0] * 4
    for masked, clear in zip(nodes, baseline, strict=True):
        assert np.max(np.abs(masked.params - clear.params)) < 1e-3
    # Both networks kept spare arrays across rounds (at least the received models): what
    # matched above was partly computed in recycled memory. (test_pool covers the pool.)
    assert all(len(node.buffers) > 0 for node in [*nodes, *baseline])


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
    """Capture every masked vector on its way out: uniform noise, uncorrelated with the
    sender's parameters, and different for each owner."""
    from p2pfl.daemon.node import Node
    from p2pfl.learning.trainer import LocalModel

    net = four(rounds=1, extra=SECURE)
    trained: dict[str, np.ndarray] = {}
    sent: dict[tuple[str, str], np.ndarray] = {}
    train, send_vector = LocalModel.train, Node.send_vector

    def capture_train(self: Any, params: np.ndarray, round_index: int) -> Any:
        result = train(self, params, round_index)
        trained[self.peer_id] = result.params.copy()
        return result

    def capture_send(self: Node, owner: str, vector: np.ndarray) -> None:
        sent[(self.id, owner)] = vector.copy()
        send_vector(self, owner, vector)

    monkeypatch.setattr(LocalModel, "train", capture_train)
    monkeypatch.setattr(Node, "send_vector", capture_send)
    assert await run_all([make_node(net, p) for p in PEERS]) == [0] * 4
    assert len(sent) == 12  # 4 peers, 3 owners each
    for (sender, _), y in sent.items():
        assert y.dtype == np.uint32
        counts = np.bincount(y.view(np.uint8), minlength=256)
        expected = y.nbytes / 256
        assert float(np.sum((counts - expected) ** 2 / expected)) < 340
        x = trained[sender]
        assert abs(np.corrcoef(y.view(np.int32).astype(np.float64), x)[0, 1]) < 0.1
    assert not np.array_equal(sent[("bob", "alice")], sent[("bob", "carol")])


async def test_with_one_contributor_left_every_owner_keeps_its_own_model(four) -> None:
    """carol and dave never come: alice's group has bob alone, below the threshold of two
    (bob's vector could only be unmasked by revealing it); so no key exchange completes,
    nobody averages, and each keeps its own model and says why."""
    net = four(
        rounds=2,
        round_timeout=30,
        startup_timeout=0.5,
        extra={**SECURE, "net": {"down_grace": 0.2}},
    )
    nodes = [make_node(net, p) for p in ("alice", "bob")]
    assert await run_all(nodes) == [EXIT_ALONE] * 2  # (no round averaged a neighbour's model)
    for peer in ("alice", "bob"):
        for e in aggregates(net.state(peer) / "events.jsonl"):
            assert e["missing"] == sorted(set(PEERS) - {peer}) and e["members"] == [peer]
            assert e["kept_own"] is True and "1 of 3 members, 2 needed" in e["reason"]


def test_secure_aggregation_needs_two_neighbours_everywhere(make_network) -> None:
    with pytest.raises(ConfigError, match="at least 2 neighbours"):
        make_network(("alice", "bob"), rounds=1, extra=SECURE)


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


async def test_survivors_recover_the_average_without_a_member_that_left(four, monkeypatch) -> None:
    """dave sends his keys for rounds 2 and 3 and then stops while training round 2: every
    owner rebuilds dave's key from the others' shares, removes his masks, and averages over
    those present, exactly. From round 4 on dave is not in the key exchange at all."""
    from p2pfl.learning.trainer import LocalModel

    original = LocalModel.train
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()

    def slow(self: Any, params: np.ndarray, round_index: int) -> Any:
        if self.peer_id == "dave" and round_index == 2:
            loop.call_soon_threadsafe(stopping.set)
            time.sleep(0.3)
        return original(self, params, round_index)

    monkeypatch.setattr(LocalModel, "train", slow)
    net = four(rounds=5, round_timeout=30, extra={**SECURE, "net": {"down_grace": 0.2}})
    nodes = [make_node(net, p) for p in PEERS]
    nodes[3].worker.costs.inline_below = 0.0  # dave's slow training must not hold the loop
    tasks = [asyncio.ensure_future(n.run()) for n in nodes]
    await stopping.wait()
    nodes[3].request_stop()
    assert await asyncio.wait_for(asyncio.gather(*tasks), 60) == [0] * 4
    for peer in PEERS[:3]:
        events = read_events(net.state(peer) / "events.jsonl")
        (two, three, four_) = [e for e in events if e["type"] == "aggregate" and e["round"] >= 2]
        # dave sent round 3's keys during round 2 (keys go one round ahead): recovered too
        for e in (two, three):
            assert e["missing"] == ["dave"] and e["recovered"] == ["dave"]
        assert four_["missing"] == ["dave"] and "recovered" not in four_
        for e in (two, three, four_):
            assert "kept_own" not in e and sorted(e["members"]) == ["alice", "bob", "carol"]
            assert sum(e["weights"].values()) == pytest.approx(1.0, abs=1e-5)
        helped = [e for e in events if e["type"] == "recovery" and e["role"] == "member"]
        assert helped and helped[-1]["missing"] == ["dave"]
    alice, bob, carol = (n.params for n in nodes[:3])
    assert np.max(np.abs(alice - bob)) < 1e-4 and np.max(np.abs(alice - carol)) < 1e-4


def test_secure_aggregation_refuses_more_neighbours_than_its_messages_hold(make_network) -> None:
    peers = [f"p{i:02d}" for i in range(66)]
    with pytest.raises(ConfigError, match="at most 64 neighbours"):
        make_network(peers, rounds=1, extra=SECURE)


async def test_dp_noise_is_added_and_the_budget_is_logged_every_round(four) -> None:
    from p2pfl.core.privacy import epsilon

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
    # A restarted node counts its earlier releases too: its checkpoint keeps them.
    from p2pfl.store.checkpoint import load_checkpoint

    saved = load_checkpoint(
        net.state("alice"), expected_digest=net.config.digest, expected_size=nodes[0].params.size
    )
    assert saved is not None and saved.dp_releases == 3


async def test_a_restarted_node_never_contributes_twice_to_a_round(four) -> None:
    """bob's journal says he already sent masked vectors for round 0 (before a crash that
    lost his checkpoint). Sending round-0 vectors again would put two different models
    under the same masks: he sits round 0 out, and the others recover without him."""
    net = four(rounds=2, extra={**SECURE, "net": {"down_grace": 0.2}})
    net.state("bob").mkdir(parents=True)
    (net.state("bob") / "secagg.log").write_text("contributed 0\n")
    assert await run_all([make_node(net, p) for p in PEERS]) == [0] * 4
    bob = read_events(net.state("bob") / "events.jsonl")
    assert not [e for e in bob if e["type"] == "send" and e["round"] == 0]
    assert [e for e in bob if e["type"] == "send" and e["round"] == 1]
    (first, second) = aggregates(net.state("alice") / "events.jsonl")
    assert first["missing"] == ["bob"] and "kept_own" not in first
    (own_first, _) = aggregates(net.state("bob") / "events.jsonl")  # nor does he own it
    assert own_first["kept_own"] is True and "sat this round out" in own_first["reason"]
    assert second["missing"] == []
    journal = (net.state("bob") / "secagg.log").read_text().split("\n")
    assert "contributed 1" in journal


async def test_a_node_whose_model_turns_nan_neither_crashes_nor_spreads_it(
    four, monkeypatch
) -> None:
    """alice's training diverges to NaN in round 1: she contributes nothing (the others
    recover without her) and, as an owner, keeps her own model and says why."""
    from p2pfl.learning.trainer import LocalModel

    original = LocalModel.train

    def diverging(self: Any, params: np.ndarray, round_index: int) -> Any:
        result = original(self, params, round_index)
        if self.peer_id == "alice" and round_index == 1:
            result.params = np.full_like(result.params, np.nan)
        return result

    monkeypatch.setattr(LocalModel, "train", diverging)
    net = four(rounds=2, extra={**SECURE, "net": {"down_grace": 0.2}})
    assert await run_all([make_node(net, p) for p in PEERS]) == [0] * 4
    last = aggregates(net.state("alice") / "events.jsonl")[-1]
    assert last["kept_own"] is True and "not finite" in last["reason"]
    for peer in ("bob", "carol", "dave"):
        final = aggregates(net.state(peer) / "events.jsonl")[-1]
        assert final["missing"] == ["alice"] and final["recovered"] == ["alice"]


async def test_a_flood_of_unrequested_reveals_is_logged_sparingly(four) -> None:
    from p2pfl.proto.wire import Reveal

    net = four(rounds=1, extra=SECURE)
    alice = make_node(net, "alice")
    try:
        for i in range(1000):
            alice.message(types.SimpleNamespace(peer_id="bob"), Reveal(i, 0, {}))  # type: ignore[arg-type]
        rejects = [
            e for e in read_events(net.state("alice") / "events.jsonl") if e["type"] == "reject"
        ]
        assert 1 <= len(rejects) <= 10 and "unrequested reveal" in rejects[0]["reason"]
    finally:
        alice.events.close()


async def test_without_buffering_no_keys_go_a_round_ahead(four) -> None:
    """Keys for round r+1 go out during round r only when owners may buffer a round
    (limits.max_buffered_rounds >= 1) and r+1 exists: an owner refuses KEYS outside its
    window, so keys sent ahead without one would be refused (and logged) every round."""
    extra = {**SECURE, "limits": {"max_buffered_rounds": 0}}
    net = four(rounds=3, extra=extra)
    nodes = [make_node(net, p) for p in PEERS]
    assert await run_all(nodes) == [0] * 4
    for peer in PEERS:
        events = read_events(net.state(peer) / "events.jsonl")
        refused = [e for e in events if "KEYS" in str(e.get("reason", ""))]
        assert refused == [], (peer, refused)
        aggregates = [e for e in events if e["type"] == "aggregate"]
        assert [e["round"] for e in aggregates] == [0, 1, 2]
        assert all(e["missing"] == [] for e in aggregates), (peer, aggregates)
