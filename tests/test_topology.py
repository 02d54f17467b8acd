"""Tests for p2pfl.core.topology: graph shapes, k-regular sampling, Metropolis weights."""

from __future__ import annotations

import itertools
import random
from collections.abc import Mapping, Sequence
from typing import Literal

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from p2pfl.config import TopologyConfig
from p2pfl.core.topology import (
    Adjacency,
    epoch_for_round,
    ever_neighbours,
    graph_for_round,
    is_connected,
    metropolis_weights,
)


def topo(
    kind: Literal["full", "ring", "k-regular", "explicit"],
    degree: int | None = None,
    edges: Sequence[tuple[str, str]] = (),
    resample_every: int = 0,
) -> TopologyConfig:
    return TopologyConfig(kind, degree, tuple(edges), resample_every)


def names(n: int) -> list[str]:
    return [f"p{i:02d}" for i in range(n)]


def assert_simple_undirected(graph: Mapping[str, frozenset[str]], ids: Sequence[str]) -> None:
    assert set(graph) == set(ids)
    for node, neighbours in graph.items():
        assert node not in neighbours, f"self loop at {node}"
        assert neighbours <= set(ids)
        for other in neighbours:
            assert node in graph[other], f"{node}-{other} is not symmetric"


def edge_set(graph: Mapping[str, frozenset[str]]) -> frozenset[tuple[str, str]]:
    return frozenset((a, b) for a, neighbours in graph.items() for b in neighbours if a < b)


# --------------------------------------------------------------------------- shapes


@pytest.mark.parametrize("n", [2, 3, 5, 10])
def test_full(n: int) -> None:
    ids = names(n)
    graph = graph_for_round(topo("full"), ids, 0, 0)
    assert_simple_undirected(graph, ids)
    for node in ids:
        assert graph[node] == frozenset(ids) - {node}


def test_ring_uses_sorted_ids() -> None:
    graph = graph_for_round(topo("ring"), ["dave", "alice", "carol", "bob", "erin"], 0, 0)
    assert graph == {
        "alice": frozenset({"erin", "bob"}),
        "bob": frozenset({"alice", "carol"}),
        "carol": frozenset({"bob", "dave"}),
        "dave": frozenset({"carol", "erin"}),
        "erin": frozenset({"dave", "alice"}),
    }


def test_ring_of_two_is_one_edge_and_of_three_a_triangle() -> None:
    assert graph_for_round(topo("ring"), ["b", "a"], 0, 0) == {
        "a": frozenset({"b"}),
        "b": frozenset({"a"}),
    }
    triangle = graph_for_round(topo("ring"), ["a", "b", "c"], 0, 0)
    assert triangle == graph_for_round(topo("full"), ["a", "b", "c"], 0, 0)


@pytest.mark.parametrize("n", [4, 7, 12])
def test_ring_is_2_regular_cycle(n: int) -> None:
    ids = names(n)
    graph = graph_for_round(topo("ring"), ids, 0, 3)
    assert_simple_undirected(graph, ids)
    assert all(len(v) == 2 for v in graph.values())
    assert is_connected(graph)


def test_explicit() -> None:
    edges = [("a", "b"), ("b", "c"), ("a", "d")]
    graph = graph_for_round(topo("explicit", edges=edges), ["a", "b", "c", "d", "e"], 0, 0)
    assert graph == {
        "a": frozenset({"b", "d"}),
        "b": frozenset({"a", "c"}),
        "c": frozenset({"b"}),
        "d": frozenset({"a"}),
        "e": frozenset(),
    }
    assert not is_connected(graph)


def test_explicit_rejects_unknown_ids_and_self_loops() -> None:
    with pytest.raises(ValueError, match="not in the roster"):
        graph_for_round(topo("explicit", edges=[("a", "z")]), ["a", "b"], 0, 0)
    with pytest.raises(ValueError, match="self loop"):
        graph_for_round(topo("explicit", edges=[("a", "a")]), ["a", "b"], 0, 0)


