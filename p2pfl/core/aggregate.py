"""Aggregation rules, pure numpy.

``metropolis_average`` is the default: doubly stochastic mixing weights, so every node
approaches the network's average. It trusts its neighbours: one peer sending huge or
sign-flipped parameters drags every model with it. The robust rules (plain mode only: with
secure aggregation a node sees only a masked sum, never the vectors they need) bound what a
lying neighbour can do, over the node's own model and its neighbours':

* ``median``: the coordinate-wise median;
* ``trimmed-mean:BETA``: per coordinate, drop the ``floor(BETA * n)`` smallest and largest
  values and average the rest;
* ``clipped:TAU``: Metropolis, with each neighbour's difference from the own model scaled
  down to an L2 norm of at most ``TAU``.

Every rule drops non-finite vectors first. Each returns the aggregate, the weights it used
(for the event log) and the neighbours it flagged as outliers, with the reason: the node
counts those towards a ``suspect`` event.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

__all__ = [
    "OUTLIER_FACTOR",
    "RobustRule",
    "aggregate",
    "coordinate_median",
    "metropolis_average",
    "parse_rule",
    "trimmed_mean",
]

#: A vector this many times farther from the robust aggregate than the members' median
#: distance is an outlier (for ``median`` and ``trimmed-mean``).
OUTLIER_FACTOR = 3.0
# Entries per slice of the coordinate-wise rules: bounds the stacked temporary memory to
# members x 64K x 4 bytes whatever the model size.
_CHUNK = 65536
_RULE_RE = re.compile(r"(metropolis|median)|(trimmed-mean|clipped):(\S+)")


@dataclass(frozen=True)
class RobustRule:
    """A parsed ``aggregation.rule``: its ``kind`` and, for trimmed-mean / clipped, its
    parameter (``beta`` in [0, 0.5), ``tau`` > 0)."""

    kind: str
    parameter: float | None = None

    def __str__(self) -> str:
        return self.kind if self.parameter is None else f"{self.kind}:{self.parameter:g}"

    @property
    def robust(self) -> bool:
        return self.kind != "metropolis"


def parse_rule(text: str) -> RobustRule:
    """``metropolis``, ``median``, ``trimmed-mean:BETA`` or ``clipped:TAU``; ValueError
    (with what is wrong) otherwise."""
    match = _RULE_RE.fullmatch(text.strip())
    if match is None:
        raise ValueError(
            f"unknown rule {text!r}: expected metropolis, median, trimmed-mean:BETA "
            "(0 <= BETA < 0.5) or clipped:TAU (TAU > 0)"
        )
    if match.group(1):
        return RobustRule(match.group(1))
    kind, raw = match.group(2), match.group(3)
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"{kind}: {raw!r} is not a number") from None
    if kind == "trimmed-mean" and not 0.0 <= value < 0.5:
        raise ValueError(f"trimmed-mean:BETA needs 0 <= BETA < 0.5, got {raw}")
    if kind == "clipped" and not (math.isfinite(value) and value > 0):
        raise ValueError(f"clipped:TAU needs a finite TAU > 0, got {raw}")
    return RobustRule(kind, value)


def metropolis_average(
    own_id: str,
    own: np.ndarray,
    received: Mapping[str, np.ndarray],
    weights: Mapping[str, float],
) -> tuple[np.ndarray, dict[str, float]]:
    """Metropolis-Hastings gossip average, renormalised over the members present.

    ``weights`` holds w_ij for the node itself and all its neighbours this round. Neighbours
    missing from ``received`` are left out and the remaining weights rescaled to sum to one.
    Works in place on ``own`` and on the received arrays (which are consumed) so a 100 MB
    model needs no extra model-sized temporaries. Returns the average and the weights used.
    """
    members = [own_id, *sorted(p for p in received if p in weights)]
    total = sum(weights[m] for m in members)
    used = {m: weights[m] / total for m in members}
    own *= np.float32(used[own_id])
    for peer in members[1:]:
        contribution = received[peer]
        contribution *= np.float32(used[peer])
        own += contribution
    return own, used


def coordinate_median(vectors: Sequence[np.ndarray], out: np.ndarray) -> np.ndarray:
    """The coordinate-wise median of equally long 1-D vectors, written into ``out`` (which
    may be one of them: each slice is stacked before it is overwritten)."""
    return _by_slices(vectors, out, lambda block: np.median(block, axis=0))


def trimmed_mean(vectors: Sequence[np.ndarray], beta: float, out: np.ndarray) -> np.ndarray:
    """Per coordinate, the mean of the values left after dropping the ``floor(beta * n)``
    smallest and largest, written into ``out`` (which may be one of the vectors)."""
    n = len(vectors)
    cut = math.floor(beta * n)
    if n - 2 * cut < 1:
        raise ValueError(f"trimming {cut} of {n} values from each end leaves nothing")

    def mean_of_middle(block: np.ndarray) -> np.ndarray:
        block.sort(axis=0)
        middle: np.ndarray = block[cut : n - cut].mean(axis=0, dtype=np.float64)
        return middle

    return _by_slices(vectors, out, mean_of_middle)


def aggregate(
    rule: RobustRule,
    own_id: str,
    own: np.ndarray,
    received: Mapping[str, np.ndarray],
    weights: Mapping[str, float],
) -> tuple[np.ndarray, dict[str, float], dict[str, str]]:
    """Apply ``rule`` to the own model and the neighbours' (consumed; the result is written
    into ``own``). Returns the aggregate, the weights used (Metropolis weights for
    metropolis and clipped, the equal share of each member for median and trimmed-mean)
    and the outliers: neighbour -> reason (``non-finite``, ``clipped``, ``far``)."""
    flagged: dict[str, str] = {}
    finite: dict[str, np.ndarray] = {}
    for peer, vector in sorted(received.items()):
        if peer not in weights:
            continue
        if np.isfinite(vector).all():
            finite[peer] = vector
        else:
            flagged[peer] = "non-finite"
    if rule.kind == "metropolis":
        params, used = metropolis_average(own_id, own, finite, weights)
        return params, used, flagged
    if rule.kind == "clipped":
        assert rule.parameter is not None
        for peer, vector in finite.items():
            if _clip_around(own, vector, rule.parameter):
                flagged[peer] = "clipped"
        params, used = metropolis_average(own_id, own, finite, weights)
        return params, used, flagged

    members = [own_id, *finite]
    vectors = [own, *finite.values()]
    # Distances to the own model, before ``own`` is overwritten: the outlier test below
    # needs each member's distance to the aggregate, so keep copies only of what it reads.
    reference = own.copy() if len(vectors) > 1 else own
    stacked = [reference, *vectors[1:]]
    if rule.kind == "median":
        coordinate_median(stacked, own)
    else:
        assert rule.parameter is not None
        trimmed_mean(stacked, rule.parameter, own)
    distances = {m: float(np.linalg.norm(v - own)) for m, v in zip(members, stacked, strict=True)}
    typical = float(np.median(list(distances.values())))
    for peer in finite:
        if distances[peer] > OUTLIER_FACTOR * typical and distances[peer] > 0:
            flagged[peer] = "far"
    share = 1.0 / len(members)
    return own, dict.fromkeys(members, share), flagged


def _clip_around(own: np.ndarray, vector: np.ndarray, tau: float) -> bool:
    """Scale ``vector - own`` (in place in ``vector``) to an L2 norm of at most ``tau``;
    True if it had to be scaled."""
    vector -= own
    norm = float(np.linalg.norm(vector))
    clipped = norm > tau
    if clipped:
        vector *= np.float32(tau / norm)
    vector += own
    return clipped


def _by_slices(
    vectors: Sequence[np.ndarray], out: np.ndarray, reduce: Callable[[np.ndarray], np.ndarray]
) -> np.ndarray:
    size = out.shape[0]
    if any(v.shape != (size,) for v in vectors):
        raise ValueError("all vectors must be 1-D and as long as out")
    for start in range(0, size, _CHUNK):
        block = np.stack([v[start : start + _CHUNK] for v in vectors])
        out[start : start + _CHUNK] = reduce(block)
    return out
