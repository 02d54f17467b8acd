"""Shared fixtures: keys, configs and digits partitions for real multi-node runs."""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from p2pfl.config import Config, load_config
from p2pfl.config.local import build_local_config
from p2pfl.learning.prepare import load_digits_arrays, write_partitions
from p2pfl.proto.keys import generate_key_file

#: Every timeout in the tests is a multiple of this; raise it on slow machines.
TIMEOUT = float(os.environ.get("P2PFL_TEST_TIMEOUT", "1.0"))


def free_ports(n: int) -> list[int]:
    """Ports the kernel just handed out for port 0 (bound, read and released together)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


@dataclass
class LocalNetwork:
    root: Path
    peers: list[str]
    config_path: Path
    config: Config
    keys: dict[str, Path]
    data: dict[str, Path]
    test_data: Path

    def state(self, peer: str) -> Path:
        return self.root / "state" / peer


@pytest.fixture(scope="session")
def digits_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Digits split for up to three peers plus a held-out set (prepared once)."""
    out = tmp_path_factory.mktemp("digits")
    x, y = load_digits_arrays()
    write_partitions(x, y, 3, out, seed=7, names=["alice", "bob", "carol"])
    return out


@pytest.fixture
def make_network(tmp_path: Path, digits_dir: Path) -> Callable[..., LocalNetwork]:
    def make(
        peers: tuple[str, ...] = ("alice", "bob", "carol"),
        *,
        rounds: int = 5,
        round_timeout: float = 10.0,
        startup_timeout: float = 20.0,
        model: dict[str, Any] | None = None,
        extra: dict[str, Any] | None = None,
    ) -> LocalNetwork:
        keys_dir = tmp_path / "keys"
        keys_dir.mkdir(exist_ok=True)
        keys = {p: keys_dir / f"{p}.key" for p in peers}
        public = {p: generate_key_file(keys[p]) for p in peers}
        ports = dict(zip(peers, free_ports(len(peers)), strict=True))
        data = build_local_config(
            peers=list(peers),
            public_keys=public,
            host="127.0.0.1",
            ports=ports,
            network="test",
            seed=7,
            rounds=rounds,
            topology={"kind": "full"},
            model=model or {"kind": "mlp", "hidden": [32]},
            inputs=64,
            classes=10,
            learning_rate=0.3,
            batch_size=32,
            round_timeout=round_timeout * TIMEOUT,
        )
        data["training"]["startup_timeout"] = startup_timeout * TIMEOUT
        for section, values in (extra or {}).items():
            data.setdefault(section, {}).update(values)
        path = tmp_path / "peers.yaml"
        path.write_text(yaml.safe_dump(data), encoding="utf-8")
        return LocalNetwork(
            root=tmp_path,
            peers=list(peers),
            config_path=path,
            config=load_config(path),
            keys=keys,
            data={p: digits_dir / f"{p}.npz" for p in peers},
            test_data=digits_dir / "test.npz",
        )

    return make
