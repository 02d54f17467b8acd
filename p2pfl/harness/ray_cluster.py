"""The driver side of ``p2pfl harness --ray``: peers placed on a Ray cluster.

Each peer is a ``ray_host.PeerHost`` actor (``num_cpus`` = ``--cpus-per-peer``, ``memory``
= ``--memory-per-peer``, spread over the machines) that owns one real ``p2pfl run``
process. The harness asks each actor for its machine's address, a free port and a public
key (the private key is made there and stays there), writes peers.yaml, and hands every
actor the config, its data share and the test set through Ray's object store. While the
peers run, one batched ``status`` call per poll brings back every peer's new event-log
lines (appended to the run folder, where the harness's usual ``Tail`` reads them), output
and memory; at the end, their checkpoints and snapshots. From then on the run folder
looks exactly like a local run's, and the same report is made from it.

``--ray`` without an address starts a local Ray instance on 127.0.0.1 only: Ray is told
this is not a cluster (``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` before it is imported; every
Ray server then binds the loopback address), with no dashboard and no usage reporting.
"""

from __future__ import annotations

import contextlib
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

if TYPE_CHECKING:
    from p2pfl.harness.layout import Layout

#: How long Ray may take to place every peer's actor before the harness gives up.
PLACE_TIMEOUT_S = 120.0
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
    """The harness's handle on one peer's actor: what ``runner.PeerProcess`` is for a local
    process. State (running, exit code, memory) is as of the last ``RayCluster.sync``."""

    peer: str
    actor: Any
    command: list[str]
    threads: int
    killed_by_harness: bool = False
    stopped_by_harness: bool = False
    starts: int = 0
    peak_rss_mb: float = 0.0
    _running: bool = False
    _code: int | None = None
    _rss: float = 0.0
    _cpu: float | None = None

    def start(self, env: Mapping[str, str]) -> None:
        """(``env`` is the harness machine's: the actor makes its own, on its machine.)"""
        import ray

        ray.get(self.actor.start.remote(self.command, self.threads))
        self._running, self._code = True, None
        self.killed_by_harness = False
        self.starts += 1

    @property
    def running(self) -> bool:
        return self._running

    def exit_code(self) -> int | None:
        return self._code

    def _signal(self, signum: int) -> None:
        import ray

        ray.get(self.actor.signal.remote(signum))

    def stop(self) -> None:
        import signal

        if self._running:
            self.stopped_by_harness = True
            self._signal(signal.SIGTERM)

    def terminate(self) -> None:
        import signal

        if self._running:
            self._signal(signal.SIGTERM)
            self._signal(signal.SIGCONT)

    def pause(self) -> bool:
        import signal

        if self._running:
            self._signal(signal.SIGSTOP)
        return self._running

    def resume(self) -> None:
        import signal

        if self._running:
            self._signal(signal.SIGCONT)

    def wait(self, timeout: float) -> None:
        import ray

        code = ray.get(self.actor.wait.remote(timeout))
        if code is not None:
            self._running, self._code = False, code

    def kill(self, *, by_harness: bool = True) -> None:
        import ray

        if self._running:
            self.killed_by_harness = by_harness or self.killed_by_harness
            ray.get(self.actor.kill.remote())
            self._running, self._code = False, -9

    def rss_mb(self) -> float:
        return self._rss if self._running else 0.0

    def close_log(self) -> None:
        """(The output is copied by ``RayCluster.sync``.)"""

    def cpu_sample(self) -> tuple[str, float] | None:
        """(This peer's process, its CPU seconds) as of the last sync."""
        return None if self._cpu is None else (f"{self.peer}:{self.starts}", self._cpu)

    def note(self, running: bool, code: int | None, rss: float, cpu: float | None = None) -> None:
        """What the actor reported."""
        self._running, self._code, self._rss, self._cpu = running, code, rss, cpu
        self.peak_rss_mb = max(self.peak_rss_mb, rss)


