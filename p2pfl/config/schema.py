"""The validated configuration's types, and the canonical digest of its shared part.

Peers compare the digest during the handshake: two peers whose ``peers.yaml`` differ in
anything that matters refuse each other. The digest covers the normalised mapping
(defaults filled in, one spelling per value), so a reformatted file keeps its digest.
"""

from __future__ import annotations

import base64
import copy
import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from p2pfl.core.privacy import DPConfig
from p2pfl.core.topology import TopologyConfig
from p2pfl.learning.base import Task

SUPPORTED_VERSION = 1
MODEL_KINDS = ("softmax", "mlp", "custom", "torch")
#: ``training.model.optimizer.kind`` (torch models; the numpy models train with plain SGD).
OPTIMIZER_KINDS = ("sgd", "adam")


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
    #: The fewest neighbours whose models a round should average: a node starts no round
    #: with fewer connected (it waits, up to ``startup_timeout``, then stops with exit
    #: code 3), and a run in which no round reached it ends with exit code 3. 0: a node may
    #: train alone.
    min_neighbours: int = 1
    #: Feature standardisation, the same at every peer: None (off; ``input_scale``
    #: applies), ``federated`` (the network's mean and standard deviation, computed before
    #: round 0 without pooling data), or the values themselves.
    standardize: Standardize | None = None


@dataclass(frozen=True)
class Standardize:
    """``x -> (x - mean) / std`` per feature; ``mean``/``std`` None: ``federated``."""

    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None

    @property
    def federated(self) -> bool:
        return self.mean is None

    def as_json(self) -> Any:
        if self.mean is None:
            return "federated"
        return {"mean": list(self.mean), "std": list(self.std or ())}


@dataclass(frozen=True)
class AggregationConfig:
    #: ``metropolis``, ``median``, ``trimmed-mean:BETA`` or ``clipped:TAU`` (normalised
    #: spelling; ``p2pfl.core.aggregate.parse_rule`` reads it).
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
    #: What a node sends each round (``none``, ``fp16``, ``int8``, ``topk:F``; normalised
    #: spelling: ``p2pfl.core.compress.parse_compression`` reads it).
    compression: str = "none"
    #: With compression, the consensus step gamma of the averaging (None: the
    #: compression's default, ``Compression.default_step``).
    consensus_step: float | None = None


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
    #: A link on which we sent nothing for this long gets a STATUS, so that a live node's
    #: silences stay short whatever its rounds take (the failure detector relies on it).
    keepalive: float = 0.1
    #: A connected neighbour is suspected (a round stops waiting for it) once the phi
    #: accrual detector reaches this level over its silence (core/liveness.py) ...
    suspect_phi: float = 8.0
    #: ... on top of this much silence, always accepted (scheduling hiccups, a busy core).
    suspect_pause: float = 0.3


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

    def digest_with_rounds(self, rounds: int) -> bytes:
        """The digest this config would have with ``training.rounds`` = ``rounds``: a
        finished run's checkpoint fits a config that only raised the round count (to
        train longer)."""
        shared = self.as_mapping()
        shared["training"]["rounds"] = rounds
        return config_digest(shared)

    def as_mapping(self) -> dict[str, Any]:
        """The normalised shared configuration that the digest covers."""
        return shared_mapping(
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


def _training_mapping(training: TrainingConfig) -> dict[str, Any]:
    return {
        "rounds": training.rounds,
        "local_epochs": training.local_epochs,
        "batch_size": training.batch_size,
        "learning_rate": training.learning_rate,
        "round_timeout": training.round_timeout,
        "startup_timeout": training.startup_timeout,
        # Only when set otherwise (as net.down_grace): files that leave them at their
        # defaults keep their digests, and nodes their checkpoints.
        **(
            {}
            if training.min_neighbours == TrainingConfig.min_neighbours
            else {"min_neighbours": training.min_neighbours}
        ),
        **({} if training.standardize is None else {"standardize": training.standardize.as_json()}),
        "input_scale": "auto" if training.input_scale is None else training.input_scale,
        "model": training.model.as_mapping(),
    }


def _aggregation_mapping(aggregation: AggregationConfig) -> dict[str, Any]:
    return {
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
            # Only when set: DP files without correlated noise keep their digests.
            **(
                {}
                if aggregation.dp.correlated_multiplier is None
                else {
                    "correlated_multiplier": aggregation.dp.correlated_multiplier,
                    "curious": aggregation.dp.curious,
                }
            ),
        },
        # Only when set otherwise: files without compression keep their digests.
        **(
            {}
            if aggregation.compression == "none"
            else {
                "compression": aggregation.compression,
                "consensus_step": aggregation.consensus_step,
            }
        ),
    }


def shared_mapping(
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
        "training": _training_mapping(training),
        "aggregation": _aggregation_mapping(aggregation),
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
            # Only when set otherwise: it joined the digest late, and files that leave it
            # at its default keep their digests (and nodes their checkpoints).
            **({} if net.down_grace == NetConfig.down_grace else {"down_grace": net.down_grace}),
            **{  # the same for the failure detector's settings
                key: getattr(net, key)
                for key in ("keepalive", "suspect_phi", "suspect_pause")
                if getattr(net, key) != getattr(NetConfig, key)
            },
        },
    }


def _canonical(value: Any) -> bytes:
    text = json.dumps(
        value, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False
    )
    return text.encode("ascii")


def config_digest(shared: Mapping[str, Any]) -> bytes:
    return hashlib.sha256(_canonical(shared)).digest()


def link_digest(config_digest: bytes, derived: Mapping[str, str]) -> bytes:
    """The digest two peers compare when they connect: the config's, and what each node
    derived from its own data that must agree across the network (an automatic input
    scale). ``derived`` empty: the config's digest itself."""
    if not derived:
        return config_digest
    return hashlib.sha256(config_digest + _canonical(dict(derived))).digest()


def derived_fields(derived: Mapping[str, str]) -> dict[str, bytes]:
    """``field_digests`` entries for ``derived`` values, the value in the name (``data.
    input_scale.4096``): two peers that differ there see each other's value."""
    return {
        f"{k}.{v}": hashlib.sha256(v.encode()).digest()[:FIELD_DIGEST_BYTES]
        for k, v in derived.items()
    }


#: Bytes of each field's digest in ``field_digests`` (a diagnosis, not a security check:
#: the whole digest is what peers must agree on).
FIELD_DIGEST_BYTES = 8


def field_digests(shared: Mapping[str, Any]) -> dict[str, bytes]:
    """A short digest per field of the shared mapping, named by its path (``seed``,
    ``training.learning_rate``, ``peers.bob``, ``training.model``), so that two peers whose
    whole digests differ can say where. Sections are split one level down; a field that
    is itself a mapping (a peer, the model) is one entry. Ordered: sections first, peers
    last (a long roster is the first thing to leave out when space is short)."""
    out: dict[str, bytes] = {}

    def add(path: str, value: Any) -> None:
        out[path] = hashlib.sha256(_canonical(value)).digest()[:FIELD_DIGEST_BYTES]

    for key in sorted(shared, key=lambda k: (k == "peers", k)):
        value = shared[key]
        if isinstance(value, Mapping) and value:
            for sub in sorted(value):
                add(f"{key}.{sub}", value[sub])
        else:
            add(key, value)
    return out
