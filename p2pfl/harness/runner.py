"""``p2pfl harness``: N real ``p2pfl run`` processes on 127.0.0.1, from data to report
(or K nodes per process, ``groups``; or on a Ray cluster, ``ray_cluster``).

What a run does, in order (each step is what an operator would do by hand):
  1. load the dataset, hold out a test set, split the rest among the peers, write files;
  2. generate one key per peer and a peers.yaml on free loopback ports (with Ray: each
     actor makes its peers' keys and draws their ports on its machine);
  3. start one ``p2pfl run`` process per peer, follow their event logs for live progress,
     and inject the requested faults (SIGKILL, restart);
  4. when they are done, evaluate every peer's final model on the test set, train the
     centralised baseline, and write summary.json and report.png.

Every process the harness starts is stopped on the way out, also on Ctrl-C or an error.
Polling the logs here is a viewer's loop, not the round path: the peers never wait for it.
"""

from __future__ import annotations

import contextlib
import shutil
import signal
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import numpy as np
import yaml

from p2pfl.errors import P2PFLError
from p2pfl.harness.faults import Fault, FaultPlan
from p2pfl.harness.groups import GroupMember, NodeGroup, group_name, groups_of
from p2pfl.harness.hosts import HostNetwork, address_of, sweep_stale
from p2pfl.harness.layout import (
    Layout,
    free_ports,
    network_name,
    peer_command,
    peer_ids,
    python_env,
)
from p2pfl.harness.links import LinkSpec, describe_links
from p2pfl.harness.netfaults import NetFault, NetFaultPlan
from p2pfl.harness.partition import PartitionSpec
from p2pfl.harness.processes import PeerHandle, PeerProcess, stop_all
from p2pfl.harness.progress import RunProgress
from p2pfl.harness.ray_cluster import LOST, RayOptions
from p2pfl.learning.base import Task
from p2pfl.logs.read import Event, Tail

if TYPE_CHECKING:
    from p2pfl.harness.baseline import BaselineResult
    from p2pfl.harness.datasets import SplitData
    from p2pfl.harness.ray_cluster import Placement, RayCluster
    from p2pfl.harness.report import PeerResult

#: Monitor loop period: each poll reads every peer's new events, which costs CPU the peers
#: share (32 peers, 10 ms: 11% of a core, two peers' worth); 20 updates a second are
#: plenty for the progress line. Faults fire within one period of the round they name, so
#: while one is pending (or peers are paused for a restart) the loop runs faster.
POLL_S = 0.05
FAULT_POLL_S = 0.002
#: Longest pause of the other peers while a restarted one starts up.
MAX_PAUSE_S = 10.0
#: With --hosts every peer listens on this port of its own host's address.
HOST_PORT = 7070


class Terminated(KeyboardInterrupt):
    """The harness got SIGTERM: it cleans up as on Ctrl-C, then exits 143."""


class HarnessError(P2PFLError):
    """The harness could not set up or complete a run (the message says what to do)."""


@dataclass(frozen=True)
class HarnessOptions:
    peers: int
    topology: Mapping[str, Any]
    topology_text: str
    rounds: int
    dataset: str
    partition: PartitionSpec
    model: Mapping[str, Any]
    model_text: str
    seed: int
    out: Path
    learning_rate: float = 0.3
    batch_size: int = 32
    local_epochs: int = 1
    round_timeout: float = 30.0
    down_grace: float = 2.0
    faults: tuple[Fault, ...] = ()
    baseline: bool = True
    snapshots: bool = True
    #: Standardize features (z-score over the pooled training data); None: only for .npz.
    standardize: bool | None = None
    secure: bool = False
    #: aggregation.dp for peers.yaml (clip_norm, noise_multiplier, delta), or None.
    dp: Mapping[str, float] | None = None
    progress: bool = True
    #: ``--task`` for an .npz dataset (regression: real targets); None: from the dataset.
    task: Task | None = None
    #: aggregation.rule for peers.yaml (metropolis, median, trimmed-mean:B, clipped:T).
    rule: str = "metropolis"
    #: aggregation.compression for peers.yaml (none, fp16, int8, topk:F).
    compression: str = "none"
    #: aggregation.consensus_step (None: the compression's default).
    consensus_step: float | None = None
    #: Poisoning peers: peer -> attack (``--byzantine PEER:KIND``).
    byzantine: Mapping[str, str] = field(default_factory=dict)
    #: ``--hosts``: every peer on a simulated host of its own, with this link (peer ->
    #: LinkSpec); None: every peer on 127.0.0.1.
    hosts: Mapping[str, LinkSpec] | None = None
    #: ``--split`` and ``--cut`` (with ``hosts`` only).
    net_faults: tuple[NetFault, ...] = ()
    #: ``--ipv6``: the simulated hosts' addresses are IPv6 (fd77::N), peers.yaml's too.
    ipv6: bool = False
    #: ``--ray``: every peer on a Ray worker (None: local processes).
    ray: RayOptions | None = None
    #: ``--nodes-per-process``: nodes that share one interpreter (1: a process each).
    nodes_per_process: int = 1
    #: ``--eval-samples``: the peers evaluate every round on this many test samples (None:
    #: all); the final evaluation takes the whole test set.
    eval_samples: int | None = None


