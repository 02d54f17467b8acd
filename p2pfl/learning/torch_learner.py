"""Any ``torch.nn.Module`` behind the ``Learner`` contract (``training.model.kind: torch``).

PyTorch is an optional extra (``pip install 'p2pfl[torch]'``): this module imports it at
the top, so only ``build_learner`` for a torch model (and the export of one) imports this
module, and a missing torch becomes a config error there, naming the extra.

The weights cross the boundary without copies: at construction every floating-point
parameter and buffer of the module is moved into ONE contiguous float32 tensor (each
becomes a view of it), and ``get_weights`` returns a numpy view of that tensor. So the
node's flat parameter vector *is* the model's storage, as for the numpy models: flattening,
masking and sending read it directly, and ``set_weights`` is one ``copyto``. Optimisers
update parameters in place, so the views stay valid. The optimiser's state (momentum,
Adam's moments) stays in this object: it is local, never averaged or sent. Integer buffers
(e.g. BatchNorm's ``num_batches_tracked``) are local too.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from p2pfl.learning.base import TASKS, Evaluation, Task
from p2pfl.learning.models import regression_evaluation, regression_targets

__all__ = ["OPTIMIZERS", "OptimizerSpec", "TorchLearner", "build_module", "use_threads"]

#: Optimisers a config may name (``training.optimizer.kind``).
OPTIMIZERS = ("sgd", "adam")
# Rows per forward pass in ``evaluate``: small chunks keep convolution activations in
# cache (Fashion-MNIST CNN: 256 rows 1.6 s, 4096 rows 2.6 s per 10000 test images).
_EVAL_CHUNK = 256


@dataclass(frozen=True)
class OptimizerSpec:
    """``training.optimizer``: SGD (with optional momentum) or Adam, and weight decay."""

    kind: str = "sgd"
    momentum: float = 0.0
    weight_decay: float = 0.0

    def build(self, params: Sequence[nn.Parameter], learning_rate: float) -> torch.optim.Optimizer:
        if self.kind == "sgd":
            return torch.optim.SGD(
                params, lr=learning_rate, momentum=self.momentum, weight_decay=self.weight_decay
            )
        if self.kind == "adam":
            return torch.optim.Adam(params, lr=learning_rate, weight_decay=self.weight_decay)
        raise ValueError(f"unknown optimizer {self.kind!r} (expected one of {OPTIMIZERS})")


def use_threads(threads: int) -> None:
    """Cap torch's threads in this process. A peer process takes one (as for BLAS):
    several peers share a machine's cores, and oversubscribed thread pools made numpy peers
    11x slower (measured on 2 cores). The harness's baseline, alone on the machine, takes all."""
    torch.set_num_threads(max(1, threads))
    # Inter-op threads can only be set before the first parallel work has started.
    if threads == 1 and torch.get_num_interop_threads() != 1:
        with contextlib.suppress(RuntimeError):
            torch.set_num_interop_threads(1)


