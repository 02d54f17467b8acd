"""The daemon: ties the round core, the learner and the network together.

A round at this node: train (worker thread) -> stream parameters to each neighbour ->
collect neighbours' parameters until all arrived or the deadline -> Metropolis average
renormalised over those present -> evaluate -> atomic checkpoint -> next round.
Nothing on that path sleeps or polls: waiting is on an event set by the network.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import resource
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from p2pfl.aggregate import aggregate, parse_rule
from p2pfl.checkpoint import (
    SNAPSHOTS_NAME,
    Checkpoint,
    commit_checkpoint,
    load_checkpoint,
    save_checkpoint,
    write_checkpoint,
)
from p2pfl.config import Config
from p2pfl.errors import ConfigError, MessageError, SecureAggregationError
from p2pfl.events import EventLog, LamportClock
from p2pfl.learning import (
    Dataset,
    Evaluation,
    build_learner,
    check_compatible,
    flatten,
    unflatten,
)
from p2pfl.net import CLOSE_INTERNAL_ERROR, Network, PeerLink
from p2pfl.pool import ArrayPool
from p2pfl.privacy import epsilon, privatize
from p2pfl.rounds import RoundTracker
from p2pfl.scoring import SuspectTracker
from p2pfl.secagg import FixedPoint
from p2pfl.secure_exchange import SecureExchange
from p2pfl.status import StatusBoard, open_status_socket, serve_status
from p2pfl.topology import ever_neighbours, graph_for_round, metropolis_weights
from p2pfl.wire import (
    DTYPE_FLOAT32,
    DTYPE_MASKED_U32,
    MAX_GROUP_IDS,
    Confirm,
    Keys,
    Message,
    ParamsBegin,
    ParamsChunk,
    Present,
    Reveal,
    Shares,
    Status,
    Unmask,
)

if TYPE_CHECKING:
    from p2pfl.metrics import NodeMetrics

log = logging.getLogger("p2pfl.node")
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


def input_scale_for(data: Dataset, configured: float | None) -> float:
    """The divisor for input features: configured, or the smallest power of two that
    covers the node's training data (identical on peers whose data share a range)."""
    if configured is not None:
        return configured
    largest = float(np.max(np.abs(data.x))) if data.x.size else 0.0
    if largest <= 1.0:
        return 1.0
    return float(2.0 ** math.ceil(math.log2(largest)))


def scale_inputs(data: Dataset, scale: float) -> Dataset:
    if scale == 1.0:
        return data
    factor = np.float32(1.0 / scale)
    return Dataset(
        x=data.x * factor,
        y=data.y,
        x_val=None if data.x_val is None else data.x_val * factor,
        y_val=data.y_val,
    )


def count_trained_rounds(path: Path) -> int:
    """How many ``train`` events an existing log holds: a restarted node's privacy budget
    counts every update it ever released (a redone round is a second release)."""
    try:
        with open(path, "rb") as f:
            return sum(1 for line in f if b'"type":"train"' in line)
    except OSError:
        return 0


def check_secure_topology(config: Config) -> None:
    """Secure aggregation needs every group to have two members besides its owner (with one,
    its contribution could not be masked): every peer needs two neighbours in every round."""
    rounds = range(config.training.rounds) if config.topology.resample_every else range(1)
    for r in rounds:
        graph = graph_for_round(config.topology, config.peer_ids, config.seed, r)
        for peer, neighbours in graph.items():
            if len(neighbours) > MAX_GROUP_IDS:
                raise ConfigError(
                    config.source,
                    "aggregation.secure",
                    f"supports at most {MAX_GROUP_IDS} neighbours per peer, but {peer} has "
                    f"{len(neighbours)} in round {r}",
                )
            if len(neighbours) < 2:
                raise ConfigError(
                    config.source,
                    "aggregation.secure",
                    f"needs every peer to have at least 2 neighbours, but {peer} has "
                    f"{len(neighbours)} in round {r} (use a topology of degree >= 2)",
                )


