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

import math
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

    def __post_init__(self) -> None:
        if not self.clip_norm > 0 or not self.noise_multiplier > 0:
            raise ValueError("clip_norm and noise_multiplier must be > 0")
        if not 0 < self.delta < 1:
            raise ValueError("delta must be between 0 and 1")


def epsilon(rounds: int, noise_multiplier: float, delta: float) -> float:
    """(epsilon, delta)-DP epsilon after ``rounds`` Gaussian releases of noise multiplier
    sigma (noise std / sensitivity)."""
    if rounds <= 0:
        return 0.0
    sigma2 = noise_multiplier**2
    return min(
        rounds * alpha / (2.0 * sigma2) + math.log(1.0 / delta) / (alpha - 1.0) for alpha in ORDERS
    )


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