# --------------------------------------------------------------------------- processes


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """A SIGTERM to the harness cleans up like Ctrl-C does."""

    def handler(signum: int, frame: object) -> None:
        raise Terminated

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


# --------------------------------------------------------------------------- the run record


@dataclass
class FaultRecord:
    fault: str
    peer: str
    at_s: float
    wall_time: float
    #: kill: the round the peer was in; restart: the round the rest of the network was in.
    round: int
    rejoined_round: int | None = None
    rejoin_s: float | None = None
    #: restart: how long the other peers were paused while this one started.
    paused_s: float | None = None
    #: split and cut: when the links came back (seconds since the start, the furthest
    #: peer's round then).
    healed_s: float | None = None
    healed_round: int | None = None
    #: The wall-clock time of the heal (time.time(), as the events' ``ts``).
    healed_wall_time: float | None = None

    def as_json(self) -> dict[str, Any]:
        return {
            "fault": self.fault,
            "peer": self.peer,
            "at_s": round(self.at_s, 3),
            # (wall-clock times, to match with the events' ts)
            "at_unix": round(self.wall_time, 3),
            "healed_unix": None
            if self.healed_wall_time is None
            else round(self.healed_wall_time, 3),
            "round": self.round,
            "rejoined_round": self.rejoined_round,
            "rejoin_s": None if self.rejoin_s is None else round(self.rejoin_s, 3),
            "paused_s": None if self.paused_s is None else round(self.paused_s, 3),
            "healed_s": None if self.healed_s is None else round(self.healed_s, 3),
            "healed_round": self.healed_round,
        }


@dataclass
class RunRecord:
    wall_s: float = 0.0
    exit_codes: dict[str, int | str | None] = field(default_factory=dict)
    faults: list[FaultRecord] = field(default_factory=list)
    faults_not_done: list[str] = field(default_factory=list)
    peak_rss_mb: dict[str, float] = field(default_factory=dict)
    peak_total_rss_mb: float = 0.0
    #: Each peer process's CPU seconds at its last sample (every 0.5 s; a process that
    #: ends loses its last half second): by process, so that nodes sharing one count once.
    cpu_s: dict[str, float] = field(default_factory=dict)
    log_problems: list[str] = field(default_factory=list)
    #: Peers stopped because none of their neighbours was running any more (they could
    #: only train alone, or wait out their start-up timeout).
    stranded: list[str] = field(default_factory=list)
    #: Ctrl-C or SIGTERM stopped the run: the report covers the rounds done.
    interrupted: bool = False
    interrupted_by_sigterm: bool = False