def test_fixed_graphs_ignore_round_and_seed() -> None:
    ids = names(6)
    for kind in ("full", "ring"):
        reference = graph_for_round(topo(kind), ids, 0, 0)
        assert graph_for_round(topo(kind), ids, 99, 57) == reference


def test_duplicate_ids_and_negative_round_rejected() -> None:
    with pytest.raises(ValueError, match="unique"):
        graph_for_round(topo("full"), ["a", "a", "b"], 0, 0)
    with pytest.raises(ValueError, match="round_index"):
        graph_for_round(topo("full"), ["a", "b"], 0, -1)


# ------------------------------------------------------------------------ k-regular


def valid_pairs(max_n: int) -> list[tuple[int, int]]:
    return [
        (n, k)
        for n in range(2, max_n + 1)
        for k in range(1, n)
        if (n * k) % 2 == 0 and not (k == 1 and n > 2)
    ]


def check_k_regular(n: int, k: int, seed: int, round_index: int = 0) -> Adjacency:
    ids = names(n)
    graph = graph_for_round(topo("k-regular", degree=k), ids, seed, round_index)
    assert_simple_undirected(graph, ids)
    assert all(len(v) == k for v in graph.values()), (n, k, seed)
    assert is_connected(graph), (n, k, seed)
    return graph


@pytest.mark.parametrize(("n", "k"), valid_pairs(14))
def test_k_regular_small(n: int, k: int) -> None:
    for seed in range(3):
        check_k_regular(n, k, seed)


@pytest.mark.parametrize("k", [2, 3, 4, 5, 8, 16, 30, 31, 32, 33, 47, 62, 63])
def test_k_regular_64_peers(k: int) -> None:
    check_k_regular(64, k, seed=11)


@settings(max_examples=40, deadline=None)
@given(
    pair=st.sampled_from(valid_pairs(40)),
    seed=st.integers(0, 2**64 - 1),
    epoch=st.integers(0, 1000),
)
def test_k_regular_property(pair: tuple[int, int], seed: int, epoch: int) -> None:
    n, k = pair
    ids = names(n)
    config = topo("k-regular", degree=k, resample_every=1)
    graph = graph_for_round(config, ids, seed, epoch)
    assert_simple_undirected(graph, ids)
    assert all(len(v) == k for v in graph.values())
    assert is_connected(graph)


def test_k_regular_is_deterministic_and_order_independent() -> None:
    ids = names(20)
    config = topo("k-regular", degree=3)
    first = graph_for_round(config, ids, 5, 0)
    shuffled = ids[:]
    random.Random(1).shuffle(shuffled)
    assert graph_for_round(config, shuffled, 5, 0) == first
    assert graph_for_round(config, ids, 5, 17) == first, "no resampling: one graph for all rounds"


def test_k_regular_result_is_a_fresh_dict() -> None:
    ids = names(8)
    config = topo("k-regular", degree=3)
    graph = graph_for_round(config, ids, 5, 0)
    graph["p00"] = frozenset()
    assert len(graph_for_round(config, ids, 5, 0)["p00"]) == 3


def test_k_regular_depends_on_seed() -> None:
    ids = names(16)
    config = topo("k-regular", degree=4)
    graphs = {edge_set(graph_for_round(config, ids, seed, 0)) for seed in range(10)}
    assert len(graphs) == 10


def test_resampling_changes_graph_per_epoch_only() -> None:
    ids = names(12)
    config = topo("k-regular", degree=3, resample_every=5)
    by_round = [edge_set(graph_for_round(config, ids, 7, r)) for r in range(30)]
    for epoch in range(6):
        block = by_round[epoch * 5 : epoch * 5 + 5]
        assert len(set(block)) == 1, f"graph changed inside epoch {epoch}"
    assert len({by_round[e * 5] for e in range(6)}) == 6
    # The same epoch under another schedule length gives the same graph (seeded by epoch).
    other = topo("k-regular", degree=3, resample_every=2)
    assert edge_set(graph_for_round(other, ids, 7, 2)) == by_round[5]


