"""The driver side of ``p2pfl harness --ray``: peers placed on a Ray cluster.

Each process of peers (one, or K with ``--nodes-per-process K``) is a ``ray_host.PeerHost``
actor (``num_cpus`` = ``--cpus-per-peer`` x its peers, ``memory`` likewise, spread over the
machines) that owns that one real process. The harness asks each actor for its machine's
address, free ports and public keys (the private keys are made there and stay there),
writes peers.yaml, and hands every actor the config, its peers' data shares and the test
set through Ray's object store. While the peers run, one batched ``status`` call per poll
brings back every peer's new event-log lines (appended to the run folder, where the
harness's usual ``Tail`` reads them), output, memory and CPU; the monitor's calls (start,
stop, kill, pause) are forwarded to the actor, which makes them on the local handles of
its machine; at the end, the peers' checkpoints and snapshots come back. From then on the
run folder looks exactly like a local run's, and the same report is made from it.

``--ray`` without an address starts a local Ray instance on 127.0.0.1 only: Ray is told
this is not a cluster (``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` before it is imported; every
Ray server then binds the loopback address), with no dashboard and no usage reporting, and
a HOME of its own (see ``_private_home``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from p2pfl.errors import P2PFLError
from p2pfl.harness.groups import group_name, groups_of

if TYPE_CHECKING:
    from p2pfl.harness.layout import Layout
    from p2pfl.harness.ray_host import PeerState

#: How long Ray may take to place every peer's actor before the harness gives up.
PLACE_TIMEOUT_S = 120.0
#: How often clashing actors may draw their ports again.
MAX_PORT_DRAWS = 20
#: The exit code of a peer whose actor is gone (its machine or Ray worker died).
LOST = -1000
#: Set before ``import ray`` for a local instance (see the module docstring).
LOCAL_RAY_ENV = {
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    "RAY_USAGE_STATS_ENABLED": "0",
}


class RayError(P2PFLError):
    """Ray is missing, cannot be reached, or cannot place the peers (the message says why)."""


@dataclass(frozen=True)
class RayOptions:
    #: ``--ray ADDRESS`` (e.g. 10.0.0.1:6379 or auto); None: start a local instance.
    address: str | None = None
    #: Ray CPUs per peer (fractional is fine); None: the cluster's CPUs shared out.
    cpus_per_peer: float | None = None
    #: Ray memory per peer in MB (a scheduling resource: Ray places by it, it does not
    #: cap the process); None: not asked for.
    memory_per_peer_mb: float | None = None


@dataclass(frozen=True)
class Placement:
    host: str
    port: int
    public_key: str


@dataclass
class RayPeer:
    """The harness's handle on one peer of an actor's process: what ``processes.PeerProcess``
    (or ``groups.GroupMember``) is locally, which the actor runs on its machine; each call
    is forwarded to it. State (running, exit code, memory, CPU) is as of the last
    ``RayCluster.sync``, or of this handle's own last call."""

    peer: str
    actor: Any
    #: The actor's name (its first and last peer), for telling processes apart.
    where: str
    killed_by_harness: bool = False
    stopped_by_harness: bool = False
    peak_rss_mb: float = 0.0
    _state: PeerState = (False, None, 0.0, None)
    _starts: int = 0

    def _call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        import ray

        return ray.get(self.actor.call.remote(self.peer, method, *args, **kwargs))

    @property
    def starts(self) -> int:
        return self._starts

    def start(self, env: Mapping[str, str]) -> None:
        """(``env`` is the harness machine's: the actor makes its own, on its machine.)"""
        self._call("start")
        self._state = (True, None, 0.0, None)
        self.killed_by_harness = False
        self._starts += 1

    @property
    def running(self) -> bool:
        return self._state[0]

    def exit_code(self) -> int | None:
        return None if self.running else self._state[1]

    def stop(self) -> None:
        if self.running:
            self.stopped_by_harness = True
            self._call("stop")

    def terminate(self) -> None:
        if self.running:
            self._call("terminate")

    def pause(self, sparing: str) -> bool:
        return bool(self.running and self._call("pause", sparing))

    def resume(self) -> None:
        if self.running:
            self._call("resume")

    def wait(self, timeout: float) -> None:
        self._call("wait", timeout)

    def kill(self, *, by_harness: bool = True) -> None:
        if self.running:
            self._call("kill", by_harness=by_harness)
            self.killed_by_harness = by_harness or self.killed_by_harness
            self._state = (False, -9, 0.0, None)

    def rss_mb(self) -> float:
        return self._state[2] if self.running else 0.0

    def cpu_sample(self) -> tuple[str, float] | None:
        sample = self._state[3]
        return None if sample is None else (f"{self.where}:{sample[0]}", sample[1])

    def close_log(self) -> None:
        """(The output is copied by ``RayCluster.sync``.)"""

    def note(self, state: PeerState) -> None:
        """What the actor reported."""
        self._state = state
        self.peak_rss_mb = max(self.peak_rss_mb, state[2])