class Monitor:
    """The harness's watch over a running network: one ``step()`` per poll folds the new
    events into the progress, carries out the faults that are due, checks the processes
    and shows the status line."""

    def __init__(
        self,
        layout: Layout,
        options: HarnessOptions,
        out_stream: IO[str],
        cluster: RayCluster | None = None,
    ) -> None:
        self.layout = layout
        self.cluster = cluster
        self.options = options
        self.out = out_stream
        self.env = python_env()
        self.hosts = (
            None if options.hosts is None else HostNetwork(options.hosts, ipv6=options.ipv6)
        )
        self.processes: dict[str, PeerHandle] = {}
        #: Where each peer's output goes (shared by the nodes of one process).
        self.logs = {peer: layout.log(peer) for peer in layout.peers}
        if cluster is None and options.nodes_per_process > 1:
            self._groups(options.nodes_per_process)
        elif cluster is None:
            self.processes.update(
                (peer, PeerProcess(peer, self._command(peer), layout.log(peer)))
                for peer in layout.peers
            )
        else:  # (the actors' folders mirror the run folder: the same command, relative)
            self.logs.update(cluster.logs(layout))
            remote = Layout(Path("."), layout.peers)
            self.processes.update(
                cluster.handles(
                    {
                        peer: peer_command(
                            remote, peer, options.snapshots, options.byzantine.get(peer)
                        )
                        for peer in layout.peers
                    }
                )
            )
        self.plan = FaultPlan(options.faults)
        self.net_plan = NetFaultPlan(options.net_faults)
        self.net_records: dict[NetFault, FaultRecord] = {}
        self.neighbours = _ever_neighbours(layout)
        self.progress = RunProgress(list(layout.peers), options.rounds)
        self.record = RunRecord()
        # One Tail per file: the state folders also hold snapshots, not worth walking.
        self.tails = [Tail(layout.state(peer) / "events.jsonl") for peer in layout.peers]
        self.restarts: dict[str, FaultRecord] = {}  # restarted peers not yet back
        #: While a restarted peer starts up, the others are paused: (its record, paused).
        self.paused: tuple[FaultRecord, list[PeerHandle]] | None = None
        self.tty = out_stream.isatty()
        self.started = time.monotonic()
        self._last_line = ""
        self._last_print = 0.0
        self._last_rss = 0.0

    def _groups(self, size: int) -> None:
        """``size`` nodes to a process, each process's output in logs/FIRST-LAST.log."""
        for members in groups_of(self.layout.peers, size):
            log = self.layout.out / "logs" / f"{group_name(members)}.log"
            specs = {peer: self._command(peer)[2:] for peer in members}  # (after python -m)
            group = NodeGroup(members, specs, log)
            for peer in members:
                self.processes[peer] = GroupMember(peer, group)
                self.logs[peer] = log

    def _command(self, peer: str) -> list[str]:
        """``p2pfl run`` for ``peer``; with --hosts, inside its host (behind its delay
        relay, if there is one: then the node listens on the host's own loopback)."""
        options = self.options
        command = peer_command(self.layout, peer, options.snapshots, options.byzantine.get(peer))
        if self.hosts is None:
            return command
        if self.hosts.relayed:
            command += ["--listen", f"127.0.0.1:{HOST_PORT}"]
        return self.hosts.wrap(peer, command)

    def start(self) -> None:
        self.layout.log(self.layout.peers[0]).parent.mkdir(parents=True, exist_ok=True)
        if self.hosts is not None:
            self._make_hosts(self.hosts)
        self.started = time.monotonic()
        for p in self.processes.values():
            p.start(self.env)

    def _make_hosts(self, hosts: HostNetwork) -> None:
        stale = sweep_stale()
        if stale:
            self.out.write(f"removed {len(stale)} namespaces a killed harness left behind\n")
        hosts.create()
        plan = self.layout.out / "hosts.json"
        hosts.write_plan(plan, dict.fromkeys(self.layout.peers, HOST_PORT))
        if hosts.relayed:
            hosts.start_relays(plan, self.env)

    def running(self) -> list[PeerHandle]:
        return [p for p in self.processes.values() if p.running]

    def step(self) -> bool:
        """One poll. False once no peer runs any more."""
        now = time.monotonic()
        if self.cluster is not None:
            self.cluster.sync(self.layout)
        events = _poll_all(self.tails, self.record)
        self.progress.update(events)
        self._note_rejoins(events)
        self._apply_faults(now)
        self._apply_net_faults(now)
        self._check_paused()
        self._check_exits()
        running = self.running()
        if not running:  # a restart still pending then can never fire: it is reported
            return False
        self._stop_stranded(running)
        if now - self._last_rss >= 0.5:
            self._last_rss = now
            self.record.peak_total_rss_mb = max(
                self.record.peak_total_rss_mb, sum(p.rss_mb() for p in running)
            )
            self.record.cpu_s.update(filter(None, (p.cpu_sample() for p in running)))
        if self.options.progress:
            self._show(self.progress.line(len(running), now - self.started), now)
        return True

    def poll_interval(self) -> float:
        """Faster while a fault waits for its round: rounds can take milliseconds."""
        busy = self.plan.pending or self.net_plan.waiting or self.paused is not None
        # (each poll reads every peer's log: with hundreds of peers, less often)
        return FAULT_POLL_S if busy else POLL_S * max(1.0, len(self.processes) / 64)

    def _note_rejoins(self, events: list[Event]) -> None:
        for event in events:
            if (
                self.paused is not None
                and event.node == self.paused[0].peer
                and event.type == "node_start"
                and event.ts >= self.paused[0].wall_time
            ):
                self.resume_others()
            pending = self.restarts.get(event.node)
            if (
                pending is not None
                and event.type == "round_end"
                and event.round is not None
                and event.ts >= pending.wall_time
            ):
                pending.rejoined_round = event.round
                pending.rejoin_s = event.ts - pending.wall_time
                del self.restarts[pending.peer]

    def _apply_faults(self, now: float) -> None:
        alive = {p.peer for p in self.running()}
        for fault in self.plan.due(self.progress.started_rounds(), alive):
            proc = self.processes[fault.peer]
            if fault.action == "kill" or proc.running:
                proc.kill()
                name = str(fault) if fault.action == "kill" else f"kill {fault.peer}"
                self.record.faults.append(
                    FaultRecord(
                        name,
                        fault.peer,
                        now - self.started,
                        time.time(),
                        self.progress.by_peer[fault.peer].round,
                    )
                )
            if fault.action == "restart":
                # Starting a process takes ~0.4 s, rounds can take milliseconds: pause the
                # others until it is up, so that the rejoin happens (and can be watched).
                self.resume_others()
                paused = [p for p in self.running() if p.peer != fault.peer and p.pause(fault.peer)]
                proc.start(self.env)
                others = [r for p, r in self.progress.started_rounds().items() if p != fault.peer]
                restart = FaultRecord(
                    str(fault), fault.peer, now - self.started, time.time(), max(others)
                )
                self.record.faults.append(restart)
                self.restarts[fault.peer] = restart
                self.paused = (restart, paused)

    def _apply_net_faults(self, now: float) -> None:
        """Partitions and cuts that begin or heal now: the hosts' rules follow the plan."""
        if self.hosts is None:
            return
        rounds = self.progress.started_rounds()
        running = [p.peer for p in self.running()]
        began, healed = self.net_plan.step(rounds, now - self.started, running)
        if not began and not healed:
            return
        # A fault counts from before its rules go in, a heal from after they are out: the
        # record never understates how long the network was cut.
        before = time.time()
        self.hosts.set_faults(self.net_plan.rules(self.hosts.addresses))
        after = time.time()
        furthest = max(rounds.values(), default=0)
        for fault in began:
            record = FaultRecord(
                str(fault),
                ",".join(fault.groups[0]) if fault.kind == "cut" else "",
                now - self.started,
                before,
                furthest,
            )
            self.record.faults.append(record)
            self.net_records[fault] = record
        for fault in healed:
            record = self.net_records.pop(fault)
            record.healed_s = now - self.started + (after - before)
            record.healed_round = furthest
            record.healed_wall_time = after

    def resume_others(self) -> None:
        """Let the peers paused for a --restart run on (also on the way out: none may stay
        stopped when the harness ends)."""
        if self.paused is not None:
            restart, paused = self.paused
            for p in paused:
                p.resume()
            restart.paused_s = time.time() - restart.wall_time
            self.paused = None

    def _check_paused(self) -> None:
        """Never keep the others paused long: the restarted peer may fail to start."""
        if self.paused is not None:
            restart, _ = self.paused
            proc = self.processes[restart.peer]
            if not proc.running or time.time() - restart.wall_time > MAX_PAUSE_S:
                self.resume_others()

    def _check_exits(self) -> None:
        """A peer that fails on its own (not killed or stopped by us) ends the run."""
        for peer, p in self.processes.items():
            code = p.exit_code()
            if code not in (None, 0) and not (p.killed_by_harness or p.stopped_by_harness):
                log = self.logs[peer]
                what = (
                    "was lost with its Ray actor (its machine or worker died)"
                    if code == LOST
                    else f"exited with code {code}"
                )
                raise HarnessError(
                    f"peer {peer} {what}; its output ({log}) ends with:\n{_tail_text(log)}"
                )

    def _stop_stranded(self, running: list[PeerHandle]) -> None:
        """A peer none of whose neighbours runs or will be restarted can only train alone
        (e.g. restarted after its neighbours finished): stop it, and say so."""
        coming = {q.peer for q in running} | {
            f.peer for f in self.plan.pending if f.action == "restart"
        }
        for p in running:
            if p.peer in self.record.stranded or self.progress.is_done(p.peer):
                continue
            if not self.neighbours[p.peer] & coming:
                p.stop()
                self.record.stranded.append(p.peer)

    def _show(self, line: str, now: float) -> None:
        if self.tty:
            if line != self._last_line:
                self.out.write("\r" + line + "\033[K")
                self.out.flush()
        elif now - self._last_print >= 2.0:
            self.out.write(line + "\n")
            self.out.flush()
            self._last_print = now
        self._last_line = line

    def finish(self) -> RunRecord:
        """After every process has stopped: the last events, and what the run did."""
        if self.cluster is not None:
            self.cluster.collect(self.layout)
        _poll_all(self.tails, self.record)
        record = self.record
        record.faults_not_done = [str(f) for f in self.plan.pending] + [
            str(f) for f in self.net_plan.pending
        ]
        record.exit_codes = {
            peer: ("killed" if p.killed_by_harness else p.exit_code())
            for peer, p in self.processes.items()
        }
        record.peak_rss_mb = {peer: round(p.peak_rss_mb, 1) for peer, p in self.processes.items()}
        return record