@dataclass
class RayCluster:
    """A connection to Ray (and the local instance, if this harness started one) and the
    run's actors."""

    options: RayOptions
    started_here: bool
    cpus_per_peer: float = 1.0
    peers: dict[str, RayPeer] = field(default_factory=dict)
    placements: dict[str, Placement] = field(default_factory=dict)
    _actors: dict[str, Any] = field(default_factory=dict)

    @property
    def threads(self) -> int:
        """Threads per peer: its whole CPUs (at least one)."""
        return max(1, math.floor(self.cpus_per_peer))

    def describe(self) -> str:
        import ray

        nodes = [n for n in ray.nodes() if n.get("Alive")]
        where = "a local Ray instance on 127.0.0.1" if self.started_here else "Ray"
        cpus = ray.cluster_resources().get("CPU", 0)
        return (
            f"{where}: {len(nodes)} machine(s), {cpus:g} CPUs; each peer an actor with "
            f"{self.cpus_per_peer:g} CPU(s), {self.threads} thread(s)"
            + (
                ""
                if self.options.memory_per_peer_mb is None
                else f", {self.options.memory_per_peer_mb:g} MB"
            )
        )

    def place(self, peers: Sequence[str]) -> dict[str, Placement]:
        """An actor per peer, spread over the machines; its address, port and public key."""
        import ray

        from p2pfl.harness.ray_host import PeerHost

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
        # SPREAD: peers on as many machines as there are (the point of a cluster run).
        resources: dict[str, Any] = {
            "num_cpus": self.cpus_per_peer,
            "scheduling_strategy": "SPREAD",
        }
        if self.options.memory_per_peer_mb is not None:
            resources["memory"] = int(self.options.memory_per_peer_mb * 2**20)
        actor_class = ray.remote(PeerHost).options(**resources)
        self._actors = {peer: actor_class.remote(peer) for peer in peers}
        try:
            found = ray.get(
                [actor.place.remote() for actor in self._actors.values()],
                timeout=PLACE_TIMEOUT_S,
            )
        except ray.exceptions.GetTimeoutError:
            raise RayError(
                f"Ray placed too few of the {len(peers)} peers within {PLACE_TIMEOUT_S:g} s "
                f"(each asks {self.cpus_per_peer:g} CPUs"
                + (
                    ""
                    if self.options.memory_per_peer_mb is None
                    else f" and {self.options.memory_per_peer_mb:g} MB"
                )
                + f"; the cluster has {ray.available_resources()}"
            ) from None
        self.placements = {
            peer: Placement(str(host), int(port), str(public))
            for peer, (host, port, public) in zip(self._actors, found, strict=True)
        }
        return self.placements

    def info(self) -> dict[str, Any]:
        """For summary.json: where the run went and what each peer had."""
        return {
            "address": self.options.address or "local",
            "machines": len({p.host for p in self.placements.values()}),
            "cpus_per_peer": self.cpus_per_peer,
            "threads_per_peer": self.threads,
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
                actor.install.remote(config_text, ray.put(shares[peer]), test_ref)
                for peer, actor in self._actors.items()
            ]
        )

    def handles(self, commands: Mapping[str, list[str]]) -> dict[str, RayPeer]:
        """The harness's handles on the actors, with each peer's ``p2pfl run`` command
        (relative paths: it runs in the actor's folder, which mirrors the run folder)."""
        self.peers = {
            peer: RayPeer(peer, self._actors[peer], list(command), self.threads)
            for peer, command in commands.items()
        }
        return self.peers

    def sync(self, layout: Layout) -> None:
        """Every peer's state, new event-log lines and output, into the run folder."""
        import ray

        asked = {peer: p.actor.status.remote() for peer, p in self.peers.items()}
        for peer, future in asked.items():
            try:
                running, code, rss, cpu, events, output = ray.get(future)
            except ray.exceptions.RayActorError:  # its machine or worker is gone
                self.peers[peer].note(False, LOST, 0.0)
                continue
            self.peers[peer].note(running, code, rss, cpu)
            _append(layout.state(peer) / "events.jsonl", events)
            _append(layout.log(peer), output)

    def collect(self, layout: Layout) -> None:
        """After the peers stopped: the rest of their logs, and their state folders'
        checkpoints and snapshots, into the run folder."""
        import ray

        for _ in range(1000):  # (a log longer than one status call's chunk takes several)
            before = [_size(layout.state(p) / "events.jsonl") for p in self.peers]
            self.sync(layout)
            if before == [_size(layout.state(p) / "events.jsonl") for p in self.peers]:
                break
        asked = {peer: p.actor.files.remote() for peer, p in self.peers.items()}
        for peer, future in asked.items():
            try:
                files = ray.get(future)
            except ray.exceptions.RayActorError:
                continue  # (lost with its machine: its events are in, its checkpoint is not)
            state = layout.state(peer).resolve()
            for relative, content in files.items():
                target = (state / relative).resolve()
                if not target.is_relative_to(state):  # (an actor cannot write elsewhere)
                    raise RayError(f"peer {peer} handed back a file outside its folder: {relative}")
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(content)

    def close(self) -> None:
        """Remove the peers' folders on the workers, end the actors, and shut the local
        instance down (a cluster given by address is only disconnected from)."""
        import ray

        if self._actors:
            # (best effort on the way out: the actors end below whatever happened)
            with contextlib.suppress(Exception):
                ray.get([actor.cleanup.remote() for actor in self._actors.values()], timeout=60)
            for actor in self._actors.values():
                ray.kill(actor)
        ray.shutdown()


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
def connected(options: RayOptions) -> Iterator[RayCluster]:
    """Ray for one run: started locally (127.0.0.1 only) or joined at ``options.address``;
    shut down or left on the way out, whatever happens."""
    home = os.environ.get("HOME")
    private_home = None
    if options.address is None:
        for name, value in LOCAL_RAY_ENV.items():
            os.environ[name] = value
        private_home = _private_home()
        os.environ["HOME"] = private_home
    try:
        import ray
    except ImportError:
        _leave_home(home, private_home)
        raise RayError("--ray needs Ray: pip install 'p2pfl[ray]'") from None
    try:
        if options.address is None:
            ray.init(
                include_dashboard=False,
                num_cpus=os.cpu_count() or 1,
                log_to_driver=False,
                logging_level=logging.WARNING,
            )
        else:
            ray.init(address=options.address, log_to_driver=False, logging_level=logging.WARNING)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        _leave_home(home, private_home)
        raise RayError(f"--ray {options.address or ''}: {exc}") from exc
    cluster = RayCluster(options, started_here=options.address is None)
    try:
        yield cluster
    finally:
        try:
            cluster.close()
        finally:
            _leave_home(home, private_home)


def _private_home() -> str:
    """A HOME of its own for a local Ray instance, holding an (empty) autoscaler config.
    Without one, Ray's dashboard process asks the cloud metadata address (169.254.169.254)
    which cloud it runs on, usage statistics or not: a connection off this machine. With
    one, it reads the provider from the file and asks nobody. (Ray also keeps its
    authentication token under HOME: a new one per run.)"""
    home = tempfile.mkdtemp(prefix="p2pfl-ray-home-")
    Path(home, "ray_bootstrap_config.yaml").write_text("provider:\n  type: local\n")
    return home


def _leave_home(home: str | None, private_home: str | None) -> None:
    """HOME as it was, and the private one removed."""
    if private_home is None:
        return
    if home is None:
        os.environ.pop("HOME", None)
    else:
        os.environ["HOME"] = home
    shutil.rmtree(private_home, ignore_errors=True)
