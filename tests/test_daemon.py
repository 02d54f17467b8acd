"""``p2pfl run`` as real processes: exit codes, SIGKILL + restart, SIGTERM."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from .conftest import TIMEOUT, LocalNetwork


def start(net: LocalNetwork, peer: str) -> subprocess.Popen[bytes]:
    with open(net.root / f"{peer}.log", "ab") as log:
        return _popen(net, peer, log)


def _popen(net: LocalNetwork, peer: str, log: Any) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "p2pfl",
            "run",
            str(net.config_path),
            "--id",
            peer,
            "--key",
            str(net.keys[peer]),
            "--data",
            str(net.data[peer]),
            "--state-dir",
            str(net.state(peer)),
        ],
        stdout=subprocess.DEVNULL,
        stderr=log,
    )


def events(net: LocalNetwork, peer: str) -> list[dict[str, Any]]:
    path = net.state(peer) / "events.jsonl"
    if not path.exists():
        return []
    lines = path.read_text().splitlines()
    # The last line may be half-written while the node runs.
    return [json.loads(line) for line in lines if line.endswith("}")]


def wait_for_round(net: LocalNetwork, peer: str, round_index: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout * TIMEOUT
    while time.monotonic() < deadline:
        if any(e["type"] == "round_end" and e["round"] >= round_index for e in events(net, peer)):
            return
        time.sleep(0.01)
    raise AssertionError(f"{peer} did not reach round {round_index}")


def stop_all(procs: list[subprocess.Popen[bytes]]) -> None:
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_sigkill_and_restart_resumes_and_everyone_finishes(make_network) -> None:
    rounds = 60
    # A bigger model makes rounds slow enough to kill one mid-run.
    net = make_network(rounds=rounds, round_timeout=20, model={"kind": "mlp", "hidden": [256]})
    procs = {p: start(net, p) for p in net.peers}
    try:
        wait_for_round(net, "bob", 5, timeout=60)
        procs["bob"].send_signal(signal.SIGKILL)
        assert procs["bob"].wait(10 * TIMEOUT) == -signal.SIGKILL
        killed_at = max(e["round"] for e in events(net, "bob") if e["type"] == "round_end")
        assert killed_at < rounds - 1, "bob finished before it could be killed"
        procs["bob"] = start(net, "bob")
        codes = {p: proc.wait(120 * TIMEOUT) for p, proc in procs.items()}
    finally:
        stop_all(list(procs.values()))
    assert codes == {"alice": 0, "bob": 0, "carol": 0}, (net.root / "bob.log").read_text()
    bob = events(net, "bob")
    (resume,) = [e for e in bob if e["type"] == "resume" and e["reason"] == "checkpoint"]
    assert resume["round"] >= 5
    # The restarted node picked up from its checkpoint: it never re-ran round 0.
    starts = [e["round"] for e in bob if e["type"] == "round_start"]
    assert starts.count(0) == 1
    for peer in net.peers:
        evs = events(net, peer)
        assert evs[-1]["type"] == "node_stop" and evs[-1]["finished"] is True
        last_rounds = {e["round"] for e in evs if e["type"] == "aggregate"}
        assert rounds - 1 in last_rounds
    finals = [[e for e in events(net, p) if e["type"] == "eval"][-1]["accuracy"] for p in net.peers]
    assert max(finals) - min(finals) <= 0.02


def test_sigterm_shuts_down_cleanly(make_network) -> None:
    net = make_network(("alice", "bob"), rounds=100000)
    procs = [start(net, p) for p in net.peers]
    try:
        wait_for_round(net, "alice", 3, timeout=30)
        procs[0].send_signal(signal.SIGTERM)
        assert procs[0].wait(10 * TIMEOUT) == 0
    finally:
        stop_all(procs)
    evs = events(net, "alice")
    last = evs[-1]
    assert last["type"] == "node_stop" and last["finished"] is False
    (final,) = [e for e in evs if e["type"] == "checkpoint" and e.get("final")]
    # Stopped before or after this round's aggregation: resume there or at the next round.
    assert final["next_round"] in (last["round"], last["round"] + 1)
    with np.load(net.state("alice") / "checkpoint.npz") as ckpt:
        assert int(ckpt["next_round"]) == final["next_round"]
    assert (net.state("alice") / "checkpoint.npz").exists()


def test_config_error_names_file_and_field(make_network, tmp_path: Path) -> None:
    net = make_network(("alice", "bob"))
    bad = tmp_path / "bad.yaml"
    bad.write_text(net.config_path.read_text().replace("rounds: 5", "rounds: -1"))
    result = subprocess.run(
        [sys.executable, "-m", "p2pfl", "check", str(bad)], capture_output=True, text=True
    )
    assert result.returncode == 2
    assert "bad.yaml" in result.stderr and "training.rounds" in result.stderr