def launch_and_watch(
    layout: Layout,
    options: HarnessOptions,
    *,
    out_stream: IO[str],
    cluster: RayCluster | None = None,
) -> RunRecord:
    """Start every peer, show progress, inject faults, and return when all are done.
    Whatever happens (Ctrl-C, SIGTERM, a failing peer), every process started is stopped."""
    monitor = Monitor(layout, options, out_stream, cluster)
    with sigterm_as_interrupt():
        try:
            monitor.start()
            while monitor.step():
                time.sleep(monitor.poll_interval())
        except KeyboardInterrupt as exc:  # the peers stop below; what they wrote is reported
            monitor.record.interrupted = True
            monitor.record.interrupted_by_sigterm = isinstance(exc, Terminated)
        finally:
            monitor.record.wall_s = time.monotonic() - monitor.started
            if options.progress and monitor.tty:
                out_stream.write("\n")
            monitor.resume_others()
            try:
                stop_all(monitor.processes)
            finally:
                if monitor.hosts is not None:
                    monitor.hosts.close()
    return monitor.finish()


def _ever_neighbours(layout: Layout) -> dict[str, frozenset[str]]:
    from p2pfl.config import load_config
    from p2pfl.core.topology import ever_neighbours

    config = load_config(layout.config)
    return {
        peer: frozenset(
            ever_neighbours(
                config.topology, config.peer_ids, config.seed, peer, config.training.rounds
            )
        )
        for peer in layout.peers
    }


def _poll_all(tails: list[Tail], record: RunRecord) -> list[Event]:
    events: list[Event] = []
    for tail in tails:
        got, problems = tail.poll()
        events.extend(got)
        record.log_problems.extend(str(problem) for problem in problems)
    return events


