"""Real nodes training the shipped PyTorch CNN on digits 8x8 (SGD with momentum), plain
and with secure aggregation: real websockets on 127.0.0.1, in one event loop."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from .test_node import make_node, read_events, run_all

torch = pytest.importorskip("torch", reason="PyTorch is an optional extra: pip install '.[torch]'")

pytestmark = pytest.mark.slow

ROUNDS = 4
CNN = {
    "kind": "torch",
    "factory": "p2pfl.learning.examples.torch_models:cnn",
    "options": {"channels": [8, 16], "hidden": 32},
    "optimizer": {"kind": "sgd", "momentum": 0.9},
}
# The fixture's 0.3 suits plain SGD on the numpy MLP; with momentum 0.9 the effective step
# is ten times larger.
TRAINING = {"learning_rate": 0.05, "local_epochs": 2}


@pytest.fixture(autouse=True)
def restore_torch_threads() -> Iterator[None]:
    """A Node builds its learner as a peer process does: one torch thread, process-wide."""
    old = torch.get_num_threads()
    yield
    torch.set_num_threads(old)


def events_by_type(path: Path) -> dict[str, list[dict[str, Any]]]:
    by_type: dict[str, list[dict[str, Any]]] = {}
    for event in read_events(path):
        by_type.setdefault(event["type"], []).append(event)
    return by_type


async def run_cnn_network(make_network, extra: dict[str, Any]) -> Any:
    net = make_network(rounds=ROUNDS, model=dict(CNN), extra=extra)
    assert net.config.training.model.kind == "torch"
    nodes = [make_node(net, peer) for peer in net.peers]
    assert await run_all(nodes) == [0, 0, 0]
    return net


def check_trained_and_agreed(net: Any, rule: str, tolerance: float) -> None:
    finals = {}
    last_accuracy = {}
    for peer in net.peers:
        by_type = events_by_type(net.state(peer) / "events.jsonl")
        assert by_type["node_stop"][0]["finished"] is True
        assert [e["round"] for e in by_type["round_end"]] == list(range(ROUNDS))
        for agg in by_type["aggregate"]:
            assert agg["rule"] == rule
            assert set(agg["members"]) == set(net.peers) and agg["missing"] == []
        evals = by_type["eval"]
        assert [e["round"] for e in evals] == list(range(ROUNDS))
        assert all(e["data"] == "validation" and "r2" not in e for e in evals)
        accuracy = [e["accuracy"] for e in evals]
        assert accuracy[-1] > accuracy[0], (peer, accuracy)
        assert accuracy[-1] > 0.7, (peer, accuracy)
        last_accuracy[peer] = accuracy[-1]
        with np.load(net.state(peer) / "checkpoint.npz", allow_pickle=False) as ckpt:
            assert int(ckpt["next_round"]) == ROUNDS
            finals[peer] = ckpt["params"].copy()
    # Full graph, everyone present: Metropolis gives every node the same average.
    assert max(last_accuracy.values()) - min(last_accuracy.values()) <= 0.01
    alice = finals["alice"]
    assert alice.dtype == np.float32 and np.all(np.isfinite(alice))
    for peer in ("bob", "carol"):
        assert finals[peer].shape == alice.shape
        assert np.max(np.abs(finals[peer] - alice)) < tolerance, peer


async def test_three_nodes_train_the_torch_cnn_and_agree(make_network) -> None:
    net = await run_cnn_network(make_network, {"training": TRAINING})
    check_trained_and_agreed(net, "metropolis", 1e-5)


async def test_three_nodes_train_the_torch_cnn_with_secure_aggregation(make_network) -> None:
    net = await run_cnn_network(
        make_network, {"training": TRAINING, "aggregation": {"secure": True}}
    )
    assert net.config.aggregation.secure is True
    # (each peer's fixed-point rounding is its own: close, not bit-identical)
    check_trained_and_agreed(net, "secure-metropolis", 1e-4)
