"""Load and validate the shared ``peers.yaml``, and compute its canonical digest.

Every peer reads the same file, and peers compare the digest during the handshake, so
validation is strict: unknown keys, wrong types and out-of-range values are errors that
name the file, the exact field (``peers.alice.public_key``, ``training.model.hidden[1]``)
and what was expected. A typo must never fall back silently to a default, because two
peers would then run with different settings while believing they agree.
"""

from __future__ import annotations

import base64
import copy
import difflib
import hashlib
import ipaddress
import json
import math
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, NoReturn, cast, get_args

import yaml

from p2pfl.aggregate import parse_rule
from p2pfl.errors import ConfigError
from p2pfl.keys import decode_public_key
from p2pfl.learning.base import TASKS, Task
from p2pfl.privacy import DPConfig
from p2pfl.topology import TopologyConfig, TopologyKind, graph_for_round, is_connected

__all__ = [
    "AggregationConfig",
    "Config",
    "LimitsConfig",
    "ModelConfig",
    "NetConfig",
    "PeerInfo",
    "TopologyConfig",
    "TopologyKind",
    "TrainingConfig",
    "load_config",
    "parse_config",
]


SUPPORTED_VERSION = 1
MODEL_KINDS = ("softmax", "mlp", "custom", "torch")
#: ``training.model.optimizer.kind`` (torch models; the numpy models train with plain SGD).
OPTIMIZER_KINDS = ("sgd", "adam")
_TOPOLOGY_KINDS: tuple[str, ...] = get_args(TopologyKind)

_NAME_RE = re.compile(r"[A-Za-z0-9._-]{1,64}")
_ADDRESS_RE = re.compile(r"ws://(?P<host>\[[^\]]*\]|[^\[\]/:@?#\s]+):(?P<port>[0-9]{1,5})")
_HOSTNAME_RE = re.compile(
    r"(?=.{1,253}\Z)[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
    r"(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*"
)
_IDENT = r"[A-Za-z_][A-Za-z0-9_]*"
_FACTORY_RE = re.compile(rf"{_IDENT}(?:\.{_IDENT})*:{_IDENT}(?:\.{_IDENT})*")

_MAX_FILE_BYTES = 1 << 20
# Bounds on what a YAML document may expand to (aliases can multiply a small file).
_MAX_YAML_NODES = 100_000
_MAX_DEPTH = 64
# Durations above a week are almost certainly milliseconds written as seconds.
_MAX_SECONDS = 7 * 24 * 3600.0
_MAX_SEED = 2**64 - 1
_MIN_CHUNK, _MAX_CHUNK = 4096, 4 * 1024 * 1024
_MAX_BUFFERED_ROUNDS = 16
_MAX_CONNECTIONS = 65535
_TOP_LEVEL_KEYS = (
    "version",
    "network",
    "seed",
    "peers",
    "topology",
    "training",
    "aggregation",
    "limits",
    "net",
)


@dataclass(frozen=True)
class PeerInfo:
    """One roster entry; ``host`` and ``port`` are parsed from ``address`` for dialling."""

    id: str
    address: str
    public_key: bytes
    host: str
    port: int


@dataclass(frozen=True)
class ModelConfig:
    """The model every peer builds from the shared seed (hidden for mlp, factory for custom
    and torch, optimizer for torch). ``outputs`` is the number of classes (classification)
    or of regression targets."""

    kind: str
    inputs: int
    outputs: int
    hidden: tuple[int, ...]
    factory: str | None
    options: Mapping[str, Any]
    task: Task = "classification"
    #: torch only: ``{kind: sgd | adam, momentum, weight_decay}`` (empty otherwise).
    optimizer: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))

    @property
    def classes(self) -> int:
        """Number of classes of a classifier (for a regressor: its number of outputs)."""
        return self.outputs

    def as_mapping(self) -> dict[str, Any]:
        """A plain, JSON-compatible copy (for model factories and the digest).

        A classifier's mapping is exactly what it was before regression and torch models
        existed, so existing configs keep their digests (and nodes their checkpoints).
        """
        mapping: dict[str, Any] = {"kind": self.kind, "inputs": self.inputs}
        if self.task == "classification":
            mapping["classes"] = self.outputs
        else:
            mapping["task"] = self.task
            mapping["outputs"] = self.outputs
        mapping["hidden"] = list(self.hidden)
        mapping["factory"] = self.factory
        mapping["options"] = copy.deepcopy(dict(self.options))
        if self.kind == "torch":
            mapping["optimizer"] = dict(self.optimizer)
        return mapping