def _tail_text(path: Path, lines: int = 15) -> str:
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return "(no output)"
    return "\n".join(text.splitlines()[-lines:]) or "(no output)"


# --------------------------------------------------------------------------- set-up


@dataclass(frozen=True)
class Prepared:
    layout: Layout
    split_name: str
    split_description: str
    task: Task
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    classes: int
    inputs: int
    input_scale: float
    samples: dict[str, int]
    classes_held: dict[str, int]
    heterogeneity: str
    nodes_per_process: int = 1


def prepare(options: HarnessOptions, cluster: RayCluster | None = None) -> Prepared:
    """Data files, keys and peers.yaml for a run (nothing is started; with ``cluster``, the
    peers' actors are placed and hold their files). If set-up fails, the run folder is
    removed again when this call created it: a retry can reuse it."""
    out = options.out
    created = not out.exists()
    try:
        return _prepare(options, cluster)
    except BaseException:
        if created and out.exists():
            shutil.rmtree(out, ignore_errors=True)
        raise


def _prepare(options: HarnessOptions, cluster: RayCluster | None) -> Prepared:
    from p2pfl.harness.datasets import describe
    from p2pfl.harness.partition import classes_per_peer, describe_heterogeneity
    from p2pfl.learning import Dataset
    from p2pfl.learning.trainer import input_scale_for

    layout = _new_layout(options)
    split = _load_split(options)
    regression = split.task == "regression"
    parts, histogram = _partitioned(split, options)
    held = classes_per_peer(histogram)
    x_train, x_test = split.x_train, split.x_test
    y_train, y_test = split.y_train, split.y_test
    standardize = options.standardize
    if standardize is None:  # tabular data: features on their own scales
        standardize = options.dataset.endswith(".npz") or regression
    if standardize:
        x_train, x_test = standardized(x_train, x_test)
    if regression:  # a target of 25-346 would blow up SGD from a model that outputs ~0
        y_train, y_test = standardized_targets(y_train, y_test)

    # (the peers' own per-round evaluation; the final one below takes the whole test set)
    peers_test = (x_test[: options.eval_samples], y_test[: options.eval_samples])
    _write_data(layout, parts, (x_train, y_train), peers_test)
    # One input scale for everyone (and the baseline): from all the training data.
    scale = 1.0 if standardize else input_scale_for(Dataset(x_train, y_train, None, None), None)
    placed = None if cluster is None else cluster.place(layout.peers)
    _write_config(layout, options, split, scale, placed)
    if cluster is not None:
        cluster.install(
            layout.config.read_text(encoding="utf-8"),
            {
                peer: (x_train[rows], y_train[rows])
                for peer, rows in zip(layout.peers, parts, strict=True)
            },
            peers_test,
        )
    notes = [
        *(["standardized"] if standardize else []),
        *(["targets standardized (MSE in units of their variance)"] if regression else []),
    ]
    return Prepared(
        layout=layout,
        split_name=split.name,
        split_description=describe(split) + "".join(f", {note}" for note in notes),
        task=split.task,
        x_train=x_train,
        y_train=y_train,
        x_test=x_test,
        y_test=y_test,
        classes=split.classes,
        inputs=split.inputs,
        input_scale=scale,
        samples={peer: int(rows.size) for peer, rows in zip(layout.peers, parts, strict=True)},
        classes_held={peer: int(n) for peer, n in zip(layout.peers, held, strict=True)},
        nodes_per_process=options.nodes_per_process,
        heterogeneity=describe_heterogeneity(
            histogram, unit="target deciles" if regression else "classes"
        ),
    )


def _new_layout(options: HarnessOptions) -> Layout:
    """The run's layout, once the options allow a run: nothing is overwritten, and a
    network needs two peers."""
    out = options.out
    if out.exists() and any(out.iterdir()):
        raise HarnessError(f"{out} is not empty; choose a new --out (nothing is overwritten)")
    if options.peers < 2:
        raise HarnessError(f"--peers must be at least 2, got {options.peers}")
    return Layout(out, peer_ids(options.peers))


def _load_split(options: HarnessOptions) -> SplitData:
    """The dataset and its test set; a missing optional package is named with its fix."""
    from p2pfl.harness.datasets import load_split

    try:
        return load_split(options.dataset, seed=options.seed, task=options.task)
    except ImportError as exc:
        raise HarnessError(
            f"--dataset {options.dataset} needs {exc.name}: pip install 'p2pfl[tools]'"
        ) from exc


def _partitioned(split: SplitData, options: HarnessOptions) -> tuple[list[np.ndarray], np.ndarray]:
    """Each peer's training rows, and how many of each class (or target decile) it holds."""
    from p2pfl.harness.partition import TARGET_BINS, label_histogram, partition, target_strata

    regression = split.task == "regression"
    # A regression set is split on its target's deciles, as a classifier's on its classes.
    strata = target_strata(split.y_train) if regression else split.y_train
    bins = TARGET_BINS if regression else split.classes
    try:
        parts = partition(strata, options.peers, options.partition, options.seed)
    except ValueError as exc:
        raise HarnessError(f"--partition {options.partition}: {exc}") from exc
    return parts, label_histogram(strata, parts, bins)


