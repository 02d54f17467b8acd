"""Compressed gossip with real peer processes (``p2pfl harness --compression``): it trains
as well as plain gossip on fewer bytes, reports them, and survives a crash and restart
(the restarted peer's copies are gone: keyframes put them back in step)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from .test_harness import harness


def run(tmp_path: Path, name: str, *args: str) -> dict[str, Any]:
    out = tmp_path / name
    done = harness(out, *args)
    assert done.returncode == 0, done.stdout + done.stderr
    summary: dict[str, Any] = json.loads((out / "summary.json").read_text())
    summary["stdout"] = done.stdout
    return summary


def events(out: Path, peer: str) -> list[dict[str, Any]]:
    path = out / "state" / peer / "events.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.slow
def test_int8_trains_like_float32_on_a_quarter_of_the_bytes(tmp_path: Path) -> None:
    common = ("--peers", "6", "--rounds", "8", "--no-baseline", "--partition", "dirichlet:1")
    plain = run(tmp_path, "none", *common)
    int8 = run(tmp_path, "int8", *common, "--compression", "int8")
    assert int8["compression"] == "int8" and plain["compression"] == "none"
    assert int8["accuracy"]["mean"] > plain["accuracy"]["mean"] - 0.02
    assert int8["compression_ratio"] > 3.5 and plain["compression_ratio"] == pytest.approx(1.0)
    assert plain["bytes_sent"] / int8["bytes_sent"] > 3.5
    assert len(int8["bytes_sent_per_round"]) == 8 and all(int8["bytes_sent_per_round"])
    assert "(int8: 3.9x fewer bytes than float32)" in int8["stdout"]
    # the models still agree: the consensus distance shrinks as without compression
    first, last = int8["consensus_distance"][0], int8["consensus_distance"][-1]
    assert last < first and last < 2 * plain["consensus_distance"][-1] + 1e-3


@pytest.mark.slow
def test_topk_survives_a_crash_and_restart_with_keyframes(tmp_path: Path) -> None:
    summary = run(
        tmp_path,
        "topk",
        *("--peers", "4", "--topology", "full", "--rounds", "24", "--no-baseline"),
        *("--compression", "topk:0.2", "--kill", "p02@2", "--restart", "p02@5"),
    )
    out = tmp_path / "topk"
    details = {p["peer"]: p for p in summary["peers_detail"]}
    assert all(p["finished"] for p in details.values())
    assert summary["faults_not_done"] == [] and summary["stranded"] == []
    # p02 lost its public copy: after the restart its first streams are whole copies, and
    # its neighbours, on new connections to it, send it keyframes too
    p02 = events(out, "p02")
    restart = max(i for i, e in enumerate(p02) if e["type"] == "node_start")
    assert next(e for e in p02[restart:] if e["type"] == "send").get("keyframe") is True
    assert any(e.get("keyframe") for e in events(out, "p00") if e.get("peer") == "p02")
    # and every stream after that is applied: nobody rejects a difference it cannot use
    for peer in ("p00", "p01", "p02", "p03"):
        rejects = [e for e in events(out, peer) if e["type"] == "reject"]
        assert not [e for e in rejects if "version" in e.get("reason", "")], rejects
    assert summary["accuracy"]["min"] > 0.8


def test_harness_checks_the_compression_flag(tmp_path: Path) -> None:
    out = tmp_path / "run"
    for args, message in (
        (("--compression", "zip"), "--compression: unknown compression 'zip'"),
        (("--compression", "topk:2"), "the fraction must be > 0 and <= 1"),
        (("--compression", "int8", "--secure"), "cannot be combined with --secure"),
    ):
        done = harness(out, "--peers", "4", *args)
        assert done.returncode == 2 and message in done.stderr, (args, done.stderr)
        assert not out.exists()


@pytest.mark.slow
def test_a_robust_rule_compares_the_decompressed_copies(tmp_path: Path) -> None:
    """--byzantine p01:random with int8 and the median: the rule sees every neighbour's
    decoded public copy, so the noise p01 sends is still outvoted and flagged."""
    summary = run(
        tmp_path,
        "median",
        *("--peers", "5", "--rounds", "6", "--byzantine", "p01:random", "--no-baseline"),
        *("--compression", "int8", "--rule", "median"),
    )
    assert summary["accuracy"]["mean"] > 0.8  # (the honest peers')
    suspects = [e for e in events(tmp_path / "median", "p00") if e["type"] == "suspect"]
    assert suspects and suspects[0]["peer"] == "p01"


def test_a_restart_whose_first_model_is_not_finite_aggregates_without_a_copy(
    make_network: Any,
) -> None:
    """After a restart the public copy is unknown until the first round's keyframe; if that
    round's model is not finite nothing is sent (NotFinite) and the copy stays unknown:
    the round still aggregates (plainly), it does not trip over the missing copy."""
    import numpy as np

    from p2pfl.core.public_copy import NotFinite, OwnCopy

    from .test_node import make_node

    net = make_network(("alice", "bob"), extra={"aggregation": {"compression": "int8"}})
    node = make_node(net, "alice")
    try:
        assert node.own_copy is not None
        node.own_copy = OwnCopy(node.compression, None)  # (as run() sets it on a resume)
        node.params = np.full_like(node.params, np.nan)
        with pytest.raises(NotFinite):
            node.own_copy.advance(node.params, 3)
        weights = {"alice": 0.5, "bob": 0.5}
        used, _ = node._aggregate_plain(3, {}, weights)
        assert used == {"alice": 1.0}
    finally:
        node.events.close()
        node.state_lock.release()
