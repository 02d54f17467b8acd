"""This round's parameters on their way to the neighbours.

Plain rounds send one array to every neighbour; compressed rounds one difference of the
public copy, or its keyframe where the neighbour's copy is not in step
(``core.public_copy``); secure rounds send each neighbour's group its own masked vector,
added as each is ready. A stream starts on a link as soon as
``rounds.may_send`` says the neighbour can use it, and the round's end waits (bounded) for
the streams in flight, but for those to neighbours that are unavailable (silent or gone):
those go on from a copy of what they send, since the model is averaged in place next.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable

import numpy as np

from p2pfl.config import LimitsConfig
from p2pfl.core.public_copy import Outgoing
from p2pfl.core.rounds import may_send
from p2pfl.daemon.events import EventLog
from p2pfl.daemon.net import CLOSE_INTERNAL_ERROR, PeerLink
from p2pfl.proto.transfer import StreamSource

log = logging.getLogger("p2pfl.daemon.node")


class Outbox:
    """The parameters a node sends in the current round, and the streams carrying them."""

    def __init__(self, events: EventLog, limits: LimitsConfig, dtype: int) -> None:
        self.events = events
        self.limits = limits
        self.dtype = dtype
        #: The round being sent, and what goes to whom (None between rounds).
        self.round: int | None = None
        self.vectors: dict[str, np.ndarray | Outgoing] = {}
        #: False once collection is over: no new stream starts (those in flight finish).
        self.offering = False
        #: Streams in flight, per link (a replaced link's stream is tracked on its own).
        self.streams: dict[PeerLink, asyncio.Task[None]] = {}
        #: What each stream in flight reads (it may be switched to a copy: ``finish``).
        self.sources: dict[PeerLink, StreamSource] = {}

    def open(self, round_index: int, vectors: dict[str, np.ndarray | Outgoing]) -> None:
        """Start sending round ``round_index``: ``vectors`` now, more with ``add``."""
        self.round = round_index
        self.vectors = vectors
        self.offering = True

    def stop_offering(self) -> None:
        self.offering = False

    def add(self, peer: str, vector: np.ndarray) -> None:
        self.vectors[peer] = vector

    def offer(self, link: PeerLink) -> None:
        """Start this round's stream on ``link`` if it is due (see ``rounds.may_send``)."""
        if not self.offering or self.round is None:
            return
        params = self.vectors.get(link.peer_id)
        if params is None or not may_send(
            self.round, link.announced, link.sent_round, self.limits.max_buffered_rounds
        ):
            return
        link.sent_round = self.round
        extra: dict[str, object] = {}
        if isinstance(params, Outgoing):
            params, keyframe = params.for_version(link.copy_version)
            link.copy_version = self.round
            extra = {"keyframe": True} if keyframe else {}
        self._start_send(link, self.round, params, extra)

    def offer_all(self, peers: Iterable[str], links: dict[str, PeerLink]) -> None:
        for peer in sorted(peers):
            link = links.get(peer)
            if link is not None:
                self.offer(link)

    def close(self) -> list[np.ndarray]:
        """Stop sending: returns the vectors (their arrays are free to reuse only once no
        stream reads them, see ``all_sent``)."""
        vectors = [v for v in self.vectors.values() if isinstance(v, np.ndarray)]
        self.round = None
        self.vectors = {}
        self.offering = False
        return vectors

    def all_sent(self) -> bool:
        return all(task.done() for task in self.streams.values())

    async def finish(self, deadline: float, unavailable: Callable[[str], bool]) -> None:
        """Let the streams complete, bounded by the round deadline plus a grace period; a
        stuck one is dropped and its link closed (the receiver discards the partial one).
        Streams to ``unavailable`` neighbours (silent: a partition, a cut) are not waited
        for: they go on in the background from a copy (``StreamSource.detach``), so the
        rest of the network does not stall on a link that carries nothing."""
        copies: dict[int, np.ndarray] = {}
        for link, source in self.sources.items():
            if source.detached or unavailable(link.peer_id):
                source.detach(copies)
        tasks = [t for link, t in self.streams.items() if not self.sources[link].detached]
        if not tasks:
            return
        loop = asyncio.get_running_loop()
        timeout = max(deadline - loop.time(), 0.0) + self.limits.handshake_timeout
        _, pending = await asyncio.wait(tasks, timeout=timeout)
        stuck = [link for link, task in list(self.streams.items()) if task in pending]
        for task in pending:
            task.cancel()
        # Close those very links (a newer link to the same peer is left alone), together:
        # each close may take up to its bound when the peer stopped reading.
        await asyncio.gather(
            *(link.close(CLOSE_INTERNAL_ERROR, "stream abandoned") for link in stuck)
        )

    def _start_send(
        self, link: PeerLink, round_index: int, params: np.ndarray, extra: dict[str, object]
    ) -> None:
        source = StreamSource(params)
        task = asyncio.ensure_future(self._send(link, round_index, source, extra))
        self.streams[link] = task
        self.sources[link] = source

        def done(_task: asyncio.Task[None]) -> None:
            if self.streams.get(link) is task:
                del self.streams[link]
                del self.sources[link]

        task.add_done_callback(done)

    async def _send(
        self, link: PeerLink, round_index: int, source: StreamSource, extra: dict[str, object]
    ) -> None:
        started = time.monotonic()
        lamport = self.events.clock.tick()
        params = source.array
        try:
            sent = await link.send_params(
                lamport, round_index, source, self.limits.chunk_bytes, self.dtype
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
            **extra,
        )