def _write_data(
    layout: Layout,
    parts: list[np.ndarray],
    train: tuple[np.ndarray, np.ndarray],
    test: tuple[np.ndarray, np.ndarray],
) -> None:
    """One data file per peer (its rows of ``train``) and the test set the peers evaluate
    on every round."""
    (layout.out / "data").mkdir(parents=True, exist_ok=True)
    x_train, y_train = train
    for peer, rows in zip(layout.peers, parts, strict=True):
        np.savez(layout.data(peer), x=x_train[rows], y=y_train[rows])
    x_test, y_test = test
    np.savez(layout.test_data, x=x_test, y=y_test)


def _write_config(
    layout: Layout,
    options: HarnessOptions,
    split: SplitData,
    scale: float,
    placed: Mapping[str, Placement] | None = None,
) -> None:
    """A key per peer and the shared peers.yaml, loaded once here: a config the peers
    would refuse fails before any of them starts, with the same message. With ``placed``
    (Ray), each peer's address, port and public key come from its actor, and its private
    key stays on the machine that runs it."""
    from p2pfl.config import load_config
    from p2pfl.config.local import build_local_config

    public, ports, hosts = _addresses(layout, options, placed)
    shared = build_local_config(
        peers=layout.peers,
        public_keys=public,
        host="127.0.0.1",
        hosts=hosts,
        ports=ports,
        network=network_name(options.dataset, options.seed),
        seed=options.seed,
        rounds=options.rounds,
        topology=dict(options.topology),
        model=dict(options.model),
        inputs=split.inputs,
        classes=split.classes,
        task=split.task,
        learning_rate=options.learning_rate,
        batch_size=options.batch_size,
        round_timeout=options.round_timeout,
    )
    shared["training"]["local_epochs"] = options.local_epochs
    shared["training"]["input_scale"] = scale
    # Many processes start at once on few cores: give them time to find each other.
    shared["training"]["startup_timeout"] = max(60.0, 2.0 * options.peers)
    shared["net"] = {"down_grace": options.down_grace}
    shared["aggregation"]["secure"] = options.secure
    shared["aggregation"]["rule"] = options.rule
    if options.compression != "none":
        shared["aggregation"]["compression"] = options.compression
    if options.consensus_step is not None:
        shared["aggregation"]["consensus_step"] = options.consensus_step
    if options.dp is not None:
        shared["aggregation"]["dp"] = dict(options.dp)
    if placed is not None:
        where, keys = "on a Ray worker", "keys on the workers"
    else:
        where = "on 127.0.0.1" if hosts is None else "on a simulated host of its own"
        keys = "keys in keys/"
    header = (
        f"# Written by `p2pfl harness`: every peer {where}, one process each.\n"
        f"# Peers {layout.peers[0]}..{layout.peers[-1]}; {keys}, data in data/.\n"
    )
    layout.config.write_text(header + yaml.safe_dump(shared, sort_keys=False), encoding="utf-8")
    load_config(layout.config)  # the peers will: fail here first, with the same message


def _addresses(
    layout: Layout, options: HarnessOptions, placed: Mapping[str, Placement] | None
) -> tuple[dict[str, str], dict[str, int], dict[str, str] | None]:
    """Every peer's public key, port and host (None: 127.0.0.1): from its Ray actor, or a
    key made here and a free loopback port, or a simulated host's address."""
    from p2pfl.proto.keys import generate_key_file

    if placed is not None:
        return (
            {peer: placed[peer].public_key for peer in layout.peers},
            {peer: placed[peer].port for peer in layout.peers},
            {peer: placed[peer].host for peer in layout.peers},
        )
    (layout.out / "keys").mkdir(mode=0o700, parents=True, exist_ok=True)
    public = {peer: generate_key_file(layout.key(peer)) for peer in layout.peers}
    if options.hosts is None:
        return public, dict(zip(layout.peers, free_ports(len(layout.peers)), strict=True)), None
    # a host each: the same port everywhere, as a deployment would have
    hosts = {peer: address_of(i, options.ipv6) for i, peer in enumerate(layout.peers)}
    return public, dict.fromkeys(layout.peers, HOST_PORT), hosts


# --------------------------------------------------------------------------- the whole run


