"""Operating a node: Prometheus metrics over HTTP and `p2pfl status` over the unix socket,
both asked while real nodes run (and train) on 127.0.0.1."""

from __future__ import annotations

import asyncio
import contextlib
import stat
import time
import urllib.request
from typing import Any

import numpy as np
import pytest

from p2pfl.cli import main
from p2pfl.daemon.metrics import MAX_REASONS, NodeMetrics, reason_label
from p2pfl.daemon.node import Node, NodeOptions
from p2pfl.daemon.status import format_status, query_status
from p2pfl.errors import P2PFLError
from p2pfl.learning import MLP, load_dataset
from p2pfl.proto.keys import load_private_key

from .conftest import TIMEOUT, LocalNetwork

#: Seconds every local training takes in the slow learner below.
TRAIN_S = 0.25


class SlowMLP(MLP):
    """An MLP whose training takes at least TRAIN_S: the status must come back meanwhile."""

    def fit(self, x: np.ndarray, y: np.ndarray, **kwargs: Any) -> float:
        time.sleep(TRAIN_S)
        return super().fit(x, y, **kwargs)


def slow_mlp(*, inputs: int, classes: int, seed: int) -> SlowMLP:
    return SlowMLP(inputs, classes, [16], seed)


def make_node(net: LocalNetwork, peer: str, metrics: bool = False) -> Node:
    return Node(
        net.config,
        NodeOptions(
            node_id=peer,
            state_dir=net.state(peer),
            handle_signals=False,
            metrics=("127.0.0.1", 0) if metrics else None,
        ),
        load_private_key(net.keys[peer]),
        load_dataset(net.data[peer], val_path=net.test_data),
    )


def scrape(url: str) -> dict[str, float]:
    with urllib.request.urlopen(url, timeout=5 * TIMEOUT) as response:
        assert response.headers["Content-Type"].startswith("text/plain")
        text = response.read().decode()
    values = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            values[name] = float(value)
    return values


async def test_metrics_and_status_of_running_nodes(make_network) -> None:
    net = make_network(rounds=6, model={"kind": "custom", "factory": "tests.test_operate:slow_mlp"})
    nodes = [make_node(net, p, metrics=(p == "alice")) for p in net.peers]
    alice = nodes[0]
    runs = asyncio.gather(*(n.run() for n in nodes))
    deadline = time.monotonic() + 30 * TIMEOUT

    async def until(check: Any) -> Any:
        while time.monotonic() < deadline:
            got = await check()
            if got:
                return got
            await asyncio.sleep(0.02)
        raise AssertionError("timed out")

    async def training_status() -> dict[str, Any] | None:
        try:
            status = await asyncio.to_thread(query_status, net.state("alice"))
        except P2PFLError:  # not listening yet
            return None
        return status if status["phase"] == "training" and status["round"] >= 1 else None

    # Asked while alice trains (in its worker thread) in round 1 or later.
    status = await until(training_status)
    assert status["node"] == "alice" and status["rounds"] == 6
    assert status["rounds_completed"] >= 1 and status["last_eval"]["accuracy"] > 0
    assert [n["peer"] for n in status["neighbours"]] == ["bob", "carol"]
    assert all(n["connected"] and n["last_seen_s"] < 5 for n in status["neighbours"])
    assert alice.metrics_address is not None
    assert status["metrics"] == f"http://127.0.0.1:{alice.metrics_address[1]}/metrics"
    assert "neighbour" in format_status(status) and "bob" in format_status(status)
    sock = net.state("alice") / "status.sock"
    assert stat.S_IMODE(sock.stat().st_mode) == 0o600

    async def scraped_after(done: float) -> dict[str, float] | None:
        values = await asyncio.to_thread(scrape, status["metrics"])
        return values if values["p2pfl_rounds_completed_total"] > done else None

    first = await until(lambda: scraped_after(0))
    later = await until(lambda: scraped_after(first["p2pfl_rounds_completed_total"]))
    assert later["p2pfl_round"] >= first["p2pfl_round"]
    assert later["p2pfl_connected_neighbours"] == 2
    assert later['p2pfl_sent_bytes_total{peer="bob"}'] > 0
    assert later['p2pfl_received_messages_total{peer="carol"}'] >= 1
    assert later["p2pfl_round_duration_seconds_count"] >= 2
    assert later["p2pfl_train_duration_seconds_sum"] >= TRAIN_S
    assert 0 < later["p2pfl_validation_accuracy"] <= 1
    assert later['p2pfl_node_info{node="alice"}'] == 1

    assert await asyncio.wait_for(runs, 60 * TIMEOUT) == [0, 0, 0]
    assert not sock.exists()  # removed on the way out
    with pytest.raises(P2PFLError, match="no status socket"):
        query_status(net.state("alice"))
    # The metrics server is gone with the node.
    with pytest.raises(OSError):
        scrape(status["metrics"])


