"""Reading ``peers.yaml`` safely: a size bound, UTF-8, and a YAML node tree checked
before anything is built (duplicate keys, merge keys, alias bombs, self-referencing
anchors, depth). Numbers are checked before PyYAML builds them: base 60 (YAML 1.1 reads
``1:30`` as 90, and PyYAML builds such numbers in time quadratic in their length) and
numbers longer than any setting needs are refused. Every error names the file and where
in it."""

from __future__ import annotations

import os
from typing import Any

import yaml

from p2pfl.config.fields import MAX_DEPTH, join_path
from p2pfl.errors import ConfigError

_MAX_FILE_BYTES = 1 << 20
# Bounds on what a YAML document may expand to (aliases can multiply a small file).
_MAX_YAML_NODES = 100_000
#: The longest number a peers.yaml may write (2**64 - 1 has 20 digits; a float's
#: shortest exact form at most 24 characters); refused before it is built.
_MAX_NUMBER_CHARS = 100
_INT_TAG = "tag:yaml.org,2002:int"
_FLOAT_TAG = "tag:yaml.org,2002:float"
_MERGE_TAG = "tag:yaml.org,2002:merge"


def read_yaml_file(path: str | os.PathLike[str]) -> tuple[str, object]:
    """The file's name and its YAML content (plain dicts, lists and scalars)."""
    source = os.fspath(path)
    try:
        with open(source, "rb") as handle:
            raw = handle.read(_MAX_FILE_BYTES + 1)
    except FileNotFoundError:
        raise ConfigError(source, "<file>", "file not found") from None
    except IsADirectoryError:
        raise ConfigError(source, "<file>", "is a directory, expected a YAML file") from None
    except OSError as exc:
        raise ConfigError(source, "<file>", f"cannot read the file: {exc.strerror}") from None
    if len(raw) > _MAX_FILE_BYTES:
        raise ConfigError(source, "<file>", "file is larger than 1 MiB; not a peers.yaml")
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ConfigError(
            source, "<file>", f"not valid UTF-8 text (bad byte at offset {exc.start})"
        ) from None
    return source, load_yaml(text, source)