def standardized(x_train: np.ndarray, x_test: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each feature to mean 0, standard deviation 1 over the pooled training data (constant
    features are only centred). A simulation convenience: real peers would agree on such a
    transform up front, since none of them sees the pooled data."""
    mean = x_train.mean(axis=0, dtype=np.float64)
    std = x_train.std(axis=0, dtype=np.float64)
    std[std == 0] = 1.0
    return (
        ((x_train - mean) / std).astype(np.float32),
        ((x_test - mean) / std).astype(np.float32),
    )


def standardized_targets(y_train: np.ndarray, y_test: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Regression targets to mean 0, standard deviation 1 over the pooled training targets
    (a simulation convenience, as for the features; R^2 does not depend on it)."""
    mean = float(y_train.mean(dtype=np.float64))
    std = float(y_train.std(dtype=np.float64)) or 1.0
    return (
        ((y_train - mean) / std).astype(np.float32),
        ((y_test - mean) / std).astype(np.float32),
    )


def run_harness(options: HarnessOptions, out_stream: IO[str] = sys.stdout) -> int:
    """Prepare, run, evaluate, report. Returns 0, or 1 if a peer did not finish."""
    from p2pfl.harness.report import build_summary, consensus_distance, final_models
    from p2pfl.logs.read import read_logs

    def say(text: str) -> None:
        out_stream.write(text + "\n")
        out_stream.flush()

    if options.rounds < 1:
        raise HarnessError(f"--rounds must be at least 1, got {options.rounds}")
    with _cluster(options) as cluster:
        prepared = prepare(options, cluster)
        layout = prepared.layout
        _announce(options, prepared, say)
        if cluster is not None:
            say(cluster.describe())
        record = launch_and_watch(layout, options, out_stream=out_stream, cluster=cluster)
        ray_info = None if cluster is None else cluster.info()
    if record.interrupted:
        say(
            f"\ninterrupted: every peer process was stopped; the report covers the rounds "
            f"done ({layout.out})"
        )
    events = read_logs(layout.state_root).events
    states = {peer: layout.state(peer) for peer in layout.peers}
    models, learner = final_models(states, layout.config, say)
    model_size = sum(w.size for w in learner.get_weights())
    x_test = prepared.x_test / np.float32(prepared.input_scale)
    results = _peer_results(prepared, record, events, learner, models, x_test)
    if record.interrupted:  # (the user wants out: no centralised training now)
        baseline, interrupted = None, True
    else:
        baseline, interrupted = _train_baseline(options, prepared, x_test, say)
    summary = build_summary(
        options={**_summary_options(options, prepared), "ray": ray_info},
        peers=results,
        events=events,
        baseline=baseline,
        consensus=(
            consensus_distance(states, options.rounds, model_size, events)
            if options.snapshots
            else []
        ),
        wall_s=record.wall_s,
        metric="accuracy" if prepared.task == "classification" else "r2",
        record=_record_json(record),
    )
    _write_report(summary, layout, say)
    if interrupted:
        return 143 if record.interrupted and record.interrupted_by_sigterm else 130
    return _exit_code(options, results, record)


@contextlib.contextmanager
def _cluster(options: HarnessOptions) -> Iterator[RayCluster | None]:
    """Ray for the run (``--ray``), or nothing: local processes."""
    if options.ray is None:
        yield None
        return
    from p2pfl.harness.ray_cluster import connected

    with connected(options.ray, options.nodes_per_process) as cluster:
        yield cluster


def _announce(options: HarnessOptions, prepared: Prepared, say: Callable[[str], None]) -> None:
    """What is about to run (data, peers, model, topology) and where its files go."""
    layout = prepared.layout
    say(f"{prepared.split_description}")
    say(
        f"{options.peers} peers ({layout.peers[0]}..{layout.peers[-1]}), partition "
        f"{options.partition}: {prepared.heterogeneity}"
    )
    say(
        f"model {options.model_text}, learning rate {options.learning_rate:g}, batch size "
        f"{options.batch_size}, {options.local_epochs} local epoch(s) per round, "
        f"{options.rounds} rounds, topology {options.topology_text}"
    )
    if options.hosts is not None:
        first = address_of(0, options.ipv6)
        say(
            f"simulated hosts: each peer in a network namespace of its own ({first}..), "
            f"links {describe_links(options.hosts)}"
        )
    say(f"run folder: {layout.out}")


def _peer_results(
    prepared: Prepared,
    record: RunRecord,
    events: list[Event],
    learner: Any,
    models: Mapping[str, np.ndarray],
    x_test: np.ndarray,
) -> list[PeerResult]:
    """Per peer: its final model on the test set (if it left a usable checkpoint) and what
    its events say about its rounds, traffic and memory."""
    from p2pfl.harness.report import PeerResult, peer_stats, test_evaluation

    stats = peer_stats(events)
    # A node reports its process's peak: nodes sharing a process share it out.
    sharing = {
        peer: len(members)
        for members in groups_of(prepared.layout.peers, prepared.nodes_per_process)
        for peer in members
    }
    results = []
    for peer in prepared.layout.peers:
        s = stats[peer]
        rounds = s["rounds"]
        tested = (
            test_evaluation(learner, models[peer], x_test, prepared.y_test)
            if peer in models
            else None
        )
        results.append(
            PeerResult(
                peer=peer,
                samples=prepared.samples[peer],
                classes_held=prepared.classes_held[peer],
                rounds_done=len(rounds),
                test_score=None if tested is None else tested.score,
                test_mse=None if tested is None or prepared.task != "regression" else tested.loss,
                bytes_sent=s["sent"],
                bytes_received=s["recv"],
                median_round_s=float(np.median(rounds)) if rounds else None,
                train_share=(
                    float(np.median(s["trains"]) / np.median(rounds))
                    if rounds and s["trains"] and np.median(rounds) > 0
                    else None
                ),
                peak_rss_mb=_peak_rss(s["rss"], record.peak_rss_mb.get(peer), sharing[peer]),
                finished=s["finished"],
            )
        )
    return results


def _peak_rss(reported: float | None, sampled: float | None, sharing: int) -> float | None:
    """A peer's peak memory: its node's report (its process's peak, shared out among the
    nodes in that process), else what the harness sampled."""
    if reported is None:
        return sampled
    return round(float(reported) / sharing, 1)


def _train_baseline(
    options: HarnessOptions, prepared: Prepared, x_test: np.ndarray, say: Callable[[str], None]
) -> tuple[BaselineResult | None, bool]:
    """The centralised model to compare with (None if not asked for), and whether Ctrl-C
    cut its training short: the peers' results are kept and reported without it."""
    from p2pfl.harness.baseline import train_centralized

    if not options.baseline:
        return None, False
    epochs = options.local_epochs * options.rounds
    say(
        f"training the centralised baseline: {epochs} epochs on all "
        f"{prepared.y_train.size} training samples ..."
    )
    try:
        baseline = train_centralized(
            learner_model_mapping(prepared.layout.config),
            seed=options.seed,
            x=prepared.x_train / np.float32(prepared.input_scale),
            y=prepared.y_train,
            x_test=x_test,
            y_test=prepared.y_test,
            epochs=epochs,
            batch_size=options.batch_size,
            learning_rate=options.learning_rate,
        )
    except KeyboardInterrupt:  # keep the peers' results: write the summary without it
        say("centralised baseline interrupted: the summary is written without it")
        return None, True
    return baseline, False


def _summary_options(options: HarnessOptions, prepared: Prepared) -> dict[str, Any]:
    """The run's settings as summary.json records them (plain JSON types)."""
    return {
        "peers": options.peers,
        "rounds": options.rounds,
        "dataset": options.dataset,
        "dataset_info": prepared.split_description,
        "task": prepared.task,
        "partition": str(options.partition),
        "partition_info": prepared.heterogeneity,
        "topology": options.topology_text,
        "secure": options.secure,
        "rule": options.rule,
        "compression": options.compression,
        "consensus_step": options.consensus_step,
        "byzantine": dict(options.byzantine),
        "dp": None if options.dp is None else dict(options.dp),
        "model": options.model_text,
        "seed": options.seed,
        "local_epochs": options.local_epochs,
        "learning_rate": options.learning_rate,
        "batch_size": options.batch_size,
        "out": str(prepared.layout.out),
        "nodes_per_process": options.nodes_per_process,
        "eval_samples": options.eval_samples,
        "hosts": None
        if options.hosts is None
        else describe_links(options.hosts) + (", IPv6" if options.ipv6 else ""),
    }


def _record_json(record: RunRecord) -> dict[str, Any]:
    """What the monitor saw (memory, faults, exits, log problems) for summary.json."""
    return {
        "peak_total_rss_mb": round(record.peak_total_rss_mb, 1),
        "peers_cpu_s": round(sum(record.cpu_s.values()), 2),
        "faults": [f.as_json() for f in record.faults],
        "faults_not_done": record.faults_not_done,
        "exit_codes": record.exit_codes,
        "log_problems": record.log_problems,
        "stranded": record.stranded,
        "interrupted": record.interrupted,
    }


def _write_report(summary: Mapping[str, Any], layout: Layout, say: Callable[[str], None]) -> None:
    """summary.json, the table, report.png (if matplotlib is there) and where they are."""
    from p2pfl.harness.report import plot_report, render_table, write_rounds_csv, write_summary

    summary_path = layout.out / "summary.json"
    write_summary(summary_path, summary)
    rounds_path = write_rounds_csv(layout.out / "rounds.csv", summary)
    say("")
    say(render_table(summary))
    say("")
    try:
        report = plot_report(summary, layout.out / "report.png")
        say(f"report:  {report}")
    except ImportError:
        say("report.png not written: matplotlib is missing (pip install 'p2pfl[tools]')")
    say(f"summary: {summary_path} (per round: {rounds_path.name})")
    say(f"logs:    {p2pfl_command()} logs summary {layout.out}")


def _exit_code(options: HarnessOptions, results: list[PeerResult], record: RunRecord) -> int:
    """1 if a peer did not finish that should have: not one killed for good by a fault,
    nor one stopped as stranded."""
    unfinished = [p.peer for p in results if not p.finished]
    killed_for_good = {f.peer for f in options.faults if f.action == "kill"} - {
        f.peer for f in options.faults if f.action == "restart"
    }
    return 1 if set(unfinished) - killed_for_good - set(record.stranded) else 0


def p2pfl_command() -> str:
    """How to run p2pfl from a shell here: ``p2pfl`` if it is on PATH, else its full path."""
    if shutil.which("p2pfl"):
        return "p2pfl"
    beside = Path(sys.executable).parent / "p2pfl"
    return str(beside) if beside.exists() else f"{sys.executable} -m p2pfl"


def learner_model_mapping(config_path: Path) -> dict[str, Any]:
    from p2pfl.config import load_config

    return load_config(config_path).training.model.as_mapping()
