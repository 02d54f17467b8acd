"""Build a node's learner from the ``training.model`` section of ``peers.yaml``.

The config loader has already checked types; this module is still defensive because a
wrong model must stop the node at start-up with a message naming the field, not fail
mid-round (or, worse, start from weights that differ from its neighbours').
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from p2pfl.errors import ConfigError
from p2pfl.learning.base import TASKS, Learner, Task
from p2pfl.learning.models import MLP, SoftmaxRegression

__all__ = ["TORCH_EXTRA_HINT", "build_learner"]

_FIELD = "training.model"
_KINDS = ("softmax", "mlp", "custom", "torch")
#: How to get PyTorch: the only torch spec that installs the CPU build on these machines.
TORCH_EXTRA_HINT = "pip install 'p2pfl[torch]' (it installs torch==2.13.0, a CPU build)"


def build_learner(
    model: Mapping[str, object],
    seed: int,
    *,
    source: str = "peers.yaml",
    torch_threads: int | None = 1,
) -> Learner:
    """Learner described by ``model``, initialised from the shared ``seed``.

    ``model["kind"]`` is ``softmax``, ``mlp`` (with ``hidden``: list of layer sizes),
    ``custom`` (with ``factory: "package.module:function"`` and optional ``options``) or
    ``torch`` (a factory returning a ``torch.nn.Module``, optional ``options`` and
    ``optimizer``). ``task`` is ``classification`` (default; needs ``classes``) or
    ``regression`` (``outputs``, default 1). A custom factory is called as
    ``factory(inputs=..., classes=... | outputs=..., seed=..., **options)`` and must return a
    ``Learner``; a torch factory as ``factory(inputs=..., outputs=..., **options)`` with
    torch's generator seeded from ``seed``. ``torch_threads`` (torch models only) sets torch's
    threads in this process: one in a peer process, ``None`` leaves them as they are.
    Any fault raises ``ConfigError(source, field, problem)``.
    """
    kind = model.get("kind")
    if kind not in _KINDS:
        raise ConfigError(
            source, f"{_FIELD}.kind", f"unknown model kind {kind!r} (expected one of {_KINDS})"
        )
    task = model.get("task", "classification")
    if task not in TASKS:
        raise ConfigError(
            source, f"{_FIELD}.task", f"unknown task {task!r} (expected one of {TASKS})"
        )
    inputs = _positive_int(model, "inputs", source)
    if task == "classification":
        outputs = _positive_int(model, "classes", source)
        if outputs < 2:
            raise ConfigError(
                source, f"{_FIELD}.classes", f"need at least 2 classes, got {outputs}"
            )
    else:
        outputs = _positive_int(model, "outputs", source)
    if kind == "softmax":
        if task != "classification":
            raise ConfigError(source, f"{_FIELD}.kind", "softmax is a classifier")
        return SoftmaxRegression(inputs, outputs, seed)
    if kind == "mlp":
        return MLP(inputs, outputs, _hidden(model, source), seed, task=task)
    if kind == "torch":
        return _build_torch(model, inputs, outputs, task, seed, source, torch_threads)
    return _build_custom(model, inputs, outputs, task, seed, source)


def _positive_int(model: Mapping[str, object], key: str, source: str) -> int:
    value = model.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(source, f"{_FIELD}.{key}", f"must be a positive integer, got {value!r}")
    return value


def _hidden(model: Mapping[str, object], source: str) -> list[int]:
    field = f"{_FIELD}.hidden"
    hidden = model.get("hidden")
    if not isinstance(hidden, Sequence) or isinstance(hidden, str | bytes) or not hidden:
        raise ConfigError(source, field, f"must be a non-empty list of layer sizes, got {hidden!r}")
    sizes: list[int] = []
    for i, size in enumerate(hidden):
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise ConfigError(
                source, f"{field}[{i}]", f"layer size must be a positive integer, got {size!r}"
            )
        sizes.append(size)
    return sizes


def _build_torch(
    model: Mapping[str, object],
    inputs: int,
    outputs: int,
    task: Task,
    seed: int,
    source: str,
    threads: int | None,
) -> Learner:
    try:
        import p2pfl.learning.torch_learner as torch_learner  # imports torch
    except ImportError as exc:
        raise ConfigError(
            source,
            f"{_FIELD}.kind",
            f"kind torch needs PyTorch, which cannot be imported here ({exc}): {TORCH_EXTRA_HINT}",
        ) from exc
    if threads is not None:
        torch_learner.use_threads(threads)
    options = _options(model, source, reserved=("inputs", "outputs"))
    spec, factory = _resolve_factory(model, source)
    try:
        module = torch_learner.build_module(
            factory, inputs=inputs, outputs=outputs, seed=seed, options=options
        )
    except Exception as exc:
        raise ConfigError(
            source, f"{_FIELD}.factory", f"calling {spec!r} failed: {type(exc).__name__}: {exc}"
        ) from exc
    raw = model.get("optimizer") or {}
    if not isinstance(raw, Mapping):
        raise ConfigError(source, f"{_FIELD}.optimizer", f"must be a mapping, got {raw!r}")
    optimizer = torch_learner.OptimizerSpec(
        kind=str(raw.get("kind", "sgd")),
        momentum=float(raw.get("momentum", 0.0)),
        weight_decay=float(raw.get("weight_decay", 0.0)),
    )
    if optimizer.kind not in torch_learner.OPTIMIZERS:
        raise ConfigError(
            source,
            f"{_FIELD}.optimizer.kind",
            f"unknown optimizer {optimizer.kind!r} (expected one of {torch_learner.OPTIMIZERS})",
        )
    learner = torch_learner.TorchLearner(module, task=task, outputs=outputs, optimizer=optimizer)
    if learner.n_parameters == 0:
        raise ConfigError(source, f"{_FIELD}.factory", f"the module from {spec!r} has no weights")
    return learner


def _resolve_factory(model: Mapping[str, object], source: str) -> tuple[str, Any]:
    """The callable named by ``factory: "package.module:function"`` (imported here)."""
    field = f"{_FIELD}.factory"
    spec = model.get("factory")
    if not isinstance(spec, str):
        raise ConfigError(
            source, field, f"must be a string 'package.module:function', got {spec!r}"
        )
    module_name, sep, attr_path = spec.partition(":")
    if not sep or not module_name.strip() or not attr_path.strip() or ":" in attr_path:
        raise ConfigError(source, field, f"{spec!r} is not of the form 'package.module:function'")

    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(
            source, field, f"cannot import module {module_name!r} (from {spec!r}): {exc}"
        ) from exc
    except Exception as exc:  # the module's own code failed while importing
        raise ConfigError(
            source,
            field,
            f"importing module {module_name!r} failed: {type(exc).__name__}: {exc}",
        ) from exc

    target: Any = module
    for part in attr_path.split("."):
        try:
            target = getattr(target, part)
        except AttributeError as exc:
            raise ConfigError(
                source, field, f"module {module_name!r} has no attribute {attr_path!r}"
            ) from exc
    if not callable(target):
        raise ConfigError(source, field, f"{spec!r} is not callable")
    return spec, target


def _build_custom(
    model: Mapping[str, object], inputs: int, outputs: int, task: Task, seed: int, source: str
) -> Learner:
    field = f"{_FIELD}.factory"
    size = "classes" if task == "classification" else "outputs"
    options = _options(model, source, reserved=("inputs", size, "seed"))
    spec, target = _resolve_factory(model, source)
    try:
        learner = target(inputs=inputs, **{size: outputs}, seed=seed, **options)
    except Exception as exc:
        raise ConfigError(
            source, field, f"calling {spec!r} failed: {type(exc).__name__}: {exc}"
        ) from exc
    if not isinstance(learner, Learner):
        raise ConfigError(
            source,
            field,
            f"{spec!r} returned {type(learner).__name__}, which is not a Learner "
            "(needs get_weights, set_weights, fit and evaluate)",
        )
    try:
        weights = learner.get_weights()
    except Exception as exc:
        raise ConfigError(
            source,
            field,
            f"get_weights() of the learner from {spec!r} failed: {type(exc).__name__}: {exc}",
        ) from exc
    if not isinstance(weights, list) or not all(isinstance(w, np.ndarray) for w in weights):
        raise ConfigError(
            source,
            field,
            f"get_weights() of the learner from {spec!r} must return a list of numpy arrays",
        )
    return learner


def _options(
    model: Mapping[str, object], source: str, *, reserved: tuple[str, ...]
) -> dict[str, Any]:
    field = f"{_FIELD}.options"
    options = model.get("options", {})
    if options is None:
        return {}
    if not isinstance(options, Mapping) or not all(isinstance(k, str) for k in options):
        raise ConfigError(source, field, f"must be a mapping of names to values, got {options!r}")
    clash = sorted(set(reserved) & set(options))
    if clash:
        raise ConfigError(
            source, field, f"must not set {', '.join(clash)} (they come from the model section)"
        )
    return dict(options)
