"""Who talks to whom in each round, and with what mixing weight.

Everything here is a pure function of the shared configuration (topology section, peer
ids, seed) and the round number, so every peer computes the same graph on its own: no
coordinator has to hand out neighbour lists, and a peer that restarts recomputes exactly
the graph the others are using.
"""

from __future__ import annotations

import functools
from collections import deque
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

__all__ = [
    "Adjacency",
    "TopologyConfig",
    "TopologyKind",
    "epoch_for_round",
    "ever_neighbours",
    "graph_for_round",
    "is_connected",
    "metropolis_weights",
]

Adjacency = dict[str, frozenset[str]]

#: The graph kinds ``topology.kind`` may name (the config parser validates against these).
TopologyKind = Literal["full", "ring", "k-regular", "explicit"]


@dataclass(frozen=True)
class TopologyConfig:
    """The communication graph: ``degree`` only for k-regular, ``edges`` only for explicit."""

    kind: TopologyKind
    degree: int | None
    edges: tuple[tuple[str, str], ...]
    resample_every: int


# Third word of the SeedSequence entropy: keeps the topology stream apart from any other
# stream another module derives from the same shared seed (ASCII "topo").
_TOPOLOGY_STREAM = 0x746F706F
# Successful double-edge swaps per edge: the graph starts from a randomly relabelled
# circulant, and ten swaps per edge are far past the point where the sampled graphs
# stop looking like the starting lattice (see the variety test in test_topology.py).
_SWAPS_PER_EDGE = 10
_MAX_ATTEMPTS_PER_EDGE = 200


def epoch_for_round(topology: TopologyConfig, round_index: int) -> int:
    """The resampling epoch a round belongs to (always 0 for a fixed graph)."""
    if round_index < 0:
        raise ValueError(f"round_index must be >= 0, got {round_index}")
    if topology.kind == "k-regular" and topology.resample_every > 0:
        return round_index // topology.resample_every
    return 0


def graph_for_round(
    config_topology: TopologyConfig, peer_ids: Sequence[str], seed: int, round_index: int
) -> Adjacency:
    """Undirected adjacency (symmetric, no self loops) of the communication graph in a round.

    The result does not depend on the order of ``peer_ids``: ids are sorted first, so peers
    that list the roster differently still agree on the graph.
    """
    ids = tuple(sorted(peer_ids))
    if len(set(ids)) != len(ids):
        raise ValueError("peer ids must be unique")
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    epoch = epoch_for_round(config_topology, round_index)
    kind = config_topology.kind
    if kind == "full":
        everyone = frozenset(ids)
        return {node: everyone - {node} for node in ids}
    if kind == "ring":
        return _ring(ids)
    if kind == "explicit":
        return _explicit(ids, config_topology.edges)
    if kind == "k-regular":
        if config_topology.degree is None:
            raise ValueError("a k-regular topology needs a degree")
        return dict(zip(ids, _k_regular(ids, config_topology.degree, seed, epoch), strict=True))
    raise ValueError(f"unknown topology kind {kind!r}")


def is_connected(adjacency: Mapping[str, Collection[str]]) -> bool:
    """True when every node can reach every other one (an empty graph is not connected).

    Neighbours that are not keys of ``adjacency`` are ignored, so a malformed map cannot
    make an unknown id count as a reachable peer.
    """
    if not adjacency:
        return False
    start = next(iter(adjacency))
    seen = {start}
    queue = deque([start])
    while queue:
        for neighbour in adjacency[queue.popleft()]:
            if neighbour in adjacency and neighbour not in seen:
                seen.add(neighbour)
                queue.append(neighbour)
    return len(seen) == len(adjacency)


def ever_neighbours(
    topology: TopologyConfig, peer_ids: Sequence[str], seed: int, node_id: str, rounds: int
) -> frozenset[str]:
    """Every peer that is ``node_id``'s neighbour in at least one of rounds 0..rounds-1.

    The node needs connections (and pairwise keys) to exactly these peers; with resampling
    the graph changes once per epoch, so one graph per epoch is enough.
    """
    if node_id not in peer_ids:
        raise ValueError(f"{node_id!r} is not one of the peers")
    if rounds < 0:
        raise ValueError(f"rounds must be >= 0, got {rounds}")
    if rounds == 0:
        return frozenset()
    last_epoch = epoch_for_round(topology, rounds - 1)
    step = topology.resample_every if last_epoch > 0 else 0
    union: set[str] = set()
    for epoch in range(last_epoch + 1):
        union |= graph_for_round(topology, peer_ids, seed, epoch * step)[node_id]
    return frozenset(union)