def build_module(
    factory: Callable[..., Any], *, inputs: int, outputs: int, seed: int, options: Mapping[str, Any]
) -> nn.Module:
    """Call ``factory(inputs=, outputs=, **options)`` with torch's generator seeded from the
    shared seed, so every peer builds bit-identical initial weights."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed % 2**63)
        module = factory(inputs=inputs, outputs=outputs, **options)
    if not isinstance(module, nn.Module):
        raise TypeError(f"returned {type(module).__name__}, not a torch.nn.Module")
    return module


class TorchLearner:
    """A ``torch.nn.Module`` trained with a configured optimiser on the node's data.

    The module maps a float32 batch of shape ``(n, inputs)`` to ``(n, outputs)``: class
    logits (classification, cross-entropy loss) or predictions (regression, MSE loss).
    A module that wants images reshapes its input itself (``nn.Unflatten``), as the shipped
    CNN does.
    """

    def __init__(
        self,
        module: nn.Module,
        *,
        task: Task,
        outputs: int,
        optimizer: OptimizerSpec = OptimizerSpec(),
    ) -> None:
        if task not in TASKS:
            raise ValueError(f"task must be one of {TASKS}, got {task!r}")
        self.task: Task = task
        self.outputs = outputs
        self.module = module.float()
        self._tensors = _floating_tensors(self.module)
        total = sum(t.numel() for t in self._tensors)
        self._flat = torch.empty(total, dtype=torch.float32)
        offset = 0
        for tensor in self._tensors:
            n = tensor.numel()
            view = self._flat[offset : offset + n].view_as(tensor)
            view.copy_(tensor.detach())
            tensor.data = view  # the module's tensor now lives in the flat storage
            offset += n
        #: The same memory as a numpy array: what ``get_weights`` hands out.
        self._flat_np = self._flat.numpy()
        #: How the local optimiser is built (peers.yaml's ``model.optimizer``).
        self.optimizer_spec = optimizer
        self._optimizer: torch.optim.Optimizer | None = None
        self._loss: nn.Module = nn.CrossEntropyLoss() if task == "classification" else nn.MSELoss()

    @property
    def optimizer(self) -> torch.optim.Optimizer | None:
        """The local optimiser (None before the first fit): its state, e.g. momentum, stays
        on this node and outlives each round's new weights."""
        return self._optimizer

    @property
    def n_parameters(self) -> int:
        """Number of values in the flat vector (parameters and floating-point buffers)."""
        return int(self._flat.numel())

    # -- Learner protocol -------------------------------------------------------------

    def get_weights(self) -> list[np.ndarray]:
        """One float32 vector: a view of the module's own storage (no copy)."""
        return [self._flat_np.view()]

    def set_weights(self, weights: Sequence[np.ndarray]) -> None:
        """Copy ``weights`` (one vector of ``n_parameters`` values) into the module."""
        if len(weights) != 1:
            raise ValueError(f"expected 1 weight array, got {len(weights)}")
        src = np.asarray(weights[0])
        if src.shape != self._flat_np.shape:
            raise ValueError(f"weight 0: expected shape {self._flat_np.shape}, got {src.shape}")
        if src.dtype.kind not in "fiu":
            raise ValueError(f"weight 0: expected a real numeric array, got {src.dtype}")
        if not np.shares_memory(src, self._flat_np):
            np.copyto(self._flat_np, src, casting="unsafe")

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
        """Minibatch training; returns the mean loss of the last epoch (each batch's loss
        measured before its step). Dropout and other randomness draw from torch's generator,
        seeded from ``rng``, so a round is reproducible."""
        if epochs < 1 or batch_size < 1:
            raise ValueError(f"epochs and batch_size must be >= 1, got {epochs}, {batch_size}")
        if not math.isfinite(learning_rate) or learning_rate <= 0:
            raise ValueError(f"learning_rate must be a positive number, got {learning_rate!r}")
        xs, ys = self._tensors_of(x, y)
        optimizer = self._optimizer_for(learning_rate)
        torch.manual_seed(int(rng.integers(2**63)))
        n = xs.shape[0]
        self.module.train()
        epoch_loss = math.nan
        for _ in range(epochs):
            order = torch.from_numpy(rng.permutation(n))
            total = 0.0
            for start in range(0, n, batch_size):
                idx = order[start : start + batch_size]
                optimizer.zero_grad(set_to_none=True)
                loss = self._loss(self.module(xs[idx]), ys[idx])
                loss.backward()
                optimizer.step()
                total += float(loss.detach()) * idx.shape[0]
            epoch_loss = total / n
        return epoch_loss

    def evaluate(self, x: np.ndarray, y: np.ndarray) -> Evaluation:
        """Mean cross-entropy and accuracy, or MSE and R^2, in chunks, in eval mode."""
        xs, ys = self._tensors_of(x, y)
        self.module.eval()
        loss_sum = 0.0
        correct = 0
        with torch.no_grad():
            for start in range(0, xs.shape[0], _EVAL_CHUNK):
                xb, yb = xs[start : start + _EVAL_CHUNK], ys[start : start + _EVAL_CHUNK]
                out = self.module(xb)
                if self.task == "classification":
                    loss_sum += float(nn.functional.cross_entropy(out, yb, reduction="sum"))
                    correct += int((out.argmax(dim=1) == yb).sum())
                else:
                    loss_sum += float(((out.double() - yb.double()) ** 2).sum())
        if self.task == "classification":
            return Evaluation(loss=loss_sum / xs.shape[0], accuracy=correct / xs.shape[0])
        return regression_evaluation(loss_sum, ys.numpy())

    # -- extras -------------------------------------------------------------------------

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The module's state_dict with every tensor in its own storage (``torch.save`` of a
        view would write the whole flat vector once per tensor)."""
        return {k: v.detach().clone() for k, v in self.module.state_dict().items()}

    # -- internals ----------------------------------------------------------------------

    def _optimizer_for(self, learning_rate: float) -> torch.optim.Optimizer:
        """The optimiser, built once (its state persists across rounds, locally); the
        learning rate is set on every call."""
        if self._optimizer is None:
            params = [p for p in self.module.parameters() if p.requires_grad]
            self._optimizer = self.optimizer_spec.build(params, learning_rate)
        for group in self._optimizer.param_groups:
            group["lr"] = learning_rate
        return self._optimizer

    def _tensors_of(self, x: np.ndarray, y: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        xs = np.asarray(x)
        if xs.ndim != 2 or xs.shape[0] == 0:
            raise ValueError(f"x must have shape (n, features) with n >= 1, got {xs.shape}")
        if xs.dtype.kind not in "fiu":
            raise ValueError(f"x must be numeric, got {xs.dtype}")
        x_t = torch.from_numpy(np.ascontiguousarray(xs, dtype=np.float32))
        if self.task == "regression":
            targets = regression_targets(y, xs.shape[0], self.outputs)
            return x_t, torch.from_numpy(np.ascontiguousarray(targets, dtype=np.float32))
        ys = np.asarray(y)
        if ys.ndim != 1 or ys.shape[0] != xs.shape[0]:
            raise ValueError(f"y must have shape ({xs.shape[0]},), got {ys.shape}")
        if ys.dtype.kind not in "iu":
            raise ValueError(f"y must hold integer class indices, got {ys.dtype}")
        lo, hi = int(ys.min()), int(ys.max())
        if lo < 0 or hi >= self.outputs:
            raise ValueError(f"labels must lie in 0..{self.outputs - 1}, found {lo}..{hi}")
        return x_t, torch.from_numpy(np.ascontiguousarray(ys, dtype=np.int64))


def _floating_tensors(module: nn.Module) -> list[torch.Tensor]:
    """Parameters, then floating-point buffers, each once (tied weights are shared)."""
    seen: set[int] = set()
    out: list[torch.Tensor] = []
    for tensor in [*module.parameters(), *module.buffers()]:
        if tensor.is_floating_point() and id(tensor) not in seen:
            seen.add(id(tensor))
            out.append(tensor)
    return out
