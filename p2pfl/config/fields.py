"""Typed readers for the fields of ``peers.yaml``, each error naming the file, the exact
field (``peers.alice.public_key``, ``training.model.hidden[1]``) and what was expected.

A typo must never fall back silently to a default: two peers would then run with
different settings while believing they agree. So a section refuses unknown keys (with
a did-you-mean), numbers refuse text and booleans, and durations have an upper bound.
"""

from __future__ import annotations

import difflib
import math
import re
from collections.abc import Mapping, Sequence
from typing import Any, NoReturn

from p2pfl.errors import ConfigError

NAME_RE = re.compile(r"[A-Za-z0-9._-]{1,64}")
MAX_DEPTH = 64
# Durations above a week are almost certainly milliseconds written as seconds.
_MAX_SECONDS = 7 * 24 * 3600.0


#: Integers beyond this many bits are quoted by their length: Python refuses to print an
#: integer of more than 4300 digits, and no setting needs one of more than 60.
_SHOWN_INT_BITS = 200
#: The largest integer a field takes when it names no bound of its own.
_MAX_INT = 2**63 - 1


def join_path(path: str, key: object) -> str:
    text = shown(key) if isinstance(key, int) and _huge(key) else str(key)
    return f"{path}.{text}" if path else text


def _huge(value: int) -> bool:
    return value.bit_length() > _SHOWN_INT_BITS


def or_empty(value: object) -> object:
    return {} if value is None else value


def shown(value: object) -> str:
    """How a wrong value is quoted back to the operator."""
    if isinstance(value, bool):
        return f"{str(value).lower()} (a boolean)"
    if value is None:
        return "nothing (an empty or null value)"
    if isinstance(value, str):
        text = value if len(value) <= 60 else value[:57] + "..."
        return repr(text)
    if isinstance(value, int) and _huge(value):
        digits = int(value.bit_length() * math.log10(2)) + 1
        return f"an integer of about {digits} digits"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, Mapping):
        return "a mapping"
    if isinstance(value, list | tuple):
        if not value:
            return "an empty list"
        return f"a list of {len(value)} item{'s' if len(value) != 1 else ''}"
    return f"a value of type {type(value).__name__}"


def number_hint(value: object) -> str:
    """Explain numbers that arrived as text, the usual cause being quotes or YAML 1.1.

    PyYAML follows YAML 1.1, which reads an exponent without a decimal point (``1e-3``)
    as a string; a bare type error would leave the operator puzzled.
    """
    if not isinstance(value, str):
        return ""
    try:
        float(value)
    except ValueError:
        return ""
    if "e" in value.lower() and "." not in value:
        return (
            " (text: YAML reads an exponent without a decimal point as text; write 0.001 or 1.0e-3)"
        )
    return " (text, not a number: remove the quotes)"


def as_float(value: int | float) -> float:
    """``float(value)``, an integer too large for a float becoming infinity (which every
    reader refuses, as it does 1e400) instead of an OverflowError."""
    try:
        return float(value)
    except OverflowError:
        return math.inf if value > 0 else -math.inf


