"""The ``training`` section and its ``model``: what every peer builds from the shared seed
(kind, task, sizes, a torch or custom factory, the torch optimiser) and how it is trained
(rounds, epochs, batch size, learning rate, timeouts, input scaling)."""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any, cast

from p2pfl.config.fields import FieldReader, as_float, or_empty, shown
from p2pfl.config.schema import (
    MODEL_KINDS,
    OPTIMIZER_KINDS,
    ModelConfig,
    Standardize,
    TrainingConfig,
)
from p2pfl.learning.base import TASKS, Task

_IDENT = r"[A-Za-z_][A-Za-z0-9_]*"
_FACTORY_RE = re.compile(rf"{_IDENT}(?:\.{_IDENT})*:{_IDENT}(?:\.{_IDENT})*")
_MODEL_KEYS = (
    "kind",
    "task",
    "inputs",
    "classes",
    "outputs",
    "hidden",
    "factory",
    "options",
    "optimizer",
)
#: Model fields that only some kinds use, and those kinds.
_KIND_ONLY_KEYS: Mapping[str, tuple[str, ...]] = MappingProxyType(
    {
        "hidden": ("mlp",),
        "factory": ("custom", "torch"),
        "options": ("custom", "torch"),
        "optimizer": ("torch",),
    }
)