@dataclass(frozen=True)
class TrainingConfig:
    rounds: int
    local_epochs: int
    batch_size: int
    learning_rate: float
    round_timeout: float
    startup_timeout: float
    model: ModelConfig
    #: Features are divided by this before training and evaluation. None means "auto":
    #: the smallest power of two >= the largest |x| in the node's own training data, so
    #: pixel data (0-16, 0-255) lands in [0, 1] on every peer without configuration.
    input_scale: float | None = None


@dataclass(frozen=True)
class AggregationConfig:
    #: ``metropolis``, ``median``, ``trimmed-mean:BETA`` or ``clipped:TAU`` (normalised
    #: spelling; ``p2pfl.aggregate.parse_rule`` reads it).
    rule: str
    secure: bool
    #: Secure aggregation's fixed point: parameters are clipped to [-clip, clip] and
    #: scaled by 2**frac_bits (clip * 2**frac_bits must stay below 2**31).
    clip: float = 64.0
    frac_bits: int = 20
    #: How long an owner waits for the members' unmasking answers (REVEAL) each round.
    recovery_timeout: float = 5.0
    #: Secure aggregation's sharing threshold, as a fraction f of a group's n members:
    #: t = floor(f * n) + 1 shares rebuild a secret. n - t dropouts are tolerated; an owner
    #: colluding with fewer than 2t - n members cannot make members reveal both secrets of
    #: anyone (0.5, a strict majority, stops an owner lying alone).
    threshold: float = 0.5
    #: Differential privacy of every peer's updates (None: off).
    dp: DPConfig | None = None


@dataclass(frozen=True)
class LimitsConfig:
    """Resource bounds; ``max_connections`` 0 means derived from the topology."""

    max_buffered_rounds: int = 2
    chunk_bytes: int = 262144
    max_connections: int = 0
    handshake_timeout: float = 5.0


@dataclass(frozen=True)
class NetConfig:
    heartbeat_interval: float = 2.0
    heartbeat_timeout: float = 10.0
    reconnect_min: float = 0.05
    reconnect_max: float = 5.0
    #: A neighbour without a connection for this long is not waited for in a round (it
    #: crashed or left); it is welcome again as soon as it reconnects.
    down_grace: float = 2.0


@dataclass(frozen=True)
class Config:
    """A validated ``peers.yaml``. ``digest`` is SHA-256 of its canonical JSON form."""

    source: str
    version: int
    network: str
    seed: int
    peers: Mapping[str, PeerInfo]
    topology: TopologyConfig
    training: TrainingConfig
    aggregation: AggregationConfig
    limits: LimitsConfig
    net: NetConfig
    digest: bytes = field(repr=False)

    @property
    def peer_ids(self) -> tuple[str, ...]:
        """All peer ids, sorted (the order every peer uses for shared decisions)."""
        return tuple(sorted(self.peers))

    @property
    def digest_hex(self) -> str:
        """Short digest for logs and error messages (the full digest is compared)."""
        return self.digest.hex()[:16]

    def as_mapping(self) -> dict[str, Any]:
        """The normalised shared configuration that the digest covers."""
        return _shared_mapping(
            version=self.version,
            network=self.network,
            seed=self.seed,
            peers=self.peers,
            topology=self.topology,
            training=self.training,
            aggregation=self.aggregation,
            limits=self.limits,
            net=self.net,
        )