def test_status_command(make_network, capsys: pytest.CaptureFixture[str]) -> None:
    net = make_network()
    state = net.state("alice")
    state.mkdir(parents=True)
    assert main(["status", str(state)]) == 2
    assert "no status socket" in capsys.readouterr().err
    (state / "status.sock").write_text("")  # a leftover file, nobody listening
    assert main(["status", str(state), "--json"]) == 2
    assert "no node is listening" in capsys.readouterr().err


def test_metrics_labels_stay_bounded() -> None:
    metrics = NodeMetrics("alice", ["bob"], lambda: 1)
    assert reason_label("round 7 is 3 ahead") == reason_label("round 9 is 12 ahead")
    for i in range(MAX_REASONS + 10):
        metrics.observe({"type": "reject", "reason": f"weird thing {'x' * i}"})
    metrics.observe({"type": "send", "peer": "mallory", "bytes": 10})
    metrics.observe({"type": "send", "peer": "bob", "bytes": 5})
    metrics.observe({"type": "eval", "loss": 0.5, "r2": 0.75})
    metrics.observe({"type": "round_end", "duration_s": "soon"})  # bad field: ignored
    registry = metrics.registry
    reasons = {
        s.labels["reason"]
        for m in registry.collect()
        if m.name == "p2pfl_rejections"
        for s in m.samples
        if s.name.endswith("_total")
    }
    assert len(reasons) == MAX_REASONS + 1 and "other" in reasons
    assert registry.get_sample_value("p2pfl_sent_bytes_total", {"peer": "unknown"}) == 10
    assert registry.get_sample_value("p2pfl_sent_bytes_total", {"peer": "bob"}) == 5
    assert registry.get_sample_value("p2pfl_validation_r2") == 0.75
    assert registry.get_sample_value("p2pfl_rounds_completed_total") == 1
    assert registry.get_sample_value("p2pfl_round_duration_seconds_count") == 0
    assert registry.get_sample_value("p2pfl_connected_neighbours") == 1


async def test_status_socket_in_a_directory_with_a_long_path(tmp_path) -> None:
    """sun_path holds 108 bytes: a deeper state directory is reached from inside it."""
    from p2pfl.daemon.status import open_status_socket, serve_status

    state = tmp_path / ("d" * 60) / ("e" * 60)
    state.mkdir(parents=True, mode=0o700)
    assert len(str(state / "status.sock")) > 108
    server = asyncio.ensure_future(serve_status(open_status_socket(state), lambda: {"ok": 1}))
    try:
        assert await asyncio.to_thread(query_status, state) == {"ok": 1}
        assert stat.S_IMODE((state / "status.sock").stat().st_mode) == 0o600
    finally:
        server.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await server


async def test_a_node_whose_status_socket_cannot_be_made_still_trains(
    make_network, caplog: pytest.LogCaptureFixture
) -> None:
    """Something that is not a socket sits at alice's status.sock (a directory): she logs
    why ``p2pfl status`` will not answer, and trains all her rounds."""
    net = make_network(rounds=2)
    (net.state("alice") / "status.sock").mkdir(parents=True)
    nodes = [make_node(net, p) for p in net.peers]
    with caplog.at_level("ERROR", logger="p2pfl.daemon.node"):
        assert await asyncio.wait_for(asyncio.gather(*(n.run() for n in nodes)), 60 * TIMEOUT) == [
            0,
            0,
            0,
        ]
    assert "no status socket" in caplog.text
    assert nodes[0].finished


