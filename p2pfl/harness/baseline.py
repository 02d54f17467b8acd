"""The centralised baseline: the same learner trained on all peers' data pooled together.

It is what the peers would get if the data could be shared, so the harness reports the
peers' accuracy as a ratio of it. It runs after the peers have stopped, so it does not
compete with them for the CPU while round times are being measured.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from p2pfl.learning import build_learner


@dataclass(frozen=True)
class BaselineResult:
    #: Test score after each epoch (index e = after e+1 epochs): accuracy, or R^2 for
    #: regression (``metric`` says which).
    score_per_epoch: list[float]
    loss_per_epoch: list[float]
    epochs: int
    samples: int
    seconds: float
    metric: str = "accuracy"

    @property
    def final_score(self) -> float:
        return self.score_per_epoch[-1]

    @property
    def best_score(self) -> float:
        return max(self.score_per_epoch)


def train_centralized(
    model: Mapping[str, Any],
    *,
    seed: int,
    x: np.ndarray,
    y: np.ndarray,
    x_test: np.ndarray,
    y_test: np.ndarray,
    epochs: int,
    batch_size: int,
    learning_rate: float,
) -> BaselineResult:
    """Train from the same initial model the peers start from (the shared seed), one epoch
    at a time, evaluating on the held-out test set after each. The same learner code as the
    peers' (a torch model with the same optimiser), but on all cores: the peers have
    stopped, so the machine is the baseline's."""

    started = time.perf_counter()
    learner = build_learner(model, seed, source="harness", torch_threads=os.cpu_count() or 1)
    rng = np.random.default_rng([seed, 0xBA5E])
    scores: list[float] = []
    losses: list[float] = []
    metric = "accuracy"
    for _ in range(epochs):
        learner.fit(x, y, epochs=1, batch_size=batch_size, learning_rate=learning_rate, rng=rng)
        result = learner.evaluate(x_test, y_test)
        scores.append(float(result.score))
        losses.append(float(result.loss))
        metric = result.metric
    return BaselineResult(
        metric=metric,
        score_per_epoch=scores,
        loss_per_epoch=losses,
        epochs=epochs,
        samples=int(y.shape[0]),
        seconds=time.perf_counter() - started,
    )