@dataclass
class RayCluster:
    """A connection to Ray (and the local instance, if this harness started one) and the
    run's actors: one per process, which runs one peer or ``nodes_per_process`` of them."""

    options: RayOptions
    started_here: bool
    nodes_per_process: int = 1
    cpus_per_peer: float = 1.0
    peers: dict[str, RayPeer] = field(default_factory=dict)
    placements: dict[str, Placement] = field(default_factory=dict)
    #: Each actor, by its name (its first and last peer), with its peers.
    _actors: dict[str, tuple[Any, list[str]]] = field(default_factory=dict)

    @property
    def threads(self) -> int:
        """Threads per process: its whole CPUs (at least one)."""
        return max(1, math.floor(self.cpus_per_peer * self.nodes_per_process))

    def describe(self) -> str:
        import ray

        nodes = [n for n in ray.nodes() if n.get("Alive")]
        where = "a local Ray instance on 127.0.0.1" if self.started_here else "Ray"
        cpus = ray.cluster_resources().get("CPU", 0)
        memory = self.options.memory_per_peer_mb
        return (
            f"{where}: {len(nodes)} machine(s), {cpus:g} CPUs; an actor per process of "
            f"{self.nodes_per_process} peer(s), {self.cpus_per_peer:g} CPU(s) per peer"
            + ("" if memory is None else f", {memory:g} MB per peer")
            + f", {self.threads} thread(s) per process"
        )

    def place(self, peers: Sequence[str]) -> dict[str, Placement]:
        """An actor per process of peers, spread over the machines; each peer's address,
        port and public key."""
        import ray

        cpus = ray.cluster_resources().get("CPU", 0)
        if self.options.cpus_per_peer is None:
            self.cpus_per_peer = min(1.0, cpus / len(peers)) if cpus else 1.0
        else:
            self.cpus_per_peer = self.options.cpus_per_peer
        need = self.cpus_per_peer * len(peers)
        if need > cpus + 1e-9:
            raise RayError(
                f"{len(peers)} peers x {self.cpus_per_peer:g} CPUs = {need:g} CPUs, but the Ray "
                f"cluster has {cpus:g}: lower --cpus-per-peer (fractions are fine) or add "
                "machines"
            )
        self._actors = {
            group_name(members): (self._actor(len(members)).remote(members), members)
            for members in groups_of(peers, self.nodes_per_process)
        }
        try:
            found = ray.get(
                [
                    actor.place.remote(span)
                    for (actor, _), span in zip(
                        self._actors.values(), port_slices(len(self._actors)), strict=True
                    )
                ],
                timeout=PLACE_TIMEOUT_S,
            )
        except ray.exceptions.GetTimeoutError:
            raise RayError(
                f"Ray placed too few of the {len(self._actors)} processes within "
                f"{PLACE_TIMEOUT_S:g} s (each asks {self.cpus_per_peer:g} CPUs per peer"
                + (
                    ""
                    if self.options.memory_per_peer_mb is None
                    else f" and {self.options.memory_per_peer_mb:g} MB per peer"
                )
                + f"; the cluster has {ray.available_resources()}"
            ) from None
        self.placements = {
            peer: Placement(str(host), int(port), str(public))
            for (_, members), places in zip(self._actors.values(), found, strict=True)
            for peer, (host, port, public) in zip(members, places, strict=True)
        }
        self._distinct_ports()
        return self.placements

    def _distinct_ports(self) -> None:
        """Every (host, port) distinct, or the actors holding a taken one draw again. (Each
        actor draws from a slice of its own, so this only guards against what should not
        happen.)"""
        import ray

        for _ in range(MAX_PORT_DRAWS):
            clashing = _clashing_actors(self.placements, self._actors)
            if not clashing:
                return
            drawn = ray.get([self._actors[name][0].new_ports.remote() for name in clashing])
            for name, ports in zip(clashing, drawn, strict=True):
                for peer, port in zip(self._actors[name][1], ports, strict=True):
                    self.placements[peer] = dataclasses.replace(self.placements[peer], port=port)
        raise RayError(f"no distinct ports for the peers after {MAX_PORT_DRAWS} draws")

    def _actor(self, peers: int) -> Any:
        """The actor class with the resources of a process of ``peers`` peers. SPREAD:
        processes on as many machines as there are (the point of a cluster run)."""
        import ray

        from p2pfl.harness.ray_host import PeerHost

        resources: dict[str, Any] = {
            "num_cpus": self.cpus_per_peer * peers,
            "scheduling_strategy": "SPREAD",
        }
        if self.options.memory_per_peer_mb is not None:
            resources["memory"] = int(self.options.memory_per_peer_mb * peers * 2**20)
        return ray.remote(PeerHost).options(**resources)

    def info(self) -> dict[str, Any]:
        """For summary.json: where the run went and what each peer had."""
        return {
            "address": self.options.address or "local",
            "machines": len({p.host for p in self.placements.values()}),
            "cpus_per_peer": self.cpus_per_peer,
            "threads_per_process": self.threads,
            "memory_per_peer_mb": self.options.memory_per_peer_mb,
            "hosts": {peer: p.host for peer, p in self.placements.items()},
        }

    def install(
        self,
        config_text: str,
        shares: Mapping[str, tuple[np.ndarray, np.ndarray]],
        test: tuple[np.ndarray, np.ndarray],
    ) -> None:
        """peers.yaml, each peer's share and the test set, through the object store."""
        import ray

        test_ref = ray.put(test)
        ray.get(
            [
                actor.install.remote(
                    config_text, ray.put({peer: shares[peer] for peer in members}), test_ref
                )
                for actor, members in self._actors.values()
            ]
        )

    def logs(self, layout: Layout) -> dict[str, Path]:
        """Where each peer's process output goes in the run folder."""
        return {
            peer: layout.out / "logs" / f"{name}.log"
            for name, (_, members) in self._actors.items()
            for peer in members
        }

    def handles(self, commands: Mapping[str, list[str]]) -> dict[str, RayPeer]:
        """The harness's handles on the peers, each actor told its peers' ``p2pfl run``
        commands (relative paths: they run in the actor's folder, which mirrors the run
        folder)."""
        import ray

        ray.get(
            [
                actor.configure.remote({p: commands[p] for p in members}, self.threads)
                for actor, members in self._actors.values()
            ]
        )
        self.peers = {
            peer: RayPeer(peer, actor, name)
            for name, (actor, members) in self._actors.items()
            for peer in members
        }
        return self.peers

    def sync(self, layout: Layout) -> None:
        """Every peer's state, new event-log lines and output, into the run folder."""
        import ray

        asked = {name: actor.status.remote() for name, (actor, _) in self._actors.items()}
        for name, future in asked.items():
            try:
                states, events, output = ray.get(future)
            except ray.exceptions.RayActorError:  # its machine or worker is gone
                for peer in self._actors[name][1]:
                    self.peers[peer].note((False, LOST, 0.0, None))
                continue
            for peer, state in states.items():
                self.peers[peer].note(state)
                _append(layout.state(peer) / "events.jsonl", events[peer])
            _append(layout.out / "logs" / f"{name}.log", output)

    def collect(self, layout: Layout) -> None:
        """After the peers stopped: the rest of their logs, and their state folders'
        checkpoints and snapshots, into the run folder."""
        import ray

        for _ in range(1000):  # (a log longer than one status call's chunk takes several)
            before = [_size(layout.state(p) / "events.jsonl") for p in self.peers]
            self.sync(layout)
            if before == [_size(layout.state(p) / "events.jsonl") for p in self.peers]:
                break
        asked = {name: actor.files.remote() for name, (actor, _) in self._actors.items()}
        for future in asked.values():
            try:
                everything = ray.get(future)
            except ray.exceptions.RayActorError:
                continue  # (lost with its machine: its events are in, its checkpoints not)
            for peer, files in everything.items():
                _write_state(layout.state(peer), peer, files)

    def close(self, ray: Any) -> None:
        """Remove the peers' folders on the workers and end the actors (``connected``
        then shuts the local instance down, or disconnects from a cluster)."""
        if self._actors:
            # (best effort on the way out: the actors end below whatever happened)
            with contextlib.suppress(Exception):
                ray.get([actor.cleanup.remote() for actor, _ in self._actors.values()], timeout=60)
            for actor, _ in self._actors.values():
                ray.kill(actor)