def test_metrics_on_a_port_in_use_is_a_clear_error() -> None:
    import socket

    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen(1)
    try:
        port = busy.getsockname()[1]
        with pytest.raises(P2PFLError, match=f"--metrics 127.0.0.1:{port}: cannot listen"):
            NodeMetrics("alice", ["bob"], lambda: 0).serve("127.0.0.1", port)
    finally:
        busy.close()


def test_metrics_beyond_loopback_are_warned_about(caplog: pytest.LogCaptureFixture) -> None:
    metrics = NodeMetrics("alice", ["bob"], lambda: 0)
    with caplog.at_level("WARNING", logger="p2pfl.daemon.metrics"):
        host, _port = metrics.serve("127.0.0.1", 0)
        assert "open to anyone" not in caplog.text  # loopback: no warning
        metrics.close()
        again = NodeMetrics("alice", ["bob"], lambda: 0)
        again.serve("0.0.0.0", 0)
        again.close()
    assert host == "127.0.0.1" and "open to anyone" in caplog.text


async def test_status_of_a_stopped_node_reads_its_log(
    make_network, capsys: pytest.CaptureFixture[str]
) -> None:
    import json

    from .test_node import make_node, run_all

    net = make_network(("alice", "bob"), rounds=2)
    assert await run_all([make_node(net, p) for p in net.peers]) == [0, 0]
    capsys.readouterr()
    assert main(["status", str(net.state("alice"))]) == 0
    out = capsys.readouterr().out
    assert out.startswith("node alice is not running (")
    assert "ended completed at round 2" in out and "2 rounds in the log (0 averaged alone)" in out
    assert main(["status", str(net.state("alice")), "--json"]) == 0
    status = json.loads(capsys.readouterr().out)
    assert status["running"] is False and status["finished"] is True
    assert status["rounds_completed"] == 2 and status["last_accuracy"] > 0


def test_metrics_count_silent_neighbours_and_their_level() -> None:
    metrics = NodeMetrics("alice", ["bob"], lambda: 1)
    metrics.observe({"type": "suspect_link", "peer": "bob", "phi": 8.3, "silent_s": 0.6})
    metrics.observe({"type": "suspect_link", "peer": "bob", "phi": 9.1, "silent_s": 0.7})
    samples = {
        (s.name, s.labels.get("peer")): s.value
        for m in metrics.registry.collect()
        for s in m.samples
        if s.name.startswith("p2pfl_link_suspicion")
    }
    assert samples[("p2pfl_link_suspicions_total", "bob")] == 2
    assert samples[("p2pfl_link_suspicion_phi", "bob")] == 9.1


def test_status_shows_a_silent_neighbour_with_its_level() -> None:
    status = {
        "node": "alice",
        "round": 3,
        "rounds": 10,
        "phase": "collecting",
        "rounds_completed": 3,
        "uptime_s": 5.0,
        "last_eval": None,
        "neighbours": [
            {"peer": "bob", "connected": True, "round": 3, "phi": 0.0, "silent": False},
            {"peer": "carol", "connected": True, "round": 3, "phi": 9.4, "silent": True},
        ],
    }
    rows = {line.split()[0]: line for line in format_status(status).splitlines()[3:]}
    assert "connected" in rows["bob"] and "silent (phi 9.4)" in rows["carol"]


def test_metrics_show_the_compression_and_keyframes() -> None:
    metrics = NodeMetrics("alice", ["bob"], lambda: 1)
    metrics.observe({"type": "node_start", "compression": "topk:0.1"})
    metrics.observe({"type": "send", "peer": "bob", "bytes": 10, "keyframe": True})
    metrics.observe({"type": "send", "peer": "bob", "bytes": 5})
    registry = metrics.registry
    assert registry.get_sample_value("p2pfl_compression_info", {"compression": "topk:0.1"}) == 1
    assert registry.get_sample_value("p2pfl_keyframes_sent_total") == 1
