"""The harness: pure parts (faults, progress, report, baseline) and whole runs of
``p2pfl harness`` with real peer processes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from p2pfl.harness.baseline import train_centralized
from p2pfl.harness.faults import Fault, FaultPlan, FaultSpecError, parse_fault
from p2pfl.harness.layout import free_ports, network_name, peer_ids
from p2pfl.harness.progress import RunProgress
from p2pfl.harness.report import consensus_distance, final_models, render_table
from p2pfl.harness.runner import standardized
from p2pfl.logs.read import Event

from .conftest import TIMEOUT

PEERS = ["p00", "p01", "p02", "p03"]


def event(node: str, kind: str, round_index: int | None = None, **fields: Any) -> Event:
    raw = {"ts": fields.pop("ts", 0.0), "node": node, "type": kind, "round": round_index}
    raw.update(fields)
    return Event(raw["ts"], node, kind, round_index, 0, raw, Path("x"), 1)


# --- faults -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("p01", "expected PEER@ROUND"),
        ("p01@", "expected PEER@ROUND"),
        ("@3", "expected PEER@ROUND"),
        ("p01@x", "expected PEER@ROUND"),
        ("p01@-1", "expected PEER@ROUND"),
        ("p09@1", "no peer 'p09'"),
        ("p01@10", "past the last round"),
    ],
)
def test_bad_fault_specs_are_refused(text: str, problem: str) -> None:
    with pytest.raises(FaultSpecError, match=problem):
        parse_fault("kill", text, PEERS, rounds=10)


def test_kill_fires_once_the_peer_has_started_its_round() -> None:
    plan = FaultPlan([parse_fault("kill", "p01@3", PEERS, 10)])
    assert plan.due({"p01": 2, "p00": 5}, running=PEERS) == []
    assert plan.due({"p01": 3}, running=PEERS) == [Fault(3, "kill", "p01")]
    assert plan.due({"p01": 4}, running=PEERS) == []  # once only
    assert plan.done == [Fault(3, "kill", "p01")]


def test_restart_waits_for_its_kill_and_for_the_others_round() -> None:
    plan = FaultPlan(
        [parse_fault("kill", "p01@2", PEERS, 10), parse_fault("restart", "p01@5", PEERS, 10)]
    )
    # the others are past round 5 but p01 has not been killed yet: only the kill fires
    assert plan.due({"p00": 6, "p01": 2}, running=PEERS) == [Fault(2, "kill", "p01")]
    others = ["p00", "p02", "p03"]
    assert plan.due({"p00": 4, "p01": 2}, running=others) == []
    assert plan.due({"p00": 5, "p01": 2}, running=others) == [Fault(5, "restart", "p01")]
    assert plan.pending == []


def test_restart_of_a_running_peer_is_a_crash_and_restart() -> None:
    plan = FaultPlan([parse_fault("restart", "p02@4", PEERS, 10)])
    # the peer's own round does not count: the rest of the network must get there
    assert plan.due({"p02": 7, "p00": 3}, running=PEERS) == []
    assert plan.due({"p02": 7, "p00": 4}, running=PEERS) == [Fault(4, "restart", "p02")]


# --- progress ------------------------------------------------------------------------------


def test_progress_line_shows_slowest_and_fastest_peer_and_mean_accuracy() -> None:
    progress = RunProgress(["p00", "p01"], total_rounds=10)
    progress.update(
        [
            event("p00", "round_start", 0),
            event("p00", "round_end", 0),
            event("p00", "eval", 0, accuracy=0.5),
            event("p00", "round_start", 1),
            event("p01", "round_start", 0),
            event("p01", "eval", 0, accuracy=0.7),
            event("stranger", "round_start", 9),
        ]
    )
    assert progress.started_rounds() == {"p00": 1, "p01": 0}
    assert progress.line(running=2, elapsed=1.0).startswith("round 1..2/10  [2 1]  acc 0.6000  2/2")
    progress.update([event("p01", "node_stop", 9, finished=True)])
    assert "round 2..10/10" in progress.line(running=1, elapsed=2.0)


def test_progress_line_says_what_peers_do_before_their_first_round() -> None:
    """A torch peer takes seconds to import: "round 0..0" told nothing while it did."""
    progress = RunProgress(["p00", "p01", "p02"], total_rounds=5)
    assert progress.line(running=3, elapsed=0.5).startswith("starting: 3 loading  3/3 running")
    progress.update([event("p00", "node_start", 0), event("p01", "node_start", 0)])
    assert progress.line(running=3, elapsed=1.0).startswith(
        "starting: 1 loading, 2 waiting for neighbours"
    )
    progress.update([event("p00", "round_start", 0)])
    assert "1 loading, 1 waiting for neighbours, 1 training round 1" in progress.line(3, 1.5)
    progress.update([event("p01", "round_start", 0), event("p02", "round_start", 0)])
    assert progress.line(3, 2.0).startswith("round 1..1/5")


# --- report --------------------------------------------------------------------------------


def test_consensus_distance_uses_each_peers_completed_rounds(tmp_path: Path) -> None:
    size = 3
    states = {p: tmp_path / p for p in ("a", "b")}
    models = {
        "a": [[1.0, 0.0, 0.0], [1.0, 1.0, 1.0]],
        "b": [[0.0, 1.0, 0.0], [1.0, 1.0, 1.0]],
    }
    for peer, rounds in models.items():
        states[peer].mkdir()
        np.asarray(rounds, dtype="<f4").tofile(states[peer] / "snapshots.f32")
    done = [event(p, "round_end", r) for p in ("a", "b") for r in (0, 1)]
    distances = consensus_distance(states, 3, size, done)
    # round 0: mean (.5,.5,0), each model .707 away, mean norm .707 -> 1.0; round 1: equal
    assert distances[0] == pytest.approx(1.0)
    assert distances[1] == pytest.approx(0.0)
    assert distances[2] is None  # nobody got there
    # a round b did not complete (it was down) is not compared
    assert consensus_distance(states, 2, size, done[:3])[1] is None


def test_a_diverged_peer_is_left_out_of_the_report_with_the_reason(make_network) -> None:
    """A model that diverged to NaN is a checkpoint a node refuses; the report goes on
    with the other peers and says why that one has no test score."""
    from p2pfl.learning import build_learner, flatten
    from p2pfl.store.checkpoint import Checkpoint, save_checkpoint

    net = make_network(("alice", "bob"))
    model = net.config.training.model.as_mapping()
    params = flatten(build_learner(model, net.config.seed, source="test").get_weights())
    for peer, value in (("alice", 0.5), ("bob", np.nan)):
        net.state(peer).mkdir(parents=True)
        diverged = np.full_like(params, value)
        save_checkpoint(net.state(peer), Checkpoint(3, diverged, 9, net.config.digest))
    warnings: list[str] = []
    states = {peer: net.state(peer) for peer in net.peers}
    models, _ = final_models(states, net.config_path, warnings.append)
    assert list(models) == ["alice"]
    assert len(warnings) == 1 and warnings[0].startswith("bob: no test score: ")
    assert "NaN or infinite value" in warnings[0]


def test_centralised_baseline_learns_and_is_deterministic() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(300, 4)).astype(np.float32)
    y = (x[:, 0] > 0).astype(np.int64)
    model = {"kind": "softmax", "inputs": 4, "classes": 2, "hidden": [], "options": {}}
    kwargs: dict[str, Any] = dict(
        seed=3, x=x, y=y, x_test=x, y_test=y, epochs=5, batch_size=16, learning_rate=0.5
    )
    first = train_centralized(model, **kwargs)
    again = train_centralized(model, **kwargs)
    assert first.score_per_epoch == again.score_per_epoch
    assert first.metric == "accuracy"
    assert len(first.score_per_epoch) == 5 and first.final_score > 0.9


def test_peer_ids_sort_in_numeric_order() -> None:
    assert peer_ids(3) == ["p00", "p01", "p02"]
    ids = peer_ids(120)
    assert ids[0] == "p000" and ids == sorted(ids)


def test_standardized_uses_training_statistics_only() -> None:
    x_train = np.array([[1.0, 5.0, 1000.0], [3.0, 5.0, 3000.0]], dtype=np.float32)
    x_test = np.array([[2.0, 6.0, 5000.0]], dtype=np.float32)
    train, test = standardized(x_train, x_test)
    assert np.allclose(train, [[-1, 0, -1], [1, 0, 1]])
    assert np.allclose(test, [[0, 1, 3]])  # constant feature: centred, not divided by 0
    assert train.dtype == np.float32


def test_network_name_is_valid_for_any_dataset() -> None:
    from p2pfl.config import _NAME_RE  # the rule peers.yaml applies

    for spec in ("digits", "fashion-mnist:/some/dir", "/tmp/my data (v2).npz", "x" * 200 + ".npz"):
        assert _NAME_RE.fullmatch(network_name(spec, 7)), spec


def test_free_ports_are_distinct() -> None:
    ports = free_ports(20)
    assert len(set(ports)) == 20


def test_free_ports_in_a_span_skip_the_taken_ones() -> None:
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        port = taken.getsockname()[1]
        drawn = free_ports(3, span=(port, port + 3))
        assert len(set(drawn)) == 3 and port not in drawn
        assert all(port < p <= port + 3 for p in drawn)
        with pytest.raises(OSError, match="fewer than 2 ports free"):
            free_ports(2, span=(port, port))


# --- whole runs ------------------------------------------------------------------------------


def harness(out: Path, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "p2pfl", "harness", "--out", str(out), *args],
        capture_output=True,
        text=True,
        timeout=timeout * TIMEOUT,
        check=False,
    )


def p2pfl(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "p2pfl", *args],
        capture_output=True,
        text=True,
        timeout=60 * TIMEOUT,
        check=False,
    )


@pytest.mark.slow
def test_harness_run_writes_summary_report_and_logs(tmp_path: Path) -> None:
    out = tmp_path / "run"
    done = harness(
        out,
        *("--peers", "4", "--topology", "ring", "--rounds", "6", "--partition", "dirichlet:1"),
    )
    assert done.returncode == 0, done.stdout + done.stderr
    summary = json.loads((out / "summary.json").read_text())
    for key in ("peers", "rounds", "dataset", "partition", "wall_s", "accuracy"):
        assert key in summary
    assert summary["peers"] == 4 and summary["rounds"] == 6
    assert summary["dataset"] == "digits" and summary["partition"] == "dirichlet:1"
    accuracy = summary["accuracy"]
    assert set(accuracy["per_peer"]) == {"p00", "p01", "p02", "p03"}
    assert accuracy["min"] <= accuracy["mean"] <= accuracy["max"]
    assert accuracy["mean"] > 0.5  # 6 rounds on digits: well above chance (0.1)
    assert 0.5 < summary["centralized_accuracy"] <= 1.0
    assert summary["ratio"] == pytest.approx(accuracy["mean"] / summary["centralized_accuracy"])
    assert summary["round_time_s"] > 0
    # a ring of 4: every peer sends to 2 neighbours each round
    per_send = summary["bytes_sent"] / (4 * 2 * 6)
    assert summary["bytes_sent"] == pytest.approx(4 * 2 * 6 * per_send)
    assert all(len(a) == 6 and None not in a for a in summary["accuracy_per_round"].values())
    assert len(summary["consensus_distance"]) == 6
    assert all(d is not None and d >= 0 for d in summary["consensus_distance"])
    assert summary["exit_codes"] == {p: 0 for p in ("p00", "p01", "p02", "p03")}
    assert (out / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the table is printed, and ends with where the report is
    assert "centralised model" in done.stdout and f"report:  {out / 'report.png'}" in done.stdout
    assert render_table(summary).splitlines()[0].startswith("peer")

    # every p2pfl logs subcommand reads the run folder
    logs = p2pfl("logs", str(out))
    assert logs.returncode == 0 and "p03" in logs.stdout
    for args in (
        ("logs", "summary", str(out), "--json"),
        ("logs", "events", str(out), "--type", "eval", "--peer", "p01", "--json"),
        ("logs", "trace", str(out), "--round", "2"),
        ("logs", "follow", str(out), "--until-stopped"),
        ("logs", "plot", str(out), "-o", str(tmp_path / "logs.png")),
    ):
        result = p2pfl(*args)
        assert result.returncode == 0, (args, result.stderr)
    evals = p2pfl("logs", "events", str(out), "--type", "eval", "--peer", "p01", "--json")
    lines = [json.loads(line) for line in evals.stdout.splitlines()]
    assert [e["round"] for e in lines] == list(range(6))
    assert (tmp_path / "logs.png").exists()


@pytest.mark.slow
def test_harness_kill_and_restart_is_measured(tmp_path: Path) -> None:
    out = tmp_path / "run"
    done = harness(
        out,
        # rounds take ~10 ms, starting a process ~0.4 s: the others are paused meanwhile,
        # so p02 still rejoins with 30 rounds to go
        *("--peers", "4", "--topology", "full", "--rounds", "40", "--no-baseline"),
        *("--kill", "p02@2", "--restart", "p02@5", "--no-snapshots"),
    )
    assert done.returncode == 0, done.stdout + done.stderr
    summary = json.loads((out / "summary.json").read_text())
    kill, restart = summary["faults"]
    assert kill["fault"] == "kill p02@2" and kill["round"] >= 2
    assert restart["fault"] == "restart p02@5" and restart["round"] >= 5
    assert restart["rejoined_round"] is not None and restart["rejoined_round"] >= 5
    assert restart["rejoin_s"] >= 0 and restart["paused_s"] > 0
    assert summary["faults_not_done"] == []
    details = {p["peer"]: p for p in summary["peers_detail"]}
    assert all(p["finished"] for p in details.values())
    assert details["p02"]["rounds_done"] < 40  # it missed the rounds it was down
    assert summary["stranded"] == []
    events = [
        json.loads(line)
        for line in (out / "state" / "p02" / "events.jsonl").read_text().splitlines()
    ]
    assert next(e["reason"] for e in events if e["type"] == "resume") == "checkpoint"
    # the others went on without p02 while it was down
    p00 = [
        json.loads(line)
        for line in (out / "state" / "p00" / "events.jsonl").read_text().splitlines()
    ]
    assert any("p02" in e["missing"] for e in p00 if e["type"] == "aggregate")


@pytest.mark.slow
def test_harness_on_a_tabular_npz_with_shards(tmp_path: Path) -> None:
    """A dataset the harness knows nothing about: features on very different scales (wine),
    three classes, label-sorted shards."""
    from sklearn.datasets import load_wine

    wine = load_wine()
    data = tmp_path / "wine.npz"
    np.savez(data, x=wine.data, y=wine.target + 10)  # labels need not start at 0
    out = tmp_path / "run"
    done = harness(
        out,
        *("--dataset", str(data), "--peers", "3", "--rounds", "15", "--partition", "shards:2"),
    )
    assert done.returncode == 0, done.stdout + done.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert "standardized" in summary["dataset_info"]
    assert summary["centralized_accuracy"] > 0.85  # standardized: easy; raw: poor
    assert summary["accuracy"]["mean"] > 0.6


@pytest.mark.slow
def test_two_peers_kill_and_restart_the_survivor_waits(tmp_path: Path) -> None:
    """p00's only neighbour is down, but a restart of it is pending: p00 is not stranded."""
    out = tmp_path / "run"
    done = harness(
        out,
        *("--peers", "2", "--rounds", "150", "--no-baseline", "--no-snapshots"),
        *("--kill", "p01@3", "--restart", "p01@6"),
    )
    assert done.returncode == 0, done.stdout + done.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["stranded"] == [] and summary["faults_not_done"] == []
    assert all(p["finished"] for p in summary["peers_detail"])