def port_slices(actors: int) -> list[tuple[int, int]]:
    """``ray_host.PEER_PORTS`` cut into one slice per actor: actors on one machine then
    never draw the same port (actors on different machines may, harmlessly)."""
    from p2pfl.harness.ray_host import PEER_PORTS

    first, last = PEER_PORTS
    size = (last + 1 - first) // actors
    if size < 1:
        raise RayError(f"{actors} processes: more than the {last + 1 - first} peer ports")
    return [(first + i * size, first + (i + 1) * size - 1) for i in range(actors)]


def _clashing_actors(
    placements: Mapping[str, Placement], actors: Mapping[str, tuple[Any, list[str]]]
) -> list[str]:
    """The actors (but the first of each clash) holding a (host, port) another one holds."""
    owner: dict[tuple[str, int], str] = {}
    clashing: list[str] = []
    for name, (_, members) in actors.items():
        for peer in members:
            where = (placements[peer].host, placements[peer].port)
            if owner.setdefault(where, name) != name and name not in clashing:
                clashing.append(name)
    return clashing


def _write_state(state: Path, peer: str, files: Mapping[str, bytes]) -> None:
    """A peer's state files as its actor handed them back (only inside its folder)."""
    root = state.resolve()
    for relative, content in files.items():
        target = (root / relative).resolve()
        if not target.is_relative_to(root):
            raise RayError(f"peer {peer} handed back a file outside its folder: {relative}")
        target.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        # (owner-only, as the node keeps its state folder: models are the owner's data)
        descriptor = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(descriptor, "wb") as f:
            f.write(content)


