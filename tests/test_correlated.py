"""Correlated noise (``secure.correlated``) and its accounting (``core.privacy.secldp_rho``):
the pairs' noise cancels over the network, both ends of a pair draw the same, its keys are
nobody else's, and the accountant has the limits it should."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from p2pfl.core.privacy import epsilon, epsilon_of, secldp_rho
from p2pfl.core.topology import TopologyConfig, graph_for_round
from p2pfl.proto.keys import pairwise_secret
from p2pfl.secure.correlated import PURPOSE, add_correlated_noise, gaussian, round_key

PEERS = tuple(f"p{i:02d}" for i in range(6))


def k_regular(n: int = 8, degree: int = 4) -> dict[str, frozenset[str]]:
    ids = tuple(f"p{i:02d}" for i in range(n))
    return graph_for_round(TopologyConfig("k-regular", degree, (), 0), ids, 7, 0)


def secrets_of(graph: dict[str, frozenset[str]]) -> dict[str, dict[str, bytes]]:
    """Every node's noise secrets with its neighbours, derived as the node derives them."""
    keys = {
        p: X25519PrivateKey.from_private_bytes(bytes([i + 1]) * 32) for i, p in enumerate(graph)
    }
    public = {p: k.public_key().public_bytes_raw() for p, k in keys.items()}
    return {
        p: {
            q: pairwise_secret(
                keys[p], public[q], network="net", own_id=p, their_id=q, purpose=PURPOSE
            )
            for q in graph[p]
        }
        for p in graph
    }


def test_the_pairs_noise_cancels_over_the_network() -> None:
    graph = k_regular(8)
    secrets = secrets_of(graph)
    models = {p: np.zeros(5000, dtype=np.float32) for p in graph}
    for p in graph:
        add_correlated_noise(models[p], p, secrets[p], 3, std=2.0)
    total = sum(models.values())
    each = np.std(models["p00"])
    assert each == pytest.approx(2.0 * math.sqrt(4), rel=0.05)  # four pairs of std 2
    assert np.abs(total).max() < 1e-5 * each  # cancelled, to float32 rounding


def test_both_ends_of_a_pair_draw_the_same_noise_with_opposite_signs() -> None:
    secrets = secrets_of(k_regular(8))
    a, b = "p00", sorted(secrets["p00"])[0]
    assert secrets[a][b] == secrets[b][a]
    x, y = np.zeros(100, np.float32), np.zeros(100, np.float32)
    add_correlated_noise(x, a, {b: secrets[a][b]}, 0, 1.0)
    add_correlated_noise(y, b, {a: secrets[b][a]}, 0, 1.0)
    assert np.array_equal(x, -y) and np.abs(x).max() > 0


def test_rounds_and_purposes_give_unrelated_keys() -> None:
    key = X25519PrivateKey.from_private_bytes(bytes([9]) * 32)
    other = X25519PrivateKey.from_private_bytes(bytes([8]) * 32).public_key().public_bytes_raw()
    noise = pairwise_secret(key, other, network="n", own_id="a", their_id="b", purpose=PURPOSE)
    masks = pairwise_secret(key, other, network="n", own_id="a", their_id="b", purpose=b"masks")
    assert noise != masks
    assert round_key(noise, 0) != round_key(noise, 1)
    with pytest.raises(ValueError):
        round_key(noise, -1)


def test_the_noise_is_standard_normal() -> None:
    values = gaussian(bytes(range(32)), 200_001)
    assert values.size == 200_001
    assert abs(values.mean()) < 0.01 and values.std() == pytest.approx(1.0, abs=0.01)
    assert np.mean(np.abs(values) > 1.96) == pytest.approx(0.05, abs=0.003)


def test_without_correlated_noise_the_accountant_is_local_dp() -> None:
    graph = k_regular(8)
    assert secldp_rho(graph, 0.7, 1e-9, 1) == pytest.approx(1 / 0.49, rel=1e-6)
    assert epsilon_of(30, 1 / 0.49, 1e-5) == pytest.approx(epsilon(30, 0.7, 1e-5))


@pytest.mark.parametrize("curious", [0, 1, 2])
def test_large_correlated_noise_reaches_central_dp_over_the_honest_peers(curious: int) -> None:
    """As the pairs' noise grows, what one message says about its node falls to what the
    average of the n - curious honest nodes' independent noise allows: 1 / ((n - h) s^2)."""
    graph = k_regular(8)
    rho = secldp_rho(graph, 1.0, 1e4, curious)
    assert rho == pytest.approx(1 / (8 - curious), rel=1e-4)
    assert secldp_rho(graph, 1.0, 1.0, curious) > rho  # less noise, less privacy


def test_a_node_whose_neighbours_all_collude_gets_local_dp_only() -> None:
    ring = graph_for_round(TopologyConfig("ring", None, (), 0), PEERS, 7, 0)
    # in a ring two curious peers can be a node's only neighbours
    assert secldp_rho(ring, 1.0, 1e4, 2) == pytest.approx(1.0, rel=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("secure", [False, True])
def test_a_run_with_correlated_noise_reports_its_accounting(tmp_path: Path, secure: bool) -> None:
    """Real peers with --dp-correlated (plain, and under secure aggregation, which masks the
    noised vectors): every round completes, and the epsilon each peer logs is the SecLDP
    accountant's for this graph, far below local DP's at the same independent noise."""
    from p2pfl.config import load_config

    from .test_harness import harness

    out = tmp_path / "run"
    args = ["--peers", "6", "--rounds", "4", "--no-baseline", "--no-snapshots"]
    args += ["--dp-noise", "0.5", "--dp-correlated", "2"] + (["--secure"] if secure else [])
    done = harness(out, *args)
    assert done.returncode == 0, done.stdout + done.stderr
    config = load_config(out / "peers.yaml")
    dp = config.aggregation.dp
    assert dp is not None and dp.correlated_multiplier == 2.0
    graph = graph_for_round(config.topology, config.peer_ids, config.seed, 0)
    expected = epsilon_of(4, secldp_rho(graph, 0.5, 2.0, 1), 1e-5)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["privacy"]["epsilon"] == pytest.approx(expected, rel=1e-4)
    assert expected < 0.5 * epsilon(4, 0.5, 1e-5)
    assert all(p["rounds_done"] == 4 for p in summary["peers_detail"])


def test_the_accountant_falls_back_to_local_dp_beyond_its_work_bound(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import p2pfl.core.privacy as privacy

    graph = k_regular(8)
    monkeypatch.setattr(privacy, "MAX_ACCOUNTING_WORK", 10)
    assert secldp_rho(graph, 0.5, 100.0, 2) == pytest.approx(4.0)  # 1 / 0.5^2