def load_config(path: str | os.PathLike[str]) -> Config:
    """Read, parse and validate a ``peers.yaml`` file."""
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
    return parse_config(_load_yaml(text, source), source)


def parse_config(data: object, source: str) -> Config:
    """Validate already-loaded YAML data (plain dicts, lists and scalars) into a Config."""
    p = _Parser(source)
    return p.config(data)


# ---------------------------------------------------------------------------- YAML


def _load_yaml(text: str, source: str) -> object:
    """``yaml.safe_load``, after a check of the node tree for what safe_load lets through.

    ``yaml.compose`` builds only the node tree (no objects are constructed), which is
    where duplicate keys are still visible: PyYAML would otherwise keep the last one
    silently. The same walk bounds alias expansion and rejects self-referencing anchors.
    """
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
        if root is not None:
            _check_nodes(root, source)
        return yaml.safe_load(text)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        what = exc.problem or exc.context or "syntax error"
        raise ConfigError(source, "<yaml>", f"invalid YAML at {where}{what}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(source, "<yaml>", f"invalid YAML: {exc}") from None
    except RecursionError:
        raise ConfigError(source, "<yaml>", "the document is nested too deeply") from None


def _check_nodes(root: yaml.Node, source: str) -> None:
    budget = [_MAX_YAML_NODES]

    def walk(node: yaml.Node, path: str, ancestors: frozenset[int]) -> None:
        budget[0] -= 1
        if budget[0] < 0:
            raise ConfigError(
                source, "<yaml>", f"the document expands to more than {_MAX_YAML_NODES} values"
            )
        if id(node) in ancestors:
            raise ConfigError(source, path or "<top level>", "an alias refers to itself")
        if len(ancestors) > _MAX_DEPTH:
            raise ConfigError(source, path, f"nested more than {_MAX_DEPTH} levels deep")
        inner = ancestors | {id(node)}
        if isinstance(node, yaml.MappingNode):
            seen: dict[tuple[str, str], int] = {}
            for key_node, value_node in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    walk(value_node, path, inner)
                    continue
                child = path
                if isinstance(key_node, yaml.ScalarNode):
                    key = (key_node.tag, key_node.value)
                    line = key_node.start_mark.line + 1
                    child = _join(path, key_node.value)
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


# ----------------------------------------------------------------------- validation


def _join(path: str, key: object) -> str:
    return f"{path}.{key}" if path else str(key)


def _or_empty(value: object) -> object:
    return {} if value is None else value


def _show(value: object) -> str:
    """How a wrong value is quoted back to the operator."""
    if isinstance(value, bool):
        return f"{str(value).lower()} (a boolean)"
    if value is None:
        return "nothing (an empty or null value)"
    if isinstance(value, str):
        text = value if len(value) <= 60 else value[:57] + "..."
        return repr(text)
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, Mapping):
        return "a mapping"
    if isinstance(value, list | tuple):
        if not value:
            return "an empty list"
        return f"a list of {len(value)} item{'s' if len(value) != 1 else ''}"
    return f"a value of type {type(value).__name__}"


def _number_hint(value: object) -> str:
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