class TrainingReader(FieldReader):
    """The training section and its model."""

    def training(self, value: object) -> TrainingConfig:
        keys = (
            "rounds",
            "local_epochs",
            "batch_size",
            "learning_rate",
            "round_timeout",
            "startup_timeout",
            "min_neighbours",
            "input_scale",
            "standardize",
            "model",
        )
        section = self.section(value, "training", keys, ("rounds", "model"))
        return TrainingConfig(
            rounds=self.integer(section["rounds"], "training.rounds", 1),
            local_epochs=self.integer(section.get("local_epochs", 1), "training.local_epochs", 1),
            batch_size=self.integer(section.get("batch_size", 32), "training.batch_size", 1),
            learning_rate=self.positive(
                section.get("learning_rate", 0.1), "training.learning_rate"
            ),
            round_timeout=self.seconds(
                section.get("round_timeout", 30.0), "training.round_timeout"
            ),
            startup_timeout=self.seconds(
                section.get("startup_timeout", 60.0), "training.startup_timeout"
            ),
            model=self.model(section["model"]),
            input_scale=self.input_scale(section.get("input_scale", "auto")),
            min_neighbours=self.integer(
                section.get("min_neighbours", 1), "training.min_neighbours", 0
            ),
            standardize=self.standardize(section),
        )

    def standardize(self, section: Mapping[str, Any]) -> Standardize | None:
        """``standardize``: none, federated, or ``{mean: [...], std: [...]}`` (one number
        per model input). It replaces ``input_scale``, which may then not be a number."""
        path = "training.standardize"
        value = section.get("standardize", "none")
        if value == "none":
            return None
        if isinstance(section.get("input_scale", "auto"), int | float):
            self.fail(path, "standardize replaces input_scale: leave input_scale at auto")
        if value == "federated":
            return Standardize()
        if isinstance(value, str):
            expected = "none, federated or {mean: [...], std: [...]}"
            self.fail(path, f"expected {expected}, got {shown(value)}")
        values = self.section(value, path, ("mean", "std"), ("mean", "std"))
        model = section.get("model")
        inputs = model.get("inputs") if isinstance(model, Mapping) else None
        mean = self.numbers(values["mean"], f"{path}.mean", inputs, positive=False)
        std = self.numbers(values["std"], f"{path}.std", inputs, positive=True)
        return Standardize(mean, std)

    def check_federated_moments(self, training: TrainingConfig, peers: int, chunk: int) -> None:
        """``standardize: federated`` sends each peer's totals in one message, tagged for
        every other peer: it must fit a record, and name at most 64 other peers."""
        if training.standardize is None or not training.standardize.federated:
            return
        if peers > 65:
            self.fail("training.standardize", f"federated supports up to 65 peers, not {peers}")
        size = 16 * (2 * training.model.inputs + 1) + (peers - 1) * 97 + 100
        if size > chunk:
            self.fail(
                "training.standardize",
                f"federated needs messages of {size} bytes for {training.model.inputs} inputs, "
                f"above limits.chunk_bytes ({chunk}): raise it",
            )

    def numbers(
        self, value: object, path: str, length: object, *, positive: bool
    ) -> tuple[float, ...]:
        """A list of finite numbers, one per model input (``positive``: each > 0)."""
        if not isinstance(value, list) or not value:
            self.fail(path, f"expected a list of numbers, one per model input, got {shown(value)}")
        if isinstance(length, int) and len(value) != length:
            self.fail(path, f"expected {length} numbers (training.model.inputs), got {len(value)}")
        out = []
        for i, item in enumerate(value):
            where = f"{path}[{i}]"
            if positive:
                out.append(self.positive(item, where))
                continue
            if isinstance(item, bool) or not isinstance(item, int | float):
                self.fail(where, f"expected a number, got {shown(item)}")
            number = as_float(item)
            if not math.isfinite(number):
                self.fail(where, f"expected a finite number, got {shown(item)}")
            out.append(number)
        return tuple(out)

    def input_scale(self, value: object) -> float | None:
        if value == "auto":
            return None
        if isinstance(value, str):
            self.fail(
                "training.input_scale", f'expected "auto" or a number > 0, got {shown(value)}'
            )
        return self.positive(value, "training.input_scale")

    def model(self, value: object) -> ModelConfig:
        path = "training.model"
        section = self.section(value, path, _MODEL_KEYS, ("kind", "inputs"))
        kind = self.choice(section["kind"], f"{path}.kind", MODEL_KINDS)
        task = cast(Task, self.choice(section.get("task", "classification"), f"{path}.task", TASKS))
        inputs = self.integer(section["inputs"], f"{path}.inputs", 1)
        outputs = self.model_outputs(section, path, kind, task)
        self.check_kind_keys(section, path, kind)
        hidden: tuple[int, ...] = ()
        factory: str | None = None
        options: dict[str, Any] = {}
        optimizer: dict[str, Any] = {}
        if kind == "mlp":
            hidden = self.hidden(section.get("hidden", [64]), f"{path}.hidden")
        if kind in ("custom", "torch"):
            factory, options = self.factory_and_options(section, path, kind)
        if kind == "torch":
            optimizer = self.optimizer(or_empty(section.get("optimizer")), f"{path}.optimizer")
        return ModelConfig(
            kind,
            inputs,
            outputs,
            hidden,
            factory,
            MappingProxyType(options),
            task=task,
            optimizer=MappingProxyType(optimizer),
        )

    def model_outputs(self, section: Mapping[str, Any], path: str, kind: str, task: Task) -> int:
        """The output width: ``classes`` for a classifier, ``outputs`` for a regressor. The
        other task's field is refused rather than ignored, so a config says what it means."""
        if task == "classification":
            if "outputs" in section:
                self.fail(
                    f"{path}.outputs",
                    "only used with task regression; a classifier has classes",
                )
            if "classes" not in section:
                self.fail(f"{path}.classes", "required field is missing (for classification)")
            return self.integer(section["classes"], f"{path}.classes", 2)
        if "classes" in section:
            self.fail(
                f"{path}.classes",
                "only used with task classification; a regressor has outputs (default 1)",
            )
        if kind == "softmax":
            self.fail(
                f"{path}.kind",
                "softmax is a classifier; for regression use mlp, torch or custom",
            )
        return self.integer(section.get("outputs", 1), f"{path}.outputs", 1)

    def check_kind_keys(self, section: Mapping[str, Any], path: str, kind: str) -> None:
        """Refuse a field the model's kind does not use: it would be silently ignored."""
        for key, owners in _KIND_ONLY_KEYS.items():
            if key in section and kind not in owners:
                self.fail(
                    f"{path}.{key}",
                    f"only used with kind {' or '.join(owners)} (kind is {kind!r})",
                )

    def factory_and_options(
        self, section: Mapping[str, Any], path: str, kind: str
    ) -> tuple[str, dict[str, Any]]:
        """A custom or torch model's ``factory`` ("module:function": only its form is checked
        here, it is imported when the learner is built) and its ``options`` (JSON values)."""
        if "factory" not in section:
            self.fail(f"{path}.factory", f'required for kind {kind} ("module:function")')
        factory = section["factory"]
        if not isinstance(factory, str) or not _FACTORY_RE.fullmatch(factory):
            self.fail(
                f"{path}.factory",
                f'expected "module:function" (e.g. mypkg.models:build), got {shown(factory)}',
            )
        raw_options = section.get("options", {})
        if not isinstance(raw_options, Mapping):
            self.fail(f"{path}.options", f"expected a mapping, got {shown(raw_options)}")
        options: dict[str, Any] = self.json_value(raw_options, f"{path}.options")
        return factory, options

    def optimizer(self, value: object, path: str) -> dict[str, Any]:
        """``{kind: sgd | adam, momentum (sgd only, 0 <= m < 1), weight_decay >= 0}``."""
        section = self.section(value, path, ("kind", "momentum", "weight_decay"))
        kind = self.choice(section.get("kind", "sgd"), f"{path}.kind", OPTIMIZER_KINDS)
        if "momentum" in section and kind != "sgd":
            self.fail(f"{path}.momentum", f"only used with kind sgd (kind is {kind!r})")
        momentum = self.fraction(section.get("momentum", 0.0), f"{path}.momentum")
        weight_decay = self.fraction(section.get("weight_decay", 0.0), f"{path}.weight_decay")
        return {"kind": kind, "momentum": momentum, "weight_decay": weight_decay}

    def fraction(self, value: object, path: str) -> float:
        """A number in [0, 1)."""
        if isinstance(value, bool) or not isinstance(value, int | float):
            self.fail(path, f"expected a number >= 0 and < 1, got {shown(value)}")
        number = as_float(value)
        if not 0.0 <= number < 1.0:
            self.fail(path, f"expected a number >= 0 and < 1, got {shown(value)}")
        return number

    def hidden(self, value: object, path: str) -> tuple[int, ...]:
        if not isinstance(value, list) or not value:
            self.fail(
                path,
                f"expected a non-empty list of layer sizes (e.g. [64]), got {shown(value)}",
            )
        return tuple(self.integer(size, f"{path}[{i}]", 1) for i, size in enumerate(value))
