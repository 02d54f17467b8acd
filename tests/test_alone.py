"""Never alone in silence: a starting node says whom it waits for and why, a node that
reaches too few neighbours (``training.min_neighbours``) stops with exit code 3 instead
of training alone, and a restarted finished node says so and exits at once."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from p2pfl.config import load_config
from p2pfl.daemon.startup import EXIT_ALONE, waiting_for
from p2pfl.logs.read import read_logs
from p2pfl.logs.summary import format_summary, summarize
from p2pfl.proto.keys import generate_key_file

from .conftest import TIMEOUT
from .test_node import make_node, read_events, run_all


async def _bob_with_another_config(
    make_network: Any,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    change: Callable[[dict[str, Any]], None],
) -> list[str]:
    """alice and bob, bob's peers.yaml changed by ``change``: both stop with exit code 3;
    their ERROR lines."""
    net = make_network(("alice", "bob"), startup_timeout=1.5)
    data = yaml.safe_load(net.config_path.read_text())
    change(data)
    other = tmp_path / "bob.yaml"
    other.write_text(yaml.safe_dump(data))
    bob_net = dataclasses.replace(net, config_path=other, config=load_config(other))
    caplog.set_level(logging.INFO, logger="p2pfl")
    codes = await run_all([make_node(net, "alice"), make_node(bob_net, "bob")])
    assert codes == [EXIT_ALONE, EXIT_ALONE]
    return [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]


def test_why_a_neighbour_is_missing_in_words() -> None:
    unreached = {"bob": "connection refused at ws://127.0.0.1:9"}
    line = waiting_for(
        ["erin", "dave", "bob", "alice"], "carol", linked={"dave"}, unreached=unreached
    )
    assert line == (
        "alice: not connected yet: it dials us; bob: connection refused at ws://127.0.0.1:9; "
        "dave: connected, its round not announced yet; erin: not connected yet"
    )


async def test_a_node_that_reaches_no_neighbour_says_why_and_exits_3(
    make_network: Any, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("p2pfl.daemon.node.REPORT_EVERY", 0.2 * TIMEOUT)
    net = make_network(startup_timeout=1.0)
    alice = make_node(net, "alice")
    caplog.set_level(logging.INFO, logger="p2pfl")
    assert await run_all([alice]) == [EXIT_ALONE]
    waiting = [r.getMessage() for r in caplog.records if "waiting for" in r.getMessage()]
    assert waiting, "no 'waiting for' line while starting"
    for peer in ("bob", "carol"):
        address = net.config.peers[peer].address
        assert f"{peer}: connection refused at {address}" in waiting[-1]
    (error,) = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert "only 0 of the 1 neighbour(s)" in error and "exit code 3" in error
    events = read_events(net.state("alice") / "events.jsonl")
    assert not [e for e in events if e["type"] in ("train", "aggregate")]
    assert events[-1]["type"] == "node_stop" and events[-1]["reason"] == "alone"
    table = format_summary(summarize(read_logs(net.state("alice")).events))
    assert table.splitlines()[1].split()[-1] == "alone" and "exit code 3" in table


async def test_with_min_neighbours_0_a_node_may_train_alone(make_network: Any) -> None:
    net = make_network(startup_timeout=0.5, rounds=2, extra={"training": {"min_neighbours": 0}})
    assert await run_all([make_node(net, "alice")]) == [0]
    (s,) = summarize(read_logs(net.state("alice")).events)
    assert (s.rounds, s.alone, s.finished) == (2, 2, True)


async def test_a_node_that_is_not_known_to_its_neighbour_is_told_what_to_check(
    make_network: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """bob's peers.yaml lists another key for alice: bob ends her handshake without a word;
    alice says what to check instead of "cannot reach"."""

    def other_key(data: dict[str, Any]) -> None:
        data["peers"]["alice"]["public_key"] = generate_key_file(tmp_path / "other.key")

    errors = await _bob_with_another_config(make_network, tmp_path, caplog, other_key)
    (alice,) = [m for m in errors if m.startswith("alice: only 0")]
    assert "bob: handshake failed: bob ended the handshake with a policy close" in alice
    assert "does its peers.yaml list our public key" in alice


async def test_a_restarted_finished_node_says_so_and_exits_at_once(
    make_network: Any, caplog: pytest.LogCaptureFixture
) -> None:
    net = make_network(("alice", "bob"), rounds=2)
    assert await run_all([make_node(net, p) for p in net.peers]) == [0, 0]
    before = read_events(net.state("alice") / "events.jsonl")
    caplog.set_level(logging.INFO, logger="p2pfl")
    started = time.monotonic()
    assert await run_all([make_node(net, "alice")]) == [0]
    assert time.monotonic() - started < 2.0 * TIMEOUT
    assert any(
        "training is complete: all 2 rounds are done" in r.getMessage() for r in caplog.records
    )
    assert read_events(net.state("alice") / "events.jsonl") == before  # nothing happened
    await asyncio.sleep(0)


async def test_a_digest_mismatch_names_the_fields_that_differ(
    make_network: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """bob's copy of peers.yaml has another learning rate and one more round: both say so,
    naming the fields, instead of two digests."""

    def other_training(data: dict[str, Any]) -> None:
        data["training"]["learning_rate"] = 0.25
        data["training"]["rounds"] += 1

    errors = await _bob_with_another_config(make_network, tmp_path, caplog, other_training)
    for node, peer in (("alice", "bob"), ("bob", "alice")):
        (line,) = [m for m in errors if m.startswith(f"{node}: only 0")]
        assert f"{peer}: config digest mismatch" in line, line
        assert "peers.yaml differs in training.learning_rate, training.rounds" in line, line


async def test_peers_whose_data_give_other_input_scales_are_refused_naming_both(
    make_network: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """input_scale: auto, and bob's features are 100 times alice's: one model would see
    inputs scaled differently at each peer. They refuse each other, and say both scales."""
    import numpy as np

    from p2pfl.learning import load_dataset

    net = make_network(("alice", "bob"), startup_timeout=1.5)
    ds = load_dataset(net.data["bob"])
    louder = tmp_path / "bob.npz"
    np.savez(louder, x=ds.x * 100, y=ds.y)
    bob_net = dataclasses.replace(net, data={**net.data, "bob": louder})
    caplog.set_level(logging.INFO, logger="p2pfl")
    codes = await run_all([make_node(net, "alice"), make_node(bob_net, "bob")])
    assert codes == [EXIT_ALONE, EXIT_ALONE]
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    (alice,) = [m for m in errors if m.startswith("alice: only 0")]
    assert "data.input_scale.128 (only theirs), data.input_scale.1 (only ours)" in alice


async def test_a_finished_run_trains_longer_when_every_peer_raises_the_round_count(
    make_network: Any, tmp_path: Path
) -> None:
    """Raise training.rounds in peers.yaml on every peer after the run finished: each node
    resumes from its checkpoint and trains the added rounds. Any other change still makes
    the checkpoint refuse the config."""
    from p2pfl.store.checkpoint import CheckpointError

    net = make_network(("alice", "bob"), rounds=2)
    assert await run_all([make_node(net, p) for p in net.peers]) == [0, 0]
    data = yaml.safe_load(net.config_path.read_text())
    data["training"]["rounds"] = 4
    longer = tmp_path / "longer.yaml"
    longer.write_text(yaml.safe_dump(data))
    more = dataclasses.replace(net, config_path=longer, config=load_config(longer))
    assert await run_all([make_node(more, p) for p in net.peers]) == [0, 0]
    events = read_events(net.state("alice") / "events.jsonl")
    assert [e["round"] for e in events if e["type"] == "aggregate"] == [0, 1, 2, 3]
    resumes = [e for e in events if e["type"] == "resume"]
    assert resumes and resumes[0]["round"] == 2
    data["training"]["learning_rate"] = 0.2  # not only the rounds: refused
    other = tmp_path / "other.yaml"
    other.write_text(yaml.safe_dump(data))
    changed = dataclasses.replace(net, config_path=other, config=load_config(other))
    node = make_node(changed, "alice")
    with pytest.raises(CheckpointError, match=r"a finished run may only raise training\.rounds"):
        await node.run()


async def test_with_compression_peers_whose_initial_models_differ_are_refused(
    make_network: Any, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A fresh node's first compressed difference is against the initial model, which both
    ends must hold bit for bit: a factory that ignored the seed (here: bob's model is
    shifted) would make bob's copies at alice differ from his own, unseen. They refuse each
    other, naming the initial model's digest."""
    from p2pfl.learning.trainer import LocalModel

    net = make_network(
        ("alice", "bob"), startup_timeout=1.5, extra={"aggregation": {"compression": "int8"}}
    )
    alice = make_node(net, "alice")
    original = LocalModel.initial_params
    monkeypatch.setattr(LocalModel, "initial_params", lambda self: original(self) + 1e-3)
    bob = make_node(net, "bob")
    caplog.set_level(logging.INFO, logger="p2pfl")
    assert await run_all([alice, bob]) == [EXIT_ALONE, EXIT_ALONE]
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    (line,) = [m for m in errors if m.startswith("alice: only 0")]
    assert f"model.initial.{alice.initial_digest} (only ours)" in line, line
