"""A learner whose parameters are one large float32 vector, for transport benchmarks.

It is a real (if trivial) model: a per-feature linear offset trained by SGD on a squared
loss, padded to the requested parameter count so that moving it over the network costs
exactly ``size * 4`` bytes. Training it touches every parameter once, in place, so the
benchmark measures the network path and memory, not the learner.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from p2pfl.learning import Evaluation


class BigVector:
    def __init__(self, inputs: int, classes: int, seed: int, size: int) -> None:
        self.inputs = inputs
        rng = np.random.default_rng(seed)
        self.w = np.empty(size, dtype=np.float32)
        for start in range(0, size, 1 << 22):  # fill in slices: no float64 temporary of `size`
            stop = min(size, start + (1 << 22))
            self.w[start:stop] = rng.standard_normal(stop - start, dtype=np.float32)

    def get_weights(self) -> list[np.ndarray]:
        return [self.w]

    def set_weights(self, weights: Sequence[np.ndarray]) -> None:
        (w,) = weights
        if w.shape != self.w.shape:
            raise ValueError(f"expected shape {self.w.shape}, got {w.shape}")
        np.copyto(self.w, w)

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
        target = np.float32(x.mean())
        loss = 0.0
        for _ in range(epochs):
            head = self.w[: self.inputs]
            loss = float(np.mean((head - target) ** 2))
            # One SGD step on the first `inputs` parameters, and a decay on the rest.
            head -= np.float32(learning_rate) * (head - target)
            self.w[self.inputs :] *= np.float32(1 - learning_rate * 1e-3)
        return loss

    def evaluate(self, x: np.ndarray, y: np.ndarray) -> Evaluation:
        head = self.w[: self.inputs]
        return Evaluation(loss=float(np.mean((head - x.mean()) ** 2)), accuracy=0.0)


def factory(*, inputs: int, classes: int, seed: int, size: int = 25_000_000) -> BigVector:
    return BigVector(inputs, classes, seed, size)
