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
from p2pfl.learning.base import Learner
from p2pfl.learning.models import MLP, SoftmaxRegression

__all__ = ["build_learner"]

_FIELD = "training.model"
_KINDS = ("softmax", "mlp", "custom")


def build_learner(model: Mapping[str, object], seed: int, *, source: str = "peers.yaml") -> Learner:
    """Learner described by ``model``, initialised from the shared ``seed``.

    ``model["kind"]`` is ``softmax``, ``mlp`` (with ``hidden``: list of layer sizes) or
    ``custom`` (with ``factory: "package.module:function"`` and optional ``options``); all
    kinds need ``inputs`` and ``classes``. A custom factory is called as
    ``factory(inputs=..., classes=..., seed=..., **options)`` and must return a ``Learner``.
    Any fault raises ``ConfigError(source, field, problem)``.
    """
    kind = model.get("kind")
    if kind not in _KINDS:
        raise ConfigError(
            source, f"{_FIELD}.kind", f"unknown model kind {kind!r} (expected one of {_KINDS})"
        )
    inputs = _positive_int(model, "inputs", source)
    classes = _positive_int(model, "classes", source)
    if classes < 2:
        raise ConfigError(source, f"{_FIELD}.classes", f"need at least 2 classes, got {classes}")
    if kind == "softmax":
        return SoftmaxRegression(inputs, classes, seed)
    if kind == "mlp":
        return MLP(inputs, classes, _hidden(model, source), seed)
    return _build_custom(model, inputs, classes, seed, source)


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


def _build_custom(
    model: Mapping[str, object], inputs: int, classes: int, seed: int, source: str
) -> Learner:
    field = f"{_FIELD}.factory"
    spec = model.get("factory")
    if not isinstance(spec, str):
        raise ConfigError(
            source, field, f"must be a string 'package.module:function', got {spec!r}"
        )
    module_name, sep, attr_path = spec.partition(":")
    if not sep or not module_name.strip() or not attr_path.strip() or ":" in attr_path:
        raise ConfigError(source, field, f"{spec!r} is not of the form 'package.module:function'")
    options = _options(model, source)

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

    try:
        learner = target(inputs=inputs, classes=classes, seed=seed, **options)
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


def _options(model: Mapping[str, object], source: str) -> dict[str, Any]:
    field = f"{_FIELD}.options"
    options = model.get("options", {})
    if options is None:
        return {}
    if not isinstance(options, Mapping) or not all(isinstance(k, str) for k in options):
        raise ConfigError(source, field, f"must be a mapping of names to values, got {options!r}")
    clash = sorted({"inputs", "classes", "seed"} & set(options))
    if clash:
        raise ConfigError(
            source, field, f"must not set {', '.join(clash)} (they come from the model section)"
        )
    return dict(options)
