"""The poisoning learner behind ``p2pfl harness --byzantine PEER:KIND`` (pure, no I/O).

The attack is a learner wrapper that only this entry point installs: the peer runs
``python -m p2pfl.harness.byzantine KIND run <the usual p2pfl run arguments>``, reads the
same peers.yaml as everyone (same digest, so its neighbours accept it) and trains
normally, but hands the node poisoned parameters to send. No peers.yaml setting can turn
it on, so a normal deployment cannot run it by accident. The entry point is
``p2pfl.harness.byzantine``; this module holds the attack itself.

KIND is ``random`` (Gaussian noise of standard deviation ``RANDOM_STD`` instead of the
model), ``sign-flip`` (the parameters negated) or ``scaled:K`` (the round's update
multiplied by K: w_old + K (w_new - w_old)).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from p2pfl.learning.base import Evaluation, Learner

__all__ = ["KINDS", "ByzantineLearner", "parse_attack"]

KINDS = ("random", "sign-flip", "scaled:K")
#: Standard deviation of the ``random`` attack's noise (trained weights are ~0.1-1).
RANDOM_STD = 10.0


def parse_attack(text: str) -> tuple[str, float]:
    """``random`` / ``sign-flip`` / ``scaled:K`` -> (kind, K); ValueError otherwise."""
    if text in ("random", "sign-flip"):
        return text, 1.0
    kind, _, raw = text.partition(":")
    if kind == "scaled":
        try:
            factor = float(raw)
        except ValueError:
            raise ValueError(f"scaled:K needs a number K, got {raw!r}") from None
        if math.isfinite(factor):
            return kind, factor
    raise ValueError(f"unknown attack {text!r}: expected one of {', '.join(KINDS)}")


class ByzantineLearner:
    """Wraps a real learner: trains it, but ``get_weights`` returns the poisoned model."""

    def __init__(self, inner: Learner, kind: str, factor: float = 1.0, seed: int = 0) -> None:
        self.inner = inner
        self.kind = kind
        self.factor = factor
        self._rng = np.random.default_rng(seed)
        self._before: list[np.ndarray] | None = None

    def get_weights(self) -> list[np.ndarray]:
        weights = [np.array(w, dtype=np.float32) for w in self.inner.get_weights()]
        if self.kind == "random":
            return [self._rng.normal(0.0, RANDOM_STD, w.shape).astype(np.float32) for w in weights]
        if self.kind == "sign-flip":
            return [-w for w in weights]
        if self._before is None:  # scaled, before any training: nothing to scale yet
            return weights
        return [
            (b + np.float32(self.factor) * (w - b)).astype(np.float32)
            for b, w in zip(self._before, weights, strict=True)
        ]

    def set_weights(self, weights: Sequence[np.ndarray]) -> None:
        self.inner.set_weights(weights)

    def fit(
        self,
        x: np.ndarray,
        y: np.ndarray,
        *,
        epochs: int,
        batch_size: int,
        learning_rate: float,
        rng: np.random.Generator,
    ) -> float:
        self._before = [np.array(w, dtype=np.float32) for w in self.inner.get_weights()]
        return self.inner.fit(
            x, y, epochs=epochs, batch_size=batch_size, learning_rate=learning_rate, rng=rng
        )

    def evaluate(self, x: np.ndarray, y: np.ndarray) -> Evaluation:
        return self.inner.evaluate(x, y)
