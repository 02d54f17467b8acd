"""Tests for p2pfl.config: the shared peers.yaml loader, its errors and its digest."""

from __future__ import annotations

import copy
import dataclasses
import datetime
import hashlib
import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from p2pfl.config import (
    Config,
    LimitsConfig,
    NetConfig,
    load_config,
    parse_config,
)
from p2pfl.errors import ConfigError
from p2pfl.proto.keys import public_key_b64

REPO = Path(__file__).resolve().parents[1]
IDS = ("alice", "bob", "carol", "dave")


def key(i: int) -> str:
    """A fixed, valid public key per index, so digests in a test run are reproducible."""
    return public_key_b64(X25519PrivateKey.from_private_bytes(bytes([i + 1]) * 32))


def base() -> dict[str, Any]:
    return {
        "version": 1,
        "network": "test-net",
        "seed": 3,
        "peers": {
            peer: {"address": f"ws://127.0.0.1:{7071 + i}", "public_key": key(i)}
            for i, peer in enumerate(IDS)
        },
        "training": {"rounds": 5, "model": {"kind": "mlp", "inputs": 64, "classes": 10}},
    }


def write(tmp_path: Path, data: object, name: str = "peers.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return path


DELETE = object()


def setting(*path: object, value: object) -> Callable[[dict[str, Any]], None]:
    """A mutation that sets (or deletes) one nested field of the base config."""

    def apply(cfg: dict[str, Any]) -> None:
        node: Any = cfg
        for step in path[:-1]:
            node = node[step]
        if value is DELETE:
            del node[path[-1]]
        else:
            node[path[-1]] = value

    return apply


def peers_plus(extra: int) -> Callable[[dict[str, Any]], None]:
    def apply(cfg: dict[str, Any]) -> None:
        for i in range(extra):
            cfg["peers"][f"extra{i}"] = {
                "address": f"ws://127.0.0.1:{8000 + i}",
                "public_key": key(100 + i),
            }

    return apply


def both(*mutations: Callable[[dict[str, Any]], None]) -> Callable[[dict[str, Any]], None]:
    def apply(cfg: dict[str, Any]) -> None:
        for mutation in mutations:
            mutation(cfg)

    return apply


def only_peers(*ids: str) -> Callable[[dict[str, Any]], None]:
    def apply(cfg: dict[str, Any]) -> None:
        cfg["peers"] = {peer: cfg["peers"][peer] for peer in ids}

    return apply


def k_regular(degree: object) -> Callable[[dict[str, Any]], None]:
    return setting("topology", value={"kind": "k-regular", "degree": degree})


def explicit(edges: object) -> Callable[[dict[str, Any]], None]:
    return setting("topology", value={"kind": "explicit", "edges": edges})


def custom(**fields: object) -> Callable[[dict[str, Any]], None]:
    model = {"kind": "custom", "inputs": 4, "classes": 2, **fields}
    return setting("training", "model", value=model)


RING_EDGES = [["alice", "bob"], ["bob", "carol"], ["carol", "dave"]]

# (mutation, exact field path, a fragment the problem text must contain)
BAD: list[tuple[Callable[[dict[str, Any]], None], str, str]] = [
    # version
    (setting("version", value=DELETE), "version", "required field is missing; expected 1"),
    (setting("version", value=2), "version", "unsupported version 2; this p2pfl reads version 1"),
    (setting("version", value="1"), "version", "expected the integer 1, got '1'"),
    (setting("version", value=True), "version", "got true (a boolean)"),
    (setting("version", value=1.0), "version", "expected the integer 1, got 1.0"),
    # top level
    (setting("sed", value=3), "sed", "unknown key; did you mean 'seed'?"),
    (setting("network", value=DELETE), "network", "required field is missing"),
    (setting("network", value="bad net!"), "network", "1-64 characters from A-Z a-z 0-9 . _ -"),
    (setting("network", value="x" * 65), "network", "1-64 characters"),
    (setting("network", value=""), "network", "got ''"),
    (setting("network", value=".."), "network", "not '.' or '..'"),
    (setting("seed", value=DELETE), "seed", "required field is missing"),
    (setting("seed", value=-1), "seed", "expected an integer between 0 and"),
    (setting("seed", value=True), "seed", "got true (a boolean)"),
    (setting("seed", value=1.5), "seed", "got 1.5"),
    (setting("seed", value=2**64), "seed", f"got {2**64}"),
    # peers
    (setting("peers", value=DELETE), "peers", "required field is missing"),
    (setting("peers", value=["alice"]), "peers", "expected a mapping of peer id"),
    (setting("peers", value=None), "peers", "got nothing"),
    (only_peers("alice"), "peers", "expected at least 2 peers, got 1"),
    (
        setting("peers", "al ice", value={"address": "ws://h:1", "public_key": key(9)}),
        "peers.al ice",
        "a peer id of 1-64 characters",
    ),
    (
        setting("peers", 123, value={"address": "ws://h:1", "public_key": key(9)}),
        "peers.123",
        "quote it if it looks like a number",
    ),
    (setting("peers", "alice", value="ws://h:1"), "peers.alice", "expected a mapping"),
    (setting("peers", "alice", "address", value=DELETE), "peers.alice.address", "missing"),
    (setting("peers", "alice", "public_key", value=DELETE), "peers.alice.public_key", "missing"),
    (
        setting("peers", "alice", "pubkey", value=key(0)),
        "peers.alice.pubkey",
        "did you mean 'public_key'?",
    ),
    (
        setting("peers", "alice", "address", value="http://127.0.0.1:7071"),
        "peers.alice.address",
        "expected an address of the form ws://HOST:PORT",
    ),
    (setting("peers", "alice", "address", value="ws://127.0.0.1"), "peers.alice.address", "PORT"),
    (
        setting("peers", "alice", "address", value="ws://127.0.0.1:7071/path"),
        "peers.alice.address",
        "ws://HOST:PORT",
    ),
    (
        setting("peers", "alice", "address", value="ws://127.0.0.1:0"),
        "peers.alice.address",
        "port must be between 1 and 65535, got 0",
    ),
    (
        setting("peers", "alice", "address", value="ws://127.0.0.1:70000"),
        "peers.alice.address",
        "port must be between 1 and 65535, got 70000",
    ),
    (
        setting("peers", "alice", "address", value="ws://999.1.1.1:7071"),
        "peers.alice.address",
        "not a valid IPv4 address",
    ),
    (
        setting("peers", "alice", "address", value="ws://[::g]:7071"),
        "peers.alice.address",
        "not a valid IPv6 address",
    ),
    (
        setting("peers", "alice", "address", value="ws://-bad-.example:7071"),
        "peers.alice.address",
        "not a valid host name",
    ),
    (setting("peers", "alice", "address", value=7071), "peers.alice.address", "got 7071"),
    (
        setting("peers", "bob", "address", value="ws://127.0.0.1:7071"),
        "peers.bob.address",
        "ws://127.0.0.1:7071 is already the address of peer 'alice'",
    ),
    (
        both(
            setting("peers", "alice", "address", value="ws://LocalHost:9000"),
            setting("peers", "bob", "address", value="ws://localhost:9000"),
        ),
        "peers.bob.address",
        "already the address of peer 'alice'",
    ),
    (
        setting("peers", "alice", "public_key", value="not base64!"),
        "peers.alice.public_key",
        "not valid base64",
    ),
    (
        setting("peers", "alice", "public_key", value="AAAAAAAAAAAAAAAAAAAAAA=="),
        "peers.alice.public_key",
        "decodes to 16 bytes, expected 32",
    ),
    (setting("peers", "alice", "public_key", value=5), "peers.alice.public_key", "got 5"),
    (
        setting("peers", "bob", "public_key", value=key(0)),
        "peers.bob.public_key",
        "same public key as peer 'alice'",
    ),
    # topology
    (setting("topology", value="full"), "topology", "expected a mapping, got 'full'"),
    (setting("topology", value={}), "topology.kind", "required field is missing"),
    (
        setting("topology", value={"kind": "star"}),
        "topology.kind",
        "expected one of: full, ring, k-regular, explicit; got 'star'",
    ),
    (setting("topology", value={"kind": "k-regular"}), "topology.degree", "required for kind"),
    (k_regular(4), "topology.degree", "expected an integer between 1 and 3, got 4"),
    (k_regular(0), "topology.degree", "expected an integer between 1 and 3, got 0"),
    (k_regular("2"), "topology.degree", "got '2' (text, not a number: remove the quotes)"),
    (
        both(peers_plus(1), k_regular(3)),
        "topology.degree",
        "peers x degree must be even, got 5 x 3",
    ),
    (k_regular(1), "topology", "never connected"),
    (
        setting("topology", value={"kind": "ring", "degree": 2}),
        "topology.degree",
        "only used with kind k-regular (kind is 'ring')",
    ),
    (
        setting("topology", value={"kind": "full", "edges": RING_EDGES}),
        "topology.edges",
        "only used with kind explicit",
    ),
    (
        setting("topology", value={"kind": "explicit"}),
        "topology.edges",
        "required for kind explicit",
    ),
    (explicit("alice-bob"), "topology.edges", "expected a list of [peer, peer] pairs"),
    (
        explicit([["alice", "bob"], ["erin", "carol"], ["carol", "dave"]]),
        "topology.edges[1][0]",
        "expected a peer id from peers (alice, bob, carol, dave), got 'erin'",
    ),
    (
        explicit([["alice", "bob"], ["bob", "carol"], ["carol", "dave"], ["dave", 7]]),
        "topology.edges[3][1]",
        "got 7",
    ),
    (
        explicit([["alice", "bob"], ["bob", "bob"], ["carol", "dave"]]),
        "topology.edges[1]",
        "self loop 'bob' -> 'bob'",
    ),
    (
        explicit([*RING_EDGES, ["bob", "alice"]]),
        "topology.edges[3]",
        "duplicate of topology.edges[0]",
    ),
    (
        explicit([["alice", "bob", "carol"]]),
        "topology.edges[0]",
        "expected a pair [peer, peer], got a list of 3 items",
    ),
    (
        explicit([["alice", "bob"], ["carol", "dave"]]),
        "topology",
        "not connected: carol, dave cannot reach alice, bob",
    ),
    (
        setting("topology", value={"kind": "k-regular", "degree": 2, "resample_every": -1}),
        "topology.resample_every",
        "expected an integer >= 0, got -1",
    ),
    (
        setting("topology", value={"kind": "ring", "resample_every": 3}),
        "topology.resample_every",
        "only applies to kind k-regular",
    ),
    (
        setting("topology", value={"kind": "ring", "degre": 2}),
        "topology.degre",
        "did you mean 'degree'?",
    ),
    # training
    (setting("training", value=DELETE), "training", "required field is missing"),
    (setting("training", "rounds", value=DELETE), "training.rounds", "required field is missing"),
    (setting("training", "rounds", value=0), "training.rounds", "expected an integer >= 1, got 0"),
    (
        setting("training", "rounds", value="ten"),
        "training.rounds",
        "expected an integer >= 1, got 'ten'",
    ),
    (setting("training", "rounds", value=True), "training.rounds", "got true (a boolean)"),
    (setting("training", "rounds", value=2.5), "training.rounds", "got 2.5"),
    (setting("training", "local_epochs", value=0), "training.local_epochs", ">= 1, got 0"),
    (setting("training", "batch_size", value=-1), "training.batch_size", ">= 1, got -1"),
    (
        setting("training", "learning_rate", value=0),
        "training.learning_rate",
        "expected a number > 0, got 0",
    ),
    (
        setting("training", "learning_rate", value="1e-3"),
        "training.learning_rate",
        "write 0.001 or 1.0e-3",
    ),
    (setting("training", "learning_rate", value=math.nan), "training.learning_rate", "got nan"),
    (setting("training", "learning_rate", value=math.inf), "training.learning_rate", "got inf"),
    (setting("training", "learning_rate", value=False), "training.learning_rate", "boolean"),
    (
        setting("training", "round_timeout", value=0),
        "training.round_timeout",
        "expected a number of seconds > 0",
    ),
    (
        setting("training", "round_timeout", value=30000000),
        "training.round_timeout",
        "expected a number of seconds > 0 and <= 604800, got 30000000",
    ),
    (setting("training", "startup_timeout", value=-1.0), "training.startup_timeout", "got -1.0"),
    (
        setting("training", "learnig_rate", value=0.1),
        "training.learnig_rate",
        "unknown key; did you mean 'learning_rate'?",
    ),
    (setting("training", "model", value=DELETE), "training.model", "required field is missing"),
    (setting("training", "model", value="mlp"), "training.model", "expected a mapping"),
    (
        setting("training", "model", "kind", value="cnn"),
        "training.model.kind",
        "expected one of: softmax, mlp, custom, torch; got 'cnn'",
    ),
    (setting("training", "model", "inputs", value=0), "training.model.inputs", ">= 1, got 0"),
    (
        setting("training", "model", "classes", value=1),
        "training.model.classes",
        "expected an integer >= 2, got 1",
    ),
    (
        setting("training", "model", "hidden", value=[64, 0]),
        "training.model.hidden[1]",
        "expected an integer >= 1, got 0",
    ),
    (
        setting("training", "model", "hidden", value=[]),
        "training.model.hidden",
        "got an empty list",
    ),
    (setting("training", "model", "hidden", value=64), "training.model.hidden", "got 64"),
    (
        setting(
            "training", "model", value={"kind": "softmax", "inputs": 4, "classes": 2, "hidden": [3]}
        ),
        "training.model.hidden",
        "only used with kind mlp (kind is 'softmax')",
    ),
    (
        setting("training", "model", "factory", value="pkg:build"),
        "training.model.factory",
        "only used with kind custom or torch (kind is 'mlp')",
    ),
    (custom(), "training.model.factory", "required for kind custom"),
    (custom(factory="no_colon"), "training.model.factory", 'expected "module:function"'),
    (custom(factory="pkg:build", options=[1]), "training.model.options", "expected a mapping"),
    (
        custom(factory="pkg:build", options={"nested": {"bad": math.nan}}),
        "training.model.options.nested.bad",
        "expected a finite number, got nan",
    ),
    (
        custom(factory="pkg:build", options={"when": datetime.date(2024, 1, 2)}),
        "training.model.options.when",
        "got a value of type date",
    ),
    # aggregation
    (
        setting("aggregation", value={"rule": "fedavg"}),
        "aggregation.rule",
        "unknown rule 'fedavg': expected metropolis, median, trimmed-mean:BETA",
    ),
    (
        setting("aggregation", value={"rule": "trimmed-mean:0.5"}),
        "aggregation.rule",
        "trimmed-mean:BETA needs 0 <= BETA < 0.5, got 0.5",
    ),
    (
        setting("aggregation", value={"rule": "clipped:-1"}),
        "aggregation.rule",
        "clipped:TAU needs a finite TAU > 0",
    ),
    (
        setting("aggregation", value={"rule": 3}),
        "aggregation.rule",
        "expected a rule name, got 3",
    ),
    (
        setting("aggregation", value={"rule": "median", "secure": True}),
        "aggregation.rule",
        "median cannot be combined with secure: true: with secure aggregation a node only "
        "ever sees the masked sum",
    ),
    (
        setting("aggregation", value={"rule": "clipped:5", "secure": True}),
        "aggregation.rule",
        "clipped:5 cannot be combined with secure: true",
    ),
    (
        setting("aggregation", value={"secure": True, "clip": 1536, "frac_bits": 20}),
        "aggregation.clip",
        "must be at most 2**30",
    ),
    (
        setting("aggregation", value={"secure": True, "frac_bits": 31}),
        "aggregation.frac_bits",
        "between 1 and 30",
    ),
    (
        setting("aggregation", value={"secure": True, "threshold": 0.4}),
        "aggregation.threshold",
        "expected a fraction >= 0.5 and < 1",
    ),
    (
        setting("aggregation", value={"secure": True, "threshold": 1}),
        "aggregation.threshold",
        "expected a fraction >= 0.5 and < 1",
    ),
    (
        setting("aggregation", value={"secure": True, "clip": -1}),
        "aggregation.clip",
        "expected a number > 0",
    ),
    (
        setting("aggregation", value={"secure": "no"}),
        "aggregation.secure",
        "expected true or false, got 'no'",
    ),
    (
        setting("aggregation", value={"rule": "metropolis", "robust": True}),
        "aggregation.robust",
        "unknown key; expected one of: rule, secure",
    ),
    # limits
    (setting("limits", value=[1]), "limits", "expected a mapping, got a list"),
    (
        setting("limits", value={"chunk_bytes": 1024}),
        "limits.chunk_bytes",
        "expected an integer between 4096 and 4194304, got 1024",
    ),
    (
        setting("limits", value={"chunk_bytes": 8 * 1024 * 1024}),
        "limits.chunk_bytes",
        "between 4096 and 4194304",
    ),
    (
        setting("limits", value={"max_buffered_rounds": 17}),
        "limits.max_buffered_rounds",
        "between 0 and 16, got 17",
    ),
    (setting("limits", value={"max_connections": -1}), "limits.max_connections", "got -1"),
    (
        setting("limits", value={"handshake_timeout": 0}),
        "limits.handshake_timeout",
        "number of seconds > 0",
    ),
    (setting("limits", value={"chunk_size": 4096}), "limits.chunk_size", "did you mean"),
    # net
    (
        setting("net", value={"heartbeat_interval": 5, "heartbeat_timeout": 5}),
        "net.heartbeat_timeout",
        "must be greater than heartbeat_interval (5), got 5",
    ),
    (
        setting("net", value={"keepalive": 10}),
        "net.keepalive",
        "must be below heartbeat_timeout (10), got 10",
    ),
    (setting("net", value={"suspect_phi": 16}), "net.suspect_phi", "> 0 and <= 15"),
    (setting("net", value={"suspect_pause": -1}), "net.suspect_pause", "seconds > 0"),
    (
        setting("net", value={"reconnect_min": 2, "reconnect_max": 1}),
        "net.reconnect_max",
        "must be >= reconnect_min (2), got 1",
    ),
    (
        setting("net", value={"reconnect_min": 0}),
        "net.reconnect_min",
        "expected a number of seconds > 0",
    ),
    (setting("net", value={"heartbeat": 1}), "net.heartbeat", "unknown key"),
]


@pytest.mark.parametrize(
    ("mutation", "field", "problem"),
    BAD,
    ids=[f"{i:03d}-{field}" for i, (_, field, _) in enumerate(BAD)],
)
def test_bad_config_names_file_field_and_problem(
    tmp_path: Path, mutation: Callable[[dict[str, Any]], None], field: str, problem: str
) -> None:
    cfg = base()
    mutation(cfg)
    path = write(tmp_path, cfg, "shared-peers.yaml")
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    err = caught.value
    assert err.file == str(path)
    assert err.field == field, str(err)
    assert problem in err.problem, str(err)
    assert str(err) == f"{path}: {field}: {err.problem}"
    assert "shared-peers.yaml" in str(err)


def test_example_peers_yaml_loads() -> None:
    cfg = load_config(REPO / "peers.yaml")
    assert cfg.version == 1
    assert cfg.network == "example-consortium"
    assert cfg.seed == 7
    assert cfg.peer_ids == ("alice", "bob", "carol")
    assert [p.address for p in cfg.peers.values()] == [
        "ws://127.0.0.1:7071",
        "ws://127.0.0.1:7072",
        "ws://127.0.0.1:7073",
    ]
    assert all(len(p.public_key) == 32 for p in cfg.peers.values())
    assert cfg.topology.kind == "full"
    model = cfg.training.model
    assert (model.kind, model.inputs, model.classes, model.hidden) == ("mlp", 64, 10, (64,))
    assert cfg.training.rounds == 20
    # The learning rate is tuned by whoever runs the example, so only its validity is pinned.
    assert cfg.training.learning_rate > 0
    assert cfg.training.round_timeout == 30.0
    assert cfg.aggregation.rule == "metropolis"
    assert cfg.aggregation.secure is False


def test_minimal_config_fills_defaults(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, base()))
    assert isinstance(cfg, Config)
    assert cfg.source == str(tmp_path / "peers.yaml")
    assert cfg.topology.kind == "full"
    assert cfg.topology.degree is None
    assert cfg.topology.edges == ()
    assert cfg.topology.resample_every == 0
    t = cfg.training
    assert (t.local_epochs, t.batch_size, t.learning_rate) == (1, 32, 0.1)
    assert (t.round_timeout, t.startup_timeout) == (30.0, 60.0)
    assert t.model.hidden == (64,)
    assert t.model.factory is None
    assert dict(t.model.options) == {}
    assert cfg.aggregation.rule == "metropolis"
    assert cfg.aggregation.secure is False
    assert cfg.limits == LimitsConfig()
    assert cfg.net == NetConfig()
    assert len(cfg.digest) == 32
    assert cfg.digest_hex == cfg.digest.hex()[:16]


