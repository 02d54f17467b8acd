"""Load and validate the shared ``peers.yaml``, and compute its canonical digest.

Every peer reads the same file, and peers compare the digest during the handshake, so
validation is strict: unknown keys, wrong types and out-of-range values are errors that
name the file, the exact field (``peers.alice.public_key``, ``training.model.hidden[1]``)
and what was expected. A typo must never fall back silently to a default, because two
peers would then run with different settings while believing they agree.

The work is split by job: ``safe_yaml`` reads the file safely, ``fields`` reads
typed fields with errors that name them, ``roster`` (peers, topology),
``training`` (training, model), ``aggregation`` (aggregation, dp) and
``limits`` (limits, net) read the sections, ``schema`` holds the result's
types and the digest. This module is the public face: it puts them together (and
re-exports the types).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from types import MappingProxyType

from p2pfl.config.aggregation import AggregationReader
from p2pfl.config.fields import NAME_RE, or_empty, shown
from p2pfl.config.limits import LimitsReader
from p2pfl.config.roster import RosterReader
from p2pfl.config.safe_yaml import read_yaml_file
from p2pfl.config.schema import (
    MODEL_KINDS,
    OPTIMIZER_KINDS,
    SUPPORTED_VERSION,
    AggregationConfig,
    Config,
    LimitsConfig,
    ModelConfig,
    NetConfig,
    PeerInfo,
    TrainingConfig,
    config_digest,
    shared_mapping,
)
from p2pfl.config.training import TrainingReader
from p2pfl.core.topology import TopologyConfig, TopologyKind

__all__ = [
    "MODEL_KINDS",
    "OPTIMIZER_KINDS",
    "SUPPORTED_VERSION",
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

#: The rule for peer ids and network names (the harness names its peers by it).
_NAME_RE = NAME_RE
_MAX_SEED = 2**64 - 1
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


def load_config(path: str | os.PathLike[str]) -> Config:
    """Read, parse and validate a ``peers.yaml`` file."""
    source, data = read_yaml_file(path)
    return parse_config(data, source)


def parse_config(data: object, source: str) -> Config:
    """Validate already-loaded YAML data (plain dicts, lists and scalars) into a Config."""
    return _DocumentReader(source).config(data)


class _DocumentReader(RosterReader, TrainingReader, AggregationReader, LimitsReader):
    """The whole document: the version first, then every section."""

    def config(self, data: object) -> Config:
        expected = "a mapping with version, network, seed, peers and training"
        if data is None:
            self.fail("", f"the file is empty; expected {expected}")
        if not isinstance(data, Mapping):
            self.fail("", f"expected {expected}, got {shown(data)}")
        if "version" not in data:
            self.fail("version", f"required field is missing; expected {SUPPORTED_VERSION}")
        # The version is checked before anything else: a file written for a newer p2pfl
        # should say so, not fail on keys this version does not know.
        version = data["version"]
        if isinstance(version, bool) or not isinstance(version, int):
            self.fail("version", f"expected the integer {SUPPORTED_VERSION}, got {shown(version)}")
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
        self.check_min_neighbours(topology, tuple(peers), seed, training)
        # An optional section left empty (every line below it commented out) means defaults.
        aggregation = self.aggregation(or_empty(root.get("aggregation")))
        if aggregation.secure:
            self.check_secure_groups(topology, tuple(peers), seed, training.rounds)
            self.check_correlated_clip(topology, tuple(peers), seed, training.rounds, aggregation)
        limits = self.limits(or_empty(root.get("limits")))
        self.check_federated_moments(training, len(peers), limits.chunk_bytes)
        net = self.net(or_empty(root.get("net")))
        shared = shared_mapping(
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
            digest=config_digest(shared),
        )