def load_yaml(text: str, source: str) -> object:
    """``yaml.safe_load``, after a check of the node tree for what safe_load lets through.

    The node tree is composed first (no objects are constructed), which is where duplicate
    keys are still visible: PyYAML would otherwise keep the last one silently. The same
    walk bounds alias expansion and rejects self-referencing anchors; then the very same
    tree is constructed, and a value that cannot be built is a ConfigError naming its field.
    """
    try:
        return _construct(_Loader(text, source))
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        what = exc.problem or exc.context or "syntax error"
        raise ConfigError(source, "<yaml>", f"invalid YAML at {where}{what}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(source, "<yaml>", f"invalid YAML: {exc}") from None
    except RecursionError:
        raise ConfigError(source, "<yaml>", "the document is nested too deeply") from None


def _construct(loader: _Loader) -> object:
    """Compose, check, then construct that same node tree (what safe_load does, less the
    second parse)."""
    try:
        root = loader.get_single_node()
        if root is None:
            return None
        loader.paths = check_nodes(root, loader.source)
        return loader.construct_document(root)
    finally:
        loader.dispose()


class _Loader(yaml.SafeLoader):
    """``safe_load``'s loader, except that a scalar its constructors cannot build
    (``!!int abc``, a number of 5000 digits, ``2024-13-45``, ``!!timestamp x``) is a
    ConfigError naming the field and the position, not a ValueError or AttributeError."""

    def __init__(self, text: str, source: str) -> None:
        super().__init__(text)
        self.source = source
        #: Each node's field path (by id), from check_nodes.
        self.paths: dict[int, str] = {}

    def construct_object(self, node: yaml.Node, deep: bool = False) -> Any:
        try:
            return super().construct_object(node, deep)
        except ConfigError:
            raise
        except (ValueError, OverflowError, TypeError, AttributeError, KeyError) as exc:
            raise ConfigError(
                self.source, self.paths.get(id(node), "<yaml>"), _unbuildable(node, exc)
            ) from None

    def construct_yaml_int(self, node: yaml.ScalarNode) -> int:
        _check_number(node)
        return super().construct_yaml_int(node)

    def construct_yaml_float(self, node: yaml.ScalarNode) -> float:
        _check_number(node)
        return super().construct_yaml_float(node)


# (The base class registered its own functions: the overrides take effect once registered.)
_Loader.add_constructor(_INT_TAG, _Loader.construct_yaml_int)
_Loader.add_constructor(_FLOAT_TAG, _Loader.construct_yaml_float)


def _check_number(node: yaml.Node) -> None:
    """Refuse a number before PyYAML builds it if it is longer than any setting needs, or
    in base 60: ``hidden: [1:0]`` would silently be 60, and a megabyte of ``1:0:0...``
    takes PyYAML's quadratic loop some 40 s of CPU. The ValueError becomes a ConfigError
    naming the field and the line (``construct_object``)."""
    if not isinstance(node, yaml.ScalarNode):
        return  # (PyYAML refuses it with its own error)
    value = str(node.value)
    if len(value) > _MAX_NUMBER_CHARS:
        raise ValueError(f"longer than {_MAX_NUMBER_CHARS} characters")
    if ":" in value:
        raise ValueError("base-60 numbers are refused: quote it if it is text")


def _unbuildable(node: yaml.Node, exc: Exception) -> str:
    """Where a value is, what it is meant to be and (for a number or a date) why not."""
    mark = node.start_mark
    kind = str(node.tag).rsplit(":", 1)[-1]
    value = str(node.value) if isinstance(node, yaml.ScalarNode) else "the value"
    text = repr(value if len(value) <= 60 else value[:57] + "...")
    # (ValueError and OverflowError say why; the others only name an internal detail.)
    why = f" ({str(exc).split(';')[0]})" if isinstance(exc, ValueError | OverflowError) else ""
    return f"line {mark.line + 1}, column {mark.column + 1}: {text} is not a valid YAML {kind}{why}"


def check_nodes(root: yaml.Node, source: str) -> dict[int, str]:
    """Check the tree (size, self-reference, depth, duplicate keys); return each node's
    field path by id (a key's is its mapping's), for errors found while constructing."""
    budget = [_MAX_YAML_NODES]
    paths: dict[int, str] = {}

    def walk(node: yaml.Node, path: str, ancestors: frozenset[int]) -> None:
        budget[0] -= 1
        if budget[0] < 0:
            raise ConfigError(
                source, "<yaml>", f"the document expands to more than {_MAX_YAML_NODES} values"
            )
        if id(node) in ancestors:
            raise ConfigError(source, path or "<top level>", "an alias refers to itself")
        if len(ancestors) > MAX_DEPTH:
            raise ConfigError(source, path, f"nested more than {MAX_DEPTH} levels deep")
        inner = ancestors | {id(node)}
        paths.setdefault(id(node), path or "<top level>")
        if isinstance(node, yaml.MappingNode):
            seen: dict[tuple[str, str], int] = {}
            for key_node, value_node in node.value:
                if key_node.tag == _MERGE_TAG:
                    raise _merge_key(source, path, key_node)
                child = path
                paths.setdefault(id(key_node), path or "<top level>")
                if isinstance(key_node, yaml.ScalarNode):
                    key = (key_node.tag, key_node.value)
                    line = key_node.start_mark.line + 1
                    child = join_path(path, key_node.value)
                    if key in seen:
                        raise ConfigError(
                            source,
                            child,
                            f"duplicate key {key_node.value!r} (line {seen[key]} and line {line})",
                        )
                    seen[key] = line
                walk(value_node, child, inner)
        elif isinstance(node, yaml.SequenceNode):
            for index, item in enumerate(node.value):
                walk(item, f"{path}[{index}]", inner)

    walk(root, "", frozenset())
    return paths


def _merge_key(source: str, path: str, key_node: yaml.Node) -> ConfigError:
    """A merge key (``<<``) would bring in fields the duplicate-key check never sees
    (``seed: 7`` beside ``<<: {seed: 9}`` is silently one or the other): refused."""
    mark = key_node.start_mark
    return ConfigError(
        source,
        path or "<top level>",
        f"line {mark.line + 1}, column {mark.column + 1}: merge keys ('<<') are not "
        "accepted in peers.yaml; write the fields out",
    )