def test_k_regular_samples_many_graphs() -> None:
    # Connected 2-regular graphs on 6 nodes are the 60 Hamiltonian cycles; on 4 nodes, 3.
    cycles6 = {edge_set(check_k_regular(6, 2, seed)) for seed in range(300)}
    assert len(cycles6) >= 50
    cycles4 = {edge_set(check_k_regular(4, 2, seed)) for seed in range(60)}
    assert len(cycles4) == 3


def test_k_regular_is_not_biased_to_the_starting_lattice() -> None:
    # In the circulant start each node's neighbours are its label neighbours; after
    # shuffling, the number of common neighbours of adjacent nodes should look random.
    ids = names(40)
    config = topo("k-regular", degree=4)
    triangles = []
    for seed in range(20):
        graph = graph_for_round(config, ids, seed, 0)
        triangles.append(sum(len(graph[a] & graph[b]) for a, b in edge_set(graph)) / 3)
    # A 4-regular circulant on 40 nodes has 40 triangles; random 4-regular graphs ~ (k-1)^3/6.
    assert np.mean(triangles) < 10


@pytest.mark.parametrize(
    ("n", "k", "problem"),
    [
        (5, 3, "must be even"),
        (4, 4, "between 1 and 3"),
        (4, 0, "between 1 and 3"),
        (4, 1, "never connected"),
        (1, 1, "at least 2 peers"),
    ],
)
def test_k_regular_impossible(n: int, k: int, problem: str) -> None:
    with pytest.raises(ValueError, match=problem):
        graph_for_round(topo("k-regular", degree=k), names(n), 0, 0)


def test_k_regular_needs_degree() -> None:
    with pytest.raises(ValueError, match="degree"):
        graph_for_round(topo("k-regular"), names(4), 0, 0)


def test_epoch_for_round() -> None:
    assert epoch_for_round(topo("k-regular", degree=2, resample_every=3), 7) == 2
    assert epoch_for_round(topo("k-regular", degree=2), 7) == 0
    assert epoch_for_round(topo("ring", resample_every=3), 7) == 0


# ------------------------------------------------------------------ ever_neighbours


def test_ever_neighbours_fixed_graph() -> None:
    ids = names(5)
    assert ever_neighbours(topo("ring"), ids, 0, "p00", 10) == {"p01", "p04"}
    assert ever_neighbours(topo("full"), ids, 0, "p00", 1) == set(ids) - {"p00"}
    assert ever_neighbours(topo("ring"), ids, 0, "p00", 0) == frozenset()


def test_ever_neighbours_is_union_over_epochs() -> None:
    ids = names(16)
    config = topo("k-regular", degree=3, resample_every=4)
    rounds = 10  # epochs 0, 1, 2
    for node in ids:
        expected: set[str] = set()
        for r in range(rounds):
            expected |= graph_for_round(config, ids, 3, r)[node]
        assert ever_neighbours(config, ids, 3, node, rounds) == expected
    assert ever_neighbours(config, ids, 3, "p00", 4) == graph_for_round(config, ids, 3, 0)["p00"]


def test_ever_neighbours_rejects_unknown_node() -> None:
    with pytest.raises(ValueError, match="not one of the peers"):
        ever_neighbours(topo("full"), ["a", "b"], 0, "z", 3)


# --------------------------------------------------------------------- connectivity


def test_is_connected() -> None:
    assert is_connected({"a": frozenset()})
    assert not is_connected({})
    assert is_connected({"a": {"b"}, "b": {"a", "c"}, "c": {"b"}})
    assert not is_connected({"a": {"b"}, "b": {"a"}, "c": set()})
    assert not is_connected({"a": {"b", "x"}, "b": {"a"}, "c": {"x"}}), "unknown ids do not bridge"