class _Parser:
    """Validates one document; every error carries the source and the field path."""

    def __init__(self, source: str) -> None:
        self.source = source

    def fail(self, path: str, problem: str) -> NoReturn:
        raise ConfigError(self.source, path or "<top level>", problem)

    # -- primitives

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
            self.fail(path, f"expected {expected}, got {_show(value)}")
        result: dict[str, Any] = {}
        for key, item in value.items():
            if not isinstance(key, str):
                self.fail(
                    _join(path, key),
                    f"keys must be text, got {_show(key)} (quote it if it is meant as a name)",
                )
            if key not in allowed:
                close = difflib.get_close_matches(key, allowed, n=1)
                hint = f"did you mean {close[0]!r}? " if close else ""
                self.fail(
                    _join(path, key),
                    f"unknown key; {hint}expected one of: {', '.join(allowed)}",
                )
            result[key] = item
        for key in required:
            if key not in result:
                self.fail(_join(path, key), "required field is missing")
        return result

    def integer(self, value: object, path: str, low: int, high: int | None = None) -> int:
        expected = (
            f"an integer >= {low}" if high is None else f"an integer between {low} and {high}"
        )
        if isinstance(value, bool) or not isinstance(value, int):
            self.fail(path, f"expected {expected}, got {_show(value)}{_number_hint(value)}")
        if value < low or (high is not None and value > high):
            self.fail(path, f"expected {expected}, got {value}")
        return value

    def positive(
        self, value: object, path: str, high: float | None = None, what: str = "a number"
    ) -> float:
        """A finite number > 0 (integers accepted and stored as float)."""
        expected = f"{what} > 0" if high is None else f"{what} > 0 and <= {high:g}"
        if isinstance(value, bool) or not isinstance(value, int | float):
            self.fail(path, f"expected {expected}, got {_show(value)}{_number_hint(value)}")
        number = float(value)
        if not math.isfinite(number) or number <= 0 or (high is not None and number > high):
            self.fail(path, f"expected {expected}, got {value!r}")
        return number

    def seconds(self, value: object, path: str) -> float:
        """A duration in seconds, at most a week (larger is probably milliseconds)."""
        return self.positive(value, path, _MAX_SECONDS, "a number of seconds")

    def boolean(self, value: object, path: str) -> bool:
        if not isinstance(value, bool):
            self.fail(path, f"expected true or false, got {_show(value)}")
        return value

    def choice(self, value: object, path: str, choices: Sequence[str]) -> str:
        if not isinstance(value, str) or value not in choices:
            self.fail(path, f"expected one of: {', '.join(choices)}; got {_show(value)}")
        return value

    def name(self, value: object, path: str, what: str) -> str:
        expected = f"{what} of 1-64 characters from A-Z a-z 0-9 . _ -"
        if not isinstance(value, str):
            hint = " (quote it if it looks like a number)" if isinstance(value, int) else ""
            self.fail(path, f"expected {expected}, got {_show(value)}{hint}")
        if value in {".", ".."}:
            self.fail(path, f"expected {expected}, but not '.' or '..'; got {_show(value)}")
        if not _NAME_RE.fullmatch(value):
            self.fail(path, f"expected {expected}, got {_show(value)}")
        return value

    def json_value(self, value: object, path: str, depth: int = 0) -> Any:
        """A deep copy restricted to what JSON can express (the digest is canonical JSON)."""
        if depth > _MAX_DEPTH:
            self.fail(path, f"nested more than {_MAX_DEPTH} levels deep")
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
                    self.fail(_join(path, key), f"keys must be text, got {_show(key)}")
                result[key] = self.json_value(item, _join(path, key), depth + 1)
            return result
        self.fail(
            path,
            f"expected text, a number, true/false, null, a list or a mapping, got {_show(value)}",
        )

    # -- document

    def config(self, data: object) -> Config:
        expected = "a mapping with version, network, seed, peers and training"
        if data is None:
            self.fail("", f"the file is empty; expected {expected}")
        if not isinstance(data, Mapping):
            self.fail("", f"expected {expected}, got {_show(data)}")
        if "version" not in data:
            self.fail("version", f"required field is missing; expected {SUPPORTED_VERSION}")
        # The version is checked before anything else: a file written for a newer p2pfl
        # should say so, not fail on keys this version does not know.
        version = data["version"]
        if isinstance(version, bool) or not isinstance(version, int):
            self.fail("version", f"expected the integer {SUPPORTED_VERSION}, got {_show(version)}")
        if version != SUPPORTED_VERSION:
            self.fail(
                "version",
                f"unsupported version {version}; this p2pfl reads version {SUPPORTED_VERSION}",
            )
        root = self.section(data, "", _TOP_LEVEL_KEYS, ("network", "seed", "peers", "training"))
        network = self.name(root["network"], "network", "a network name")
        seed = self.integer(root["seed"], "seed", 0, _MAX_SEED)
        peers = self.peers(root["peers"])
        topology = self.topology(root.get("topology", {"kind": "full"}), tuple(peers))
        self.check_graph(topology, tuple(peers), seed)
        training = self.training(root["training"])
        # An optional section left empty (every line below it commented out) means defaults.
        aggregation = self.aggregation(_or_empty(root.get("aggregation")))
        limits = self.limits(_or_empty(root.get("limits")))
        net = self.net(_or_empty(root.get("net")))
        shared = _shared_mapping(
            version=SUPPORTED_VERSION,
            network=network,
            seed=seed,
            peers=peers,
            topology=topology,
            training=training,
            aggregation=aggregation,
            limits=limits,
            net=net,
        )
        return Config(
            source=self.source,
            version=SUPPORTED_VERSION,
            network=network,
            seed=seed,
            peers=MappingProxyType(peers),
            topology=topology,
            training=training,
            aggregation=aggregation,
            limits=limits,
            net=net,
            digest=_digest(shared),
        )

    def peers(self, value: object) -> dict[str, PeerInfo]:
        expected = "a mapping of peer id to {address, public_key}"
        if not isinstance(value, Mapping):
            self.fail("peers", f"expected {expected}, got {_show(value)}")
        found: dict[str, PeerInfo] = {}
        for raw_id in value:
            peer_id = self.name(raw_id, _join("peers", raw_id), "a peer id")
            path = _join("peers", peer_id)
            entry = self.section(
                value[raw_id],
                path,
                ("address", "public_key"),
                ("address", "public_key"),
                expected="a mapping {address: ws://HOST:PORT, public_key: BASE64}",
            )
            host, port, address = self.address(entry["address"], _join(path, "address"))
            key = self.public_key(entry["public_key"], _join(path, "public_key"))
            found[peer_id] = PeerInfo(peer_id, address, key, host, port)
        if len(found) < 2:
            self.fail("peers", f"expected at least 2 peers, got {len(found)}")
        ordered = {peer_id: found[peer_id] for peer_id in sorted(found)}
        by_address: dict[str, str] = {}
        by_key: dict[bytes, str] = {}
        for peer_id, peer in ordered.items():
            path = _join("peers", peer_id)
            if peer.address in by_address:
                self.fail(
                    _join(path, "address"),
                    f"{peer.address} is already the address of peer {by_address[peer.address]!r};"
                    " every peer needs its own address",
                )
            if peer.public_key in by_key:
                self.fail(
                    _join(path, "public_key"),
                    f"same public key as peer {by_key[peer.public_key]!r};"
                    " every peer needs its own key pair (`p2pfl keygen`)",
                )
            by_address[peer.address] = peer_id
            by_key[peer.public_key] = peer_id
        return ordered

    def address(self, value: object, path: str) -> tuple[str, int, str]:
        """(host, port, normalised address) from ``ws://HOST:PORT``."""
        expected = "an address of the form ws://HOST:PORT (for example ws://10.1.0.11:7070)"
        if not isinstance(value, str):
            self.fail(path, f"expected {expected}, got {_show(value)}")
        match = _ADDRESS_RE.fullmatch(value)
        if match is None:
            self.fail(path, f"expected {expected}, got {_show(value)}")
        host_text, port = match["host"], int(match["port"])
        if not 1 <= port <= 65535:
            self.fail(path, f"port must be between 1 and 65535, got {port}")
        if host_text.startswith("["):
            try:
                host = ipaddress.IPv6Address(host_text[1:-1]).compressed
            except ValueError:
                self.fail(path, f"{host_text} is not a valid IPv6 address")
            return host, port, f"ws://[{host}]:{port}"
        if re.fullmatch(r"[0-9.]+", host_text):
            try:
                host = str(ipaddress.IPv4Address(host_text))
            except ValueError:
                self.fail(path, f"{host_text!r} is not a valid IPv4 address")
        elif _HOSTNAME_RE.fullmatch(host_text):
            host = host_text.lower()
        else:
            self.fail(path, f"{host_text!r} is not a valid host name or IP address")
        return host, port, f"ws://{host}:{port}"

    def public_key(self, value: object, path: str) -> bytes:
        expected = "the base64 X25519 public key printed by `p2pfl keygen` (44 characters)"
        if not isinstance(value, str):
            self.fail(path, f"expected {expected}, got {_show(value)}")
        try:
            return decode_public_key(value)
        except ValueError as exc:
            self.fail(path, f"expected {expected}, got {_show(value)}: {exc}")

    def topology(self, value: object, ids: tuple[str, ...]) -> TopologyConfig:
        section = self.section(
            value, "topology", ("kind", "degree", "edges", "resample_every"), ("kind",)
        )
        kind = cast(TopologyKind, self.choice(section["kind"], "topology.kind", _TOPOLOGY_KINDS))
        n = len(ids)
        degree: int | None = None
        edges: tuple[tuple[str, str], ...] = ()
        if "degree" in section and kind != "k-regular":
            self.fail("topology.degree", f"only used with kind k-regular (kind is {kind!r})")
        if "edges" in section and kind != "explicit":
            self.fail("topology.edges", f"only used with kind explicit (kind is {kind!r})")
        if kind == "k-regular":
            if "degree" not in section:
                self.fail("topology.degree", "required for kind k-regular")
            degree = self.integer(section["degree"], "topology.degree", 1, n - 1)
            if (n * degree) % 2:
                self.fail(
                    "topology.degree",
                    f"no {degree}-regular graph on {n} peers exists:"
                    f" peers x degree must be even, got {n} x {degree}",
                )
        if kind == "explicit":
            if "edges" not in section:
                self.fail("topology.edges", "required for kind explicit")
            edges = self.edges(section["edges"], ids)
        resample_every = self.integer(
            section.get("resample_every", 0), "topology.resample_every", 0
        )
        if resample_every and kind != "k-regular":
            self.fail(
                "topology.resample_every",
                f"resampling only applies to kind k-regular (kind is {kind!r}); use 0 or remove it",
            )
        return TopologyConfig(kind, degree, edges, resample_every)

    def edges(self, value: object, ids: tuple[str, ...]) -> tuple[tuple[str, str], ...]:
        if not isinstance(value, list):
            self.fail(
                "topology.edges", f"expected a list of [peer, peer] pairs, got {_show(value)}"
            )
        known = set(ids)
        first_seen: dict[tuple[str, str], int] = {}
        for index, pair in enumerate(value):
            path = f"topology.edges[{index}]"
            if not isinstance(pair, list) or len(pair) != 2:
                self.fail(path, f"expected a pair [peer, peer], got {_show(pair)}")
            for end, peer in enumerate(pair):
                if not isinstance(peer, str) or peer not in known:
                    self.fail(
                        f"{path}[{end}]",
                        f"expected a peer id from peers ({', '.join(ids)}), got {_show(peer)}",
                    )
            a, b = sorted(cast(list[str], pair))
            if a == b:
                self.fail(path, f"self loop {a!r} -> {b!r}; an edge joins two different peers")
            if (a, b) in first_seen:
                self.fail(path, f"duplicate of topology.edges[{first_seen[(a, b)]}]")
            first_seen[(a, b)] = index
        return tuple(sorted(first_seen))

    def check_graph(self, topology: TopologyConfig, ids: tuple[str, ...], seed: int) -> None:
        """The graph must be connected, or the model could never reach consensus."""
        try:
            graph = graph_for_round(topology, ids, seed, 0)
        except ValueError as exc:
            self.fail("topology", str(exc))
        if not is_connected(graph):
            start = ids[0]
            reach = {start}
            frontier = [start]
            while frontier:
                for other in graph[frontier.pop()]:
                    if other not in reach:
                        reach.add(other)
                        frontier.append(other)
            cut_off = sorted(set(ids) - reach)
            self.fail(
                "topology",
                f"the graph is not connected: {', '.join(cut_off)} cannot reach"
                f" {', '.join(sorted(reach))}; add edges so every peer can reach every other",
            )

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
                "training.input_scale", f'expected "auto" or a number > 0, got {_show(value)}'
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
                    f'expected "module:function" (e.g. mypkg.models:build), got {_show(factory)}',
                )
            raw_options = section.get("options", {})
            if not isinstance(raw_options, Mapping):
                self.fail(f"{path}.options", f"expected a mapping, got {_show(raw_options)}")
            options = self.json_value(raw_options, f"{path}.options")
        if kind == "torch":
            optimizer = self.optimizer(_or_empty(section.get("optimizer")), f"{path}.optimizer")
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
            self.fail(path, f"expected a number >= 0 and < 1, got {_show(value)}")
        number = float(value)
        if not 0.0 <= number < 1.0:
            self.fail(path, f"expected a number >= 0 and < 1, got {value!r}")
        return number

    def hidden(self, value: object, path: str) -> tuple[int, ...]:
        if not isinstance(value, list) or not value:
            self.fail(
                path, f"expected a non-empty list of layer sizes (e.g. [64]), got {_show(value)}"
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
            self.fail("aggregation.rule", f"expected a rule name, got {_show(raw_rule)}")
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


# --------------------------------------------------------------------------- digest


def _shared_mapping(
    *,
    version: int,
    network: str,
    seed: int,
    peers: Mapping[str, PeerInfo],
    topology: TopologyConfig,
    training: TrainingConfig,
    aggregation: AggregationConfig,
    limits: LimitsConfig,
    net: NetConfig,
) -> dict[str, Any]:
    """The normalised shared configuration: defaults filled in, one spelling per value."""
    return {
        "version": version,
        "network": network,
        "seed": seed,
        "peers": {
            peer_id: {
                "address": peer.address,
                "public_key": base64.b64encode(peer.public_key).decode("ascii"),
            }
            for peer_id, peer in sorted(peers.items())
        },
        "topology": {
            "kind": topology.kind,
            "degree": topology.degree,
            "edges": [list(edge) for edge in sorted(topology.edges)],
            "resample_every": topology.resample_every,
        },
        "training": {
            "rounds": training.rounds,
            "local_epochs": training.local_epochs,
            "batch_size": training.batch_size,
            "learning_rate": training.learning_rate,
            "round_timeout": training.round_timeout,
            "startup_timeout": training.startup_timeout,
            "input_scale": "auto" if training.input_scale is None else training.input_scale,
            "model": training.model.as_mapping(),
        },
        "aggregation": {
            "rule": aggregation.rule,
            "secure": aggregation.secure,
            "clip": aggregation.clip,
            "frac_bits": aggregation.frac_bits,
            "recovery_timeout": aggregation.recovery_timeout,
            "threshold": aggregation.threshold,
            "dp": None
            if aggregation.dp is None
            else {
                "clip_norm": aggregation.dp.clip_norm,
                "noise_multiplier": aggregation.dp.noise_multiplier,
                "delta": aggregation.dp.delta,
            },
        },
        "limits": {
            "max_buffered_rounds": limits.max_buffered_rounds,
            "chunk_bytes": limits.chunk_bytes,
            "max_connections": limits.max_connections,
            "handshake_timeout": limits.handshake_timeout,
        },
        "net": {
            "heartbeat_interval": net.heartbeat_interval,
            "heartbeat_timeout": net.heartbeat_timeout,
            "reconnect_min": net.reconnect_min,
            "reconnect_max": net.reconnect_max,
        },
    }


def _digest(shared: Mapping[str, Any]) -> bytes:
    canonical = json.dumps(
        shared, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False
    )
    return hashlib.sha256(canonical.encode("ascii")).digest()
