"""Pure-numpy models: softmax regression and a ReLU multilayer perceptron.

Both are the same dense network (softmax regression is the MLP without hidden layers),
with one of two heads: softmax cross-entropy (classification) or a linear output trained
on the mean squared error (regression, ``task="regression"``).
All parameters live in ONE contiguous buffer, with each weight matrix and bias vector a
view into it, so that:

* ``get_weights`` costs nothing and ``flatten`` of the buffer is free;
* an SGD step is a single vectorised ``flat -= lr * grad`` over one gradient buffer laid
  out the same way, instead of a Python loop over layers.

Initial weights come only from ``np.random.default_rng(seed)``, so every peer that builds a
model from the shared seed starts from bit-identical parameters.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from itertools import pairwise
from typing import Any

import numpy as np
from numpy.typing import DTypeLike

from p2pfl.learning.base import TASKS, Evaluation, Task

__all__ = ["MLP", "SoftmaxRegression", "regression_evaluation", "regression_targets"]

# Rows per chunk in ``evaluate`` and ``predict``: bounds the activation memory on big sets.
_EVAL_CHUNK = 8192


def _float_dtype(dtype: DTypeLike) -> np.dtype[Any]:
    resolved = np.dtype(dtype)
    if resolved not in (np.dtype(np.float32), np.dtype(np.float64)):
        raise ValueError(f"model dtype must be float32 or float64, got {resolved}")
    return resolved


def _positive_int(name: str, value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


class _DenseNetwork:
    """Dense ReLU network with a softmax cross-entropy head (classification, ``outputs``
    classes) or a linear MSE head (regression, ``outputs`` targets); shared implementation."""

    def __init__(
        self,
        inputs: int,
        outputs: int,
        hidden: Sequence[int],
        seed: int,
        dtype: DTypeLike,
        task: Task = "classification",
    ) -> None:
        if task not in TASKS:
            raise ValueError(f"task must be one of {TASKS}, got {task!r}")
        self.task: Task = task
        self.inputs = _positive_int("inputs", inputs)
        self.outputs = _positive_int("outputs", outputs)
        if task == "classification" and self.outputs < 2:
            raise ValueError(f"classes must be at least 2, got {outputs}")
        self.hidden = tuple(_positive_int("hidden layer size", h) for h in hidden)
        self.dtype = _float_dtype(dtype)

        sizes = [self.inputs, *self.hidden, self.outputs]
        shapes: list[tuple[int, ...]] = []
        for fan_in, fan_out in pairwise(sizes):
            shapes += [(fan_in, fan_out), (fan_out,)]
        self._shapes = shapes
        total = sum(math.prod(s) for s in shapes)
        self._flat = np.zeros(total, dtype=self.dtype)
        self._grad_flat = np.zeros(total, dtype=self.dtype)
        self._params = self._views(self._flat)
        self._grads = self._views(self._grad_flat)

        # He initialisation (std sqrt(2 / fan_in)), drawn in float64 so the same seed gives
        # the same values whatever the model dtype; biases start at zero.
        rng = np.random.default_rng(seed)
        for w in self._params[0::2]:
            fan_in = w.shape[0]
            w[...] = rng.standard_normal(w.shape) * math.sqrt(2.0 / fan_in)

    def _views(self, flat: np.ndarray) -> list[np.ndarray]:
        views: list[np.ndarray] = []
        offset = 0
        for shape in self._shapes:
            size = math.prod(shape)
            views.append(flat[offset : offset + size].reshape(shape))
            offset += size
        return views

    @property
    def classes(self) -> int:
        """Number of classes (classification) or of regression targets."""
        return self.outputs

    @property
    def n_parameters(self) -> int:
        """Total number of scalar parameters."""
        return int(self._flat.size)

    # -- Learner protocol -------------------------------------------------------------

    def get_weights(self) -> list[np.ndarray]:
        """Views of the live parameters ``[W1, b1, W2, b2, ...]`` (no copy).

        Fresh view objects each call, so a caller reshaping one cannot corrupt the model;
        their values change when the model trains or ``set_weights`` runs.
        """
        return [p.view() for p in self._params]

    def set_weights(self, weights: Sequence[np.ndarray]) -> None:
        """Copy ``weights`` into the parameter buffer; all-or-nothing on a mismatch."""
        if len(weights) != len(self._params):
            raise ValueError(f"expected {len(self._params)} weight arrays, got {len(weights)}")
        arrays = [np.asarray(w) for w in weights]
        for i, (src, dst) in enumerate(zip(arrays, self._params, strict=True)):
            if src.shape != dst.shape:
                raise ValueError(f"weight {i}: expected shape {dst.shape}, got {src.shape}")
            if src.dtype.kind not in "fiu":
                raise ValueError(f"weight {i}: expected a real numeric array, got {src.dtype}")
        # Validated first so a bad list never leaves the model half-updated.
        for src, dst in zip(arrays, self._params, strict=True):
            np.copyto(dst, src, casting="unsafe")

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
        """Minibatch SGD over ``(x, y)``; returns the mean training loss of the last epoch.

        The loss of each batch is measured before its update step (the usual running loss).
        """
        xs, ys = self._check_xy(x, y)
        epochs = _positive_int("epochs", epochs)
        batch_size = _positive_int("batch_size", batch_size)
        if not math.isfinite(learning_rate) or learning_rate <= 0:
            raise ValueError(f"learning_rate must be a positive number, got {learning_rate!r}")
        lr = self.dtype.type(learning_rate)
        n = ys.shape[0]
        epoch_loss = math.nan
        for _ in range(epochs):
            order = rng.permutation(n)
            total = 0.0
            for start in range(0, n, batch_size):
                idx = order[start : start + batch_size]
                loss = self._loss_and_gradients_into(xs[idx], ys[idx])
                total += loss * idx.shape[0]
                # One vectorised step over the whole parameter buffer.
                self._grad_flat *= lr
                self._flat -= self._grad_flat
            epoch_loss = total / n
        return epoch_loss

    def evaluate(self, x: np.ndarray, y: np.ndarray) -> Evaluation:
        """Mean cross-entropy and accuracy (classification) or mean squared error and R^2
        (regression), computed in chunks to bound memory."""
        xs, ys = self._check_xy(x, y)
        if self.task == "regression":
            return self._evaluate_regression(xs, ys)
        n = ys.shape[0]
        loss_sum = 0.0
        correct = 0
        for start in range(0, n, _EVAL_CHUNK):
            xb = xs[start : start + _EVAL_CHUNK]
            yb = ys[start : start + _EVAL_CHUNK]
            z = self._forward(xb)[1]
            z -= z.max(axis=1, keepdims=True)
            lse = np.log(np.exp(z).sum(axis=1))
            rows = np.arange(yb.shape[0])
            loss_sum += float(np.sum(lse - z[rows, yb], dtype=np.float64))
            correct += int(np.count_nonzero(z.argmax(axis=1) == yb))
        return Evaluation(loss=loss_sum / n, accuracy=correct / n)

    def _evaluate_regression(self, xs: np.ndarray, ys: np.ndarray) -> Evaluation:
        sse = 0.0
        for start in range(0, ys.shape[0], _EVAL_CHUNK):
            z = self._forward(xs[start : start + _EVAL_CHUNK])[1]
            sse += float(np.sum((z - ys[start : start + _EVAL_CHUNK]) ** 2, dtype=np.float64))
        return regression_evaluation(sse, ys)

    # -- extras -------------------------------------------------------------------------

    def logits(self, x: np.ndarray) -> np.ndarray:
        """The model's raw outputs for every row of ``x`` (before any softmax): what an
        exported model must reproduce."""
        return self._forward(self._check_x(x))[1]

    def predict(self, x: np.ndarray) -> np.ndarray:
        """Predicted class index for every row of ``x`` (regression: the predicted targets,
        shape ``(n, outputs)``)."""
        xs = self._check_x(x)
        if self.task == "regression":
            return np.concatenate(
                [
                    self._forward(xs[start : start + _EVAL_CHUNK])[1]
                    for start in range(0, xs.shape[0], _EVAL_CHUNK)
                ]
            )
        out = np.empty(xs.shape[0], dtype=np.int64)
        for start in range(0, xs.shape[0], _EVAL_CHUNK):
            z = self._forward(xs[start : start + _EVAL_CHUNK])[1]
            out[start : start + _EVAL_CHUNK] = z.argmax(axis=1)
        return out

    def loss_and_gradients(self, x: np.ndarray, y: np.ndarray) -> tuple[float, list[np.ndarray]]:
        """Mean loss on ``(x, y)`` and its gradient, shaped like ``get_weights()``.

        Public so tests can compare against finite differences; the gradients are copies.
        """
        xs, ys = self._check_xy(x, y)
        loss = self._loss_and_gradients_into(xs, ys)
        return loss, [g.copy() for g in self._grads]

    # -- internals ----------------------------------------------------------------------

    def _check_x(self, x: np.ndarray) -> np.ndarray:
        xs = np.asarray(x)
        if xs.ndim != 2 or xs.shape[1] != self.inputs:
            raise ValueError(f"x must have shape (n, {self.inputs}), got {xs.shape}")
        if xs.shape[0] == 0:
            raise ValueError("x has no rows")
        if xs.dtype.kind not in "fiu":
            raise ValueError(f"x must be numeric, got {xs.dtype}")
        return xs.astype(self.dtype, copy=False)

    def _check_xy(self, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        xs = self._check_x(x)
        if self.task == "regression":
            return xs, regression_targets(y, xs.shape[0], self.outputs).astype(self.dtype)
        ys = np.asarray(y)
        if ys.ndim != 1 or ys.shape[0] != xs.shape[0]:
            raise ValueError(f"y must have shape ({xs.shape[0]},), got {ys.shape}")
        if ys.dtype.kind not in "iu":
            raise ValueError(f"y must hold integer class indices, got {ys.dtype}")
        lo, hi = int(ys.min()), int(ys.max())
        if lo < 0 or hi >= self.classes:
            raise ValueError(f"labels must lie in 0..{self.classes - 1}, found {lo}..{hi}")
        return xs, ys.astype(np.intp, copy=False)

    def _forward(self, x: np.ndarray) -> tuple[list[np.ndarray], np.ndarray]:
        """Hidden activations (input first, post-ReLU) and the output logits."""
        acts = [x]
        a = x
        n_layers = len(self._params) // 2
        for layer in range(n_layers):
            w, b = self._params[2 * layer], self._params[2 * layer + 1]
            h = a @ w
            h += b
            if layer < n_layers - 1:
                np.maximum(h, 0, out=h)
                acts.append(h)
            a = h
        return acts, a

    def _loss_and_gradients_into(self, x: np.ndarray, y: np.ndarray) -> float:
        """Mean loss; writes its gradient into the gradient buffer views."""
        n = y.shape[0]
        acts, z = self._forward(x)
        if self.task == "regression":
            # Mean squared error over every entry (as torch's MSELoss): d/dz = 2 (z - y) / size.
            z -= y
            loss = float(np.mean(z * z, dtype=np.float64))
            z *= self.dtype.type(2.0 / z.size)
            self._backward(acts, z)
            return loss
        rows = np.arange(n)
        # Stable log-sum-exp: shift every row by its maximum before exponentiating.
        z -= z.max(axis=1, keepdims=True)
        picked = z[rows, y]
        np.exp(z, out=z)
        sums = z.sum(axis=1, keepdims=True)
        loss = float(np.mean(np.log(sums[:, 0]) - picked, dtype=np.float64))
        # d(loss)/d(logits) = (softmax - onehot) / n, built in place in z.
        z /= sums
        z[rows, y] -= 1
        z *= self.dtype.type(1.0 / n)
        self._backward(acts, z)
        return loss

    def _backward(self, acts: list[np.ndarray], delta: np.ndarray) -> None:
        """Back-propagate d(loss)/d(logits) into the gradient buffer views."""
        for layer in range(len(acts) - 1, -1, -1):
            a = acts[layer]
            np.matmul(a.T, delta, out=self._grads[2 * layer])
            np.sum(delta, axis=0, out=self._grads[2 * layer + 1])
            if layer > 0:
                delta = delta @ self._params[2 * layer].T
                # ReLU derivative: a is the post-activation, positive exactly where h > 0.
                delta *= a > 0


class SoftmaxRegression(_DenseNetwork):
    """Multinomial logistic regression: one dense layer and softmax cross-entropy."""

    def __init__(self, inputs: int, classes: int, seed: int, dtype: DTypeLike = np.float32) -> None:
        super().__init__(inputs, classes, (), seed, dtype)


class MLP(_DenseNetwork):
    """Multilayer perceptron with ReLU hidden layers and a softmax cross-entropy head, or
    (``task="regression"``) a linear head trained on the mean squared error."""

    def __init__(
        self,
        inputs: int,
        outputs: int,
        hidden: Sequence[int],
        seed: int,
        dtype: DTypeLike = np.float32,
        task: Task = "classification",
    ) -> None:
        if isinstance(hidden, str | bytes) or len(hidden) == 0:
            raise ValueError(f"hidden must list at least one layer size, got {hidden!r}")
        super().__init__(inputs, outputs, hidden, seed, dtype, task)


def regression_targets(y: np.ndarray, rows: int, outputs: int) -> np.ndarray:
    """``y`` as a finite float array of shape ``(rows, outputs)`` (a 1-D ``y`` is one target)."""
    ys = np.asarray(y)
    if ys.dtype.kind not in "fiu":
        raise ValueError(f"regression targets must be numeric, got {ys.dtype}")
    if ys.ndim == 1:
        ys = ys.reshape(-1, 1)
    if ys.shape != (rows, outputs):
        raise ValueError(f"y must have shape ({rows},) or ({rows}, {outputs}), got {ys.shape}")
    if ys.dtype.kind == "f" and not np.isfinite(ys).all():
        raise ValueError("regression targets must be finite")
    return ys


def regression_evaluation(sse: float, ys: np.ndarray) -> Evaluation:
    """MSE and R^2 from the sum of squared errors over ``ys`` (shape ``(n, outputs)``).

    R^2 = 1 - SSE / SST with SST summed over every output around its own mean. Constant
    targets (SST = 0) give 1 for an exact fit and 0 otherwise, never a division by zero.
    """
    centred = ys - ys.mean(axis=0, dtype=np.float64)
    sst = float(np.sum(centred * centred, dtype=np.float64))
    r2 = 1.0 - sse / sst if sst > 0 else (1.0 if sse == 0 else 0.0)
    return Evaluation(loss=sse / ys.size, r2=r2)
