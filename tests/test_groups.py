"""Several nodes per process (``p2pfl harness --nodes-per-process K``): the same run as
one process per node, kills and restarts inside a process, and the process's commands."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from p2pfl.harness.groups import NodeGroup, group_name, groups_of
from p2pfl.harness.layout import python_env

from .conftest import TIMEOUT

RUN = ("--peers", "6", "--rounds", "3", "--seed", "3", "--no-snapshots")


def harness(out: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "p2pfl", "harness", "--out", str(out), *args],
        capture_output=True,
        text=True,
        timeout=180 * TIMEOUT,
        check=False,
    )


def events(folder: Path, peer: str) -> list[dict[str, object]]:
    lines = (folder / "state" / peer / "events.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


def test_groups_are_consecutive_peers() -> None:
    peers = [f"p{i:02d}" for i in range(7)]
    assert groups_of(peers, 3) == [peers[0:3], peers[3:5], peers[5:7]]
    assert groups_of(peers, 10) == [peers]
    assert groups_of(peers, 1) == [[p] for p in peers]
    assert [group_name(g) for g in groups_of(peers, 3)] == ["p00-p02", "p03-p04", "p05-p06"]
    assert [group_name(g) for g in groups_of(peers[:1], 3)] == ["p00"]
    sizes = [len(g) for g in groups_of([f"p{i:03d}" for i in range(256)], 50)]
    assert sizes == [43, 43, 43, 43, 42, 42]


def test_nodes_sharing_processes_train_as_nodes_of_their_own(tmp_path: Path) -> None:
    shared = harness(tmp_path / "shared", *RUN, "--nodes-per-process", "3")
    assert shared.returncode == 0, shared.stdout + shared.stderr
    alone = harness(tmp_path / "alone", *RUN)
    assert alone.returncode == 0, alone.stdout + alone.stderr
    a = json.loads((tmp_path / "shared" / "summary.json").read_text())
    b = json.loads((tmp_path / "alone" / "summary.json").read_text())
    assert set(a) == set(b)
    for peer, accuracy in b["accuracy"]["per_peer"].items():
        assert a["accuracy"]["per_peer"][peer] == pytest.approx(accuracy, abs=1e-6)
    assert a["nodes_per_process"] == 3 and b["nodes_per_process"] == 1
    # two processes of three nodes: each node its own key, state folder and port
    pids = {peer: events(tmp_path / "shared", peer)[0]["pid"] for peer in a["accuracy"]["per_peer"]}
    assert pids["p00"] == pids["p01"] == pids["p02"] != pids["p03"] == pids["p04"] == pids["p05"]
    logs = sorted(p.name for p in (tmp_path / "shared" / "logs").iterdir())
    assert logs == ["p00-p02.log", "p03-p05.log"]
    listens = {
        e["port"] for p in pids for e in events(tmp_path / "shared", p) if e["type"] == "listen"
    }
    assert len(listens) == 6


def test_a_node_killed_and_restarted_inside_its_process(tmp_path: Path) -> None:
    run = harness(
        tmp_path / "run",
        *("--peers", "4", "--rounds", "8", "--no-snapshots", "--no-baseline"),
        *("--nodes-per-process", "2", "--kill", "p01@2", "--restart", "p01@4"),
    )
    assert run.returncode == 0, run.stdout + run.stderr
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    faults = {f["fault"]: f for f in summary["faults"]}
    assert faults["kill p01@2"]["round"] == 2
    assert faults["restart p01@4"]["rejoined_round"] is not None
    assert faults["restart p01@4"]["paused_s"] is not None  # (nobody was paused long)
    p01 = [e for e in events(tmp_path / "run", "p01") if e["type"] == "node_start"]
    p00 = [e for e in events(tmp_path / "run", "p00") if e["type"] == "node_start"]
    assert len(p01) == 2 and p01[0]["pid"] == p01[1]["pid"]  # the same process, a new node
    assert len(p00) == 1 and p00[0]["pid"] == p01[0]["pid"]  # its process mate ran on
    assert summary["accuracy"]["min"] > 0.8
    # the killed node did nothing more: its log is quiet from its stop to the new start
    log = [e["type"] for e in events(tmp_path / "run", "p01")]
    after_stop = log[log.index("node_stop") + 1 :]
    assert after_stop[: after_stop.index("node_start") + 1] in (
        ["node_start"],
        ["resume", "node_start"],
    )


def test_a_running_node_restarted_inside_its_process(tmp_path: Path) -> None:
    """--restart of a peer that runs: a kill and a start in the same step; the killed
    node's end must not be taken for the new one's."""
    run = harness(
        tmp_path / "run",
        *("--peers", "4", "--rounds", "6", "--no-snapshots", "--no-baseline"),
        *("--nodes-per-process", "2", "--restart", "p01@3"),
    )
    assert run.returncode == 0, run.stdout + run.stderr
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    faults = {f["fault"]: f for f in summary["faults"]}
    assert faults["restart p01@3"]["rejoined_round"] is not None
    assert summary["exit_codes"]["p01"] == 0


def test_bad_commands_are_logged_and_the_nodes_run_on(tmp_path: Path) -> None:
    """The process's stdin: unknown verbs and peers are refused in its log."""
    spec = ["p2pfl", "run", "missing.yaml", "--id", "p00", "--key", "k", "--data", "d.npz"]
    group = NodeGroup(["p00"], {"p00": [*spec, "--state-dir", str(tmp_path)]}, tmp_path / "g.log")
    group.launch([], python_env())
    group.send("explode p00")
    group.send("start nobody")
    group.send("start p00")  # its config is missing: the node ends with code 2
    group.send("")
    assert group.proc is not None
    group.proc.stdin.close()  # type: ignore[union-attr]
    group.proc.wait(30 * TIMEOUT)
    group.poll()
    group.close_log()
    assert group.codes == {"p00": 2}
    log = (tmp_path / "g.log").read_text()
    assert "unknown command 'explode p00'" in log
    assert "unknown command 'start nobody'" in log
    assert "p00: cannot start" in log
