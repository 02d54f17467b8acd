"""The network's feature mean and deviation without pooling data (``p2pfl.core.moments``):
exact against the pooled statistics, the same bits at every node, a single share masked,
and every bad share refused."""

from __future__ import annotations

import types

import numpy as np
import pytest

from p2pfl.core.moments import (
    ENTRY_BYTES,
    NetworkMoments,
    decode,
    encode,
    local_moments,
    mean_std,
)
from p2pfl.errors import MessageError
from p2pfl.proto.wire import (
    Moments,
    Standardized,
    decode_message,
    encode_moments,
    encode_standardized,
)

from .test_secure_group import secrets_for
from .test_secure_node import four  # noqa: F401  (the fixture)

PEERS = ["alice", "bob", "carol", "dave"]
CONTEXT = b"config digest"


def datasets(seed: int = 0, features: int = 5) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    scales = [1.0, 10.0, 4096.0, 0.01, 300.0][:features]
    return {
        p: (rng.normal(i, 1.0, size=(20 + 7 * i, features)) * scales).astype(np.float32)
        for i, p in enumerate(PEERS)
    }


def network(data: dict[str, np.ndarray]) -> dict[str, NetworkMoments]:
    """Every node's view, once every share reached every node."""
    secrets = secrets_for(PEERS)
    features = next(iter(data.values())).shape[1]
    nodes = {
        p: NetworkMoments(p, PEERS, features, {q: secrets[p][q] for q in PEERS if q != p}, CONTEXT)
        for p in PEERS
    }
    for p, node in nodes.items():
        node.add_own(local_moments(data[p]))
    for p, node in nodes.items():
        vector, tags = node.shares[p]
        for q, other in nodes.items():
            if q != p:
                assert other.add(p, vector, tags)
    return nodes