def test_empty_optional_sections_mean_defaults(tmp_path: Path) -> None:
    text = yaml.safe_dump(base(), sort_keys=False)
    text += "aggregation:\nlimits:\n#  chunk_bytes: 8192\nnet:\n"
    path = tmp_path / "peers.yaml"
    path.write_text(text, encoding="utf-8")
    cfg = load_config(path)
    assert cfg.limits == LimitsConfig()
    assert cfg.net == NetConfig()
    assert cfg.digest == load_config(write(tmp_path, base(), "plain.yaml")).digest


def test_peers_are_ordered_and_parsed(tmp_path: Path) -> None:
    cfg_data = base()
    cfg_data["peers"] = {
        "zed": {"address": "ws://[::1]:9000", "public_key": key(1)},
        "Ann": {"address": "ws://Node-1.Example.org:7070", "public_key": key(2)},
        "mid": {"address": "ws://10.0.0.5:1", "public_key": key(3)},
    }
    cfg = load_config(write(tmp_path, cfg_data))
    assert list(cfg.peers) == ["Ann", "mid", "zed"]
    assert cfg.peer_ids == ("Ann", "mid", "zed")
    zed = cfg.peers["zed"]
    assert (zed.id, zed.host, zed.port, zed.address) == ("zed", "::1", 9000, "ws://[::1]:9000")
    ann = cfg.peers["Ann"]
    assert (ann.host, ann.port) == ("node-1.example.org", 7070)
    assert ann.address == "ws://node-1.example.org:7070"
    assert cfg.peers["mid"].public_key == bytes.fromhex(
        X25519PrivateKey.from_private_bytes(bytes([4]) * 32).public_key().public_bytes_raw().hex()
    )


