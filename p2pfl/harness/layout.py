"""Where a harness run's files are, and what starting one peer takes: the parts that the
local runner, the Ray actors and the multi-node processes share (no process handling)."""

from __future__ import annotations

import os
import random
import re
import socket
import sys
from dataclasses import dataclass
from pathlib import Path


@dataclass
class Layout:
    """Where a run's files are; the peer ids are p00, p01, ... (sorted = numeric order)."""

    out: Path
    peers: list[str]

    @property
    def config(self) -> Path:
        return self.out / "peers.yaml"

    def key(self, peer: str) -> Path:
        return self.out / "keys" / f"{peer}.key"

    def data(self, peer: str) -> Path:
        return self.out / "data" / f"{peer}.npz"

    @property
    def test_data(self) -> Path:
        return self.out / "data" / "test.npz"

    @property
    def state_root(self) -> Path:
        return self.out / "state"

    def state(self, peer: str) -> Path:
        return self.state_root / peer

    def log(self, peer: str) -> Path:
        return self.out / "logs" / f"{peer}.log"


def network_name(dataset: str, seed: int) -> str:
    """A valid ``network`` for peers.yaml (letters, digits, . _ -) naming the dataset."""
    stem = Path(dataset).stem if dataset.endswith(".npz") else dataset.split(":", 1)[0]
    return f"harness-{re.sub(r'[^A-Za-z0-9._-]', '-', stem)[:32]}-{seed}"


def peer_ids(count: int) -> list[str]:
    width = max(2, len(str(count - 1)))
    return [f"p{i:0{width}d}" for i in range(count)]


def free_ports(
    count: int, host: str = "127.0.0.1", span: tuple[int, int] | None = None
) -> list[int]:
    """``count`` distinct ports that were free a moment ago (held open together, so the
    kernel cannot hand out one twice). With ``span`` (first, last), drawn at random from
    that range rather than from the kernel's ephemeral ports, which it also hands to
    outgoing connections and to every other port-0 bind (Ray's workers bind theirs so):
    those cannot take a port drawn outside them before the node binds it."""
    sockets: list[socket.socket] = []
    try:
        if span is None:
            for _ in range(count):
                s = socket.socket()
                s.bind((host, 0))
                sockets.append(s)
        else:
            for port in random.sample(range(span[0], span[1] + 1), span[1] + 1 - span[0]):
                if len(sockets) == count:
                    break
                s = socket.socket()
                try:
                    s.bind((host, port))
                except OSError:
                    s.close()
                    continue
                sockets.append(s)
            if len(sockets) < count:
                raise OSError(f"fewer than {count} ports free in {span[0]}-{span[1]} on {host}")
        return [int(s.getsockname()[1]) for s in sockets]
    finally:
        for s in sockets:
            s.close()


def python_env() -> dict[str, str]:
    env = dict(os.environ)
    for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        env[var] = "1"
    # The peers import this very p2pfl, wherever it is (installed or a source checkout).
    package_root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join([package_root, *filter(None, [env.get("PYTHONPATH", "")])])
    return env


def peer_command(
    layout: Layout, peer: str, snapshots: bool, attack: str | None = None
) -> list[str]:
    """``p2pfl run`` for ``peer``; with ``attack``, the harness-only poisoning entry point
    (``p2pfl.harness.byzantine``) instead, with the same arguments."""
    entry = ["p2pfl"] if attack is None else ["p2pfl.harness.byzantine", attack]
    command = [
        sys.executable,
        "-m",
        *entry,
        "run",
        str(layout.config),
        "--id",
        peer,
        "--key",
        str(layout.key(peer)),
        "--data",
        str(layout.data(peer)),
        "--val-data",
        str(layout.test_data),
        "--state-dir",
        str(layout.state(peer)),
    ]
    if snapshots:
        command.append("--snapshots")
    return command