def _children_of_run(out: Path) -> list[int]:
    """PIDs of processes whose command line mentions the run folder."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if str(out).encode() in cmdline and b"run" in cmdline.split(b"\0"):
            pids.append(int(entry.name))
    return pids


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_interrupted_harness_stops_every_peer(tmp_path: Path, sig: signal.Signals) -> None:
    out = tmp_path / "run"
    proc = subprocess.Popen(
        [
            *(sys.executable, "-m", "p2pfl", "harness", "--out", str(out), "--peers", "3"),
            *("--rounds", "100000", "--no-baseline", "--no-snapshots"),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,  # the signal goes to the harness only, as kill(1) would
    )
    try:
        deadline = time.monotonic() + 60 * TIMEOUT
        while time.monotonic() < deadline:
            assert proc.poll() is None, "the harness stopped early"
            logs = list((out / "state").glob("*/events.jsonl")) if out.exists() else []
            if len(logs) == 3 and all('"round_end"' in f.read_text() for f in logs):
                break
            time.sleep(0.05)
        else:
            pytest.fail("peers never got going")
        assert len(_children_of_run(out)) == 3
        os.kill(proc.pid, sig)
        code = proc.wait(30 * TIMEOUT)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert code == (130 if sig == signal.SIGINT else 143)
    assert _children_of_run(out) == []
    for log in (out / "state").glob("*/events.jsonl"):
        last = json.loads(log.read_text().splitlines()[-1])
        assert last["type"] == "node_stop"  # stopped cleanly, final checkpoint written
    # the rounds done are reported all the same
    summary = json.loads((out / "summary.json").read_text())
    assert len(summary["peers_detail"]) == 3 and summary["interrupted"] is True
    assert all(p["rounds_done"] >= 1 for p in summary["peers_detail"])


def test_harness_refuses_a_used_folder_and_bad_options(tmp_path: Path) -> None:
    used = tmp_path / "used"
    used.mkdir()
    (used / "keep.txt").write_text("results")
    done = harness(used, "--peers", "3")
    assert done.returncode == 2 and "not empty" in done.stderr
    assert (used / "keep.txt").read_text() == "results"
    for args, problem in (
        (("--peers", "1"), "at least 2"),
        (("--partition", "zipf:2"), "--partition"),
        (("--kill", "p07@1", "--peers", "3"), "no peer 'p07'"),
        (("--dataset", str(tmp_path / "nothing.npz")), "nothing.npz"),
        (("--rounds", "0"), "at least 1"),
        (("--peers", "4", "--topology", "k-regular:4"), "needs more than 4 peers"),
        (
            (
                "--peers",
                "3",
                "--partition",
                "dirichlet:0.5",
                "--seed",
                "1",
                "--round-timeout",
                "-1",
            ),
            "round_timeout",
        ),
    ):
        done = harness(tmp_path / "new", *args)
        assert done.returncode == 2, (args, done.stdout, done.stderr)
        assert problem in done.stderr, (args, done.stderr)
        assert not (tmp_path / "new").exists(), args  # nothing half-made left behind


@pytest.mark.slow
def test_regression_harness_run_reports_r2_everywhere(tmp_path: Path) -> None:
    """diabetes (scikit-learn's bundled regression set) with the numpy MLP's MSE head: the
    summary, the table, report.png and `p2pfl logs` all speak R^2, not accuracy."""
    out = tmp_path / "run"
    done = harness(
        out,
        *("--dataset", "diabetes", "--peers", "4", "--topology", "ring", "--rounds", "8"),
        *("--partition", "dirichlet:1"),
    )
    assert done.returncode == 0, done.stdout + done.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["task"] == "regression" and summary["metric"] == "r2"
    assert "accuracy" not in summary and "centralized_accuracy" not in summary
    r2 = summary["r2"]
    assert set(r2["per_peer"]) == {"p00", "p01", "p02", "p03"}
    assert 0.1 < r2["mean"] <= 1.0  # well above predicting the mean (0)
    assert summary["centralized_r2"] is not None
    assert summary["ratio"] == pytest.approx(r2["mean"] / summary["centralized_r2"], rel=1e-4)
    assert all(len(v) == 8 and None not in v for v in summary["r2_per_round"].values())
    assert len(summary["centralized_r2_per_epoch"]) == 8
    for peer in summary["peers_detail"]:
        assert peer["test_mse"] > 0
        assert peer["test_r2"] == pytest.approx(r2["per_peer"][peer["peer"]], abs=1e-6)
    assert "peers' test R^2" in done.stdout and "test MSE" in done.stdout
    assert "target deciles per peer" in done.stdout
    assert (out / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    config = (out / "peers.yaml").read_text()
    assert "task: regression" in config and "outputs: 1" in config
    logs = p2pfl("logs", "summary", str(out))
    assert logs.returncode == 0 and "R^2" in logs.stdout.splitlines()[0]
    evals = p2pfl("logs", "events", str(out), "--type", "eval", "--json")
    first = json.loads(evals.stdout.splitlines()[0])
    assert "r2" in first and "accuracy" not in first
    from p2pfl.logs.plot import round_series
    from p2pfl.logs.read import read_logs

    series = round_series(read_logs(out).events)
    assert set(series["r2"]) == {"p00", "p01", "p02", "p03"} and not series["accuracy"]
    plot = p2pfl("logs", "plot", str(out), "-o", str(tmp_path / "plot.png"))
    assert plot.returncode == 0, plot.stderr


def test_regression_targets_are_stratified_and_standardized() -> None:
    from p2pfl.harness.partition import target_strata
    from p2pfl.harness.runner import standardized_targets

    y = np.arange(100, dtype=np.float32)[::-1].copy()
    strata = target_strata(y)
    assert strata.dtype == np.int64 and sorted(set(strata.tolist())) == list(range(10))
    assert all(np.count_nonzero(strata == b) == 10 for b in range(10))
    assert strata[0] == 9 and strata[-1] == 0  # the largest targets in the top decile
    train, test = standardized_targets(y, np.array([y.mean()], dtype=np.float32))
    assert abs(float(train.mean())) < 1e-5 and float(train.std()) == pytest.approx(1.0, 1e-5)
    assert test.tolist() == [pytest.approx(0.0, abs=1e-6)]


@pytest.mark.slow
def test_torch_cnn_harness_run(tmp_path: Path) -> None:
    """`--model torch:cnn`: real peers train the shipped PyTorch CNN on digits 8x8, and
    the centralised baseline is the same torch model and optimiser on the pooled data."""
    pytest.importorskip("torch", reason="PyTorch is an optional extra: pip install '.[torch]'")
    out = tmp_path / "run"
    done = harness(
        out, *("--model", "torch:cnn", "--peers", "3", "--rounds", "4", "--optimizer", "adam")
    )
    assert done.returncode == 0, done.stdout + done.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["model"] == "torch:cnn" and summary["metric"] == "accuracy"
    assert summary["accuracy"]["mean"] > 0.7  # 4 rounds of the CNN on digits
    assert summary["centralized_accuracy"] > 0.7
    config = (out / "peers.yaml").read_text()
    assert "kind: torch" in config and "p2pfl.learning.examples.torch_models:cnn" in config
    assert "kind: adam" in config
    assert summary["exit_codes"] == {p: 0 for p in ("p00", "p01", "p02")}


@pytest.mark.slow
def test_a_noise_sending_peer_ruins_metropolis_but_not_the_median(tmp_path: Path) -> None:
    """--byzantine: p01 sends large noise instead of its model. Plain Metropolis averaging
    takes it in (every honest model is dragged off); the coordinate-wise median keeps the
    honest peers near their no-attack accuracy, and they log p01 as a suspect."""
    common = ("--peers", "5", "--rounds", "6", "--byzantine", "p01:random", "--no-baseline")
    means = {}
    for rule in ("metropolis", "median"):
        out = tmp_path / rule
        done = harness(out, *common, "--rule", rule)
        assert done.returncode == 0, done.stdout + done.stderr
        summary = json.loads((out / "summary.json").read_text())
        assert summary["byzantine"] == {"p01": "random"} and summary["rule"] == rule
        assert summary["accuracy"]["over"] == "honest peers that finished"
        honest = {p: a for p, a in summary["accuracy"]["per_peer"].items() if p != "p01"}
        assert summary["accuracy"]["mean"] == pytest.approx(
            sum(honest.values()) / len(honest), abs=1e-6
        )
        means[rule] = summary["accuracy"]["mean"]
        assert "byzantine, left out of the mean: p01 (random)" in done.stdout
    assert means["median"] > 0.8 and means["metropolis"] < means["median"] - 0.2, means
    logs = p2pfl("logs", "summary", str(tmp_path / "median"))
    header, *rows = logs.stdout.splitlines()
    assert header.split()[-1] == "suspects"
    honest_rows = [row for row in rows if row.split() and row.split()[0] in ("p00", "p02")]
    assert honest_rows and all(row.split()[-1] == "p01" for row in honest_rows)
    suspects = p2pfl("logs", "events", str(tmp_path / "median"), "--type", "suspect", "--json")
    first = json.loads(suspects.stdout.splitlines()[0])
    assert first["peer"] == "p01" and first["reason"] == "far" and first["flagged"] >= 3


def test_harness_checks_byzantine_and_rule_flags(tmp_path: Path) -> None:
    out = tmp_path / "run"
    for args, message in (
        (("--byzantine", "p09:random"), "no peer 'p09'"),
        (("--byzantine", "p01:loud"), "unknown attack 'loud'"),
        (("--byzantine", "p01:random", "--byzantine", "p01:sign-flip"), "given twice"),
        (("--rule", "mode"), "--rule: unknown rule 'mode'"),
        (("--rule", "median", "--secure"), "cannot be combined with --secure"),
    ):
        done = harness(out, "--peers", "4", *args)
        assert done.returncode == 2 and message in done.stderr, (args, done.stderr)
        assert not out.exists()


def _summary(**extra: Any) -> dict[str, Any]:
    return {
        "metric": "accuracy",
        "dataset": "digits",
        "partition": "iid",
        "peers": 3,
        "topology": "full",
        "accuracy_per_round": {"p00": [0.5, 0.6], "p01": [0.4, 0.7], "p02": [0.1, 0.1]},
        "consensus_distance": [None, None],
        "faults": [],
        **extra,
    }


def test_the_report_title_says_what_changes_the_curves() -> None:
    from p2pfl.harness.report import report_title

    assert report_title(_summary()) == "digits, iid, 3 peers, full"
    title = report_title(
        _summary(
            secure=True,
            dp={"noise_multiplier": 1.1, "clip_norm": 1.0},
            rule="median",
            byzantine={"p02": "sign-flip"},
            faults=[{"fault": "kill p01", "round": 1}],
            interrupted=True,
        )
    )
    for part in (
        "secure aggregation",
        "DP noise 1.1, clip 1.0",
        "rule median",
        "byzantine p02: sign-flip",
        "1 fault(s)",
        "INTERRUPTED",
    ):
        assert part in title, part


def test_a_report_without_snapshots_has_no_empty_panel(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    from p2pfl.harness.report import plot_report

    narrow = plot_report(_summary(byzantine={"p02": "random"}), tmp_path / "a.png")
    wide = plot_report(_summary(consensus_distance=[0.5, 0.1]), tmp_path / "b.png")
    from PIL import Image

    with Image.open(narrow) as a, Image.open(wide) as b:
        assert a.size[0] < b.size[0] * 0.6


def test_per_round_metrics_as_csv(tmp_path: Path) -> None:
    import csv

    from p2pfl.harness.report import write_rounds_csv

    path = write_rounds_csv(tmp_path / "rounds.csv", _summary(consensus_distance=[0.5, None]))
    with path.open() as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 6 and rows[0] == {
        "round": "0",
        "peer": "p00",
        "accuracy": "0.5",
        "consensus_distance": "0.5",
    }
    assert rows[1]["consensus_distance"] == ""


def test_several_seeds_run_one_after_the_other_and_are_summarised(tmp_path: Path) -> None:
    out = tmp_path / "seeds"
    done = harness(out, "--peers", "3", "--rounds", "2", "--seeds", "1,2", "--no-snapshots")
    assert done.returncode == 0, done.stderr
    record = json.loads((out / "seeds.json").read_text())
    assert record["seeds"] == [1, 2] and record["exit_codes"] == [0, 0]
    accuracy = record["figures"]["mean accuracy"]
    per_seed = [json.loads((out / f"seed-{s}" / "summary.json").read_text()) for s in (1, 2)]
    assert accuracy["per_seed"] == [s["accuracy"]["mean"] for s in per_seed]
    assert accuracy["mean"] == pytest.approx(sum(accuracy["per_seed"]) / 2)
    assert [s["seed"] for s in per_seed] == [1, 2]
    assert "over 2 seeds (1, 2):" in done.stdout


def test_seeds_must_be_distinct_numbers(tmp_path: Path) -> None:
    for bad in ("1,1", "a,b", ","):
        done = harness(tmp_path / "x", "--seeds", bad)
        assert done.returncode == 2 and "--seeds" in done.stderr