def test_topologies_load(tmp_path: Path) -> None:
    data = base()
    data["topology"] = {"kind": "k-regular", "degree": 2, "resample_every": 5}
    cfg = load_config(write(tmp_path, data))
    assert (cfg.topology.kind, cfg.topology.degree, cfg.topology.resample_every) == (
        "k-regular",
        2,
        5,
    )
    data["topology"] = {
        "kind": "explicit",
        "edges": [["dave", "carol"], ["bob", "alice"], ["carol", "bob"]],
    }
    cfg = load_config(write(tmp_path, data))
    assert cfg.topology.edges == (("alice", "bob"), ("bob", "carol"), ("carol", "dave"))
    data["topology"] = {"kind": "ring"}
    assert load_config(write(tmp_path, data)).topology.kind == "ring"


def test_custom_model(tmp_path: Path) -> None:
    data = base()
    options = {"width": 3, "names": ["a", "b"], "nested": {"x": None, "y": 1.5, "z": True}}
    data["training"]["model"] = {
        "kind": "custom",
        "inputs": 4,
        "classes": 3,
        "factory": "my_pkg.models:build_net",
        "options": copy.deepcopy(options),
    }
    model = load_config(write(tmp_path, data)).training.model
    assert model.factory == "my_pkg.models:build_net"
    assert model.hidden == ()
    assert model.options == options
    mapping = model.as_mapping()
    assert mapping == {
        "kind": "custom",
        "inputs": 4,
        "classes": 3,
        "hidden": [],
        "factory": "my_pkg.models:build_net",
        "options": options,
    }
    mapping["options"]["names"].append("c")
    assert model.options["names"] == ["a", "b"], "as_mapping must hand out a copy"