def metropolis_weights(adjacency: Mapping[str, Collection[str]], node: str) -> dict[str, float]:
    """Metropolis-Hastings mixing weights of ``node``: w_ij = 1/(1+max(d_i, d_j)).

    The self weight w_ii = 1 - sum_j w_ij takes the rest. The matrix built from these rows
    is symmetric and every row sums to 1, so it is doubly stochastic: repeated mixing
    converges to the plain average of all nodes even when degrees differ, whereas a plain
    neighbour mean would drift toward the well-connected nodes.
    """
    if node not in adjacency:
        raise KeyError(f"{node!r} is not in the graph")
    neighbours = sorted(adjacency[node])
    own_degree = len(neighbours)
    weights: dict[str, float] = {}
    for other in neighbours:
        if other == node:
            raise ValueError(f"{node!r} has a self loop")
        if other not in adjacency:
            raise KeyError(f"neighbour {other!r} of {node!r} is not in the graph")
        if node not in adjacency[other]:
            raise ValueError(f"adjacency is not symmetric: {node!r} -> {other!r} only")
        weights[other] = 1.0 / (1 + max(own_degree, len(adjacency[other])))
    weights[node] = 1.0 - sum(weights.values())
    return weights


def _ring(ids: tuple[str, ...]) -> Adjacency:
    n = len(ids)
    if n < 2:
        return {node: frozenset() for node in ids}
    return {node: frozenset({ids[(i - 1) % n], ids[(i + 1) % n]}) for i, node in enumerate(ids)}


def _explicit(ids: tuple[str, ...], edges: Sequence[tuple[str, str]]) -> Adjacency:
    known = set(ids)
    neighbours: dict[str, set[str]] = {node: set() for node in ids}
    for a, b in edges:
        if a not in known or b not in known:
            raise ValueError(f"edge ({a!r}, {b!r}) names a peer that is not in the roster")
        if a == b:
            raise ValueError(f"edge ({a!r}, {b!r}) is a self loop")
        neighbours[a].add(b)
        neighbours[b].add(a)
    return {node: frozenset(adj) for node, adj in neighbours.items()}


class _RawRandom:
    """Bounded integers from the raw PCG64 stream.

    numpy promises stable streams for its bit generators and SeedSequence, but not for
    ``Generator`` methods such as ``integers`` or ``permutation``, which have changed
    between releases. Peers may run different numpy versions and must still agree on the
    graph, so the sampling on top of the raw 64-bit words is done here.
    """

    _BATCH = 512

    def __init__(self, seed: int, epoch: int) -> None:
        sequence = np.random.SeedSequence([seed, epoch, _TOPOLOGY_STREAM])
        self._bits = np.random.Generator(np.random.PCG64(sequence)).bit_generator
        self._buffer: list[int] = []

    def _word(self) -> int:
        if not self._buffer:
            self._buffer = [int(w) for w in self._bits.random_raw(self._BATCH)][::-1]
        return self._buffer.pop()

    def below(self, bound: int) -> int:
        """Uniform integer in [0, bound) by rejection (no modulo bias)."""
        limit = (1 << 64) - (1 << 64) % bound
        while True:
            word = self._word()
            if word < limit:
                return word % bound

    def permutation(self, n: int) -> list[int]:
        order = list(range(n))
        for i in range(n - 1, 0, -1):
            j = self.below(i + 1)
            order[i], order[j] = order[j], order[i]
        return order


