"""What arrives on a node's links: announced rounds and parameter streams, judged by the
round core (``rounds.RoundTracker``) and logged; secure aggregation's messages go to the
secure exchange (whose session judges them).

With compression a stream is a payload that changes this node's copy of the sender's
public copy held for that link (``core.public_copy``): it is read and applied whatever the
round's verdict, so the copies stay in step, and the copy (a snapshot) is what the round
receives.

Every rejection is a ``reject`` event with its reason (secure aggregation's are throttled
per peer); the link stays up unless the message breaks the protocol (then a MessageError
drops it).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping

import numpy as np

from p2pfl.core.public_copy import PeerCopies
from p2pfl.core.rounds import RoundTracker
from p2pfl.daemon.events import EventLog
from p2pfl.daemon.net import PeerLink
from p2pfl.daemon.secure_exchange import SecureExchange
from p2pfl.errors import MessageError, SecureAggregationError
from p2pfl.proto.wire import (
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


class Inbox:
    """Dispatches one node's incoming messages."""

    def __init__(
        self,
        *,
        tracker: RoundTracker,
        events: EventLog,
        links: Mapping[str, PeerLink],
        params_dtype: int,
        exchange: SecureExchange | None,
        offer: Callable[[PeerLink], None],
        notify: Callable[[], None],
        copies: PeerCopies | None = None,
        snapshot: Callable[[np.ndarray], np.ndarray] | None = None,
    ) -> None:
        self.tracker = tracker
        self.events = events
        #: The network's current links (a replaced link's late news is ignored).
        self.links = links
        self.params_dtype = params_dtype
        self.exchange = exchange
        self.secure = exchange is not None
        self.offer = offer
        self.notify = notify
        #: Compression: the copies of the neighbours' public copies, and how a copy is
        #: snapshotted for a round (None: plain or secure streams).
        self.copies = copies
        self.snapshot = snapshot or (lambda copy: copy.copy())

    def message(self, link: PeerLink, msg: Message) -> None:
        """Handle one authenticated message (RemoteProtocolError/MessageError drop the link)."""
        if isinstance(msg, Status):
            link.announced = msg.round
            if self.links.get(link.peer_id) is not link:
                return  # a replaced link closing: its news is older than the new link's
            self.tracker.note_peer_round(link.peer_id, msg.round)
            self.offer(link)
            self.notify()
        elif isinstance(msg, ParamsBegin):
            if msg.dtype != self.params_dtype:
                raise MessageError(
                    f"parameters of dtype code {msg.dtype}, this network uses "
                    f"{self.params_dtype} (aggregation.secure: {self.secure})"
                )
            verdict = self.tracker.judge(link.peer_id, msg.round)
            if not verdict.keep:
                self.events.emit("reject", msg.round, peer=link.peer_id, reason=verdict.reason)
            link.stream_keep = verdict.keep
            whole = verdict.keep or self.copies is not None
            link.receiver.begin(msg.round, msg.total_bytes, keep=whole)
            link.stream_started = time.monotonic()
            link.stream_lamport = msg.lamport
        elif isinstance(msg, Keys | Shares | Present | Confirm | Unmask | Reveal):
            self._secure_message(link, msg)
        elif isinstance(msg, ParamsChunk):
            self._params_chunk(link, msg)

    def _params_chunk(self, link: PeerLink, msg: ParamsChunk) -> None:
        done = link.receiver.chunk(msg.round, msg.offset, msg.data)
        if done is None or done.params is None:
            return
        params, payload_bytes = done.params, done.params.nbytes
        if self.copies is not None:
            copy = self.copies.apply(link, link.peer_id, done.round, params)
            if not link.stream_keep:
                return  # (judged at its start: the reject is logged)
            params = self.snapshot(copy)
        # One NaN would spread to every model. A float64 sum is NaN/inf exactly when some
        # entry is (float32 values cannot overflow it) and allocates no model-sized mask;
        # (+inf and -inf together make it NaN with a warning: silenced, still refused).
        # (A compressed stream's copy was checked when the payload was applied.)
        elif not self.secure and not _finite(params):
            self.events.emit(
                "reject", done.round, peer=link.peer_id, reason="non-finite parameters"
            )
            return
        verdict = self.tracker.deliver(link.peer_id, done.round, params)
        if verdict.keep:
            self.events.emit(
                "recv",
                done.round,
                peer=link.peer_id,
                bytes=payload_bytes,
                duration_s=round(time.monotonic() - link.stream_started, 6),
                buffered=done.round > self.tracker.current,
                sent_lamport=link.stream_lamport,
            )
        else:
            self.events.emit("reject", done.round, peer=link.peer_id, reason=verdict.reason)
        self.notify()

    def _secure_message(
        self, link: PeerLink, msg: Keys | Shares | Present | Confirm | Unmask | Reveal
    ) -> None:
        exchange = self.exchange
        if exchange is None:
            raise MessageError(
                f"{type(msg).__name__.upper()} in a network without secure aggregation"
            )
        try:
            exchange.receive(link, msg)
        except SecureAggregationError as exc:  # a step refused that no handler foresaw
            self.events.emit("reject", msg.round, peer=link.peer_id, reason=str(exc))


def _finite(params: np.ndarray) -> bool:
    with np.errstate(invalid="ignore", over="ignore"):
        return bool(np.isfinite(np.sum(params, dtype=np.float64)))