def test_mlp_as_mapping(tmp_path: Path) -> None:
    data = base()
    data["training"]["model"]["hidden"] = [32, 16]
    model = load_config(write(tmp_path, data)).training.model
    assert model.as_mapping() == {
        "kind": "mlp",
        "inputs": 64,
        "classes": 10,
        "hidden": [32, 16],
        "factory": None,
        "options": {},
    }


def test_config_is_immutable(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, base()))
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.seed = 4  # type: ignore[misc]
    with pytest.raises(TypeError):
        cfg.peers["mallory"] = cfg.peers["alice"]  # type: ignore[index]


def test_parse_config_uses_given_source() -> None:
    cfg = parse_config(base(), "inline")
    assert cfg.source == "inline"
    bad = base()
    bad["training"]["rounds"] = "ten"
    with pytest.raises(ConfigError, match=r"^inline: training.rounds: expected an integer >= 1"):
        parse_config(bad, "inline")


def test_options_recursion_is_bounded() -> None:
    data = base()
    loop: list[object] = []
    loop.append(loop)
    data["training"]["model"] = {
        "kind": "custom",
        "inputs": 4,
        "classes": 2,
        "factory": "m:f",
        "options": {"loop": loop},
    }
    with pytest.raises(ConfigError, match="nested more than"):
        parse_config(data, "inline")


