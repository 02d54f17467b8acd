"""The ``training``, ``aggregation``, ``limits`` and ``net`` sections: the model and how
it is trained, how models are combined (plain rules, secure aggregation, differential
privacy), and the resource bounds and timers of a node."""

from __future__ import annotations

import re
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any, cast

from p2pfl.aggregate import parse_rule
from p2pfl.config_fields import FieldReader, or_empty, shown
from p2pfl.config_types import (
    MODEL_KINDS,
    OPTIMIZER_KINDS,
    AggregationConfig,
    LimitsConfig,
    ModelConfig,
    NetConfig,
    TrainingConfig,
)
from p2pfl.learning.base import TASKS, Task
from p2pfl.privacy import DPConfig

_IDENT = r"[A-Za-z_][A-Za-z0-9_]*"
_FACTORY_RE = re.compile(rf"{_IDENT}(?:\.{_IDENT})*:{_IDENT}(?:\.{_IDENT})*")
_MIN_CHUNK, _MAX_CHUNK = 4096, 4 * 1024 * 1024
_MAX_BUFFERED_ROUNDS = 16
_MAX_CONNECTIONS = 65535


class TrainingReader(FieldReader):
    """The model, training, aggregation, limits and net sections."""

    def training(self, value: object) -> TrainingConfig:
        keys = (
            "rounds",
            "local_epochs",
            "batch_size",
            "learning_rate",
            "round_timeout",
            "startup_timeout",
            "input_scale",
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
        )

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
        section = self.section(
            value,
            path,
            (
                "kind",
                "task",
                "inputs",
                "classes",
                "outputs",
                "hidden",
                "factory",
                "options",
                "optimizer",
            ),
            ("kind", "inputs"),
        )
        kind = self.choice(section["kind"], f"{path}.kind", MODEL_KINDS)
        task = cast(Task, self.choice(section.get("task", "classification"), f"{path}.task", TASKS))
        inputs = self.integer(section["inputs"], f"{path}.inputs", 1)
        if task == "classification":
            if "outputs" in section:
                self.fail(
                    f"{path}.outputs",
                    "only used with task regression; a classifier has classes",
                )
            if "classes" not in section:
                self.fail(f"{path}.classes", "required field is missing (for classification)")
            outputs = self.integer(section["classes"], f"{path}.classes", 2)
        else:
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
            outputs = self.integer(section.get("outputs", 1), f"{path}.outputs", 1)
        only: dict[str, tuple[str, ...]] = {
            "hidden": ("mlp",),
            "factory": ("custom", "torch"),
            "options": ("custom", "torch"),
            "optimizer": ("torch",),
        }
        for key, owners in only.items():
            if key in section and kind not in owners:
                self.fail(
                    f"{path}.{key}",
                    f"only used with kind {' or '.join(owners)} (kind is {kind!r})",
                )
        hidden: tuple[int, ...] = ()
        factory: str | None = None
        options: dict[str, Any] = {}
        optimizer: dict[str, Any] = {}
        if kind == "mlp":
            hidden = self.hidden(section.get("hidden", [64]), f"{path}.hidden")
        if kind in ("custom", "torch"):
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
            options = self.json_value(raw_options, f"{path}.options")
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
        number = float(value)
        if not 0.0 <= number < 1.0:
            self.fail(path, f"expected a number >= 0 and < 1, got {value!r}")
        return number

    def hidden(self, value: object, path: str) -> tuple[int, ...]:
        if not isinstance(value, list) or not value:
            self.fail(
                path,
                f"expected a non-empty list of layer sizes (e.g. [64]), got {shown(value)}",
            )
        return tuple(self.integer(size, f"{path}[{i}]", 1) for i, size in enumerate(value))

    def aggregation(self, value: object) -> AggregationConfig:
        section = self.section(
            value,
            "aggregation",
            ("rule", "secure", "clip", "frac_bits", "recovery_timeout", "threshold", "dp"),
        )
        raw_rule = section.get("rule", "metropolis")
        if not isinstance(raw_rule, str):
            self.fail("aggregation.rule", f"expected a rule name, got {shown(raw_rule)}")
        try:
            parsed_rule = parse_rule(raw_rule)
        except ValueError as exc:
            self.fail("aggregation.rule", str(exc))
        rule = str(parsed_rule)
        secure = self.boolean(section.get("secure", False), "aggregation.secure")
        if secure and parsed_rule.robust:
            self.fail(
                "aggregation.rule",
                f"{rule} cannot be combined with secure: true: with secure aggregation a "
                "node only ever sees the masked sum of its neighbourhood, never the single "
                "vectors a robust rule compares; use rule metropolis with secure aggregation, "
                "or secure: false with a robust rule",
            )
        d = AggregationConfig(rule, secure)
        clip = self.positive(section.get("clip", d.clip), "aggregation.clip", 2.0**30, "a number")
        frac_bits = self.integer(
            section.get("frac_bits", d.frac_bits), "aggregation.frac_bits", 1, 30
        )
        if clip * 2.0**frac_bits > 2.0**30:
            self.fail(
                "aggregation.clip",
                f"clip * 2**frac_bits must be at most 2**30 (sums are signed 32-bit "
                f"integers, every term rounded on its own); "
                f"{clip:g} * 2**{frac_bits} is {clip * 2.0**frac_bits:.3g}: "
                "lower clip or frac_bits",
            )
        recovery_timeout = self.seconds(
            section.get("recovery_timeout", d.recovery_timeout), "aggregation.recovery_timeout"
        )
        threshold = self.positive(
            section.get("threshold", d.threshold), "aggregation.threshold", 1.0, "a fraction"
        )
        if not 0.5 <= threshold < 1.0:
            self.fail(
                "aggregation.threshold",
                f"expected a fraction >= 0.5 and < 1 (0.5: a strict majority of a group's "
                f"members rebuilds a secret), got {threshold:g}",
            )
        dp = self.dp(section["dp"]) if section.get("dp") is not None else None
        return AggregationConfig(
            rule, secure, clip, frac_bits, recovery_timeout, dp=dp, threshold=threshold
        )

    def dp(self, value: object) -> DPConfig:
        keys = ("clip_norm", "noise_multiplier", "delta")
        section = self.section(value, "aggregation.dp", keys, keys)
        clip_norm = self.positive(section["clip_norm"], "aggregation.dp.clip_norm")
        noise = self.positive(section["noise_multiplier"], "aggregation.dp.noise_multiplier")
        delta = self.positive(section["delta"], "aggregation.dp.delta", 0.5)
        return DPConfig(clip_norm, noise, delta)

    def limits(self, value: object) -> LimitsConfig:
        d = LimitsConfig()
        section = self.section(
            value,
            "limits",
            ("max_buffered_rounds", "chunk_bytes", "max_connections", "handshake_timeout"),
        )
        return LimitsConfig(
            max_buffered_rounds=self.integer(
                section.get("max_buffered_rounds", d.max_buffered_rounds),
                "limits.max_buffered_rounds",
                0,
                _MAX_BUFFERED_ROUNDS,
            ),
            chunk_bytes=self.integer(
                section.get("chunk_bytes", d.chunk_bytes),
                "limits.chunk_bytes",
                _MIN_CHUNK,
                _MAX_CHUNK,
            ),
            max_connections=self.integer(
                section.get("max_connections", d.max_connections),
                "limits.max_connections",
                0,
                _MAX_CONNECTIONS,
            ),
            handshake_timeout=self.seconds(
                section.get("handshake_timeout", d.handshake_timeout), "limits.handshake_timeout"
            ),
        )

    def net(self, value: object) -> NetConfig:
        d = NetConfig()
        section = self.section(
            value,
            "net",
            (
                "heartbeat_interval",
                "heartbeat_timeout",
                "reconnect_min",
                "reconnect_max",
                "down_grace",
            ),
        )

        def get(key: str, default: float) -> float:
            return self.seconds(section.get(key, default), f"net.{key}")

        result = NetConfig(
            heartbeat_interval=get("heartbeat_interval", d.heartbeat_interval),
            heartbeat_timeout=get("heartbeat_timeout", d.heartbeat_timeout),
            reconnect_min=get("reconnect_min", d.reconnect_min),
            reconnect_max=get("reconnect_max", d.reconnect_max),
            down_grace=get("down_grace", d.down_grace),
        )
        if result.heartbeat_timeout <= result.heartbeat_interval:
            self.fail(
                "net.heartbeat_timeout",
                f"must be greater than heartbeat_interval ({result.heartbeat_interval:g}),"
                f" got {result.heartbeat_timeout:g}",
            )
        if result.reconnect_min > result.reconnect_max:
            self.fail(
                "net.reconnect_max",
                f"must be >= reconnect_min ({result.reconnect_min:g}),"
                f" got {result.reconnect_max:g}",
            )
        return result