def _append(path: Path, data: bytes) -> None:
    if data:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "ab") as f:
            f.write(data)


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


@contextlib.contextmanager
def connected(options: RayOptions, nodes_per_process: int = 1) -> Iterator[RayCluster]:
    """Ray for one run: started locally (127.0.0.1 only) or joined at ``options.address``;
    shut down or left on the way out, and the environment as it was, whatever happens."""
    saved = {name: os.environ.get(name) for name in (*LOCAL_RAY_ENV, "HOME")}
    private_home = None
    try:
        if options.address is None:
            os.environ.update(LOCAL_RAY_ENV)
            private_home = _private_home()
            os.environ["HOME"] = private_home
        with _ray_session(options) as ray:
            cluster = RayCluster(options, options.address is None, nodes_per_process)
            try:
                yield cluster
            finally:
                cluster.close(ray)
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        if private_home is not None:
            shutil.rmtree(private_home, ignore_errors=True)


@contextlib.contextmanager
def _ray_session(options: RayOptions) -> Iterator[Any]:
    """``ray``, initialised; shut down on the way out (also when ``init`` fails half way)."""
    try:
        import ray
    except ImportError:
        raise RayError("--ray needs Ray: pip install 'p2pfl[ray]'") from None
    try:
        try:
            if options.address is None:
                ray.init(
                    include_dashboard=False,
                    num_cpus=os.cpu_count() or 1,
                    log_to_driver=False,
                    logging_level=logging.WARNING,
                )
            else:
                ray.init(
                    address=options.address, log_to_driver=False, logging_level=logging.WARNING
                )
        except (ConnectionError, RuntimeError, ValueError) as exc:
            raise RayError(f"--ray {options.address or ''}: {exc}") from exc
        yield ray
    finally:
        ray.shutdown()


def _private_home() -> str:
    """A HOME of its own for a local Ray instance, holding an (empty) autoscaler config.
    Without one, Ray's dashboard process asks the cloud metadata address (169.254.169.254)
    which cloud it runs on, usage statistics or not: a connection off this machine. With
    one, it reads the provider from the file and asks nobody. (Ray also keeps its
    authentication token under HOME: a new one per run.)"""
    home = tempfile.mkdtemp(prefix="p2pfl-ray-home-")
    Path(home, "ray_bootstrap_config.yaml").write_text("provider:\n  type: local\n")
    return home