class FieldReader:
    """Reads the fields of one document; every error carries the source and the field path."""

    def __init__(self, source: str) -> None:
        self.source = source

    def fail(self, path: str, problem: str) -> NoReturn:
        raise ConfigError(self.source, path or "<top level>", problem)

    def section(
        self,
        value: object,
        path: str,
        allowed: Sequence[str],
        required: Sequence[str] = (),
        expected: str = "a mapping",
    ) -> dict[str, Any]:
        """A mapping with string keys, no unknown keys and all required keys present."""
        if not isinstance(value, Mapping):
            self.fail(path, f"expected {expected}, got {shown(value)}")
        result: dict[str, Any] = {}
        for key, item in value.items():
            if not isinstance(key, str):
                self.fail(
                    join_path(path, key),
                    f"keys must be text, got {shown(key)} (quote it if it is meant as a name)",
                )
            if key not in allowed:
                close = difflib.get_close_matches(key, allowed, n=1)
                hint = f"did you mean {close[0]!r}? " if close else ""
                self.fail(
                    join_path(path, key),
                    f"unknown key; {hint}expected one of: {', '.join(allowed)}",
                )
            result[key] = item
        for key in required:
            if key not in result:
                self.fail(join_path(path, key), "required field is missing")
        return result

    def integer(self, value: object, path: str, low: int, high: int | None = None) -> int:
        expected = (
            f"an integer >= {low}" if high is None else f"an integer between {low} and {high}"
        )
        if isinstance(value, bool) or not isinstance(value, int):
            self.fail(path, f"expected {expected}, got {shown(value)}{number_hint(value)}")
        if value < low or (high is not None and value > high):
            self.fail(path, f"expected {expected}, got {shown(value)}")
        if high is None and value > _MAX_INT:  # (the digest's JSON must print it)
            self.fail(path, f"expected {expected} and at most 2**63 - 1, got {shown(value)}")
        return value

    def positive(
        self, value: object, path: str, high: float | None = None, what: str = "a number"
    ) -> float:
        """A finite number > 0 (integers accepted and stored as float)."""
        expected = f"{what} > 0" if high is None else f"{what} > 0 and <= {high:g}"
        if isinstance(value, bool) or not isinstance(value, int | float):
            self.fail(path, f"expected {expected}, got {shown(value)}{number_hint(value)}")
        number = as_float(value)
        if not math.isfinite(number) or number <= 0 or (high is not None and number > high):
            self.fail(path, f"expected {expected}, got {shown(value)}")
        return number

    def seconds(self, value: object, path: str) -> float:
        """A duration in seconds, at most a week (larger is probably milliseconds)."""
        return self.positive(value, path, _MAX_SECONDS, "a number of seconds")

    def boolean(self, value: object, path: str) -> bool:
        if not isinstance(value, bool):
            self.fail(path, f"expected true or false, got {shown(value)}")
        return value

    def choice(self, value: object, path: str, choices: Sequence[str]) -> str:
        if not isinstance(value, str) or value not in choices:
            self.fail(path, f"expected one of: {', '.join(choices)}; got {shown(value)}")
        return value

    def name(self, value: object, path: str, what: str) -> str:
        expected = f"{what} of 1-64 characters from A-Z a-z 0-9 . _ -"
        if not isinstance(value, str):
            hint = " (quote it if it looks like a number)" if isinstance(value, int) else ""
            self.fail(path, f"expected {expected}, got {shown(value)}{hint}")
        if value in {".", ".."}:
            self.fail(path, f"expected {expected}, but not '.' or '..'; got {shown(value)}")
        if not NAME_RE.fullmatch(value):
            self.fail(path, f"expected {expected}, got {shown(value)}")
        return value

    def json_value(self, value: object, path: str, depth: int = 0) -> Any:
        """A deep copy restricted to what JSON can express (the digest is canonical JSON)."""
        if depth > MAX_DEPTH:
            self.fail(path, f"nested more than {MAX_DEPTH} levels deep")
        if isinstance(value, int) and not isinstance(value, bool) and _huge(value):
            # The digest is canonical JSON: no integer it could not print.
            self.fail(path, f"expected a number of at most 60 digits, got {shown(value)}")
        if value is None or isinstance(value, bool | int | str):
            return value
        if isinstance(value, float):
            if not math.isfinite(value):
                self.fail(path, f"expected a finite number, got {value!r}")
            return value
        if isinstance(value, list | tuple):
            return [self.json_value(v, f"{path}[{i}]", depth + 1) for i, v in enumerate(value)]
        if isinstance(value, Mapping):
            result: dict[str, Any] = {}
            for key, item in value.items():
                if not isinstance(key, str):
                    self.fail(join_path(path, key), f"keys must be text, got {shown(key)}")
                result[key] = self.json_value(item, join_path(path, key), depth + 1)
            return result
        self.fail(
            path,
            f"expected text, a number, true/false, null, a list or a mapping, got {shown(value)}",
        )
