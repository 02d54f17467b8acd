"""The daemon: runs one peer's rounds, feeding the round core what the network brings.

A round at this node: train (``trainer``, run by the ``worker``) -> stream parameters to
each neighbour (``outbox``) -> collect neighbours' parameters until the round core
(``rounds.RoundTracker``) says collection is over -> aggregate (``aggregate``, or
``secure_exchange`` with secure aggregation) -> evaluate -> checkpoint (``persist``) ->
the next round, as the round core decides. Nothing on that path sleeps or polls: waiting
is on an event set by the network.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from p2pfl.config import Config
from p2pfl.core.aggregate import aggregate, parse_rule
from p2pfl.core.clock import LamportClock
from p2pfl.core.compress import max_payload_bytes, parse_compression
from p2pfl.core.liveness import DetectorSettings, Liveness
from p2pfl.core.moments import digest
from p2pfl.core.phases import Phase, advance
from p2pfl.core.privacy import secldp_rho
from p2pfl.core.public_copy import NotFinite, OwnCopy, PeerCopies, consensus_step
from p2pfl.core.rounds import RoundTracker
from p2pfl.core.scoring import SuspectTracker
from p2pfl.core.topology import (
    epoch_for_round,
    ever_neighbours,
    graph_for_round,
    metropolis_weights,
)
from p2pfl.daemon.events import EventLog
from p2pfl.daemon.inbox import Inbox
from p2pfl.daemon.moments_exchange import Agreement, MomentsExchange
from p2pfl.daemon.net import CLOSE_POLICY, Network, PeerLink
from p2pfl.daemon.outbox import Outbox
from p2pfl.daemon.persist import RoundSaver
from p2pfl.daemon.pool import ArrayPool
from p2pfl.daemon.procinfo import peak_rss_mb
from p2pfl.daemon.secure_exchange import SecureExchange
from p2pfl.daemon.startup import EXIT_ALONE, REPORT_EVERY, waiting_for
from p2pfl.daemon.statedir import StateLock, prepare_state_dir
from p2pfl.daemon.status import StatusBoard, open_status_socket, serve_status
from p2pfl.daemon.worker import Worker
from p2pfl.errors import ListenError, MessageError, P2PFLError
from p2pfl.learning import Dataset
from p2pfl.learning.base import Evaluation
from p2pfl.learning.trainer import LocalModel, Trained, restore_dp_releases
from p2pfl.proto.keys import pairwise_secret
from p2pfl.proto.wire import (
    DTYPE_COMPRESSED,
    DTYPE_FLOAT32,
    DTYPE_MASKED_U32,
    Message,
    Moments,
    Standardized,
)
from p2pfl.secure.arithmetic import FixedPoint
from p2pfl.secure.correlated import PURPOSE as NOISE_PURPOSE
from p2pfl.secure.correlated import add_correlated_noise
from p2pfl.store.checkpoint import load_checkpoint
from p2pfl.store.standardization import load_saved

if TYPE_CHECKING:
    from p2pfl.daemon.metrics import NodeMetrics

log = logging.getLogger("p2pfl.daemon.node")
T = TypeVar("T")


@dataclass(frozen=True)
class NodeOptions:
    """Node-local settings (command-line flags of ``p2pfl run``, not part of peers.yaml)."""

    node_id: str
    state_dir: Path
    listen_host: str | None = None
    listen_port: int | None = None
    #: False when embedded in another event loop (tests): SIGINT/SIGTERM stay with the host.
    handle_signals: bool = True
    #: Also keep every round's model in state_dir/snapshots.f32 (``p2pfl run --snapshots``).
    snapshots: bool = False
    #: Serve Prometheus metrics on (host, port) (``p2pfl run --metrics``); None: off.
    metrics: tuple[str, int] | None = None
    #: Answer ``p2pfl status`` on state_dir/status.sock.
    status_socket: bool = True
    #: Training threads (torch): ``p2pfl run --threads``.
    threads: int = 1


class Node:
    """One p2pfl peer. Implements the network's ``LinkHandler`` and secure aggregation's
    ``ExchangeHost``."""

    #: ``request_stop`` came before ``run`` made the stop event: honoured when it does.
    _stop_requested = False

    def __init__(
        self,
        config: Config,
        options: NodeOptions,
        private_key: X25519PrivateKey,
        data: Dataset,
    ) -> None:
        self.config = config
        self.id = options.node_id
        self.options = options
        self.training = config.training
        # The privacy budget already spent is restored with the checkpoint (run()).
        self.local = LocalModel(config, self.id, data, 0, options.threads)
        self.params = self.local.initial_params()
        aggregation = config.aggregation
        #: The fixed point of secure aggregation, or None for plain averaging.
        self.secure = (
            FixedPoint(aggregation.clip, aggregation.frac_bits) if aggregation.secure else None
        )
        self._public_copies()
        #: How plain rounds combine the models (secure rounds: Metropolis over the sum).
        self.rule = parse_rule(aggregation.rule)
        #: Neighbours whose updates the rule keeps rejecting (logged as ``suspect``).
        self.suspects = SuspectTracker()
        self._open_log(options)
        #: What the node is doing now (``p2pfl status``).
        self.phase = Phase.STARTING
        self._graphs: dict[int, dict[str, frozenset[str]]] = {}
        net = config.net
        #: Every neighbour's arrivals: the failure detector (core/liveness.py).
        self.liveness = Liveness(
            DetectorSettings(net.suspect_phi, net.suspect_pause, expected_gap=net.keepalive)
        )
        self.tracker = RoundTracker(
            total_rounds=config.training.rounds,
            neighbours_of=self.neighbours_of,
            max_buffered_rounds=config.limits.max_buffered_rounds,
            down_grace=net.down_grace,
            liveness=self.liveness,
            min_models=config.training.min_neighbours,
        )
        self._build_parts(private_key)
        #: ``standardize: federated``: the flooding of the feature totals (None: not used,
        #: or this node's standardisation was saved by an earlier life).
        self.moments: MomentsExchange | None = None
        #: ``standardize: federated``: neighbours compare what they ended with.
        self.agreement: Agreement | None = None
        standardize = config.training.standardize
        if standardize is not None and standardize.federated:
            self.agreement = Agreement(self.clock)
            saved = load_saved(options.state_dir, config)
            if saved is not None:
                self.local.standardize(*saved)
                self.agreement.set_own(digest(*saved))
            else:
                try:
                    self.moments = MomentsExchange(
                        config,
                        self.id,
                        private_key,
                        self.local.data.x,
                        self.clock,
                        self.events,
                        options.state_dir,
                    )
                except P2PFLError:  # (the node will not run: let go of its files)
                    self.events.close()
                    self.state_lock.release()
                    raise
        self._changed: asyncio.Event | None = None
        self.finished = False
        #: What ``run`` returns: 0, or ``EXIT_ALONE``.
        self.exit_code = 0
        #: Rounds aggregated in this life, and the most neighbours' models one averaged.
        self.rounds_run = 0
        self.most_averaged = 0
        self._status_task: asyncio.Future[None] | None = None
        self._stop: asyncio.Event | None = None
        #: The round a restart should begin with, given what self.params holds now.
        self._resume_round = 0

    def _public_copies(self) -> None:
        """What a node sends (``aggregation.compression``): with one, differences of its
        public copy (``core.public_copy``), and the averaging mixes the copies."""
        aggregation = self.config.aggregation
        self.compression = parse_compression(aggregation.compression)
        self.consensus_step = aggregation.consensus_step or self.compression.default_step()
        self.own_copy: OwnCopy | None = None
        self.peer_copies: PeerCopies | None = None
        #: With compression: the initial model's digest, which neighbours compare.
        self.initial_digest: str | None = None
        if self.compression.enabled:
            # The shared initial model: a fresh neighbour's copy of ours starts as it.
            initial = np.array(self.params, dtype=np.float32)
            self.initial_digest = hashlib.sha256(initial.astype("<f4").tobytes()).hexdigest()[:16]
            self.own_copy = OwnCopy(self.compression, initial)
            self.peer_copies = PeerCopies(self.compression, initial)
            self.params_dtype = DTYPE_COMPRESSED
        else:
            self.params_dtype = DTYPE_MASKED_U32 if self.secure is not None else DTYPE_FLOAT32

    def _correlated_noise(self, private_key: X25519PrivateKey) -> None:
        """``aggregation.dp.correlated_multiplier``: the secret this node shares with each
        peer it is ever a neighbour of (the pairs' noise, ``secure.correlated``), and the
        accounting of the worst graph of the run (``core.privacy.secldp_rho``)."""
        #: neighbour -> the pair's noise secret (empty: no correlated noise)
        self.noise_secrets: dict[str, bytes] = {}
        dp = self.config.aggregation.dp
        if dp is None or dp.correlated_multiplier is None:
            return
        config = self.config
        rounds = config.training.rounds
        for peer in sorted(
            ever_neighbours(config.topology, config.peer_ids, config.seed, self.id, rounds)
        ):
            self.noise_secrets[peer] = pairwise_secret(
                private_key,
                config.peers[peer].public_key,
                network=config.network,
                own_id=self.id,
                their_id=peer,
                # (bound to this configuration: a run with another seed, learning rate...
                # draws other noise; an identical re-run of the same file does not)
                purpose=NOISE_PURPOSE + config.digest,
            )
        epochs = {epoch_for_round(config.topology, r): r for r in range(rounds)}
        self.local.dp_rho = max(
            secldp_rho(self.graph(r), dp.noise_multiplier, dp.correlated_multiplier, dp.curious)
            for r in epochs.values()
        )

    def _open_log(self, options: NodeOptions) -> None:
        """The state directory (made private), the event log and what listens to it."""
        # The model and the log say something about local data: owner-only (0700 / 0600).
        #: Permissions found looser and tightened (logged at start-up).
        self.tightened = prepare_state_dir(options.state_dir)
        #: One node per state directory (released when the node shuts down).
        self.state_lock = StateLock(options.state_dir)
        for line in self.tightened:
            log.warning("state directory was readable by other users; tightened %s", line)
        self.clock = LamportClock()
        self.events = EventLog(options.state_dir / "events.jsonl", self.id, self.clock)
        #: What ``p2pfl status`` reports beyond the node's own state.
        self.board = StatusBoard()
        self.events.listeners.append(self.board.observe)
        #: Prometheus metrics (``--metrics``), fed by the events; None when off.
        self.metrics: NodeMetrics | None = None
        #: Where the metrics are served, once they are.
        self.metrics_address: tuple[str, int] | None = None
        if options.metrics is not None:
            from p2pfl.daemon.metrics import NodeMetrics  # prometheus-client: only when asked for

            self.metrics = NodeMetrics(self.id, self.config.peer_ids, lambda: len(self.net.links))
            self.events.listeners.append(self.metrics.observe)

    @property
    def derived(self) -> dict[str, str]:
        """What this node derived from its own data that every peer must share: an
        automatic input scale (``input_scale: auto``). Peers compare it when they connect:
        a neighbour whose data gave another scale is refused, naming both, instead of one
        model seeing differently scaled inputs at each peer. With compression also the
        initial model's digest."""
        derived = {}
        if self.config.training.input_scale is None and not self.config.training.standardize:
            derived["data.input_scale"] = f"{self.local.input_scale:g}"
        if self.initial_digest is not None:
            # With compression, a fresh node's first difference is against the initial
            # model, which both ends must hold bit for bit (a factory ignoring the seed, or
            # another torch build, would make the copies differ unseen).
            derived["model.initial"] = self.initial_digest
        return derived

    def _build_parts(self, private_key: X25519PrivateKey) -> None:
        """The shell's parts, wired: network, worker, saver, outbox, secure exchange, inbox."""
        config, options = self.config, self.options
        #: Spare model-sized arrays: received models, and (secure) masks, reuse them.
        self.buffers = ArrayPool(self.params.size, keep=0)
        compressed = self.compression.enabled
        self.net = Network(
            config=config,
            own_id=self.id,
            private_key=private_key,
            handler=self,
            events=self.events,
            expected_bytes=max_payload_bytes(self.params.size)
            if compressed
            else self.params.nbytes,
            allocate=lambda: self.buffers.take().view(np.float32),
            derived=self.derived,
            variable_streams=compressed,
        )
        self.worker = Worker()
        self.saver = RoundSaver(
            options.state_dir,
            config.digest,
            snapshots=options.snapshots,
            worker=self.worker,
            node_id=self.id,
        )
        #: This round's parameters on their way to the neighbours.
        self.outbox = Outbox(self.events, config.limits, self.params_dtype)
        #: Secure aggregation's key exchange, masking and unmasking (None: plain averaging).
        self.exchange = (
            SecureExchange(self, self.secure, private_key=private_key, state_dir=options.state_dir)
            if self.secure is not None
            else None
        )
        #: What arrives on the links, judged and logged.
        self.inbox = Inbox(
            tracker=self.tracker,
            events=self.events,
            links=self.net.links,
            params_dtype=self.params_dtype,
            exchange=self.exchange,
            offer=self.offer,
            notify=self.notify,
            copies=self.peer_copies,
            snapshot=self._snapshot,
        )
        self._correlated_noise(private_key)

    def _snapshot(self, copy: np.ndarray) -> np.ndarray:
        """A neighbour's public copy as this round received it (a pool array: the copy
        itself changes with the neighbour's next difference)."""
        out = self.buffers.take().view(np.float32)
        out[:] = copy
        return out

    @property
    def input_scale(self) -> float:
        return self.local.input_scale

    def request_stop(self) -> None:
        """Ask a running node to shut down as it does on SIGTERM."""
        self._stop_requested = True
        if self._stop is not None:
            self._stop.set()

    # --- topology ------------------------------------------------------------------------

    def graph(self, round_index: int) -> dict[str, frozenset[str]]:
        graph = self._graphs.get(round_index)
        if graph is None:
            graph = graph_for_round(
                self.config.topology, self.config.peer_ids, self.config.seed, round_index
            )
            if len(self._graphs) >= 16:  # keep recent rounds only (dicts keep insertion order)
                del self._graphs[next(iter(self._graphs))]
            self._graphs[round_index] = graph
        return graph

    def neighbours_of(self, round_index: int) -> frozenset[str]:
        return self.graph(round_index)[self.id]

    def status(self) -> dict[str, Any]:
        """What ``p2pfl status`` shows: the round, the neighbours' links, the latest eval."""
        now_mono, now = time.monotonic(), time.time()
        current = max(self.tracker.current, 0)
        neighbours = []
        for peer in sorted(self.neighbours_of(min(current, self.training.rounds - 1))):
            link = self.net.links.get(peer)
            if link is not None:
                seen: float | None = now_mono - link.last_heard
            elif peer in self.board.disconnected_at:
                seen = now - self.board.disconnected_at[peer]
            else:
                seen = None
            neighbours.append(
                {
                    "peer": peer,
                    "connected": link is not None,
                    "round": self.tracker.peer_rounds.get(peer),
                    "last_seen_s": None if seen is None else round(seen, 3),
                    "suspect": peer in self.board.suspects,
                    # the failure detector's level for a connected neighbour's silence
                    "phi": None if link is None else round(self.liveness.phi(peer, now_mono), 2),
                    "silent": link is not None and self.liveness.suspected(peer, now_mono),
                }
            )
        return {
            "node": self.id,
            "round": self.tracker.current,
            "rounds": self.training.rounds,
            "phase": self.phase,
            "rounds_completed": self.board.rounds_completed,
            "uptime_s": round(now - self.board.started, 3),
            "last_eval": self.board.last_eval,
            "neighbours": neighbours,
            "metrics": None
            if self.metrics_address is None
            else f"http://{self.metrics_address[0]}:{self.metrics_address[1]}/metrics",
        }

    # --- ExchangeHost services (secure aggregation) ----------------------------------------

    def notify(self) -> None:
        if self._changed is not None:
            self._changed.set()

    def sending_round(self) -> int | None:
        return self.outbox.round

    def send_vector(self, owner: str, vector: np.ndarray) -> None:
        self.outbox.add(owner, vector)
        link = self.net.links.get(owner)
        if link is not None:
            self.offer(link)

    async def run_job(self, job: str, fn: Callable[..., T], *args: Any) -> T:
        return await self.worker.run(job, fn, *args)

    async def wait_until(
        self, done: Callable[[], bool], deadline: Callable[[], float | None]
    ) -> bool:
        """Wait for ``done()`` to become true, woken by network events. False on timeout.
        ``deadline()`` is asked again after every wake-up (a neighbour that dropped
        meanwhile brings the next wake-up forward)."""
        if self._changed is None:  # (made on the loop that waits)
            self._changed = asyncio.Event()
        loop = asyncio.get_running_loop()
        while True:
            # The wake-up first, then done(): a grace that ends between the two is then
            # seen by done(), instead of being skipped until the next wake-up.
            deadline_now = deadline()
            if done():
                return True
            if deadline_now is not None and loop.time() >= deadline_now:
                # Passed between deadline() and done()? Then it was a wake-up (a grace or
                # a suspicion that just came), not the end: ask again.
                again = deadline()
                if again is None or loop.time() < again:
                    continue
                return False
            self._changed.clear()
            # asyncio.timeout_at, not wait_for: before Python 3.12 wait_for can swallow a
            # cancellation (a stop request) that lands as the event fires (CPython gh-86296).
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout_at(deadline_now):
                    await self._changed.wait()

    # --- LinkHandler callbacks (called by the network, on the event loop) --------------------

    def current_round(self) -> int:
        return self.tracker.current

    def offer(self, link: PeerLink) -> None:
        """Send what is due on ``link``: the feature totals (``standardize: federated``),
        secure aggregation's KEYS, this round's parameters."""
        if self.moments is not None:
            self.moments.offer_all(link, self.net.spawn)
        if self.agreement is not None:
            self.agreement.tell(link, self.net.spawn)
        if self.exchange is not None:
            self.exchange.offer_keys(link)
        self.outbox.offer(link)

    def link_up(self, link: PeerLink) -> None:
        self._heard(link.peer_id, reconnected=True)
        self.tracker.mark_up(link.peer_id)
        if self.exchange is not None:
            self.exchange.links_changed()
        self.offer(link)
        self.notify()

    def link_down(self, link: PeerLink, reason: str) -> None:
        if self.peer_copies is not None:
            self.peer_copies.forget(link)
        if link.peer_id not in self.net.links:  # not replaced by a newer connection
            self.tracker.forget_peer(link.peer_id)
            self.tracker.mark_down(link.peer_id, asyncio.get_running_loop().time())
        if self.exchange is not None:
            self.exchange.links_changed()
        self.notify()

    def heard(self, peer_id: str) -> None:
        self._heard(peer_id)

    def _heard(self, peer: str, *, reconnected: bool = False) -> None:
        """Anything from ``peer`` feeds its failure detector; a suspicion ends here."""
        now = asyncio.get_running_loop().time()
        silence = self.liveness.heard(peer, now, reconnected=reconnected)
        if silence is not None:
            self.events.emit("unsuspect_link", peer=peer, silent_s=round(silence, 3))
            log.info("%s: %s is heard again after %.2f s", self.id, peer, silence)

    def _note_silences(self) -> None:
        """Log the neighbours this round stops waiting for because they went silent."""
        now = asyncio.get_running_loop().time()
        connected = self.tracker.missing() & self.net.links.keys()
        for peer, phi in self.liveness.newly_suspected(frozenset(connected), now):
            history = self.liveness.histories[peer]
            silent = now - history.last
            self.events.emit(
                "suspect_link",
                self.tracker.current,
                peer=peer,
                phi=round(phi, 2),
                silent_s=round(silent, 3),
            )
            log.warning("%s: %s silent %.2f s (phi %.1f): suspected", self.id, peer, silent, phi)

    def _collected(self, done: Callable[[], bool]) -> bool:
        """Whether collection is over (``done``), after logging new silences."""
        self._note_silences()
        return done()

    def message(self, link: PeerLink, msg: Message) -> None:
        if isinstance(msg, Standardized):
            if self.agreement is None:
                raise MessageError("STANDARDIZED in a network without standardize: federated")
            self.agreement.heard[link.peer_id] = msg.digest
            conflict = self.agreement.conflict(link.peer_id)
            if conflict is not None:
                raise MessageError(conflict)  # (the link is dropped, and the reason logged)
            return
        if isinstance(msg, Moments):
            if self.moments is None:
                standardize = self.config.training.standardize
                if standardize is not None and standardize.federated:
                    return  # (ours were computed in an earlier life: a peer still offers)
                raise MessageError("MOMENTS in a network without standardize: federated")
            if self.moments.receive(link, msg, self.net.links, self.net.spawn):
                self.notify()
            return
        self.inbox.message(link, msg)

    # --- the round loop ------------------------------------------------------------------

    async def _startup(self, start_round: int, resumed: bool) -> int | None:
        """Wait (bounded) for this round's neighbours and their round numbers; the round
        to start with, or None when fewer than ``training.min_neighbours`` came.

        A fresh node waits up to ``training.startup_timeout`` for all of them (peers start
        at different times). A node resuming from a checkpoint joins a network that is
        already running: a neighbour that has not connected within ``net.down_grace`` is
        down, and waiting longer would also hold up the live neighbours, who wait for this
        node's rounds. Either way it says every few seconds whom it waits for, and why.
        """
        loop = asyncio.get_running_loop()
        neighbours = self.neighbours_of(start_round)
        deadline = loop.time() + self.training.startup_timeout
        tracker = self.tracker
        need = min(self.training.min_neighbours, len(neighbours))

        def waiting() -> list[str]:
            return tracker.not_ready(neighbours, self.net.links, resumed=resumed, now=loop.time())

        def missing() -> list[str]:
            links, rounds = self.net.links, tracker.peer_rounds
            return sorted(p for p in neighbours if not (p in links and p in rounds))

        def done() -> bool:
            return not waiting() and len(neighbours) - len(missing()) >= need

        report_at = [loop.time() + REPORT_EVERY]

        def wakeup() -> float:
            graces = tracker.startup_wakeup(waiting(), resumed=resumed, deadline=deadline)
            return min(graces, report_at[0])

        while not await self.wait_until(done, wakeup):
            now = loop.time()
            if now >= deadline:
                break
            if now >= report_at[0]:
                left = deadline - now
                log.info("%s: waiting for %s (%.0fs left)", self.id, self._why(missing()), left)
                report_at[0] = now + REPORT_EVERY
        absent = missing()
        if len(neighbours) - len(absent) < need:
            log.error(
                "%s: only %d of the %d neighbour(s) a round needs (training.min_neighbours) "
                "came within training.startup_timeout (%gs). Not training alone: exit code %d. "
                "%s",
                self.id,
                len(neighbours) - len(absent),
                need,
                self.training.startup_timeout,
                EXIT_ALONE,
                self._why(absent),
            )
            return None
        if absent:
            log.warning("%s: starting without %s (startup timeout)", self.id, self._why(absent))
        return max(start_round, self.tracker.consensus_round(start_round))

    async def _standardize(self) -> bool:
        """``standardize: federated``: wait (up to ``training.startup_timeout``) until every
        peer's feature totals are in, then standardise with the network's mean and standard
        deviation. False if some never came."""
        assert self.moments is not None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.training.startup_timeout
        moments = self.moments.moments
        while not await self.wait_until(
            lambda: not moments.missing(), lambda: min(deadline, loop.time() + REPORT_EVERY)
        ):
            if loop.time() >= deadline:
                log.error(
                    "%s: the feature totals of %s never came within training.startup_timeout "
                    "(standardize: federated needs every peer once, at the start): exit code %d",
                    self.id,
                    ", ".join(moments.missing()),
                    EXIT_ALONE,
                )
                return False
            log.info(
                "%s: waiting for the feature totals of %s", self.id, ", ".join(moments.missing())
            )
        problem = ""
        if self.moments.equivocated:
            liars = ", ".join(sorted(self.moments.equivocated))
            problem = f"{liars} sent different totals to different peers"
        else:
            try:
                mean, std = await self.worker.run(
                    "standardize", self.moments.result, self.options.state_dir, self.config
                )
            except ValueError as exc:  # totals no data can give: a peer lied, or an overflow
                problem = str(exc)
        if problem:
            log.error("%s: cannot standardise: %s: exit code %d", self.id, problem, EXIT_ALONE)
            return False
        self.local.standardize(mean, std)
        self._agree(digest(mean, std))
        rows = round(moments.totals()[0])
        self.events.emit("standardize", None, rows=rows, digest=digest(mean, std))
        log.info("%s: standardised with the network's mean and deviation (%d rows)", self.id, rows)
        return True

    def _agree(self, own: str) -> None:
        """Tell every neighbour what we ended with; drop those that ended elsewhere."""
        assert self.agreement is not None
        self.agreement.set_own(own)
        for peer, link in list(self.net.links.items()):
            self.agreement.tell(link, self.net.spawn)
            conflict = self.agreement.conflict(peer)
            if conflict is not None:
                log.error("%s: %s", self.id, conflict)
                self.events.emit("reject", None, peer=peer, reason=conflict)
                self.net.spawn(link.close(CLOSE_POLICY, "standardised differently"))

    def _why(self, peers: list[str]) -> str:
        """Whom we wait for, and why (``startup.waiting_for``)."""
        return waiting_for(peers, self.id, linked=self.net.links, unreached=self.net.unreached)

    async def _round(self, r: int) -> int:
        """One round: train -> send and collect -> aggregate -> evaluate -> checkpoint.
        Returns the next round."""
        started = time.monotonic()
        cpu_started = time.process_time()  # (all threads: training, masks, transfers)
        neighbours = self._start_round(r)
        trained = await self._train(r)
        await self._exchange_models(r, neighbours)
        received, next_round = await self._aggregate(r, neighbours)
        split, result = await self._evaluate(r)
        await self.saver.save_round(
            r, next_round, self.params, self.clock.value, self.local.dp_releases
        )
        self.events.emit("checkpoint", r, next_round=next_round)
        duration = time.monotonic() - started
        self.events.emit(
            "round_end",
            r,
            duration_s=round(duration, 6),
            cpu_s=round(time.process_time() - cpu_started, 6),
            next_round=next_round,
        )
        log.info(
            "%s round %d/%d: loss %.4f, %s %s %.4f, %d/%d neighbours, %.3fs",
            self.id,
            r + 1,
            self.training.rounds,
            trained.loss,
            split,
            result.metric,
            result.score,
            len(received),
            len(neighbours),
            duration,
        )
        return next_round

    def _start_round(self, r: int) -> frozenset[str]:
        """Announce round r; returns its neighbours. With secure aggregation the keys go
        first: the owners relay them while we train."""
        neighbours = self.neighbours_of(r)
        self.tracker.start_round(r)
        self._resume_round = r
        if self.peer_copies is not None:  # who may still send us a difference (keep_only)
            window = range(
                max(r - 1, 0),
                min(r + self.config.limits.max_buffered_rounds + 1, self.training.rounds),
            )
            self.peer_copies.keep_only(frozenset().union(*(self.neighbours_of(q) for q in window)))
        # A round's received models (and, secure, masks for it and the next) are reused.
        self.buffers.keep = (2 if self.exchange is not None else 1) * len(neighbours)
        self.net.broadcast_status(r)
        self.events.emit("round_start", r, neighbours=sorted(neighbours))
        if self.exchange is not None:
            self.exchange.start_round(r)
        return neighbours

    async def _train(self, r: int) -> Trained:
        """Round r's local training (a worker job); with DP the release is logged durably
        before anything leaves."""
        t0 = time.monotonic()
        self.phase = advance(self.phase, Phase.TRAINING)
        trained = await self.worker.run("train", self.local.train, self.params, r)
        self.params = trained.params
        dp = self.config.aggregation.dp
        if self.noise_secrets and dp is not None and dp.correlated_multiplier is not None:
            pairs = {p: self.noise_secrets[p] for p in self.neighbours_of(r)}
            std = dp.correlated_multiplier * dp.clip_norm
            await self.worker.run(
                "correlate", add_correlated_noise, self.params, self.id, pairs, r, std
            )
        self.events.emit(
            "train",
            r,
            loss=round(trained.loss, 6),
            duration_s=round(time.monotonic() - t0, 6),
            samples=len(self.local.data.y),
            **trained.privacy,
        )
        if self.config.aggregation.dp is not None:
            # Durable before the update leaves: a power cut may roll the checkpoint back
            # (rounds commit it without a directory fsync), never the log's count of
            # releases, so a restart cannot undercount the budget spent. One fsync per
            # round, only with DP: ~0.2 ms on the event loop (ext4, virtual disk).
            self.events.sync()
        return trained

    async def _exchange_models(self, r: int, neighbours: frozenset[str]) -> None:
        """Send our parameters (plain, or masked per owner) and collect the neighbours'
        until the round core (or the secure exchange) says collection is over."""
        loop = asyncio.get_running_loop()
        exchange = self.exchange
        if self.own_copy is not None:
            try:
                outgoing = await self.worker.run("compress", self.own_copy.advance, self.params, r)
            except NotFinite as exc:
                log.error("%s round %d: %s", self.id, r, exc)
                self.outbox.open(r, {})
            else:
                self.outbox.open(r, dict.fromkeys(neighbours, outgoing))
        elif exchange is None:
            self.outbox.open(r, dict.fromkeys(neighbours, self.params))
        else:  # each owner's vector is added as its key exchange and mask are done
            self.outbox.open(r, {})
            exchange.trained(r, self.params)
        self.phase = advance(self.phase, Phase.COLLECTING)
        self.outbox.offer_all(neighbours, self.net.links)
        self.tracker.start_collecting(loop.time(), self.training.round_timeout)
        # Woken by network news, by the deadline, or when a disconnected neighbour's grace
        # runs out (then it is not waited for).
        if exchange is None:
            await self.wait_until(
                lambda: self._collected(lambda: self.tracker.collection_done(loop.time())),
                lambda: self.tracker.next_wakeup(loop.time()),
            )
        else:
            exchange.start_collecting(loop.time())
            await self.wait_until(
                lambda: self._collected(lambda: exchange.collection_done(r, loop.time())),
                lambda: exchange.next_wakeup(r, loop.time()),
            )
        await self._wait_for_fresh_links(neighbours)
        self.outbox.stop_offering()
        assert self.tracker.deadline is not None
        await self.outbox.finish(
            self.tracker.deadline, lambda peer: self.tracker.unavailable(peer, loop.time())
        )
        sent = self.outbox.close()
        if exchange is not None and self.outbox.all_sent():
            for vector in sent:  # masked vectors no stream reads now
                self.buffers.give(vector)

    async def _wait_for_fresh_links(self, neighbours: frozenset[str]) -> None:
        """A neighbour whose link came up during collection (a crossing dial, a reconnect)
        tells us its round on that link a moment later, and only then may our parameters
        go out on it. A round that already has that neighbour's model would otherwise end
        first and never send it ours. Bounded by one handshake timeout."""

        def unannounced() -> bool:
            links = self.net.links
            return any(links[p].announced is None for p in neighbours if p in links)

        if unannounced():
            bound = asyncio.get_running_loop().time() + self.config.limits.handshake_timeout
            await self.wait_until(lambda: not unannounced(), lambda: bound)

    async def _aggregate(
        self, r: int, neighbours: frozenset[str]
    ) -> tuple[dict[str, np.ndarray], int]:
        """Combine what arrived (the rule, or the secure sum); returns what was received
        and the next round."""
        received = self.tracker.take_received()
        self.phase = advance(self.phase, Phase.AGGREGATING)
        missing = sorted(neighbours - set(received))
        weights = metropolis_weights(self.graph(r), self.id)
        if self.exchange is None:
            used, outcome = self._aggregate_plain(r, received, weights)
        else:
            used, outcome, own_clipped = await self.exchange.aggregate(r, received, weights)
            # (the same parameters, encoded as member and as owner: count each entry once)
            outcome["clipped"] = max(self.exchange.clipped, own_clipped)
        self.rounds_run += 1
        self.most_averaged = max(self.most_averaged, len(set(used) - {self.id}))
        next_round = self.tracker.next_round()
        self._resume_round = next_round  # from here on, self.params is "round r done"
        self.events.emit(
            "aggregate",
            r,
            rule="secure-metropolis" if self.secure is not None else str(self.rule),
            members=sorted(used),
            weights={k: round(v, 6) for k, v in used.items()},
            missing=missing,
            **outcome,
        )
        if missing:
            log.info("%s round %d: aggregated without %s", self.id, r, ", ".join(missing))
        return received, next_round

    async def _evaluate(self, r: int) -> tuple[str, Evaluation]:
        self.phase = advance(self.phase, Phase.EVALUATING)
        split, result = await self.worker.run("evaluate", self.local.evaluate, self.params)
        self.events.emit(
            "eval",
            r,
            data=split,
            loss=round(result.loss, 6),
            **{result.metric: round(result.score, 6)},
        )
        return split, result

    def _aggregate_plain(
        self, r: int, received: dict[str, np.ndarray], weights: dict[str, float]
    ) -> tuple[dict[str, float], dict[str, Any]]:
        """The configured rule over our model and the neighbours'; outliers it flags feed
        the suspect tracker. With compression the rule mixes the public copies, and the
        model moves by ``consensus_step`` towards their mix (``core.public_copy``)."""
        public = None if self.own_copy is None else self.own_copy.copy
        if public is None:  # (no compression; or a restart's first copy was not finite)
            self.params, used, outliers = aggregate(
                self.rule, self.id, self.params, received, weights
            )
        else:
            own = self.buffers.take().view(np.float32)
            own[:] = public
            mixed, used, outliers = aggregate(self.rule, self.id, own, received, weights)
            consensus_step(self.params, public, mixed, self.consensus_step)
            self.buffers.give(own)
        for consumed in received.values():
            self.buffers.give(consumed)
        outcome: dict[str, Any] = {"outliers": outliers} if outliers else {}
        for suspect in self.suspects.record(set(received), outliers):
            self.events.emit(
                "suspect",
                r,
                peer=suspect.peer,
                reason=suspect.reason,
                flagged=suspect.flagged,
                window=suspect.window,
            )
            log.warning(
                "%s: neighbour %s is a suspect: its update was rejected (%s) in %d of "
                "its last %d rounds",
                self.id,
                suspect.peer,
                suspect.reason,
                suspect.flagged,
                suspect.window,
            )
        return used, outcome

    async def _until_done_or_stopped(
        self,
        main: asyncio.Future[Any],
        heartbeat: asyncio.Future[Any],
        stopper: asyncio.Future[Any],
    ) -> None:
        """Until the rounds end or a stop comes. If this task itself is cancelled instead
        (a crash, not a stop), the rounds and heartbeat are abandoned with it."""
        try:
            await asyncio.wait({main, stopper}, return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            await self._abandon(main, heartbeat, stopper)
            raise

    async def _abandon(self, *tasks: asyncio.Future[Any]) -> None:
        """The node's own task was cancelled (a node killed in a process it shares with
        others, ``harness/multinode.py``): its rounds, heartbeat and stop watch end with it,
        and the file work in flight finishes, so that nothing of it writes into the state
        folder a restarted node takes over. No final checkpoint: it crashed."""
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self.worker.settle()
        await self.saver.committed()
        self.saver.close()

    async def _final_checkpoint(self) -> None:
        """On a signal mid-round: wait for the worker thread, then checkpoint what the model
        is: before aggregation, the current round (a restart redoes it; local training is
        repeated, nothing is lost); after it, the next round."""
        await self.worker.settle()
        await self.saver.committed()
        self.saver.close()
        if self.finished:
            return
        resume = self._resume_round
        await self.saver.save_final(resume, self.params, self.clock.value, self.local.dp_releases)
        self.events.emit("checkpoint", self.tracker.current, next_round=resume, final=True)

    async def _linger(self) -> None:
        """After the last round, give neighbours (bounded) time to finish with our parameters."""
        loop = asyncio.get_running_loop()
        last = self.training.rounds - 1
        neighbours = self.neighbours_of(last)
        deadline = loop.time() + self.training.round_timeout
        await self.wait_until(
            lambda: all(
                self.tracker.peer_rounds.get(p, 0) >= self.training.rounds
                or p not in self.net.links
                for p in neighbours
            ),
            lambda: deadline,
        )

    async def _heartbeat(self) -> None:
        """Keep every link from staying silent longer than ``net.keepalive`` (a timer
        beside the rounds, never on their path); every ``heartbeat_interval`` tell every
        link our round and close those silent past ``heartbeat_timeout``."""
        net = self.config.net
        tick = min(net.keepalive, net.heartbeat_interval) / 2
        last_full = time.monotonic()
        while True:
            await asyncio.sleep(tick)
            now = time.monotonic()
            if now - last_full >= net.heartbeat_interval:
                last_full = now
                self.net.broadcast_status(self.tracker.current)
                self.net.check_heartbeats(now, net.heartbeat_timeout)
            else:
                self.net.keep_alive(self.tracker.current, now, tick)

    async def _rounds(self, start_round: int, resumed: bool) -> None:
        started = await self._startup(start_round, resumed)
        if started is None:
            self.exit_code = EXIT_ALONE
            return
        if self.moments is not None and not await self._standardize():
            self.exit_code = EXIT_ALONE
            return
        r = started
        if r != start_round:
            self.events.emit("resume", r, reason="neighbours are ahead", from_round=start_round)
        while r < self.training.rounds:
            r = await self._round(r)
        need = self.training.min_neighbours
        if self.rounds_run and self.most_averaged < need:
            log.error(
                "%s: no round averaged the models of %d neighbour(s) (training.min_neighbours; "
                "at most %d): exit code %d",
                self.id,
                need,
                self.most_averaged,
                EXIT_ALONE,
            )
            self.exit_code = EXIT_ALONE
        self.tracker.start_round(self.training.rounds)
        self.net.broadcast_status(self.training.rounds)
        self.finished = True
        self.phase = advance(self.phase, Phase.FINISHED)
        await self._linger()

    # --- lifecycle -----------------------------------------------------------------------

    async def run(self) -> int:
        """Run all rounds (or until SIGINT/SIGTERM). Returns the process exit code."""
        self._changed = asyncio.Event()
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        self._stop = stop
        if self._stop_requested:
            stop.set()
        if self.options.handle_signals:
            for sig in (signal.SIGINT, signal.SIGTERM):
                with contextlib.suppress(NotImplementedError, RuntimeError):
                    loop.add_signal_handler(sig, stop.set)

        start_round = 0
        try:
            checkpoint = load_checkpoint(
                self.options.state_dir,
                expected_digest=self.config.digest,
                expected_size=self.params.size,
                digest_with_rounds=self.config.digest_with_rounds,
                dp=self.config.aggregation.dp is not None,
            )
            self.local.dp_releases = restore_dp_releases(
                self.config, checkpoint, self.options.state_dir / "events.jsonl"
            )
        except P2PFLError:  # (the node will not run: let go of its files)
            self._close_files()
            raise
        if checkpoint is not None and checkpoint.next_round >= self.training.rounds:
            log.info(
                "%s: training is complete: all %d rounds are done (checkpoint in %s); "
                "nothing to do",
                self.id,
                self.training.rounds,
                self.options.state_dir,
            )
            self._close_files()
            return 0
        if checkpoint is not None:
            self.params = checkpoint.params
            if self.own_copy is not None:  # what the neighbours knew of it is gone
                self.own_copy = OwnCopy(self.compression, None)
            start_round = checkpoint.next_round
            self.clock.restore(checkpoint.lamport)
            self.events.emit("resume", start_round, reason="checkpoint")
            log.info("%s: resuming from checkpoint at round %d", self.id, start_round)
        self.tracker.start_round(start_round)
        self._resume_round = start_round
        self.events.emit(
            "node_start",
            start_round,
            pid=os.getpid(),
            config_digest=self.config.digest_hex,
            parameters=int(self.params.size),
            compression=str(self.compression),
            input_scale=self.input_scale,
            samples=len(self.local.data.y),
            **({"tightened": self.tightened} if self.tightened else {}),
        )
        try:
            await self._open_services(start_round)
            self._connect()
            heartbeat = asyncio.ensure_future(self._heartbeat())
            main = asyncio.ensure_future(self._rounds(start_round, checkpoint is not None))
            stopper = asyncio.ensure_future(stop.wait())
            await self._until_done_or_stopped(main, heartbeat, stopper)
            heartbeat.cancel()
            stopper.cancel()
            if not main.done():
                log.info("%s: stopping on signal at round %d", self.id, self.tracker.current)
                main.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await main
            await self._final_checkpoint()
        finally:
            await self._shut_down()
        return self.exit_code

    def _close_files(self) -> None:
        """For a node that ends before it started: its log, journal and lock."""
        self.events.close()
        if self.exchange is not None:
            self.exchange.close()
        self.state_lock.release()

    async def _open_services(self, start_round: int) -> None:
        """Listen for peers; serve metrics and the status socket if asked to."""
        peer = self.config.peers[self.id]
        host = self.options.listen_host or peer.host
        port = peer.port if self.options.listen_port is None else self.options.listen_port
        told = self.options.listen_host is not None or self.options.listen_port is not None
        try:
            await self.net.listen(host, port)
        except OSError as exc:
            where = "--listen" if told else f"{self.config.source}: peers.{self.id}.address"
            raise ListenError(
                f"cannot listen on {host}:{port}: {exc.strerror or exc} (another process on "
                f"that port, or not this machine's address? see {where})"
            ) from None
        if self.metrics is not None and self.options.metrics is not None:
            try:
                self.metrics_address = self.metrics.serve(*self.options.metrics)
            except OSError as exc:
                raise ListenError(
                    "cannot serve metrics on {}:{}: {} (see --metrics)".format(
                        *self.options.metrics, exc.strerror or exc
                    )
                ) from None
            self.events.emit(
                "listen",
                start_round,
                service="metrics",
                host=self.metrics_address[0],
                port=self.metrics_address[1],
            )
            log.info("%s: metrics on http://%s:%d/metrics", self.id, *self.metrics_address)
        if self.options.status_socket:
            try:
                sock = open_status_socket(self.options.state_dir)
            except OSError as exc:  # an aid to the operator: never worth not training for
                log.error("%s: no status socket (p2pfl status will not answer): %s", self.id, exc)
            else:
                self._status_task = asyncio.ensure_future(serve_status(sock, self.status))

    def _connect(self) -> None:
        """Reach every peer that is ever a neighbour: the smaller id dials (one connection
        per pair); the other announces itself, so a restarted peer is not left waiting out
        a reconnect backoff."""
        targets = ever_neighbours(
            self.config.topology,
            self.config.peer_ids,
            self.config.seed,
            self.id,
            self.training.rounds,
        )
        now = asyncio.get_running_loop().time()
        for target in targets - set(self.net.links):
            self.tracker.mark_down(target, now)  # until it connects
        for target in sorted(targets):
            if target > self.id:
                self.net.dial(target)
            else:
                self.net.announce(target)

    async def _shut_down(self) -> None:
        self.phase = advance(self.phase, Phase.STOPPING)
        if self._status_task is not None:
            self._status_task.cancel()
            with contextlib.suppress(asyncio.CancelledError, OSError):
                await self._status_task
            with contextlib.suppress(OSError):
                (self.options.state_dir / "status.sock").unlink()
        if self.metrics is not None:
            self.metrics.close()
        await self.net.close()
        self.events.emit(
            "node_stop",
            self.tracker.current,
            finished=self.finished,
            peak_rss_mb=peak_rss_mb(),
            reason="alone"
            if self.exit_code == EXIT_ALONE
            else "completed"
            if self.finished
            else "stopped",
        )
        self.events.close()
        if self.exchange is not None:
            self.exchange.close()
        self.state_lock.release()