def test_every_node_gets_the_pooled_mean_and_deviation_bit_for_bit() -> None:
    data = datasets()
    nodes = network(data)
    pooled = np.concatenate([d.astype(np.float64) for d in data.values()])
    results = [mean_std(node.totals()) for node in nodes.values()]
    for mean, std in results:
        np.testing.assert_allclose(mean, pooled.mean(axis=0), rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(std, pooled.std(axis=0), rtol=1e-9)
    first = results[0]
    assert all(r[0].tobytes() == first[0].tobytes() for r in results)  # the same bits
    assert all(r[1].tobytes() == first[1].tobytes() for r in results)


def test_one_share_says_nothing_of_its_node() -> None:
    data = datasets()
    nodes = network(data)
    vector, _ = nodes["alice"].shares["bob"]
    seen = decode(
        [
            int.from_bytes(vector[k : k + ENTRY_BYTES], "big")
            for k in range(0, len(vector), ENTRY_BYTES)
        ]
    )
    actual = local_moments(data["bob"])
    assert np.all(np.abs(seen - actual) > 1e6)  # ring noise, nowhere near bob's totals


def test_a_constant_feature_is_only_centred() -> None:
    data = datasets()
    for d in data.values():
        d[:, 1] = 3.0
    mean, std = mean_std(network(data)["carol"].totals())
    assert mean[1] == pytest.approx(3.0) and std[1] == 1.0


def test_fixed_point_round_trips_negative_and_large_totals() -> None:
    values = np.array([-5.25, 0.0, 1e15, -3e12, 2.0**-20])
    np.testing.assert_allclose(decode(encode(values)), values, rtol=1e-15, atol=2.0**-48)
    with pytest.raises(ValueError, match="too large to standardise with"):
        encode(np.array([np.nan]))
    with pytest.raises(ValueError, match="too large"):  # 64 peers: each below 2**73
        encode(np.array([2.0**73]), peers=64)
    encode(np.array([2.0**72]), peers=64)


def test_bad_shares_are_refused() -> None:
    nodes = network(datasets())
    alice = nodes["alice"]
    vector, tags = nodes["bob"].shares["bob"]
    tampered = bytes([vector[0] ^ 1]) + vector[1:]
    fresh = NetworkMoments("alice", PEERS, 5, {q: b"k" * 32 for q in PEERS[1:]}, CONTEXT)
    for origin, vec, tg, problem in (
        ("zed", vector, tags, "not another peer"),
        ("alice", vector, tags, "not another peer"),
        ("bob", vector[:-ENTRY_BYTES], tags, "expected 11 entries"),
        ("bob", tampered, tags, "does not verify"),
        ("bob", vector, {}, "does not verify"),
    ):
        with pytest.raises(MessageError, match=problem):
            fresh.add(origin, vec, tg)
    assert not alice.add("bob", vector, tags)  # the same share again: not new
    other_vector, other_tags = nodes["carol"].shares["carol"]
    with pytest.raises(MessageError, match="does not verify"):
        alice.add("bob", other_vector, other_tags)  # carol's share as bob's


def test_totals_need_every_peer() -> None:
    secrets = secrets_for(PEERS)
    alice = NetworkMoments("alice", PEERS, 5, {q: secrets["alice"][q] for q in PEERS[1:]}, CONTEXT)
    alice.add_own(local_moments(datasets()["alice"]))
    assert alice.missing() == ["bob", "carol", "dave"]
    with pytest.raises(ValueError, match="missing from bob, carol, dave"):
        alice.totals()


def test_moments_on_the_wire() -> None:
    nodes = network(datasets())
    vector, tags = nodes["bob"].shares["bob"]
    msg = decode_message(encode_moments(9, "bob", vector, tags), max_chunk=1 << 20)
    assert isinstance(msg, Moments)
    assert (msg.lamport, msg.origin, msg.vector, msg.tags) == (9, "bob", vector, tags)
    raw = encode_moments(9, "bob", vector, tags)
    for bad, problem in (
        (raw[:13], "malformed origin"),
        (raw[:13] + bytes([3]) + b"bob" + (7).to_bytes(4, "big") + bytes(7), "vector of 7 bytes"),
        (raw[:13] + bytes([3]) + b"bob" + (1 << 20).to_bytes(4, "big"), "vector of"),
        (raw + b"x", "trailing"),
    ):
        with pytest.raises(MessageError, match=problem):
            decode_message(bad, max_chunk=1 << 20)


async def test_real_nodes_on_a_ring_standardise_with_the_pooled_statistics(four) -> None:  # noqa: F811
    """Four nodes on a ring (each share reaches the far node only passed on): every node
    ends with the same mean and deviation, those of the pooled data, and keeps them."""
    import json

    from p2pfl.learning import load_dataset

    from .test_node import make_node, read_events, run_all
    from .test_secure_node import PEERS as NODES

    extra = {"topology": {"kind": "ring"}, "training": {"standardize": "federated"}}
    net = four(rounds=2, extra=extra)
    assert await run_all([make_node(net, p) for p in NODES]) == [0] * 4
    pooled = np.concatenate([load_dataset(net.data[p]).x.astype(np.float64) for p in NODES])
    saved = [json.loads((net.state(p) / "standardize.json").read_text()) for p in NODES]
    assert all(s["mean"] == saved[0]["mean"] and s["std"] == saved[0]["std"] for s in saved)
    np.testing.assert_allclose(saved[0]["mean"], pooled.mean(axis=0), rtol=1e-9, atol=1e-12)
    expected_std = np.where(pooled.std(axis=0) < 1e-12, 1.0, pooled.std(axis=0))
    np.testing.assert_allclose(saved[0]["std"], expected_std, rtol=1e-7, atol=1e-9)
    assert saved[0]["rows"] == len(pooled)
    for p in NODES:
        (event,) = [
            e for e in read_events(net.state(p) / "events.jsonl") if e["type"] == "standardize"
        ]
        assert event["digest"] == saved[0]["digest"]
    again = make_node(net, "alice")  # a restart reuses what it computed
    try:
        assert again.moments is None and again.local.standardization is not None
        np.testing.assert_array_equal(again.local.standardization[0], saved[0]["mean"])
        # a peer that still floods its share is not a protocol error (the link stays)
        again.message(types.SimpleNamespace(peer_id="bob"), Moments(1, 0, "bob", bytes(16), {}))  # type: ignore[arg-type]
        # neighbours compare what they ended with: the same digest is fine, another refused
        bob = types.SimpleNamespace(peer_id="bob")
        ours = bytes.fromhex(saved[0]["digest"])
        again.message(bob, Standardized(1, 0, ours))  # type: ignore[arg-type]
        with pytest.raises(MessageError, match="bob standardised with 0000000000000000"):
            again.message(bob, Standardized(1, 0, bytes(8)))  # type: ignore[arg-type]
    finally:
        again.events.close()
        again.state_lock.release()


async def test_a_node_whose_peers_never_send_their_totals_stops_with_exit_3(
    make_network,
) -> None:
    from p2pfl.daemon.startup import EXIT_ALONE

    from .test_node import make_node, run_all

    extra = {"training": {"standardize": "federated", "min_neighbours": 0}}
    net = make_network(("alice", "bob"), startup_timeout=0.5, extra=extra)
    assert await run_all([make_node(net, "alice")]) == [EXIT_ALONE]


def test_values_in_peers_yaml_are_used_as_they_are(make_network) -> None:
    from p2pfl.learning import load_dataset

    from .test_node import make_node

    mean, std = [0.5] * 64, [2.0] * 64
    net = make_network(
        ("alice", "bob"), extra={"training": {"standardize": {"mean": mean, "std": std}}}
    )
    node = make_node(net, "alice")
    try:
        raw = load_dataset(net.data["alice"]).x
        np.testing.assert_allclose(node.local.data.x, (raw - 0.5) / 2.0, rtol=1e-6)
        assert node.moments is None and node.local.input_scale == 1.0
    finally:
        node.events.close()
        node.state_lock.release()


def test_an_origin_that_tells_peers_different_totals_is_caught() -> None:
    """bob sends alice two different shares, each with a valid tag for her: only bob can
    make those, so bob equivocated (alice must not standardise with either)."""
    from p2pfl.core.moments import Equivocation, masked_share, share_tags

    secrets = secrets_for(PEERS)
    nodes = network(datasets())
    bob_secrets = {q: secrets["bob"][q] for q in PEERS if q != "bob"}
    other = masked_share("bob", local_moments(datasets(seed=9)["bob"]), bob_secrets, CONTEXT)
    fresh = NetworkMoments("alice", PEERS, 5, {q: secrets["alice"][q] for q in PEERS[1:]}, CONTEXT)
    vector, tags = nodes["bob"].shares["bob"]
    assert fresh.add("bob", vector, {**tags, "mallory": b"x" * 32})
    assert "mallory" not in fresh.shares["bob"][1]  # (unknown peers' tags are not kept)
    with pytest.raises(Equivocation, match="bob sent two different feature totals"):
        fresh.add("bob", other, share_tags(other, bob_secrets, CONTEXT))


@pytest.mark.parametrize(
    ("totals", "problem"),
    [
        ([0.0, 1.0, 1.0], "row count 0 is not a positive whole number"),
        ([2.5, 1.0, 1.0], "row count 2.5"),
        ([2.0, 1.0, -1.0], "sums of squares are smaller"),
        ([2.0, 10.0, 1.0], "sums of squares are smaller"),  # 2 * 1 < 10 ** 2
        ([1.0, 1e39, 1e78], "beyond float32"),
    ],
)
def test_totals_that_no_data_can_give_are_refused(totals: list[float], problem: str) -> None:
    with pytest.raises(ValueError, match=problem):
        mean_std(np.array(totals))


def test_a_node_sends_the_same_share_after_a_restart_and_never_new_totals(
    make_network, tmp_path
) -> None:
    """The share is kept before it is sent: a restart sends those bytes again; a restart
    on other data under the same config is refused (the masks would show the change)."""
    from p2pfl.errors import DataError

    from .test_node import make_node

    extra = {"training": {"standardize": "federated"}}
    net = make_network(("alice", "bob"), extra=extra)
    first = make_node(net, "alice")
    assert first.moments is not None
    share = first.moments.moments.shares["alice"]
    first.events.close()
    first.state_lock.release()
    again = make_node(net, "alice")
    assert again.moments is not None and again.moments.moments.shares["alice"] == share
    again.events.close()
    again.state_lock.release()
    ds = np.load(net.data["alice"])
    changed = tmp_path / "changed.npz"
    np.savez(changed, x=ds["x"][:-1], y=ds["y"][:-1])
    import dataclasses

    other = dataclasses.replace(net, data={**net.data, "alice": changed})
    with pytest.raises(DataError, match="already sent masked feature totals"):
        make_node(other, "alice")


def test_standardized_on_the_wire() -> None:
    msg = decode_message(encode_standardized(5, b"12345678"), max_chunk=1 << 20)
    assert isinstance(msg, Standardized) and (msg.lamport, msg.digest) == (5, b"12345678")
    with pytest.raises(MessageError, match="STANDARDIZED body of 9 bytes"):
        decode_message(encode_standardized(5, b"12345678") + b"x", max_chunk=1 << 20)