# ------------------------------------------------------------------ file and YAML errors


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert caught.value.field == "<file>"
    assert str(caught.value) == f"{path}: <file>: file not found"


def test_directory_is_not_a_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="is a directory") as caught:
        load_config(tmp_path)
    assert caught.value.field == "<file>"


def test_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "peers.yaml"
    path.write_bytes(b"version: 1\nnetwork: \xff\xfe\n")
    with pytest.raises(ConfigError, match="not valid UTF-8") as caught:
        load_config(path)
    assert caught.value.field == "<file>"


def test_too_large(tmp_path: Path) -> None:
    path = tmp_path / "peers.yaml"
    path.write_bytes(b"#" * (2 << 20))
    with pytest.raises(ConfigError, match="larger than 1 MiB"):
        load_config(path)


def test_yaml_syntax_error_reports_line_and_column(tmp_path: Path) -> None:
    path = tmp_path / "peers.yaml"
    path.write_text("version: 1\nnetwork: x\npeers: {alice: [\n", encoding="utf-8")
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert caught.value.field == "<yaml>"
    assert "invalid YAML at line 4, column 1" in caught.value.problem
    assert str(path) in str(caught.value)


def test_yaml_tabs_error_has_position(tmp_path: Path) -> None:
    path = tmp_path / "peers.yaml"
    path.write_text("version: 1\ntraining:\n\trounds: 3\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"invalid YAML at line 3, column 1"):
        load_config(path)


@pytest.mark.parametrize("text", ["", "# only a comment\n", "---\n"])
def test_empty_file(tmp_path: Path, text: str) -> None:
    path = tmp_path / "peers.yaml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(ConfigError, match="the file is empty") as caught:
        load_config(path)
    assert caught.value.field == "<top level>"


def test_root_must_be_mapping(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="got a list") as caught:
        load_config(write(tmp_path, [1, 2]))
    assert caught.value.field == "<top level>"


def test_duplicate_keys_are_rejected(tmp_path: Path) -> None:
    path = tmp_path / "peers.yaml"
    one = key(0)
    two = key(1)
    path.write_text(
        f"""version: 1
network: n
seed: 1
peers:
  alice: {{address: "ws://h:1", public_key: "{one}"}}
  alice: {{address: "ws://h:2", public_key: "{two}"}}
training: {{rounds: 1, model: {{kind: softmax, inputs: 2, classes: 2}}}}
""",
        encoding="utf-8",
    )
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert caught.value.field == "peers.alice"
    assert caught.value.problem == "duplicate key 'alice' (line 5 and line 6)"


def test_a_merge_key_cannot_hide_a_duplicate(tmp_path: Path) -> None:
    """``seed: 7`` beside ``<<: {seed: 9}`` gives two seeds the duplicate-key check never
    saw; merge keys are refused outright."""
    text = yaml.safe_dump(base(), sort_keys=False).replace("seed: 3\n", "seed: 7\n<<: {seed: 9}\n")
    path = tmp_path / "peers.yaml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert caught.value.field == "<top level>"
    assert caught.value.problem == (
        "line 4, column 1: merge keys ('<<') are not accepted in peers.yaml; write the fields out"
    )


def test_merge_keys_are_refused_inside_sections_too(tmp_path: Path) -> None:
    text = yaml.safe_dump(base(), sort_keys=False)
    text += "limits: &lim {chunk_bytes: 8192}\nnet:\n  <<: {reconnect_min: 0.1}\n"
    path = tmp_path / "peers.yaml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(ConfigError, match=r"merge keys \('<<'\) are not accepted") as caught:
        load_config(path)
    assert caught.value.field == "net"


def test_self_referencing_alias(tmp_path: Path) -> None:
    path = tmp_path / "peers.yaml"
    path.write_text("version: 1\nloop: &a [*a]\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="an alias refers to itself") as caught:
        load_config(path)
    assert caught.value.field == "loop[0]"


def test_alias_bomb_is_bounded(tmp_path: Path) -> None:
    lines = ["version: 1", "a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    for i in range(1, 9):
        prev = f"*a{i - 1}"
        lines.append(f"a{i}: &a{i} [{', '.join([prev] * 10)}]")
    path = tmp_path / "peers.yaml"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="expands to more than"):
        load_config(path)


def test_python_tags_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "peers.yaml"
    path.write_text("version: !!python/object/apply:os.getcwd []\n", encoding="utf-8")
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert caught.value.field == "<yaml>"
    assert "python/object/apply" in caught.value.problem


def test_non_text_top_level_key(tmp_path: Path) -> None:
    data: dict[Any, Any] = base()
    data[3] = "x"
    with pytest.raises(ConfigError, match="keys must be text, got 3") as caught:
        load_config(write(tmp_path, data))
    assert caught.value.field == "3"


# ---------------------------------------------------------------------------- digest

COMPACT = """version: 1
network: test-net
seed: 3
peers:
  alice: {{address: "ws://127.0.0.1:7071", public_key: "{k0}"}}
  bob: {{address: "ws://127.0.0.1:7072", public_key: "{k1}"}}
  carol: {{address: "ws://127.0.0.1:7073", public_key: "{k2}"}}
topology: {{kind: explicit, edges: [[alice, bob], [bob, carol]]}}
training: {{rounds: 5, learning_rate: {lr}, model: {{kind: mlp, inputs: 64, classes: 10}}}}
"""

VERBOSE = """# the same network, written differently
training:
  model:
    hidden: [64]         # the default, spelled out
    classes: 10
    kind: mlp
    inputs: 64
  startup_timeout: 60
  round_timeout: 30.0
  learning_rate: 0.10
  batch_size: 32
  local_epochs: 1
  rounds: 5
peers:
  carol:
    public_key: "{k2}"
    address: "ws://127.0.0.1:7073"
  bob: {{public_key: "{k1}", address: "ws://127.0.0.1:7072"}}
  alice: {{address: "ws://127.0.0.1:7071", public_key: "{k0}"}}
topology:
  edges:
    - [carol, bob]
    - [bob, alice]
  resample_every: 0
  kind: explicit
aggregation: {{secure: false, rule: metropolis}}
limits: {{max_buffered_rounds: 2, chunk_bytes: 262144, max_connections: 0, handshake_timeout: 5}}
net:
  reconnect_max: 5
  reconnect_min: 0.05
  heartbeat_timeout: 10
  heartbeat_interval: 2
seed: 3
network: test-net
version: 1
"""


def load_text(tmp_path: Path, text: str, name: str) -> Config:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return load_config(path)


def keys3() -> dict[str, str]:
    return {"k0": key(0), "k1": key(1), "k2": key(2)}


def test_digest_ignores_comments_order_and_spelled_out_defaults(tmp_path: Path) -> None:
    compact = load_text(tmp_path, COMPACT.format(lr="0.1", **keys3()), "a.yaml")
    verbose = load_text(tmp_path, VERBOSE.format(**keys3()), "b.yaml")
    assert compact.digest == verbose.digest
    assert compact.as_mapping() == verbose.as_mapping()


def test_digest_changes_with_learning_rate(tmp_path: Path) -> None:
    first = load_text(tmp_path, COMPACT.format(lr="0.1", **keys3()), "a.yaml")
    second = load_text(tmp_path, COMPACT.format(lr="0.05", **keys3()), "b.yaml")
    assert first.digest != second.digest
    same = load_text(tmp_path, COMPACT.format(lr="1", **keys3()), "c.yaml")
    also = load_text(tmp_path, COMPACT.format(lr="1.0", **keys3()), "d.yaml")
    assert same.digest == also.digest


def test_digest_is_sha256_of_canonical_json(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, base()))
    canonical = json.dumps(
        cfg.as_mapping(), sort_keys=True, separators=(",", ":"), ensure_ascii=True
    ).encode()
    assert cfg.digest == hashlib.sha256(canonical).digest()
    shared = cfg.as_mapping()
    assert shared["peers"]["alice"] == {"address": "ws://127.0.0.1:7071", "public_key": key(0)}
    assert shared["topology"] == {"kind": "full", "degree": None, "edges": [], "resample_every": 0}


def test_digest_ignores_host_case(tmp_path: Path) -> None:
    lower = base()
    upper = base()
    lower["peers"]["alice"]["address"] = "ws://node.example:7071"
    upper["peers"]["alice"]["address"] = "ws://NODE.Example:7071"
    assert load_config(write(tmp_path, lower, "a.yaml")).digest == (
        load_config(write(tmp_path, upper, "b.yaml")).digest
    )


SEMANTIC_CHANGES: list[Callable[[dict[str, Any]], None]] = [
    setting("network", value="other-net"),
    setting("seed", value=4),
    setting("peers", "alice", "address", value="ws://127.0.0.1:9999"),
    setting("peers", "alice", "public_key", value=key(50)),
    only_peers("alice", "bob", "carol"),
    setting("topology", value={"kind": "ring"}),
    k_regular(2),
    setting("training", "rounds", value=6),
    setting("training", "local_epochs", value=2),
    setting("training", "batch_size", value=64),
    setting("training", "learning_rate", value=0.2),
    setting("training", "round_timeout", value=31),
    setting("training", "startup_timeout", value=61),
    setting("training", "min_neighbours", value=2),
    setting("training", "model", "hidden", value=[65]),
    setting("training", "model", "inputs", value=63),
    setting("limits", value={"chunk_bytes": 8192}),
    setting("limits", value={"max_connections": 3}),
    setting("net", value={"heartbeat_interval": 1}),
    setting("net", value={"down_grace": 5}),
    setting("net", value={"keepalive": 0.2}),
    setting("net", value={"suspect_phi": 5}),
    setting("net", value={"suspect_pause": 1}),
]


@pytest.mark.parametrize("change", SEMANTIC_CHANGES)
def test_every_semantic_change_changes_the_digest(
    tmp_path: Path, change: Callable[[dict[str, Any]], None]
) -> None:
    reference = load_config(write(tmp_path, base(), "a.yaml")).digest
    changed = base()
    change(changed)
    assert load_config(write(tmp_path, changed, "b.yaml")).digest != reference


def test_the_digest_covers_every_shared_field(tmp_path: Path) -> None:
    """A field added to a config section but not to the digest lets peers disagree on it
    silently (net.down_grace did, until the security review)."""
    config = load_config(write(tmp_path, base(), "a.yaml"))
    shared = config.as_mapping()
    for section in ("topology", "training", "aggregation", "limits", "net"):
        fields = {f.name for f in dataclasses.fields(getattr(config, section))}
        covered = set(shared[section])
        if section == "net":
            # covered when they differ from their defaults
            covered |= {"down_grace", "keepalive", "suspect_phi", "suspect_pause"}
        if section == "training":
            covered |= {"min_neighbours", "standardize"}  # the same
        if section == "aggregation":
            covered |= {"compression", "consensus_step"}  # the same
        assert fields == covered, section


def test_down_grace_at_its_default_keeps_the_old_digest(tmp_path: Path) -> None:
    plain = load_config(write(tmp_path, base(), "a.yaml")).digest
    spelled = base()
    spelled.setdefault("net", {})["down_grace"] = 2.0
    assert load_config(write(tmp_path, spelled, "b.yaml")).digest == plain


# --- start-up rules live in validation: `p2pfl check` and `p2pfl run` refuse the same files


def secure_with(topology: dict[str, Any], peers: int = 4) -> dict[str, Any]:
    cfg = base()
    cfg["peers"] = dict(list(cfg["peers"].items())[:peers])
    cfg["topology"] = topology
    cfg["aggregation"] = {"secure": True}
    return cfg


@pytest.mark.parametrize(
    ("topology", "peers"),
    [
        pytest.param({"kind": "full"}, 2, id="two-peers"),
        pytest.param({"kind": "ring"}, 2, id="two-peer-ring"),
        pytest.param(
            {"kind": "explicit", "edges": [["alice", "bob"], ["bob", "carol"]]}, 3, id="a-path"
        ),
    ],
)
def test_secure_aggregation_needs_two_neighbours_for_every_peer(
    tmp_path: Path, topology: dict[str, Any], peers: int
) -> None:
    with pytest.raises(ConfigError, match=r"aggregation\.secure: needs every peer to have"):
        load_config(write(tmp_path, secure_with(topology, peers)))


def test_secure_aggregation_is_checked_in_every_resampled_round(tmp_path: Path) -> None:
    cfg = secure_with({"kind": "k-regular", "degree": 2, "resample_every": 1})
    cfg["training"]["rounds"] = 3
    assert load_config(write(tmp_path, cfg)).aggregation.secure  # degree 2 in every round


def test_secure_aggregation_over_a_ring_of_three_is_valid(tmp_path: Path) -> None:
    assert load_config(write(tmp_path, secure_with({"kind": "ring"}, 3))).aggregation.secure


def test_check_refuses_what_run_refuses(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from p2pfl.cli import main

    path = write(tmp_path, secure_with({"kind": "ring"}, 2))
    assert main(["check", str(path)]) == 2
    assert "aggregation.secure: needs every peer to have at least 2 neighbours" in (
        capsys.readouterr().err
    )


def test_min_neighbours_defaults_to_one_and_zero_allows_training_alone(tmp_path: Path) -> None:
    assert load_config(write(tmp_path, base())).training.min_neighbours == 1
    cfg = base()
    cfg["training"]["min_neighbours"] = 0
    assert load_config(write(tmp_path, cfg)).training.min_neighbours == 0


@pytest.mark.parametrize(
    ("topology", "wanted", "problem"),
    [
        ({"kind": "ring"}, 3, "is 3, but alice has only 2 neighbour(s) in round 0"),
        ({"kind": "full"}, 4, "is 4, but alice has only 3 neighbour(s) in round 0"),
        ({"kind": "full"}, -1, "expected an integer >= 0"),
        ({"kind": "full"}, "two", "expected an integer"),
    ],
)
def test_min_neighbours_must_be_reachable_for_every_peer(
    tmp_path: Path, topology: dict[str, Any], wanted: object, problem: str
) -> None:
    cfg = base()
    cfg["topology"] = topology
    cfg["training"]["min_neighbours"] = wanted
    with pytest.raises(ConfigError, match=r"training\.min_neighbours") as info:
        load_config(write(tmp_path, cfg))
    assert problem in str(info.value)


def test_min_neighbours_is_part_of_the_shared_digest(tmp_path: Path) -> None:
    cfg = base()
    cfg["training"]["min_neighbours"] = 2
    assert (
        load_config(write(tmp_path, cfg)).digest
        != load_config(write(tmp_path, base(), "b.yaml")).digest
    )


@pytest.mark.parametrize(
    ("standardize", "extra", "problem"),
    [
        ("sometimes", {}, "expected none, federated or {mean: [...], std: [...]}"),
        ("federated", {"input_scale": 255}, "standardize replaces input_scale"),
        ({"mean": [0.0] * 63, "std": [1.0] * 64}, {}, "expected 64 numbers"),
        ({"mean": [0.0] * 64, "std": [1.0] * 63 + [0.0]}, {}, "std[63]: expected a number > 0"),
        ({"mean": [0.0] * 63 + ["x"], "std": [1.0] * 64}, {}, "mean[63]: expected a number"),
        ({"mean": [0.0] * 64}, {}, "std: required field is missing"),
    ],
)
def test_standardize_is_checked(
    tmp_path: Path, standardize: object, extra: dict[str, Any], problem: str
) -> None:
    cfg = base()
    cfg["training"].update({"standardize": standardize, **extra})
    with pytest.raises(ConfigError, match=r"training\.standardize") as info:
        load_config(write(tmp_path, cfg))
    assert problem in str(info.value)


def test_standardize_values_and_federated_are_read_and_in_the_digest(tmp_path: Path) -> None:
    cfg = base()
    cfg["training"]["standardize"] = "federated"
    federated = load_config(write(tmp_path, cfg))
    assert federated.training.standardize is not None and federated.training.standardize.federated
    cfg["training"]["standardize"] = {"mean": [0.5] * 64, "std": [2] * 64}
    given = load_config(write(tmp_path, cfg, "b.yaml"))
    assert given.training.standardize is not None
    assert given.training.standardize.std == (2.0,) * 64
    plain = load_config(write(tmp_path, base(), "c.yaml"))
    assert len({plain.digest, federated.digest, given.digest}) == 3


def test_federated_standardize_must_fit_a_record(tmp_path: Path) -> None:
    cfg = base()
    cfg["training"]["standardize"] = "federated"
    cfg["training"]["model"]["inputs"] = 200
    cfg["limits"] = {"chunk_bytes": 4096}
    with pytest.raises(ConfigError, match=r"above limits\.chunk_bytes"):
        load_config(write(tmp_path, cfg))


# --- aggregation.compression


@pytest.mark.parametrize(
    ("spelled", "normal"),
    [("none", "none"), ("fp16", "fp16"), (" int8 ", "int8"), ("topk:0.10", "topk:0.1")],
)
def test_compression_is_read_in_one_spelling(tmp_path: Path, spelled: str, normal: str) -> None:
    cfg = base()
    cfg["aggregation"] = {"compression": spelled}
    assert load_config(write(tmp_path, cfg)).aggregation.compression == normal


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("zip", r"aggregation\.compression: unknown compression 'zip'"),
        ("topk:0", r"aggregation\.compression: topk: the fraction must be > 0 and <= 1"),
        ("topk:1.5", r"the fraction must be > 0 and <= 1, got 1.5"),
        ("topk:x", r"topk: 'x' is not a number"),
        (8, r"aggregation\.compression: expected none, fp16, int8 or topk:FRACTION, got 8"),
    ],
)
def test_a_bad_compression_names_the_field(tmp_path: Path, value: object, message: str) -> None:
    cfg = base()
    cfg["aggregation"] = {"compression": value}
    with pytest.raises(ConfigError, match=message):
        load_config(write(tmp_path, cfg))


