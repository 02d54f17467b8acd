"""What coalitions of group owners learn under secure aggregation: a topology audit by
linear algebra, pure numpy (``p2pfl check --privacy``).

Secure aggregation shows owner c, in round r, only the weighted sum of its members'
vectors: s_c = sum over j in U_c of w_cj x_j, where the members are c's neighbours in
that round's graph and U_c the ones it names present. An honest owner names all of them
(no real dropout); one that lies about dropouts may name any U_c with at least t_c members
(its group's Shamir threshold), and the members accept. Every vector goes into several
owners' sums with public weights: a coalition C of peers, pooling its own vectors and the
sums it owns, holds linear equations in the other peers' vectors, and where those
equations pin one vector down, the coalition has it, to the last bit (the masks are gone
in every sum). This module finds the smallest such coalitions.

Peer v's vector is determined by rows A (one per sum, restricted to the vectors the
coalition does not know) exactly when e_v lies in A's row space: with the right singular
vectors V of A's non-zero singular values, when the row v of V has norm 1. Coordinates are
independent and the weights are the same for every coordinate, so one scalar unknown per
peer stands for its whole vector.

A round's vectors differ from the next round's (every peer trains in between), so sums of
different rounds are not combined: each distinct graph is audited on its own.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from p2pfl.core.topology import metropolis_weights

__all__ = ["Exposure", "GraphAudit", "audit_graph", "determined"]

#: 1 - |row of V|^2 below this: the vector is determined (float64 SVD of small matrices).
_TOLERANCE = 1e-9


@dataclass(frozen=True)
class Exposure:
    """A coalition and a peer whose vector its pooled sums determine. ``presented`` names,
    for each owner that lied, the members it named present (the rest it called dropped)."""

    coalition: tuple[str, ...]
    victims: tuple[str, ...]
    presented: Mapping[str, tuple[str, ...]] = field(default_factory=dict)

    @property
    def lying(self) -> bool:
        return bool(self.presented)


@dataclass(frozen=True)
class GraphAudit:
    """One graph's audit: the smallest coalition of honest owners, and of owners lying
    about dropouts, that learns some peer's vector; each also among coalitions of owners
    alone (no two of them neighbours: none is a member of another's group, so no member
    colludes). None: no coalition of up to ``searched`` peers does; a search that hit its
    budget says so in ``complete``."""

    honest: Exposure | None
    lying: Exposure | None
    honest_owners_only: Exposure | None
    lying_owners_only: Exposure | None
    searched: int
    complete: bool = True


def determined(rows: np.ndarray) -> np.ndarray:
    """Which columns (unknowns) the equations ``rows`` determine, as a boolean array."""
    if rows.size == 0:
        return np.zeros(rows.shape[1] if rows.ndim == 2 else 0, dtype=bool)
    _, singular, vt = np.linalg.svd(rows, full_matrices=False)
    rank = int(np.sum(singular > singular.max() * 1e-10)) if singular.size else 0
    basis = vt[:rank]
    return np.asarray(1.0 - np.sum(basis * basis, axis=0) < _TOLERANCE)


def audit_graph(
    graph: Mapping[str, Iterable[str]],
    threshold: float,
    *,
    max_coalition: int = 4,
    budget: int = 50_000,
) -> GraphAudit:
    """The smallest coalitions (of at most ``max_coalition`` peers) whose sums, honest or
    with lies about dropouts, determine a peer outside them. ``threshold`` is
    ``aggregation.threshold`` (a group of n members needs floor(f n) + 1 present).
    ``budget`` bounds the systems each of the four searches solves (coalitions, and for
    the lying ones every choice of present sets: they multiply); a search that reaches it
    stops, and ``complete`` is False."""
    adjacency = {peer: frozenset(neighbours) for peer, neighbours in graph.items()}
    peers = sorted(adjacency)
    weights = {peer: metropolis_weights(adjacency, peer) for peer in peers}
    most = min(max_coalition, len(peers) - 1)
    spent, complete = [0], [True]

    def honest(coalition: tuple[str, ...]) -> Exposure | None:
        spent[0] += 1
        return None if spent[0] > budget else _honest(coalition, peers, adjacency, weights)

    def lying(coalition: tuple[str, ...]) -> Exposure | None:
        return _lying(coalition, peers, adjacency, weights, threshold, spent, budget)

    def search(
        probe: Callable[[tuple[str, ...]], Exposure | None],
        admit: Callable[[tuple[str, ...]], bool] = lambda coalition: True,
    ) -> Exposure | None:
        spent[0] = 0
        found = _smallest(peers, most, probe, admit, lambda: spent[0] > budget)
        complete[0] = complete[0] and spent[0] <= budget
        return found

    def apart(coalition: tuple[str, ...]) -> bool:
        return all(b not in adjacency[a] for a, b in itertools.combinations(coalition, 2))

    return GraphAudit(
        honest=search(honest),
        lying=search(lying),
        honest_owners_only=search(honest, apart),
        lying_owners_only=search(lying, apart),
        searched=most,
        complete=complete[0],
    )


def _smallest(
    peers: Sequence[str],
    most: int,
    probe: Callable[[tuple[str, ...]], Exposure | None],
    admit: Callable[[tuple[str, ...]], bool],
    exhausted: Callable[[], bool],
) -> Exposure | None:
    """The first coalition, smallest first, that ``probe`` finds exposing someone."""
    for size in range(1, most + 1):
        for coalition in itertools.combinations(peers, size):
            if exhausted():
                return None
            if not admit(coalition):
                continue
            found = probe(coalition)
            if found is not None:
                return found
    return None


def _unknowns(coalition: Sequence[str], peers: Sequence[str]) -> list[str]:
    inside = set(coalition)
    return [p for p in peers if p not in inside]


def _row(
    owner: str,
    present: Iterable[str],
    unknown: Mapping[str, int],
    weights: Mapping[str, Mapping[str, float]],
) -> np.ndarray:
    row = np.zeros(len(unknown))
    for member in present:
        if member in unknown:
            row[unknown[member]] = weights[owner][member]
    return row


def _honest(
    coalition: tuple[str, ...],
    peers: Sequence[str],
    adjacency: Mapping[str, frozenset[str]],
    weights: Mapping[str, Mapping[str, float]],
) -> Exposure | None:
    names = _unknowns(coalition, peers)
    unknown = {p: i for i, p in enumerate(names)}
    rows = np.array([_row(c, adjacency[c], unknown, weights) for c in coalition])
    hit = determined(rows)
    if not hit.any():
        return None
    return Exposure(coalition, tuple(p for p, h in zip(names, hit, strict=True) if h))


def _lying(
    coalition: tuple[str, ...],
    peers: Sequence[str],
    adjacency: Mapping[str, frozenset[str]],
    weights: Mapping[str, Mapping[str, float]],
    threshold: float,
    spent: list[int],
    budget: int,
) -> Exposure | None:
    names = _unknowns(coalition, peers)
    unknown = {p: i for i, p in enumerate(names)}
    options = [list(_presentable(c, coalition, adjacency, threshold)) for c in coalition]
    for choice in itertools.product(*options):
        spent[0] += 1
        if spent[0] > budget:
            return None
        rows = np.array(
            [
                _row(c, present, unknown, weights)
                for c, present in zip(coalition, choice, strict=True)
            ]
        )
        hit = determined(rows)
        if hit.any():
            presented = {
                c: tuple(sorted(present))
                for c, present in zip(coalition, choice, strict=True)
                if set(present) != adjacency[c]
            }
            victims = tuple(p for p, h in zip(names, hit, strict=True) if h)
            return Exposure(coalition, victims, presented)
    return None


def _presentable(
    owner: str, coalition: Sequence[str], adjacency: Mapping[str, frozenset[str]], fraction: float
) -> Iterator[frozenset[str]]:
    """The present sets that matter for ``owner``: every member outside the coalition
    that it may leave out, with at least its threshold present (colluding members always
    count as present: their vectors are known anyway). The honest set comes first."""
    members = adjacency[owner]
    need = min(len(members), math.floor(fraction * len(members)) + 1)
    inside = members & set(coalition)
    outside = sorted(members - inside)
    for size in range(len(outside), 0, -1):
        if size + len(inside) < need:
            break
        for kept in itertools.combinations(outside, size):
            yield inside | frozenset(kept)
