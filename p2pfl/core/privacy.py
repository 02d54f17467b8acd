"""Differential privacy of each peer's updates: clip, add Gaussian noise, account (pure).

Each round a peer clips its update (the trained model minus the model it started the round
with) to L2 norm ``clip_norm`` and adds Gaussian noise of standard deviation
``noise_multiplier * clip_norm`` to every coordinate, before masking and sending. What
leaves the peer is then a Gaussian mechanism of sensitivity ``clip_norm`` on its data:
the unit protected is the peer's whole dataset (peer-level DP), whatever its neighbours do
with the result.

Accounting uses Renyi DP (Mironov 2017): one release costs alpha / (2 sigma^2) at every
order alpha, rounds compose by adding, and (epsilon, delta) is the minimum over orders of
rdp + log(1/delta) / (alpha - 1). Every peer trains on all its data every round, so there
is no subsampling amplification: the numbers are conservative.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np

#: Renyi orders searched for the tightest conversion (as in common accountants).
ORDERS: tuple[float, ...] = (
    *(1 + x / 10.0 for x in range(1, 100)),
    *tuple(float(a) for a in range(11, 64)),
    128.0,
    256.0,
    512.0,
)


@dataclass(frozen=True)
class DPConfig:
    clip_norm: float
    noise_multiplier: float
    delta: float
    #: Pairwise-cancelling noise per neighbour pair, std = this * clip_norm (None: off;
    #: ``secure.correlated``), and the colluding curious peers the accounting allows for.
    correlated_multiplier: float | None = None
    curious: int = 1

    def __post_init__(self) -> None:
        if not self.clip_norm > 0 or not self.noise_multiplier > 0:
            raise ValueError("clip_norm and noise_multiplier must be > 0")
        if not 0 < self.delta < 1:
            raise ValueError("delta must be between 0 and 1")
        if self.correlated_multiplier is not None and not self.correlated_multiplier > 0:
            raise ValueError("correlated_multiplier must be > 0")
        if self.curious < 0:
            raise ValueError("curious must be >= 0")


def epsilon(rounds: int, noise_multiplier: float, delta: float) -> float:
    """(epsilon, delta)-DP epsilon after ``rounds`` Gaussian releases of noise multiplier
    sigma (noise std / sensitivity)."""
    return epsilon_of(rounds, 1.0 / noise_multiplier**2, delta)


def epsilon_of(releases: int, rho: float, delta: float) -> float:
    """(epsilon, delta) epsilon after ``releases`` Gaussian mechanisms whose Renyi DP is
    alpha * rho / 2 each (rho = 1 / sigma^2 for one independent Gaussian; see
    ``secldp_rho`` for correlated noise)."""
    if releases <= 0:
        return 0.0
    return min(
        releases * alpha * rho / 2.0 + math.log(1.0 / delta) / (alpha - 1.0) for alpha in ORDERS
    )


#: The work ``secldp_rho`` may do per graph (curious sets x n^3), about a second here;
#: beyond it the accounting falls back to local DP (a valid, looser bound).
MAX_ACCOUNTING_WORK = 2e8


def secldp_rho(
    graph: Mapping[str, Iterable[str]],
    noise_multiplier: float,
    correlated_multiplier: float,
    curious: int,
) -> float:
    """One round's Renyi DP coefficient (epsilon(alpha) = alpha * rho / 2) of every node's
    message, against an eavesdropper who sees every message and ``curious`` colluding
    peers who know the secrets of their own pairs (SecLDP, after DECOR).

    Per coordinate, the honest nodes' messages carry noise of covariance
    C^2 (s^2 I + c^2 L), s the independent and c the correlated multiplier, L the Laplacian
    of the graph without the curious peers (their pairs' noise is known to them and
    subtracted). A node's data moves its own message's mean by at most C (its clipped
    update), so a Gaussian mechanism of that covariance gives rho = e_u' (s^2 I + c^2 L)^-1
    e_u, maximised over the node u and the curious set H (of exactly ``curious`` peers:
    knowing more secrets never helps less). Checks: with c = 0 it is 1 / s^2, local DP;
    as c grows on a connected graph it falls to 1 / (n s^2), what central DP gets from the
    same independent noise; a node whose neighbours are all curious gets 1 / s^2 again."""
    adjacency = {peer: frozenset(neighbours) for peer, neighbours in graph.items()}
    peers = sorted(adjacency)
    size = min(curious, len(peers) - 1)
    if math.comb(len(peers), size) * len(peers) ** 3 > MAX_ACCOUNTING_WORK:
        # Too many curious sets to try: local DP's 1/s^2, which bounds every one of them.
        return 1.0 / noise_multiplier**2
    worst = 0.0
    for curious_set in itertools.combinations(peers, size):
        honest = [p for p in peers if p not in curious_set]
        index = {p: i for i, p in enumerate(honest)}
        laplacian = np.zeros((len(honest), len(honest)))
        for p in honest:
            for q in adjacency[p]:
                if q in index:
                    laplacian[index[p], index[q]] -= 1.0
                    laplacian[index[p], index[p]] += 1.0
        covariance = noise_multiplier**2 * np.eye(len(honest)) + correlated_multiplier**2 * (
            laplacian
        )
        worst = max(worst, float(np.max(np.diag(np.linalg.inv(covariance)))))
    return worst


def privatize(
    start: np.ndarray, trained: np.ndarray, dp: DPConfig, rng: np.random.Generator
) -> tuple[np.ndarray, float, bool]:
    """``start`` + the clipped update + Gaussian noise. Returns the new parameters, the
    update's norm before clipping, and whether it was clipped. ``rng`` must not be
    predictable to others (never the shared seed: anyone with peers.yaml could subtract
    the noise)."""
    update = trained.astype(np.float64) - start
    norm = float(np.linalg.norm(update))
    clipped = norm > dp.clip_norm
    if clipped:
        update *= dp.clip_norm / norm
    update += rng.normal(0.0, dp.noise_multiplier * dp.clip_norm, size=update.shape)
    return (start + update).astype(np.float32), norm, clipped