def test_compression_is_refused_with_secure_aggregation_saying_why(tmp_path: Path) -> None:
    cfg = secure_with({"kind": "ring"}, 3)
    cfg["aggregation"]["compression"] = "int8"
    with pytest.raises(ConfigError, match=r"aggregation\.compression: int8 cannot be combined"):
        load_config(write(tmp_path, cfg))


def test_a_consensus_step_needs_a_compression(tmp_path: Path) -> None:
    cfg = base()
    cfg["aggregation"] = {"consensus_step": 0.5}
    with pytest.raises(ConfigError, match=r"aggregation\.consensus_step: applies only with"):
        load_config(write(tmp_path, cfg))
    cfg["aggregation"]["compression"] = "topk:0.1"
    assert load_config(write(tmp_path, cfg)).aggregation.consensus_step == 0.5
    cfg["aggregation"]["consensus_step"] = 1.5
    with pytest.raises(ConfigError, match=r"consensus_step: expected a step size > 0 and <= 1"):
        load_config(write(tmp_path, cfg))


def test_compression_joins_the_digest_only_when_on(tmp_path: Path) -> None:
    plain = load_config(write(tmp_path, base())).digest
    cfg = base()
    cfg["aggregation"] = {"compression": "none"}
    assert load_config(write(tmp_path, cfg, "none.yaml")).digest == plain
    digests = {plain}
    for spelled in ("fp16", "int8", "topk:0.1", "topk:0.2"):
        cfg["aggregation"] = {"compression": spelled}
        digests.add(load_config(write(tmp_path, cfg, f"{spelled}.yaml")).digest)
    cfg["aggregation"]["consensus_step"] = 0.3
    digests.add(load_config(write(tmp_path, cfg, "step.yaml")).digest)
    assert len(digests) == 6


