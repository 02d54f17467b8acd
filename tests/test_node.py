"""Real nodes, real websockets on 127.0.0.1, in one event loop."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from p2pfl.daemon.node import Node, NodeOptions
from p2pfl.learning import load_dataset
from p2pfl.proto.keys import load_private_key

from .conftest import TIMEOUT, LocalNetwork


def read_events(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def make_node(net: LocalNetwork, peer: str, *, snapshots: bool = False) -> Node:
    return Node(
        net.config,
        NodeOptions(
            node_id=peer, state_dir=net.state(peer), handle_signals=False, snapshots=snapshots
        ),
        load_private_key(net.keys[peer]),
        load_dataset(net.data[peer]),
    )


async def run_all(nodes: list[Node], timeout: float = 60) -> list[int]:
    return list(
        await asyncio.wait_for(asyncio.gather(*(n.run() for n in nodes)), timeout * TIMEOUT)
    )


async def test_three_nodes_train_and_agree(make_network) -> None:
    net = make_network(rounds=6)
    nodes = [make_node(net, p) for p in net.peers]
    assert await run_all(nodes) == [0, 0, 0]
    finals = {}
    for peer in net.peers:
        events = read_events(net.state(peer) / "events.jsonl")
        by_type: dict[str, list[dict[str, Any]]] = {}
        for e in events:
            by_type.setdefault(e["type"], []).append(e)
        others = set(net.peers) - {peer}
        for r in range(6):
            assert {e["peer"] for e in by_type["send"] if e["round"] == r} == others
            assert {e["peer"] for e in by_type["recv"] if e["round"] == r} == others
            (agg,) = [e for e in by_type["aggregate"] if e["round"] == r]
            assert set(agg["members"]) == set(net.peers) and agg["missing"] == []
            assert sum(agg["weights"].values()) == pytest.approx(1.0, abs=1e-5)
            (end,) = [e for e in by_type["round_end"] if e["round"] == r]
            assert end["cpu_s"] > 0  # (training alone costs CPU time)
        lamports = [e["lamport"] for e in events]
        assert lamports == sorted(lamports) and len(set(lamports)) == len(lamports)
        assert by_type["node_stop"][0]["finished"] is True
        finals[peer] = by_type["eval"][-1]["accuracy"]
        assert (net.state(peer) / "checkpoint.npz").exists()
    # Full graph, everyone present: Metropolis gives every node the same average.
    assert max(finals.values()) - min(finals.values()) <= 0.01
    assert min(finals.values()) > 0.8


async def test_lamport_clock_orders_send_before_recv(make_network) -> None:
    net = make_network(("alice", "bob"), rounds=3)
    await run_all([make_node(net, p) for p in net.peers])
    alice = read_events(net.state("alice") / "events.jsonl")
    bob = read_events(net.state("bob") / "events.jsonl")
    for r in range(3):
        (sent,) = [e for e in alice if e["type"] == "send" and e["round"] == r]
        (got,) = [e for e in bob if e["type"] == "recv" and e["round"] == r]
        assert sent["lamport"] < got["lamport"]
        assert got["sent_lamport"] == sent["lamport"]  # pairs the recv with its send


async def test_node_waits_for_a_late_neighbour(make_network) -> None:
    net = make_network(("alice", "bob"), rounds=3)
    alice, bob = (make_node(net, p) for p in net.peers)
    early = asyncio.ensure_future(alice.run())
    await asyncio.sleep(0.5 * TIMEOUT)
    assert not early.done()
    assert await asyncio.wait_for(bob.run(), 30 * TIMEOUT) == 0
    assert await asyncio.wait_for(early, 30 * TIMEOUT) == 0
    aggregates = [
        e for e in read_events(net.state("alice") / "events.jsonl") if e["type"] == "aggregate"
    ]
    assert all(e["missing"] == [] for e in aggregates)


async def test_missing_neighbour_is_renormalised_away_after_deadline(make_network) -> None:
    """carol never starts: after the startup wait and each round deadline the others go on."""
    net = make_network(rounds=2, round_timeout=0.5, startup_timeout=0.5)
    nodes = [make_node(net, p) for p in ("alice", "bob")]
    assert await run_all(nodes) == [0, 0]
    for peer in ("alice", "bob"):
        aggregates = [
            e for e in read_events(net.state(peer) / "events.jsonl") if e["type"] == "aggregate"
        ]
        assert [e["missing"] for e in aggregates] == [["carol"], ["carol"]]
        assert set(aggregates[0]["weights"]) == {"alice", "bob"}


async def test_absent_neighbour_is_not_waited_for_after_its_grace(make_network) -> None:
    """carol never connects. With a 60 s round deadline but a short net.down_grace, alice
    and bob do not wait out the deadline: each round goes on without carol at once."""
    net = make_network(
        rounds=3, round_timeout=60, startup_timeout=0.5, extra={"net": {"down_grace": 0.2}}
    )
    nodes = [make_node(net, p) for p in ("alice", "bob")]
    started = asyncio.get_running_loop().time()
    assert await run_all(nodes, timeout=30) == [0, 0]
    assert asyncio.get_running_loop().time() - started < 30 * TIMEOUT
    for peer in ("alice", "bob"):
        aggregates = [
            e for e in read_events(net.state(peer) / "events.jsonl") if e["type"] == "aggregate"
        ]
        assert [e["missing"] for e in aggregates] == [["carol"]] * 3
        assert all(set(e["members"]) == {"alice", "bob"} for e in aggregates)


async def test_wait_asks_for_the_deadline_again_after_each_wake_up(make_network) -> None:
    """A neighbour that drops while a node collects brings the wake-up forward (its grace
    ends before the round deadline). The wait must notice without any further news."""
    node = make_node(make_network(("alice", "bob")), "alice")
    loop = asyncio.get_running_loop()
    start = loop.time()
    wake = {"at": start + 60.0}  # the round deadline

    def drop() -> None:  # bob's link goes down: his grace ends in 0.1 s
        wake["at"] = loop.time() + 0.1
        node.notify()

    loop.call_later(0.05, drop)
    try:
        done = await asyncio.wait_for(
            node.wait_until(lambda: loop.time() >= wake["at"], lambda: wake["at"]), 5 * TIMEOUT
        )
    finally:
        node.events.close()
    assert done and loop.time() - start < 5 * TIMEOUT


async def test_snapshots_keep_every_rounds_model(make_network) -> None:
    net = make_network(("alice", "bob"), rounds=3)
    nodes = [make_node(net, p, snapshots=p == "alice") for p in net.peers]
    assert await run_all(nodes) == [0, 0]
    raw = np.fromfile(net.state("alice") / "snapshots.f32", dtype="<f4")
    size = nodes[0].params.size
    assert raw.size == 3 * size  # one record per round
    assert np.array_equal(raw[2 * size :], nodes[0].params)
    assert not np.array_equal(raw[:size], raw[2 * size :])
    assert not (net.state("bob") / "snapshots.f32").exists()


async def test_stop_request_shuts_down_cleanly(make_network) -> None:
    net = make_network(("alice", "bob"), rounds=1000)
    nodes = [make_node(net, p) for p in net.peers]
    tasks = [asyncio.ensure_future(n.run()) for n in nodes]
    path = net.state("alice") / "events.jsonl"
    for _ in range(200):
        await asyncio.sleep(0.02)
        if path.exists() and '"checkpoint"' in path.read_text():
            break
    for n in nodes:
        n.request_stop()
    assert await asyncio.wait_for(asyncio.gather(*tasks), 10 * TIMEOUT) == [0, 0]
    last = read_events(path)[-1]
    assert last["type"] == "node_stop" and last["finished"] is False


async def test_a_stop_requested_before_run_is_honoured(make_network) -> None:
    """(A process that runs several nodes may ask one to stop before its task began.)"""
    net = make_network(("alice", "bob"), rounds=1000)
    nodes = [make_node(net, p) for p in net.peers]
    for n in nodes:
        n.request_stop()
    assert await asyncio.wait_for(run_all(nodes), 10 * TIMEOUT) == [0, 0]
    last = read_events(net.state("alice") / "events.jsonl")[-1]
    assert last["type"] == "node_stop" and last["finished"] is False


def _tasks_of(node: Node) -> list[asyncio.Task[Any]]:
    """The unfinished tasks whose coroutine is a method of ``node``."""
    found = []
    for task in asyncio.all_tasks():
        frame = getattr(task.get_coro(), "cr_frame", None)
        if not task.done() and frame is not None and frame.f_locals.get("self") is node:
            found.append(task)
    return found


async def test_a_cancelled_node_leaves_no_task_behind(make_network) -> None:
    """Cancelling a node's own task (a node killed in a process it shares) ends its rounds
    and heartbeat too: nothing of it goes on writing into its state folder."""
    net = make_network(("alice", "bob"), rounds=1000)
    alice, bob = (make_node(net, p) for p in net.peers)
    tasks = [asyncio.ensure_future(n.run()) for n in (alice, bob)]
    path = net.state("alice") / "events.jsonl"
    for _ in range(200):
        await asyncio.sleep(0.02)
        if path.exists() and '"checkpoint"' in path.read_text():
            break
    assert _tasks_of(alice)
    tasks[0].cancel()
    with pytest.raises(asyncio.CancelledError):
        await tasks[0]
    assert _tasks_of(alice) == []
    assert alice.state_lock._fd is None  # (let go: a restarted node can take it)
    bob.request_stop()
    assert await asyncio.wait_for(tasks[1], 10 * TIMEOUT) == 0


async def test_a_node_alone_still_ends_each_round_at_its_deadline(make_network) -> None:
    """No neighbour ever connects, so no network event wakes the round: the deadline must."""
    net = make_network(
        ("alice", "bob"),
        rounds=2,
        round_timeout=0.3,
        startup_timeout=0.3,
        extra={"training": {"min_neighbours": 0}},
    )
    alice = make_node(net, "alice")
    assert await asyncio.wait_for(alice.run(), 10 * TIMEOUT) == 0
    aggregates = [
        e for e in read_events(net.state("alice") / "events.jsonl") if e["type"] == "aggregate"
    ]
    assert [e["missing"] for e in aggregates] == [["bob"], ["bob"]]


@pytest.mark.parametrize("compression", ["none", "topk:0.2"])
async def test_resampled_k_regular_topology_trains(
    make_network, tmp_path: Path, compression: str
) -> None:
    """Six peers on a 2-regular graph redrawn every round: each round's aggregate uses
    exactly that round's neighbours, and nobody is missing. With compression every new
    neighbour's public copy arrives as a keyframe or a difference it can apply: no
    stream is refused."""
    from p2pfl.core.topology import graph_for_round
    from p2pfl.learning.prepare import load_digits_arrays, write_partitions

    peers = tuple(f"p{i}" for i in range(6))
    net = make_network(
        peers,
        rounds=4,
        extra={
            "topology": {"kind": "k-regular", "degree": 2, "resample_every": 1},
            "aggregation": {"compression": compression},
        },
    )
    x, y = load_digits_arrays()
    data_dir = tmp_path / "six"
    write_partitions(x, y, len(peers), data_dir, seed=3, names=list(peers))
    net.data = {p: data_dir / f"{p}.npz" for p in peers}
    assert await run_all([make_node(net, p) for p in peers]) == [0] * len(peers)
    graphs = [graph_for_round(net.config.topology, net.config.peer_ids, 7, r) for r in range(4)]
    assert len({frozenset((k, v) for k, v in g.items()) for g in graphs}) > 1
    for peer in peers:
        for e in read_events(net.state(peer) / "events.jsonl"):
            if e["type"] == "aggregate":
                assert set(e["members"]) == graphs[e["round"]][peer] | {peer}
                assert e["missing"] == []
            if e["type"] == "reject":  # (a copy out of step would be refused, and logged)
                assert "version" not in e["reason"] and "copy" not in e["reason"], e


async def test_large_model_streams_in_many_chunks(make_network) -> None:
    """A 10 MB model crosses as 40 encrypted 256 KiB chunks each way, every round, and both
    nodes end with bit-identical averages."""
    size = 2_500_000
    net = make_network(
        ("alice", "bob"),
        rounds=2,
        model={"kind": "custom", "factory": "scripts.big_model:factory", "options": {"size": size}},
    )
    nodes = [make_node(net, p) for p in net.peers]
    assert await run_all(nodes) == [0, 0]
    for peer in net.peers:
        recvs = [e for e in read_events(net.state(peer) / "events.jsonl") if e["type"] == "recv"]
        assert [e["bytes"] for e in recvs] == [size * 4, size * 4]
        assert size * 4 > 30 * nodes[0].net.limits.max_chunk  # many chunks per stream
    alice, bob = (n.params for n in nodes)
    assert alice.shape == (size,)
    assert np.array_equal(alice, bob)
