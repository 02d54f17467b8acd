"""The worker side of ``p2pfl harness --ray``: one ``PeerHost`` actor per process of peers
(one peer, or K with ``--nodes-per-process K``), owning that real process on whatever
machine Ray placed it.

Why an actor that owns a process, and not a node running inside the actor: the peers stay
exactly what an operator or the local harness runs (with one node per process: its own
interpreter, event loop, signal handling and final checkpoint on SIGTERM, ``--kill`` a
SIGKILL of that process alone, its memory its own; with several, the multi-node process of
``harness/multinode.py``, as locally). A node inside Ray's worker process would share it
with Ray's threads and could only be "killed" by killing the actor.

Why the private keys are made here: they never leave the machine that runs the peers, as
in a deployment; only the public keys go back to the harness for peers.yaml.

On the worker the actor drives its process with the harness's own local handles
(``processes.PeerProcess`` for one peer, ``groups.GroupMember`` for several), so a peer on
Ray is started, stopped, killed and restarted exactly as a local one. Nothing here imports
Ray: the class is made an actor by ``ray_cluster`` (so it also runs, and is tested, as a
plain object).
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from p2pfl.harness.groups import GroupMember, NodeGroup, group_name
from p2pfl.harness.layout import free_ports, python_env
from p2pfl.harness.processes import PeerHandle, PeerProcess

#: Most bytes of a log handed back per ``status`` call (the rest comes at the next one).
MAX_CHUNK = 8 << 20
#: The BLAS thread pools a peer's threads setting caps.
THREAD_VARS = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")
#: Where the peers on a Ray worker listen: outside the kernel's ephemeral ports (32768-60999
#: on Linux), which Ray's own workers and every outgoing connection draw from, and above
#: Ray's fixed ports (6379, 8265, 10001, its worker range from 10002).
PEER_PORTS = (20000, 29999)
#: What the harness may ask of a peer's handle through ``call``.
CALLS = frozenset({"start", "stop", "terminate", "pause", "resume", "kill", "wait"})

#: One peer's state as ``status`` reports it: running, exit code, resident MB (its share),
#: (which process, its CPU seconds) or None.
PeerState = tuple[bool, int | None, float, tuple[str, float] | None]


class PeerHost:
    """Some peers' files and their one process on a Ray worker. Its working folder mirrors
    the run folder's layout (peers.yaml, keys/, data/, state/, logs/), so the harness's own
    ``peer_command`` with relative paths runs here unchanged."""

    def __init__(self, peers: Sequence[str], root: str | None = None) -> None:
        self.peers = list(peers)
        self.workdir = Path(tempfile.mkdtemp(prefix=f"p2pfl-{group_name(self.peers)}-", dir=root))
        self.output = self.workdir / "logs" / f"{group_name(self.peers)}.log"
        self.handles: dict[str, PeerHandle] = {}
        self.threads = 1
        self.host = "127.0.0.1"
        self.ports = PEER_PORTS
        #: How far the harness has read each event log and the output.
        self._sent: dict[str, int] = {}

    # ------------------------------------------------------------------ set-up

    def place(
        self, ports: tuple[int, int] = PEER_PORTS, host: str | None = None
    ) -> list[tuple[str, int, str]]:
        """Per peer: this machine's address (as Ray knows it), a port from ``ports`` free
        on it a moment ago, and the public key of a private key made here."""
        from p2pfl.proto.keys import generate_key_file

        if host is None:
            import ray

            host = str(ray.util.get_node_ip_address())
        self.host, self.ports = host, ports
        return [
            (host, port, generate_key_file(self.workdir / "keys" / f"{peer}.key"))
            for peer, port in zip(self.peers, self.new_ports(), strict=True)
        ]

    def new_ports(self) -> list[int]:
        """A port per peer from this actor's ports (a slice of ``PEER_PORTS`` the harness
        gives each actor, so that actors sharing a machine do not draw the same), free on
        this machine a moment ago."""
        return free_ports(len(self.peers), self.host, self.ports)

    def install(
        self,
        config_text: str,
        shares: Mapping[str, tuple[np.ndarray, np.ndarray]],
        test: tuple[np.ndarray, np.ndarray],
    ) -> None:
        """peers.yaml, these peers' data shares and the shared test set, as files."""
        (self.workdir / "data").mkdir(exist_ok=True)
        (self.workdir / "logs").mkdir(exist_ok=True)
        (self.workdir / "peers.yaml").write_text(config_text, encoding="utf-8")
        for peer in self.peers:
            x, y = shares[peer]
            np.savez(self.workdir / "data" / f"{peer}.npz", x=x, y=y)
        np.savez(self.workdir / "data" / "test.npz", x=test[0], y=test[1])

    def configure(self, commands: Mapping[str, list[str]], threads: int) -> None:
        """Each peer's ``python -m ...`` command (relative paths, from this folder), run
        with this machine's Python and p2pfl and ``threads`` threads for BLAS and torch."""
        self.threads = threads
        thread_flag = ["--threads", str(threads)]
        if len(self.peers) == 1:
            (peer,) = self.peers
            command = [sys.executable, *commands[peer][1:], *thread_flag]
            self.handles = {peer: PeerProcess(peer, command, self.output, cwd=self.workdir)}
            return
        specs = {peer: [*commands[peer][2:], *thread_flag] for peer in self.peers}
        group = NodeGroup(self.peers, specs, self.output, cwd=self.workdir)
        self.handles = {peer: GroupMember(peer, group) for peer in self.peers}

    # ------------------------------------------------------------------ the process

    def call(self, peer: str, method: str, *args: Any, **kwargs: Any) -> Any:
        """``method`` of ``peer``'s handle, as the harness would call it on a local one
        (``start`` gets this machine's environment)."""
        if method not in CALLS:
            raise ValueError(f"not a peer handle's call: {method!r}")
        if method == "start":
            env = python_env()
            for var in THREAD_VARS:
                env[var] = str(self.threads)
            args = (env,)
        return getattr(self.handles[peer], method)(*args, **kwargs)

    def status(self) -> tuple[dict[str, PeerState], dict[str, bytes], bytes]:
        """Every peer's state and new event-log bytes, and the process's new output."""
        states: dict[str, PeerState] = {}
        events: dict[str, bytes] = {}
        for peer in self.peers:
            handle = self.handles.get(peer)  # (None: not configured yet)
            running = handle is not None and handle.running
            if handle is None:
                states[peer] = (False, None, 0.0, None)
            else:
                rss = handle.rss_mb() if running else 0.0
                states[peer] = (running, handle.exit_code(), rss, handle.cpu_sample())
            events[peer] = self._read(peer, self.workdir / "state" / peer / "events.jsonl")
        return states, events, self._read("", self.output)

    def _read(self, name: str, path: Path) -> bytes:
        try:
            with open(path, "rb") as f:
                f.seek(self._sent.get(name, 0))
                chunk = f.read(MAX_CHUNK)
        except OSError:
            return b""
        self._sent[name] = self._sent.get(name, 0) + len(chunk)
        return chunk

    # ------------------------------------------------------------------ the end

    def files(self) -> dict[str, dict[str, bytes]]:
        """Per peer, every file of its state folder but its event log (which ``status``
        has handed over already): checkpoints, snapshots, the final model. Keyed by path
        relative to the state folder."""
        found: dict[str, dict[str, bytes]] = {}
        for peer in self.peers:
            state = self.workdir / "state" / peer
            found[peer] = {
                path.relative_to(state).as_posix(): path.read_bytes()
                for path in (sorted(state.rglob("*")) if state.is_dir() else [])
                if path.is_file() and not path.is_symlink() and path.name != "events.jsonl"
            }
        return found

    def cleanup(self) -> None:
        """Stop the process (SIGKILL: the harness has stopped it properly already) and
        remove this folder, the private keys with it."""
        for handle in self.handles.values():
            handle.kill(by_harness=False)
            handle.close_log()
        shutil.rmtree(self.workdir, ignore_errors=True)