def test_correlated_noise_is_read_checked_and_in_the_digest(tmp_path: Path) -> None:
    dp = {"clip_norm": 1.0, "noise_multiplier": 0.5, "delta": 1e-5}
    cfg = base()
    cfg["aggregation"] = {"dp": dict(dp)}
    plain = load_config(write(tmp_path, cfg, "plain.yaml"))
    assert plain.aggregation.dp is not None and plain.aggregation.dp.correlated_multiplier is None
    cfg["aggregation"]["dp"]["correlated_multiplier"] = 3
    correlated = load_config(write(tmp_path, cfg, "c.yaml"))
    assert correlated.aggregation.dp is not None
    assert correlated.aggregation.dp.correlated_multiplier == 3.0
    assert correlated.aggregation.dp.curious == 1
    cfg["aggregation"]["dp"]["curious"] = 2
    two = load_config(write(tmp_path, cfg, "two.yaml"))
    assert len({plain.digest, correlated.digest, two.digest}) == 3
    cfg["aggregation"]["dp"]["correlated_multiplier"] = -1
    with pytest.raises(ConfigError, match=r"aggregation\.dp\.correlated_multiplier: expected"):
        load_config(write(tmp_path, cfg))
    cfg["aggregation"]["dp"] = {**dp, "curious": 1}
    with pytest.raises(ConfigError, match=r"aggregation\.dp\.curious: applies only with"):
        load_config(write(tmp_path, cfg))


def test_correlated_noise_is_refused_where_it_could_not_cancel(tmp_path: Path) -> None:
    dp = {"clip_norm": 1.0, "noise_multiplier": 0.5, "delta": 1e-5, "correlated_multiplier": 3}
    cfg = base()
    cfg["aggregation"] = {"rule": "median", "dp": dp}
    with pytest.raises(ConfigError, match=r"correlated_multiplier: cannot be combined with rule"):
        load_config(write(tmp_path, cfg))
    secure = secure_with({"kind": "ring"}, 4)
    secure["aggregation"]["dp"] = {**dp, "correlated_multiplier": 20}  # 6 x 20 x sqrt(2) > 64
    with pytest.raises(ConfigError, match=r"must stay within aggregation\.clip \(64\)"):
        load_config(write(tmp_path, secure))
    secure["aggregation"]["clip"] = 256.0
    secure["aggregation"]["frac_bits"] = 18
    assert load_config(write(tmp_path, secure)).aggregation.dp is not None