@functools.lru_cache(maxsize=64)
def _k_regular(
    ids: tuple[str, ...], degree: int, seed: int, epoch: int
) -> tuple[frozenset[str], ...]:
    """Neighbour sets (in ``ids`` order) of a seeded random connected ``degree``-regular graph.

    Start from a circulant graph on a random relabelling of the peers, then apply random
    degree-preserving double-edge swaps that keep the graph simple. When 2*degree >= n-1
    every degree-regular graph is connected (two non-adjacent nodes must share a
    neighbour), so the sparser complement is randomised instead, which mixes faster.
    Otherwise swaps are applied in windows that are undone if they disconnect the graph.
    Cached because nodes ask for the same graph every round of an epoch.
    """
    n = len(ids)
    if n < 2:
        raise ValueError(f"a k-regular topology needs at least 2 peers, got {n}")
    if not 1 <= degree < n:
        raise ValueError(f"degree must be between 1 and {n - 1} for {n} peers, got {degree}")
    if (n * degree) % 2:
        raise ValueError(
            f"no {degree}-regular graph on {n} peers exists: peers x degree must be even"
        )
    if degree == 1 and n > 2:
        raise ValueError(
            f"a 1-regular graph splits {n} peers into separate pairs and is never connected;"
            " use degree >= 2"
        )
    rng = _RawRandom(seed, epoch)
    label = rng.permutation(n)
    dense = 2 * degree >= n - 1
    work_degree = n - 1 - degree if dense else degree
    adjacency: list[set[int]] = [set() for _ in range(n)]
    edges: list[tuple[int, int]] = []
    offsets = list(range(1, work_degree // 2 + 1))
    if work_degree % 2:
        offsets.append(n // 2)
    for position in range(n):
        for offset in offsets:
            other = (position + offset) % n
            a, b = label[position], label[other]
            if b in adjacency[a]:  # offset n/2 reaches each pair from both ends
                continue
            adjacency[a].add(b)
            adjacency[b].add(a)
            edges.append((a, b))
    _shuffle_edges(edges, adjacency, rng, keep_connected=not dense)
    if dense:
        everyone = set(range(n))
        adjacency = [everyone - adjacency[i] - {i} for i in range(n)]
    return tuple(frozenset(ids[j] for j in adjacency[i]) for i in range(n))


def _shuffle_edges(
    edges: list[tuple[int, int]],
    adjacency: list[set[int]],
    rng: _RawRandom,
    *,
    keep_connected: bool,
) -> None:
    """Randomise a simple graph in place by double-edge swaps: a-b, c-d -> a-d, c-b."""
    m = len(edges)
    if m < 2:
        return
    target = _SWAPS_PER_EDGE * m
    max_attempts = _MAX_ATTEMPTS_PER_EDGE * m
    done = attempts = 0
    window = 1
    while done < target and attempts < max_attempts:
        log: list[tuple[int, int, tuple[int, int], tuple[int, int]]] = []
        while len(log) < window and done + len(log) < target and attempts < max_attempts:
            attempts += 1
            i, j = rng.below(m), rng.below(m)
            if i == j:
                continue
            a, b = edges[i]
            c, d = edges[j]
            if rng.below(2):
                c, d = d, c
            # Shared endpoints and existing edges both show up as a-d or c-b present.
            if a == d or c == b or d in adjacency[a] or b in adjacency[c]:
                continue
            _swap(adjacency, a, b, c, d)
            log.append((i, j, edges[i], edges[j]))
            edges[i], edges[j] = (a, d), (c, b)
        if not keep_connected or _connected_ints(adjacency):
            done += len(log)
            window += 1
            continue
        for i, j, old_i, old_j in reversed(log):
            a, d = edges[i]
            c, b = edges[j]
            _swap(adjacency, a, d, c, b)
            edges[i], edges[j] = old_i, old_j
        window = max(1, window // 2)


def _swap(adjacency: list[set[int]], a: int, b: int, c: int, d: int) -> None:
    """Replace edges a-b and c-d with a-d and c-b."""
    adjacency[a].discard(b)
    adjacency[b].discard(a)
    adjacency[c].discard(d)
    adjacency[d].discard(c)
    adjacency[a].add(d)
    adjacency[d].add(a)
    adjacency[c].add(b)
    adjacency[b].add(c)


def _connected_ints(adjacency: list[set[int]]) -> bool:
    seen = [False] * len(adjacency)
    seen[0] = True
    stack = [0]
    count = 1
    while stack:
        for neighbour in adjacency[stack.pop()]:
            if not seen[neighbour]:
                seen[neighbour] = True
                count += 1
                stack.append(neighbour)
    return count == len(adjacency)
