"""The learner contract and the weight (un)flattening every transfer goes through.

A node never looks inside a model: it asks a ``Learner`` for its weights, flattens them into
one float32 vector for quantising, masking and sending, and writes the aggregate back with
``set_weights``. Keeping that boundary this thin is what lets operators plug in their own
models (``kind: custom``) without touching the protocol code.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, Protocol, runtime_checkable

import numpy as np

__all__ = ["TASKS", "Evaluation", "Learner", "Task", "flatten", "unflatten"]

#: What a model predicts: class indices (cross-entropy, accuracy) or real targets (MSE, R^2).
Task = Literal["classification", "regression"]
TASKS: tuple[Task, ...] = ("classification", "regression")


@dataclass(frozen=True)
class Evaluation:
    """A model's quality on one data set.

    Classification: ``loss`` is the mean cross-entropy and ``accuracy`` is set. Regression:
    ``loss`` is the mean squared error (over samples and outputs) and ``r2`` is set (the
    coefficient of determination, 1 - SSE / SST: 1 is perfect, 0 is predicting the mean).
    """

    loss: float
    accuracy: float | None = None
    r2: float | None = None

    @property
    def metric(self) -> str:
        """The name of the headline figure: ``accuracy`` or ``r2``."""
        return "accuracy" if self.accuracy is not None else "r2"

    @property
    def score(self) -> float:
        """The headline figure (higher is better): accuracy, else R^2."""
        value = self.accuracy if self.accuracy is not None else self.r2
        if value is None:
            raise ValueError("an Evaluation needs accuracy (classification) or r2 (regression)")
        return value


@runtime_checkable
class Learner(Protocol):
    """What a node needs from a model: weights in and out, local training, evaluation.

    Every peer builds its learner from the shared seed, so all peers start from the same
    weights; after that only ``set_weights`` (the aggregate) and ``fit`` (local data) move them.
    """

    def get_weights(self) -> list[np.ndarray]:
        """Current parameters, one array per tensor, in a fixed order.

        Implementations may return views of live parameters: copy them before training
        if the old values must survive.
        """
        ...

    def set_weights(self, weights: Sequence[np.ndarray]) -> None:
        """Copy ``weights`` into the model; raise ``ValueError`` if a shape does not match."""
        ...

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
        """Minibatch training, reshuffled with ``rng`` every epoch; mean loss of the last
        epoch. ``y`` holds int64 class indices (classification) or float32 targets of shape
        ``(n,)`` or ``(n, outputs)`` (regression)."""
        ...

    def evaluate(self, x: np.ndarray, y: np.ndarray) -> Evaluation:
        """Loss and accuracy (classification) or loss and R^2 (regression) on ``(x, y)``,
        without changing the model."""
        ...


def flatten(weights: Sequence[np.ndarray]) -> np.ndarray:
    """One 1-D float32 vector holding all of ``weights`` in order.

    A single C-contiguous float32 array comes back as a view, not a copy: for a 100 MB
    model the copy alone would cost more than encrypting it. Callers must therefore treat
    the result as possibly aliasing the model and copy before mutating it.
    """
    if len(weights) == 1:
        only = weights[0]
        if isinstance(only, np.ndarray) and only.dtype == np.float32 and only.flags.c_contiguous:
            return only.ravel()
    if not weights:
        return np.empty(0, dtype=np.float32)
    # ravel() of a contiguous array is a view, so concatenate copies each value exactly once.
    return np.concatenate([np.ravel(w) for w in weights], dtype=np.float32)


def unflatten(flat: np.ndarray, like: Sequence[np.ndarray]) -> list[np.ndarray]:
    """Views of ``flat`` shaped like the arrays of ``like`` (the inverse of ``flatten``).

    No data is copied, so writing into a returned array writes into ``flat``.
    """
    if flat.ndim != 1:
        raise ValueError(f"flat weights must be 1-D, got shape {flat.shape}")
    shapes = [np.shape(t) for t in like]
    sizes = [int(np.prod(s, dtype=np.int64)) for s in shapes]
    total = sum(sizes)
    if total != flat.size:
        raise ValueError(f"flat weights have {flat.size} values but the template needs {total}")
    out: list[np.ndarray] = []
    offset = 0
    for shape, size in zip(shapes, sizes, strict=True):
        # A 1-D slice has a single stride, so this reshape is always a view.
        out.append(flat[offset : offset + size].reshape(shape))
        offset += size
    return out