# ---------------------------------------------------------------- Metropolis weights


def from_edges(nodes: Sequence[str], edges: Sequence[tuple[str, str]]) -> Adjacency:
    neighbours: dict[str, set[str]] = {node: set() for node in nodes}
    for a, b in edges:
        neighbours[a].add(b)
        neighbours[b].add(a)
    return {node: frozenset(adj) for node, adj in neighbours.items()}


def mixing_matrix(graph: Mapping[str, frozenset[str]]) -> np.ndarray:
    ids = sorted(graph)
    index = {node: i for i, node in enumerate(ids)}
    matrix = np.zeros((len(ids), len(ids)))
    for node in ids:
        for other, weight in metropolis_weights(graph, node).items():
            matrix[index[node], index[other]] = weight
    return matrix


IRREGULAR = {
    "star": from_edges("abcde", [("a", "b"), ("a", "c"), ("a", "d"), ("a", "e")]),
    "path": from_edges("abcd", [("a", "b"), ("b", "c"), ("c", "d")]),
    "lollipop": from_edges(
        "abcdef",
        [*itertools.combinations("abcd", 2), ("d", "e"), ("e", "f")],
    ),
    "random": from_edges(
        names(12),
        [
            (a, b)
            for a, b in itertools.combinations(names(12), 2)
            if random.Random(f"{a}{b}").random() < 0.3
        ]
        + [(f"p{i:02d}", f"p{i + 1:02d}") for i in range(11)],
    ),
}


@pytest.mark.parametrize("name", sorted(IRREGULAR))
def test_metropolis_is_doubly_stochastic_on_irregular_graphs(name: str) -> None:
    graph = IRREGULAR[name]
    degrees = {len(v) for v in graph.values()}
    assert len(degrees) > 1, "the graph should be irregular"
    matrix = mixing_matrix(graph)
    np.testing.assert_allclose(matrix.sum(axis=1), 1.0, rtol=0, atol=1e-12)
    np.testing.assert_allclose(matrix.sum(axis=0), 1.0, rtol=0, atol=1e-12)
    np.testing.assert_array_equal(matrix, matrix.T)
    assert (matrix >= 0).all()
    assert (np.diag(matrix) > 0).all()


def test_metropolis_mixing_converges_to_the_plain_average() -> None:
    graph = IRREGULAR["lollipop"]
    matrix = mixing_matrix(graph)
    values = np.arange(len(graph), dtype=float) ** 2
    state = values.copy()
    for _ in range(500):
        state = matrix @ state
    np.testing.assert_allclose(state, values.mean(), atol=1e-9)


def test_metropolis_weights_values() -> None:
    star = IRREGULAR["star"]
    assert metropolis_weights(star, "b") == {"a": 0.2, "b": 0.8}
    centre = metropolis_weights(star, "a")
    assert set(centre) == set("abcde")
    assert centre["b"] == pytest.approx(0.2)
    assert centre["a"] == pytest.approx(0.2)
    assert metropolis_weights({"solo": frozenset()}, "solo") == {"solo": 1.0}
    full = graph_for_round(topo("full"), names(4), 0, 0)
    assert metropolis_weights(full, "p00") == {
        "p00": 0.25,
        "p01": 0.25,
        "p02": 0.25,
        "p03": 0.25,
    }


def test_metropolis_rejects_bad_graphs() -> None:
    with pytest.raises(KeyError):
        metropolis_weights({"a": frozenset()}, "b")
    with pytest.raises(ValueError, match="not symmetric"):
        metropolis_weights({"a": frozenset({"b"}), "b": frozenset()}, "a")
    with pytest.raises(ValueError, match="self loop"):
        metropolis_weights({"a": frozenset({"a"})}, "a")
    with pytest.raises(KeyError):
        metropolis_weights({"a": frozenset({"z"})}, "a")
