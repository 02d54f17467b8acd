"""A poisoning peer for the harness (``p2pfl harness --byzantine PEER:KIND``).

The attack is a learner wrapper that only this entry point installs: the peer runs
``python -m p2pfl.harness.byzantine KIND run <the usual p2pfl run arguments>``, reads the
same peers.yaml as everyone (same digest, so its neighbours accept it) and trains
normally, but hands the node poisoned parameters to send. No peers.yaml setting can turn
it on, so a normal deployment cannot run it by accident.

KIND is ``random`` (Gaussian noise of standard deviation ``RANDOM_STD`` instead of the
model), ``sign-flip`` (the parameters negated) or ``scaled:K`` (the round's update
multiplied by K: w_old + K (w_new - w_old)).
"""

from __future__ import annotations

import asyncio
import math
import sys
from collections.abc import Sequence

import numpy as np

from p2pfl.learning.base import Evaluation, Learner

__all__ = ["KINDS", "ByzantineLearner", "main", "parse_attack"]

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


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m p2pfl.harness.byzantine KIND run ...``: p2pfl run, with the attack."""
    from p2pfl.cli import build_node, make_parser, setup_logging
    from p2pfl.errors import P2PFLError

    args_in = list(sys.argv[1:] if argv is None else argv)
    if len(args_in) < 2 or args_in[1] != "run":
        print("usage: python -m p2pfl.harness.byzantine KIND run ARGS...", file=sys.stderr)
        return 2
    try:
        kind, factor = parse_attack(args_in[0])
        args = make_parser().parse_args(args_in[1:])
        setup_logging(args)
        node = build_node(args)
    except (ValueError, P2PFLError) as exc:
        print(f"p2pfl: error: {exc}", file=sys.stderr)
        return 2
    node.learner = ByzantineLearner(node.learner, kind, factor, seed=node.peer_index)
    return int(asyncio.run(node.run()))


if __name__ == "__main__":
    sys.exit(main())