def peak_rss_mb() -> float:
    """This process's peak resident memory. VmHWM, where Linux has it: ru_maxrss can carry
    over the parent's peak across fork and exec (a node started by a big harness)."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return round(int(line.split()[1]) / 1024, 1)
    except (OSError, ValueError):
        pass
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


class Node:
    """One p2pfl peer."""

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
        self.input_scale = input_scale_for(data, config.training.input_scale)
        self.data = scale_inputs(data, self.input_scale)
        self.training = config.training
        model = config.training.model
        check_compatible(data, model.inputs, model.outputs, source=config.source, task=model.task)
        self.learner = build_learner(model.as_mapping(), config.seed, source=config.source)
        # Only the shapes matter (for unflatten); no copy of a possibly huge model.
        self.template = self.learner.get_weights()
        # May be a view of the learner's own storage (single-array learners): no extra copy.
        self.params = flatten(self.learner.get_weights())
        self.peer_index = config.peer_ids.index(self.id)
        aggregation = config.aggregation
        #: The fixed point of secure aggregation, or None for plain averaging.
        self.secure = (
            FixedPoint(aggregation.clip, aggregation.frac_bits) if aggregation.secure else None
        )
        if self.secure is not None:
            check_secure_topology(config)
        self.params_dtype = DTYPE_MASKED_U32 if self.secure is not None else DTYPE_FLOAT32
        #: How plain rounds combine the models (secure rounds: Metropolis over the sum).
        self.rule = parse_rule(aggregation.rule)
        #: Neighbours whose updates the rule keeps rejecting (logged as ``suspect``).
        self.suspects = SuspectTracker()
        self._private_key = private_key
        self._dp_rng = np.random.default_rng()  # OS entropy
        #: Updates released so far (a restarted node counts its earlier life's too).
        self._dp_releases = count_trained_rounds(options.state_dir / "events.jsonl")
        # The model and the log say something about local data: owner-only (0700 / 0600).
        options.state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
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
            from p2pfl.metrics import NodeMetrics  # prometheus-client: only when asked for

            self.metrics = NodeMetrics(self.id, config.peer_ids, lambda: len(self.net.links))
            self.events.listeners.append(self.metrics.observe)
        #: What the node is doing now (``p2pfl status``).
        self.phase = "starting"
        self._graphs: dict[int, dict[str, frozenset[str]]] = {}
        self.tracker = RoundTracker(
            total_rounds=config.training.rounds,
            neighbours_of=self.neighbours_of,
            max_buffered_rounds=config.limits.max_buffered_rounds,
            down_grace=config.net.down_grace,
        )
        #: Spare model-sized arrays: received models, and (secure) masks, reuse them.
        self.buffers = ArrayPool(self.params.size, keep=0)
        self.net = Network(
            config=config,
            own_id=self.id,
            private_key=private_key,
            handler=self,
            events=self.events,
            expected_bytes=self.params.nbytes,
            allocate=lambda: self.buffers.take().view(np.float32),
        )
        #: Secure aggregation's key exchange, masking and unmasking (None: plain averaging).
        self.exchange = SecureExchange(self, self.secure) if self.secure is not None else None
        self.collecting = False
        #: This round's parameters to send, per neighbour (plain: one array for all; secure:
        #: each neighbour's group gets its own masked contribution, added as it is ready).
        self.outgoing: tuple[int, dict[str, np.ndarray]] | None = None
        self._changed: asyncio.Event | None = None
        #: Streams in flight, per link (a replaced link's stream is tracked on its own).
        self._send_tasks: dict[PeerLink, asyncio.Task[None]] = {}
        self.finished = False
        self._status_task: asyncio.Future[None] | None = None
        self._stop: asyncio.Event | None = None
        self._worker: asyncio.Future[Any] | None = None
        #: The round a restart should begin with, given what self.params holds now.
        self._resume_round = 0
        #: The background fsync of the last checkpoint written.
        self._commit: asyncio.Future[Path] | None = None
        self._snapshots_fd: int | None = None

    def request_stop(self) -> None:
        """Ask a running node to shut down as it does on SIGTERM."""
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

    def neighbours_of(self, round_index: int) -> frozenset[str]:
        return self.graph(round_index)[self.id]

    # --- LinkHandler callbacks (called by the network, on the event loop) --------------------

    def current_round(self) -> int:
        return self.tracker.current

    def _notify(self) -> None:
        if self._changed is not None:
            self._changed.set()

    def link_up(self, link: PeerLink) -> None:
        self.tracker.mark_up(link.peer_id)
        self._offer(link)
        self._notify()

    def link_down(self, link: PeerLink, reason: str) -> None:
        if link.peer_id not in self.net.links:  # not replaced by a newer connection
            self.tracker.forget_peer(link.peer_id)
            self.tracker.mark_down(link.peer_id, asyncio.get_running_loop().time())
        self._notify()

    def message(self, link: PeerLink, msg: Message) -> None:
        if isinstance(msg, Status):
            link.announced = msg.round
            if self.net.links.get(link.peer_id) is not link:
                return  # a replaced link closing: its news is older than the new link's
            self.tracker.note_peer_round(link.peer_id, msg.round)
            self._offer(link)
            self._notify()
        elif isinstance(msg, ParamsBegin):
            if msg.dtype != self.params_dtype:
                raise MessageError(
                    f"parameters of dtype code {msg.dtype}, this network uses "
                    f"{self.params_dtype} (aggregation.secure: {self.secure is not None})"
                )
            verdict = self.tracker.judge(link.peer_id, msg.round)
            if not verdict.keep:
                self.events.emit("reject", msg.round, peer=link.peer_id, reason=verdict.reason)
            link.receiver.begin(msg.round, msg.total_bytes, keep=verdict.keep)
            link.stream_started = time.monotonic()
            link.stream_lamport = msg.lamport
        elif isinstance(msg, Keys | Shares | Present | Confirm | Unmask | Reveal):
            self._secure_message(link, msg)
        elif isinstance(msg, ParamsChunk):
            done = link.receiver.chunk(msg.round, msg.offset, msg.data)
            if done is None or done.params is None:
                return
            # One NaN would spread to every model. A float64 sum is NaN/inf exactly when some
            # entry is (float32 values cannot overflow it) and allocates no model-sized mask.
            if self.secure is None and not np.isfinite(np.sum(done.params, dtype=np.float64)):
                self.events.emit(
                    "reject", done.round, peer=link.peer_id, reason="non-finite parameters"
                )
                return
            verdict = self.tracker.deliver(link.peer_id, done.round, done.params)
            if verdict.keep:
                self.events.emit(
                    "recv",
                    done.round,
                    peer=link.peer_id,
                    bytes=done.params.nbytes,
                    duration_s=round(time.monotonic() - link.stream_started, 6),
                    buffered=done.round > self.tracker.current,
                    sent_lamport=link.stream_lamport,
                )
            else:
                self.events.emit("reject", done.round, peer=link.peer_id, reason=verdict.reason)
            self._notify()

    def _secure_message(
        self, link: PeerLink, msg: Keys | Shares | Present | Confirm | Unmask | Reveal
    ) -> None:
        exchange = self.exchange
        if exchange is None:
            raise MessageError(
                f"{type(msg).__name__.upper()} in a network without secure aggregation"
            )
        try:
            if isinstance(msg, Keys):
                exchange.on_keys(link, msg)
            elif isinstance(msg, Shares):
                exchange.on_shares(link, msg)
            elif isinstance(msg, Present):
                exchange.on_present(link, msg)
            elif isinstance(msg, Confirm):
                exchange.on_confirm(link, msg)
            elif isinstance(msg, Unmask):
                exchange.on_unmask(link, msg)
            else:
                exchange.on_reveal(link, msg)
        except SecureAggregationError as exc:  # a step refused that no handler foresaw
            self.events.emit("reject", msg.round, peer=link.peer_id, reason=str(exc))

    # --- sending -------------------------------------------------------------------------

    def _offer(self, link: PeerLink) -> None:
        """Send this round's parameters over ``link`` once, as soon as the neighbour can
        use them: it announced a round it would buffer them in (a restarted neighbour still
        at its checkpoint round gets them when it announces our round)."""
        if self.exchange is not None:
            self.exchange.offer_keys(link)
        if not self.collecting or self.outgoing is None:
            return
        round_index, per_peer = self.outgoing
        params = per_peer.get(link.peer_id)
        if link.sent_round == round_index or params is None:
            return
        announced = link.announced  # said on this link: never stale news from a replaced one
        if announced is None:
            return
        if not round_index - self.config.limits.max_buffered_rounds <= announced <= round_index:
            return
        link.sent_round = round_index
        self._start_send(link, round_index, params)

    def _start_send(self, link: PeerLink, round_index: int, params: np.ndarray) -> None:
        task = asyncio.ensure_future(self._send(link, round_index, params))
        self._send_tasks[link] = task
        task.add_done_callback(lambda _done: self._send_tasks.pop(link, None))

    async def _send(self, link: PeerLink, round_index: int, params: np.ndarray) -> None:
        started = time.monotonic()
        lamport = self.clock.tick()
        try:
            sent = await link.send_params(
                lamport, round_index, params, self.config.limits.chunk_bytes, self.params_dtype
            )
        except Exception as exc:  # the link died mid-stream; the receiver discards the partial
            log.debug("send to %s failed: %s", link.peer_id, exc)
            return
        self.events.emit(
            "send",
            round_index,
            peer=link.peer_id,
            bytes=params.nbytes,  # as in recv; wire_bytes adds headers and AEAD tags
            wire_bytes=sent,
            duration_s=round(time.monotonic() - started, 6),
            lamport=lamport,
        )

    # --- the round loop ------------------------------------------------------------------

    def _train(self, round_index: int) -> tuple[float, np.ndarray, dict[str, Any]]:
        """Runs in a worker thread: the event loop keeps receiving meanwhile. With
        differential privacy, the update is clipped and noised before anything leaves."""
        dp = self.config.aggregation.dp
        # A copy: a single-array learner may train in the very memory self.params views.
        start = self.params.copy() if dp is not None else None
        self.learner.set_weights(unflatten(self.params, self.template))
        rng = np.random.default_rng([self.config.seed, self.peer_index, round_index])
        loss = self.learner.fit(
            self.data.x,
            self.data.y,
            epochs=self.training.local_epochs,
            batch_size=self.training.batch_size,
            learning_rate=self.training.learning_rate,
            rng=rng,
        )
        trained = flatten(self.learner.get_weights())
        if dp is None or start is None:
            return float(loss), trained, {}
        # Noise from the OS's entropy, never the shared seed (which every peer knows).
        noised, norm, clipped = privatize(start, trained, dp, self._dp_rng)
        self._dp_releases += 1
        return (
            float(loss),
            noised,
            {
                "dp_update_norm": round(norm, 6),
                "dp_clipped": clipped,
                "dp_epsilon": round(epsilon(self._dp_releases, dp.noise_multiplier, dp.delta), 6),
                "dp_delta": dp.delta,
            },
        )

    def _evaluate(self) -> tuple[str, Evaluation]:
        self.learner.set_weights(unflatten(self.params, self.template))
        if self.data.x_val is not None and self.data.y_val is not None:
            return "validation", self.learner.evaluate(self.data.x_val, self.data.y_val)
        return "train", self.learner.evaluate(self.data.x, self.data.y)

    async def _wait_until(
        self, done: object, deadline: float | Callable[[], float | None] | None
    ) -> bool:
        """Wait for ``done()`` to become true, woken by network events. False on timeout.
        ``deadline`` may be a function: it is asked again after every wake-up (a neighbour
        that dropped meanwhile brings the next wake-up forward)."""
        assert self._changed is not None and callable(done)
        loop = asyncio.get_running_loop()
        when = deadline if callable(deadline) else lambda: deadline
        while True:
            # The wake-up first, then done(): a grace that ends between the two is then
            # seen by done(), instead of being skipped until the next wake-up.
            deadline_now = when()
            if done():
                return True
            if deadline_now is not None and loop.time() >= deadline_now:
                return False
            self._changed.clear()
            # asyncio.timeout_at, not wait_for: before Python 3.12 wait_for can swallow a
            # cancellation (a stop request) that lands as the event fires (CPython gh-86296).
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout_at(deadline_now):
                    await self._changed.wait()

    async def _startup(self, start_round: int, resumed: bool) -> int:
        """Wait (bounded) for this round's neighbours and their round numbers.

        A fresh node waits up to ``training.startup_timeout`` (peers start at different
        times). A node resuming from a checkpoint joins a network that is already running:
        a neighbour that has not connected within ``net.down_grace`` is down, and waiting
        longer would also hold up the live neighbours, who wait for this node's rounds.
        """
        loop = asyncio.get_running_loop()
        neighbours = self.neighbours_of(start_round)
        deadline = loop.time() + self.training.startup_timeout
        tracker = self.tracker

        def waiting(now: float) -> list[str]:
            return [
                p
                for p in neighbours
                if not (p in self.net.links and p in tracker.peer_rounds)
                and not (resumed and tracker.gone(p, now))
            ]

        def wake_up() -> float:
            now = loop.time()
            graces = [tracker.grace_ends(p) for p in waiting(now) if resumed]
            return min([deadline, *(g for g in graces if g is not None)])

        ready = await self._wait_until(lambda: not waiting(loop.time()), wake_up)
        if not ready:
            missing = sorted(neighbours - set(self.net.links))
            log.warning("%s: starting without %s (startup timeout)", self.id, ", ".join(missing))
        return max(start_round, self.tracker.consensus_round(start_round))

    async def _round(self, r: int) -> int:
        loop = asyncio.get_running_loop()
        started = time.monotonic()
        cpu_started = time.process_time()  # (all threads: training, masks, transfers)
        neighbours = self.neighbours_of(r)
        self.tracker.start_round(r)
        self._resume_round = r
        # A round's received models (and, secure, masks for it and the next) are reused.
        self.buffers.keep = (2 if self.exchange is not None else 1) * len(neighbours)
        self.net.broadcast_status(r)
        self.events.emit("round_start", r, neighbours=sorted(neighbours))
        if self.exchange is not None:  # keys first: the owners relay them while we train
            self.exchange.start_round(r)

        t0 = time.monotonic()
        self.phase = "training"
        loss, trained, privacy = await self._in_worker(self._train, r)
        self.params = trained
        self.events.emit(
            "train",
            r,
            loss=round(loss, 6),
            duration_s=round(time.monotonic() - t0, 6),
            samples=len(self.data.y),
            **privacy,
        )

        if self.exchange is None:
            self.outgoing = (r, dict.fromkeys(neighbours, self.params))
        else:  # each owner's vector is added as its key exchange and mask are done
            self.outgoing = (r, {})
            self.exchange.trained(r, trained)
        self.collecting = True
        self.phase = "collecting"
        for peer in sorted(neighbours):
            link = self.net.links.get(peer)
            if link is not None:
                self._offer(link)
        self.tracker.start_collecting(loop.time(), self.training.round_timeout)
        # Woken by network news, by the deadline, or when a disconnected neighbour's grace
        # runs out (then it is not waited for).
        exchange = self.exchange
        if exchange is None:
            await self._wait_until(
                lambda: self.tracker.collection_done(loop.time()),
                lambda: self.tracker.next_wakeup(loop.time()),
            )
        else:
            exchange.start_collecting(loop.time())
            await self._wait_until(
                lambda: exchange.collection_done(r, loop.time()),
                lambda: exchange.next_wakeup(r, loop.time()),
            )
        self.collecting = False
        assert self.tracker.deadline is not None
        await self._finish_sends(self.tracker.deadline)
        if exchange is not None and all(task.done() for task in self._send_tasks.values()):
            for vector in self.outgoing[1].values():  # masked vectors no stream reads now
                self.buffers.give(vector)
        self.outgoing = None

        received = self.tracker.take_received()
        self.phase = "aggregating"
        missing = sorted(neighbours - set(received))
        weights = metropolis_weights(self.graph(r), self.id)
        outcome: dict[str, Any] = {}
        if exchange is None:
            self.params, used, outliers = aggregate(
                self.rule, self.id, self.params, received, weights
            )
            for consumed in received.values():
                self.buffers.give(consumed)
            if outliers:
                outcome["outliers"] = outliers
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
        else:
            used, outcome, own_clipped = await exchange.aggregate(r, received, weights)
            # (the same parameters, encoded as member and as owner: count each entry once)
            outcome["clipped"] = max(exchange.clipped, own_clipped)
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

        self.phase = "evaluating"
        split, result = await self._in_worker(self._evaluate)
        self.events.emit(
            "eval",
            r,
            data=split,
            loss=round(result.loss, 6),
            **{result.metric: round(result.score, 6)},
        )
        await self._checkpoint(r, next_round)
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
            loss,
            split,
            result.metric,
            result.score,
            len(received),
            len(neighbours),
            duration,
        )
        return next_round

    async def _in_worker(self, fn: Callable[..., T], *args: Any) -> T:
        """Run blocking work in a thread. Shielded: a shutdown waits for it instead of
        abandoning a thread that is still writing the model or the checkpoint file."""
        self._worker = asyncio.ensure_future(asyncio.to_thread(fn, *args))
        return await asyncio.shield(self._worker)

    def _save_checkpoint(self, next_round: int) -> None:
        save_checkpoint(
            self.options.state_dir,
            Checkpoint(next_round, self.params, self.clock.value, self.config.digest),
        )

    async def _checkpoint(self, round_index: int, next_round: int) -> None:
        """Write this round's checkpoint, and commit it (fsync) in the background: the next
        round does not wait for the disk. Until the commit, the previous checkpoint stands
        (a restart then redoes one round)."""
        await self._committed()
        try:
            tmp = await self._in_worker(self._write_round_files, round_index, next_round)
        except OSError as exc:  # e.g. a full disk: the previous checkpoint stands
            log.error("%s: round %d checkpoint not written: %s", self.id, round_index, exc)
            return
        self._commit = asyncio.ensure_future(
            asyncio.to_thread(commit_checkpoint, self.options.state_dir, tmp)
        )

    async def _committed(self) -> None:
        """Wait for the checkpoint commit in flight, if any. It stays tracked until it has
        finished, even if this wait is cancelled (a stop): nobody may write the next
        checkpoint file while a commit still renames the last one."""
        commit = self._commit
        if commit is None:
            return
        try:
            await asyncio.shield(commit)
        except OSError as exc:
            log.error("%s: checkpoint commit failed: %s", self.id, exc)
        finally:
            if commit.done() and self._commit is commit:
                self._commit = None

    def _write_round_files(self, round_index: int, next_round: int) -> Path:
        if self.options.snapshots:
            try:
                self._write_snapshot(round_index)
            except OSError as exc:  # analysis only: never worth stopping a node for
                log.error("%s: round %d snapshot not written: %s", self.id, round_index, exc)
        return write_checkpoint(
            self.options.state_dir,
            Checkpoint(next_round, self.params, self.clock.value, self.config.digest),
        )

    def _write_snapshot(self, round_index: int) -> None:
        """Round ``round_index``'s model at record ``round_index`` of state_dir/snapshots.f32
        (raw float32, one record per round), for offline analysis: the harness measures how
        far apart the peers' models are. Not fsynced: it is not crash state."""
        if self._snapshots_fd is None:
            self._snapshots_fd = os.open(
                self.options.state_dir / SNAPSHOTS_NAME, os.O_WRONLY | os.O_CREAT, 0o600
            )
        data = np.ascontiguousarray(self.params, dtype="<f4")
        os.pwrite(self._snapshots_fd, data.data.cast("B"), round_index * data.nbytes)

    async def _final_checkpoint(self) -> None:
        """On a signal mid-round: wait for the worker thread, then checkpoint what the model
        is: before aggregation, the current round (a restart redoes it; local training is
        repeated, nothing is lost); after it, the next round."""
        if self._worker is not None:
            with contextlib.suppress(Exception):
                await self._worker
        await self._committed()
        if self._snapshots_fd is not None:
            os.close(self._snapshots_fd)
            self._snapshots_fd = None
        if self.finished:
            return
        resume = self._resume_round
        await asyncio.to_thread(self._save_checkpoint, resume)
        self.events.emit("checkpoint", self.tracker.current, next_round=resume, final=True)

    async def _finish_sends(self, deadline: float) -> None:
        """Let outgoing streams complete (bounded by the round deadline plus a grace period)."""
        tasks = list(self._send_tasks.values())
        if not tasks:
            return
        loop = asyncio.get_running_loop()
        timeout = max(deadline - loop.time(), 0.0) + self.config.limits.handshake_timeout
        _, pending = await asyncio.wait(tasks, timeout=timeout)
        stuck = [link for link, task in self._send_tasks.items() if task in pending]
        for task in pending:  # a stuck stream: drop it; the receiver discards the partial one
            task.cancel()
        # Close those very links (a newer link to the same peer is left alone), together:
        # each close may take up to its bound when the peer stopped reading.
        await asyncio.gather(
            *(link.close(CLOSE_INTERNAL_ERROR, "stream abandoned") for link in stuck)
        )

    async def _linger(self) -> None:
        """After the last round, give neighbours (bounded) time to finish with our parameters."""
        loop = asyncio.get_running_loop()
        last = self.training.rounds - 1
        neighbours = self.neighbours_of(last)
        await self._wait_until(
            lambda: all(
                self.tracker.peer_rounds.get(p, 0) >= self.training.rounds
                or p not in self.net.links
                for p in neighbours
            ),
            loop.time() + self.training.round_timeout,
        )

    async def _heartbeat(self) -> None:
        interval = self.config.net.heartbeat_interval
        while True:
            await asyncio.sleep(interval)
            self.net.broadcast_status(self.tracker.current)
            self.net.check_heartbeats(time.monotonic(), self.config.net.heartbeat_timeout)

    async def _rounds(self, start_round: int, resumed: bool) -> None:
        r = await self._startup(start_round, resumed)
        if r != start_round:
            self.events.emit("resume", r, reason="neighbours are ahead", from_round=start_round)
        while r < self.training.rounds:
            r = await self._round(r)
        self.tracker.start_round(self.training.rounds)
        self.net.broadcast_status(self.training.rounds)
        self.finished = True
        self.phase = "finished"
        await self._linger()

    async def run(self) -> int:
        """Run all rounds (or until SIGINT/SIGTERM). Returns the process exit code."""
        self._changed = asyncio.Event()
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        self._stop = stop
        if self.options.handle_signals:
            for sig in (signal.SIGINT, signal.SIGTERM):
                with contextlib.suppress(NotImplementedError, RuntimeError):
                    loop.add_signal_handler(sig, stop.set)

        start_round = 0
        checkpoint = load_checkpoint(
            self.options.state_dir,
            expected_digest=self.config.digest,
            expected_size=self.params.size,
        )
        if checkpoint is not None:
            self.params = checkpoint.params
            start_round = checkpoint.next_round
            self.clock.value = max(self.clock.value, checkpoint.lamport)
            self.events.emit("resume", start_round, reason="checkpoint")
            log.info("%s: resuming from checkpoint at round %d", self.id, start_round)
        self.tracker.start_round(start_round)
        self._resume_round = start_round
        peer = self.config.peers[self.id]
        host = self.options.listen_host or peer.host
        port = peer.port if self.options.listen_port is None else self.options.listen_port
        self.events.emit(
            "node_start",
            start_round,
            config_digest=self.config.digest_hex,
            parameters=int(self.params.size),
            input_scale=self.input_scale,
            samples=len(self.data.y),
        )
        try:
            await self.net.listen(host, port)
            if self.metrics is not None and self.options.metrics is not None:
                self.metrics_address = self.metrics.serve(*self.options.metrics)
                self.events.emit(
                    "listen",
                    start_round,
                    service="metrics",
                    host=self.metrics_address[0],
                    port=self.metrics_address[1],
                )
                log.info("%s: metrics on http://%s:%d/metrics", self.id, *self.metrics_address)
            if self.options.status_socket:
                self._status_task = asyncio.ensure_future(
                    serve_status(open_status_socket(self.options.state_dir), self.status)
                )
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
                if target > self.id:  # one connection per pair: the smaller id dials
                    self.net.dial(target)
                else:  # e.g. after a restart: do not wait out their reconnect backoff
                    self.net.announce(target)
            heartbeat = asyncio.ensure_future(self._heartbeat())
            main = asyncio.ensure_future(self._rounds(start_round, checkpoint is not None))
            stopper = asyncio.ensure_future(stop.wait())
            await asyncio.wait({main, stopper}, return_when=asyncio.FIRST_COMPLETED)
            heartbeat.cancel()
            stopper.cancel()
            if not main.done():
                log.info("%s: stopping on signal at round %d", self.id, self.tracker.current)
                main.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await main
            await self._final_checkpoint()
        finally:
            self.phase = "stopping"
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
                reason="completed" if self.finished else "stopped",
            )
            self.events.close()
            if self.exchange is not None:
                self.exchange.close()
        return 0
