"""The websockets shell: listen, dial, handshake, and move encrypted records.

What the bytes mean is decided by the pure ``p2pfl.proto`` modules (``handshake``,
``channel``, ``wire``, ``guard``, and ``admit`` for whether a handshake is accepted and
which of two crossing links survives) and by the node, which receives authenticated
messages through the ``LinkHandler`` callbacks. The guards against abuse of websockets
itself (frames p2pfl never sends, unread output, unbounded closes) live here. Anything a
remote end does wrong ends that one connection with a logged rejection; the node keeps
running.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import random
import socket
import threading
import time
from collections.abc import Callable, Coroutine, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from websockets.asyncio.client import ClientConnection, connect
from websockets.asyncio.connection import Connection
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.exceptions import (
    ConnectionClosed,
    ConnectionClosedError,
    InvalidHandshake,
    InvalidURI,
)
from websockets.frames import Frame, Opcode
from websockets.protocol import Event, State

from p2pfl.config import Config
from p2pfl.config.schema import derived_fields, field_digests, link_digest
from p2pfl.daemon.events import EventLog
from p2pfl.errors import DigestMismatch, HandshakeError, P2PFLError, RemoteProtocolError
from p2pfl.proto.admit import confirm_keys, judge_hello, judge_reply, keeps_old_link
from p2pfl.proto.channel import Channel
from p2pfl.proto.guard import Admission, Throttle, printable
from p2pfl.proto.handshake import MAX_HANDSHAKE_MESSAGE, MAX_REPLY_MESSAGE, TAGLEN, IKHandshake
from p2pfl.proto.transfer import StreamReceiver, StreamSource, iter_chunks
from p2pfl.proto.wire import (
    CHUNK_OVERHEAD,
    DTYPE_FLOAT32,
    PROLOGUE,
    Message,
    Status,
    decode_hello,
    decode_message,
    decode_reply,
    encode_hello,
    encode_params_begin,
    encode_params_chunk,
    encode_reply,
    encode_status,
)

log = logging.getLogger("p2pfl.daemon.net")

#: Close codes we send. Reasons stay generic: details go to our log, not to the peer.
CLOSE_NORMAL = 1000
CLOSE_GOING_AWAY = 1001
CLOSE_POLICY = 1008
CLOSE_TOO_BIG = 1009
CLOSE_INTERNAL_ERROR = 1011
CLOSE_TRY_LATER = 1013


class LinkHandler(Protocol):
    """What the network needs from the node."""

    def current_round(self) -> int: ...

    def link_up(self, link: PeerLink) -> None: ...

    def link_down(self, link: PeerLink, reason: str) -> None: ...

    def heard(self, peer_id: str) -> None:
        """Bytes arrived from ``peer_id`` (on any of its links): the failure detector's
        input. Called per socket read, not per message: a 256 KiB chunk crawling over a
        thin link still shows a live peer."""

    def message(self, link: PeerLink, msg: Message) -> None:
        """Handle one authenticated message; raise RemoteProtocolError to drop the link."""


class PeerLink:
    """One authenticated connection to a peer: a websocket plus its record channel."""

    def __init__(
        self,
        peer_id: str,
        ws: Connection,
        channel: Channel,
        *,
        expected_bytes: int,
        initiator: bool,
        allocate: Callable[[], np.ndarray] | None = None,
        send_timeout: float = 10.0,
        variable: bool = False,
    ) -> None:
        self.peer_id = peer_id
        #: A record that cannot be handed to the socket in this long (the peer stopped
        #: reading) ends the link: otherwise every send behind it waits for ever.
        self.send_timeout = send_timeout
        self.ws = ws
        self.channel = channel
        self.initiator = initiator
        self.receiver = StreamReceiver(expected_bytes, allocate, variable=variable)
        #: Compression: the version of our public copy last sent on this link (streams
        #: on one link arrive in order; None: nothing yet, the next one is a keyframe).
        self.copy_version: int | None = None
        #: Whether the stream being received is kept for the round (a compressed stream
        #: is always read whole: it changes the copy of the sender's model).
        self.stream_keep = False
        self.stream_started = 0.0
        #: The sender's Lamport time of the stream being received (its ``send`` event's).
        self.stream_lamport = 0
        self.last_heard = time.monotonic()
        self.created = self.last_heard
        #: When a record last went out on this link (``keep_alive`` fills the silences).
        self.last_sent = self.last_heard
        self.bytes_sent = 0
        self.bytes_received = 0
        #: The round whose parameters were sent on this link (each link gets them once).
        self.sent_round: int | None = None
        #: The round the peer announced on this link (None until its first STATUS here).
        self.announced: int | None = None
        #: One record at a time (sealing order is sending order: counters are implicit).
        self._send_lock = asyncio.Lock()
        #: One parameter stream at a time; short messages (STATUS and the secure-aggregation
        #: exchange) still go out between its chunks instead of waiting behind a whole model.
        self._stream_lock = asyncio.Lock()
        self.closed = asyncio.Event()

    def __repr__(self) -> str:
        return f"<PeerLink {self.peer_id} {'out' if self.initiator else 'in'}>"

    async def _send_record(self, plaintext: bytes | bytearray) -> None:
        record = self.channel.seal(plaintext)
        self.bytes_sent += len(record)
        self.last_sent = time.monotonic()
        try:
            async with asyncio.timeout(self.send_timeout):
                await self.ws.send(record)
        except TimeoutError:
            log.warning("%s does not read what we send: link cut", self.peer_id)
            self.ws.transport.abort()
            raise ConnectionClosedError(None, None) from None

    async def send_message(self, plaintext: bytes) -> None:
        """Send one short message (``wire.encode_*``): it goes out between the chunks of a
        parameter stream, never behind a whole model."""
        async with self._send_lock:
            await self._send_record(plaintext)

    async def send_status(self, lamport: int, round_index: int) -> None:
        async with self._send_lock:
            await self._send_record(encode_status(lamport, round_index))

    async def send_params(
        self,
        lamport: int,
        round_index: int,
        flat_params: np.ndarray | StreamSource,
        chunk_bytes: int,
        dtype: int = DTYPE_FLOAT32,
    ) -> int:
        """Send one parameter stream; returns the bytes put on the wire. (From a
        ``StreamSource``, every chunk is read from the array it holds then.)"""
        before = self.bytes_sent
        source = flat_params if isinstance(flat_params, StreamSource) else StreamSource(flat_params)
        nbytes = source.array.nbytes
        async with self._stream_lock:
            async with self._send_lock:
                await self._send_record(encode_params_begin(lamport, round_index, nbytes, dtype))
            for offset, piece in iter_chunks(source, chunk_bytes):
                record = encode_params_chunk(lamport, round_index, offset, piece)
                async with self._send_lock:
                    await self._send_record(record)
        return self.bytes_sent - before

    async def close(self, code: int = CLOSE_NORMAL, reason: str = "") -> None:
        await close_bounded(self.ws, code, reason)


#: How long a close may wait for the peer before the TCP connection is aborted.
CLOSE_TIMEOUT = 2.0
#: How long a look-up of a roster peer's host name may take.
RESOLVE_TIMEOUT = 5.0
#: Bytes an unauthenticated connection may leave queued for sending. Our handshake messages
#: are under 1 KiB; what fills the queue is websockets' pong to every ping, written even
#: when the peer reads nothing.
MAX_OUTPUT_PENDING = 64 * 1024


async def close_bounded(
    ws: Connection, code: int = CLOSE_NORMAL, reason: str = "", timeout: float = CLOSE_TIMEOUT
) -> None:
    """Close, bounded: websockets' close() waits in drain() with no timeout when the peer
    stopped reading (a ping flood fills our output with pongs), so after ``timeout`` the
    TCP connection is aborted. Every close in this module goes through here."""
    try:
        async with asyncio.timeout(timeout):
            await ws.close(code, reason)
    except Exception:
        pass
    finally:
        if ws.state is not State.CLOSED:
            ws.transport.abort()


#: Before authentication, received bytes are parsed this many at a time, so that a cut
#: takes effect within one slice (honest traffic then is under 1 KiB per message).
UNAUTHENTICATED_SLICE = 1024
#: Our dialer's upgrade request is about 200 bytes; a browser's a few hundred more.
MAX_UPGRADE_BYTES = 8192
#: Data frames a peer may send before we have authenticated it. The handshake has two
#: (HELLO, then the first record), but a dialer is authenticated on our REPLY and may send
#: on (a STATUS broadcast) before our side has read its first record: a few more are
#: honest; a flood of thousands of empty ones is not.
MAX_HANDSHAKE_FRAMES = 8


class GuardedConnection(Connection):
    """What both ends of our connections add to websockets' (server and client alike).

    websockets answers every ping with a pong, even to a peer that reads nothing, and
    parses a whole socket read (up to 256 KiB: some 40 000 tiny frames, 150 ms of CPU)
    before we see any of it. So every frame p2pfl never sends cuts the connection: a PING
    or PONG (liveness is the STATUS heartbeat), a fragment (messages are one frame each),
    a text frame; before authentication also more data frames than a handshake needs
    (MAX_HANDSHAKE_FRAMES) and an HTTP upgrade request above 8 KiB. Before authentication
    the input is parsed in 1 KiB slices so a cut comes within one of them. Queued output
    above ``max_output`` also cuts. ``network`` is set by the subclass factories below.
    """

    network: Network
    cut = False
    authenticated = False
    max_output = MAX_OUTPUT_PENDING
    #: Bytes received during the HTTP upgrade, and data frames before authentication.
    upgrade_bytes = 0
    early_frames = 0
    #: Once the connection is a link: told of every read (``LinkHandler.heard``).
    on_bytes: Callable[[], None] | None = None

    def data_received(self, data: bytes) -> None:
        if self.authenticated:
            if self.on_bytes is not None:
                self.on_bytes()
            super().data_received(data)
            return
        if self.protocol.state is State.CONNECTING:
            self.upgrade_bytes += len(data)
            if self.upgrade_bytes > MAX_UPGRADE_BYTES:
                self.network.cut(self, f"websocket upgrade above {MAX_UPGRADE_BYTES} bytes")
                return
        view = memoryview(data)
        for start in range(0, len(data), UNAUTHENTICATED_SLICE):
            if self.cut:
                return
            super().data_received(bytes(view[start : start + UNAUTHENTICATED_SLICE]))

    def send_data(self) -> None:
        super().send_data()
        if not self.cut and self.transport.get_write_buffer_size() > self.max_output:
            self.network.cut(self, "peer does not read what we send", polite=False)

    def process_event(self, event: Event) -> None:
        if self.cut:
            return
        if isinstance(event, Frame):
            fault = self._unwanted(event)
            if fault is not None:
                self.network.cut(self, fault)
                return
        super().process_event(event)

    def _unwanted(self, frame: Frame) -> str | None:
        """Why ``frame`` is one p2pfl never sends here (None if it is fine)."""
        if frame.opcode in (Opcode.PING, Opcode.PONG):
            return f"{frame.opcode.name.lower()} frame (p2pfl never pings)"
        if frame.opcode is Opcode.CLOSE:
            return None
        if frame.opcode is not Opcode.BINARY or not frame.fin:
            return "fragmented or text frame (p2pfl sends whole binary messages)"
        if not self.authenticated:
            self.early_frames += 1
            if self.early_frames > MAX_HANDSHAKE_FRAMES:
                return "more messages than a handshake needs"
        return None


@dataclass(frozen=True)
class NetLimits:
    """Every limit of the transport in one place (derived from config and model size)."""

    max_record: int
    max_chunk: int
    max_connections: int
    handshake_timeout: float
    open_timeout: float
    max_queue: int = 16

    @property
    def max_output(self) -> int:
        """Bytes an authenticated link may leave queued: our own sends wait (drain) above
        websockets' write limit, so more than two records queued means a peer that does
        not read (a bound behind the frame rules, which already cut pings)."""
        return 2 * self.max_record + MAX_OUTPUT_PENDING


class Network:
    """Listener, dialers and the per-connection receive loops of one node."""

    def __init__(
        self,
        *,
        config: Config,
        own_id: str,
        private_key: X25519PrivateKey,
        handler: LinkHandler,
        events: EventLog,
        expected_bytes: int,
        allocate: Callable[[], np.ndarray] | None = None,
        derived: Mapping[str, str] | None = None,
        variable_streams: bool = False,
    ) -> None:
        derived = derived or {}
        self.config = config
        self.own_id = own_id
        self.private_key = private_key
        self.handler = handler
        self.events = events
        self.expected_bytes = expected_bytes
        #: Where a received model goes (a float32 array of expected_bytes): see ``pool``.
        self.allocate = allocate
        #: Compressed payloads: parameter streams of any length up to ``expected_bytes``.
        self.variable_streams = variable_streams
        chunk = config.limits.chunk_bytes
        self.limits = NetLimits(
            max_record=chunk + CHUNK_OVERHEAD + TAGLEN,
            max_chunk=chunk,
            max_connections=config.limits.max_connections or 2 * len(config.peers) + 8,
            handshake_timeout=config.limits.handshake_timeout,
            open_timeout=config.limits.handshake_timeout,
        )
        self.id_by_key = {p.public_key: p.id for p in config.peers.values()}
        #: The digest peers compare: the config's, and what this node derived from its data
        #: that must agree (``derived``, e.g. an automatic input scale).
        self.digest = link_digest(config.digest, derived)
        #: Per-field digests of both: a mismatch REPLY carries them, so the peer that
        #: dialled can say which fields differ.
        self.field_digests = field_digests(config.as_mapping()) | derived_fields(derived)
        self.links: dict[str, PeerLink] = {}
        self.admission: Admission[ServerConnection] = Admission(self.limits.max_connections)
        self._throttle = Throttle()
        self._throttle_all = Throttle(burst=50, window=10.0)  # all unauthenticated sources
        #: Each roster peer's source keys (see ``source_key``): its pending connections are
        #: evicted last. Addresses written as IPs count at once; host names once resolved
        #: (at ``listen`` and again whenever the peer is dialled or its link goes down).
        self._peer_sources: dict[str, frozenset[str]] = {
            p.id: frozenset({source_key(p.host)}) if _is_ip(p.host) else frozenset()
            for p in config.peers.values()
            if p.id != own_id
        }
        self.peer_sources: frozenset[str] = frozenset().union(*self._peer_sources.values())
        self._resolving: set[str] = set()  # peers whose look-up is under way
        self._retiring: set[PeerLink] = set()  # replaced links finishing what is under way
        self._server: Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._stopping = False
        #: Why a roster peer has no link, as far as we know (the last failed dial, a
        #: digest mismatch); a peer with a link, or never tried, has no entry.
        self.unreached: dict[str, str] = {}

    # --- lifecycle -----------------------------------------------------------------------

    def _ws_options(self) -> dict[str, object]:
        return {
            # Until a peer authenticates it may only send handshake-sized messages; the
            # limit is raised to one record once it has (see _authenticated).
            "max_size": MAX_HANDSHAKE_MESSAGE,
            "max_queue": self.limits.max_queue,
            "compression": None,  # parameters do not compress; masked data never will
            "ping_interval": None,  # liveness is our own STATUS heartbeat
            "close_timeout": 2,
        }

    async def listen(self, host: str, port: int) -> int:
        """Start accepting connections; returns the bound port (useful with port 0)."""
        self._server = await serve(
            self._accept,
            host,
            port,
            open_timeout=self.limits.open_timeout,
            create_connection=_counted_connection(self),
            server_header=None,  # do not advertise the library and Python versions
            **self._ws_options(),  # type: ignore[arg-type]
        )
        bound = int(next(iter(self._server.sockets)).getsockname()[1])
        for peer_id in self._peer_sources:
            self.spawn(self.resolve_peer(peer_id))
        self.events.emit("listen", host=host, port=bound)
        log.info("%s listening on %s:%d", self.own_id, host, bound)
        return bound

    async def resolve_peer(self, peer_id: str) -> None:
        """Look up a roster peer's host name again (a peer may move, e.g. a new DHCP lease);
        on failure keep what was known."""
        host = self.config.peers[peer_id].host
        if _is_ip(host) or peer_id in self._resolving:
            return
        self._resolving.add(peer_id)  # until the look-up's thread ends, not our wait
        lookup = _getaddrinfo(host, finished=lambda: self._resolving.discard(peer_id))
        try:
            async with asyncio.timeout(RESOLVE_TIMEOUT):
                infos = await asyncio.shield(lookup)
        except (OSError, TimeoutError) as exc:
            log.debug("cannot resolve %s (%s): %s", host, peer_id, _describe(exc))
            return
        found = frozenset(source_key(str(info[4][0])) for info in infos)
        if found:
            self._peer_sources[peer_id] = found
            self.peer_sources = frozenset().union(*self._peer_sources.values())

    def dial(self, peer_id: str) -> None:
        """Keep a connection to ``peer_id`` up for as long as the network runs."""
        self.spawn(self._dial_forever(peer_id))

    def announce(self, peer_id: str) -> None:
        """Dial ``peer_id`` once, without retrying.

        Normally the smaller id dials. But after a restart, a peer with a smaller id may be
        sleeping in its reconnect backoff (up to ``net.reconnect_max``) while the whole
        neighbourhood waits for us; one direct attempt brings the link up at once. If both
        ends dial at the same moment, the newer link replaces the older one as on any
        reconnection, and the smaller id's dialer keeps the pair connected after that.
        """
        self.spawn(self._announce(peer_id))

    async def _announce(self, peer_id: str) -> None:
        if peer_id in self.links:
            return
        try:
            link = await self.dial_once(peer_id)
        except (P2PFLError, OSError, TimeoutError, ConnectionClosed, InvalidHandshake) as exc:
            log.debug("announcing ourselves to %s failed: %s", peer_id, _describe(exc))
            if peer_id not in self.links:
                self.unreached[peer_id] = (
                    str(exc)
                    if isinstance(exc, P2PFLError)
                    else _unreachable(exc, self.config.peers[peer_id].address)
                )
            return
        await self.run_link(link, None)

    def spawn(self, coro: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        """Run a task that ``close()`` cancels and awaits."""
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def close(self) -> None:
        self._stopping = True
        if self._server is not None:
            # Stop accepting now (websockets' own close() does it later, in a task).
            self._server.server.close()
        for task in list(self._tasks):
            task.cancel()
        links = [*self.links.values(), *self._retiring]
        await asyncio.gather(*(link.close(CLOSE_GOING_AWAY, "shutting down") for link in links))
        if self._server is not None:
            # A TCP connection accepted just before the listener closed may still be on its
            # way to connection_made (accept task -> transport -> callback): let it get
            # there, then drop every unauthenticated connection. One that never starts its
            # upgrade would otherwise wait out open_timeout, or leak if the loop ends first.
            # (One that gets there later still, under a flood, aborts itself: see
            # CountedConnection.connection_made.)
            for _ in range(3):
                await asyncio.sleep(0)
            for conn in self.admission.pending():
                conn.transport.abort()
            self._server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 5)
        for task in list(self._tasks):
            with contextlib.suppress(BaseException):
                await task

    @property
    def stopping(self) -> bool:
        """``close`` has begun: no new connection is taken from here on."""
        return self._stopping

    # --- accepting -------------------------------------------------------------------------

    async def _accept(self, ws: ServerConnection) -> None:
        # Admission (the pending-connection budget) is enforced per TCP connection, in
        # _counted_connection, before the websocket upgrade.
        remote = _address(ws)
        # One deadline from the TCP accept: the upgrade's time counts against it too.
        loop = asyncio.get_running_loop()
        accepted = getattr(ws, "accepted_at", 0.0) or loop.time()
        try:
            async with asyncio.timeout_at(accepted + self.limits.handshake_timeout):
                link, first = await self._respond(ws, remote)
        except HandshakeError as exc:
            self.refuse(ws, "handshake_fail", str(exc))
            await close_bounded(ws, CLOSE_POLICY)
            return
        except (ConnectionClosed, TimeoutError) as exc:
            if not (isinstance(ws, GuardedConnection) and ws.cut):  # logged when cut
                self.refuse(ws, "handshake_fail", _describe(exc))
            await close_bounded(ws, CLOSE_POLICY)
            return
        await self.run_link(link, first)

    def refuse(self, ws: Connection, event: str, reason: str) -> None:
        """Log a refused unauthenticated connection, rate-limited per source address."""
        remote = _address(ws)
        now = time.monotonic()
        suppressed = self._throttle.allow(source_key(remote.rpartition(":")[0]), now)
        if suppressed is None or self._throttle_all.allow("*", now) is None:
            return
        extra = {"suppressed": suppressed} if suppressed else {}
        self.events.emit(event, addr=remote, reason=reason, role="responder", **extra)
        log.warning("connection from %s refused: %s", remote, reason)

    def cut(self, ws: Connection, reason: str, *, polite: bool = True) -> None:
        """End a connection that sends what p2pfl never sends, or does not read, at once:
        nothing more it sent is parsed. Logged once (rate-limited while unauthenticated).

        ``polite``: tell the peer (close code 1008, as for any protocol error) and let the
        TCP connection close after that frame, aborting it if that takes ``CLOSE_TIMEOUT``;
        otherwise (our output is full anyway) abort at once."""
        if not isinstance(ws, GuardedConnection) or ws.cut:
            return
        ws.cut = True
        if isinstance(ws, ServerConnection) and ws in self.admission:
            self.refuse(ws, "reject", reason)
        else:
            self.events.emit("reject", addr=_address(ws), reason=reason)
            log.warning("%s: connection with %s cut: %s", self.own_id, _address(ws), reason)
        if not polite or ws.protocol.state is not State.OPEN:
            ws.transport.abort()
            return
        ws.protocol.fail(CLOSE_POLICY)  # the close frame; the parser now discards the rest
        ws.send_data()
        ws.transport.close()  # stops reading at once, closes once the frame is out
        asyncio.get_running_loop().call_later(CLOSE_TIMEOUT, ws.transport.abort)

    def _link(self, peer_id: str, ws: Connection, channel: Channel, *, initiator: bool) -> PeerLink:
        """An authenticated connection as a link (either side of the handshake)."""
        if isinstance(ws, GuardedConnection):
            handler = self.handler
            ws.on_bytes = lambda: handler.heard(peer_id)
        return PeerLink(
            peer_id,
            ws,
            channel,
            expected_bytes=self.expected_bytes,
            initiator=initiator,
            allocate=self.allocate,
            send_timeout=self.config.net.heartbeat_timeout,
            variable=self.variable_streams,
        )

    def _authenticated(self, ws: Connection) -> None:
        """The peer proved its identity: full-size records from now on, and it leaves the
        pending-connection budget."""
        ws.protocol.max_message_size = self.limits.max_record
        if isinstance(ws, GuardedConnection):
            ws.max_output = self.limits.max_output
            ws.authenticated = True
        if isinstance(ws, ServerConnection):
            self.admission.authenticated(ws)

    async def _respond(self, ws: ServerConnection, remote: str) -> tuple[PeerLink, Status]:
        msg1 = await ws.recv(decode=False)
        hs = IKHandshake(initiator=False, static=self.private_key, prologue=PROLOGUE)
        hello = decode_hello(hs.read_message(msg1))
        verdict = judge_hello(
            hello,
            hs.remote_static,
            roster=self.id_by_key,
            own_id=self.own_id,
            digest=self.digest,
        )
        peer_id = verdict.peer_id
        reply = encode_reply(verdict.reply, self.digest, self.field_digests)
        await ws.send(hs.write_message(reply))
        # (a mismatch is not noted in ``unreached`` here: a replayed HELLO could claim one;
        # our own dial, or the peer's announce, brings the confirmed story)
        verdict.fail_if_mismatch(self.digest, hello.digest)
        channel = Channel(hs.session_keys(), max_plaintext=self.limits.max_record - TAGLEN)
        # Key confirmation: message 1 alone could be a replay, so the link only counts once
        # the initiator proves it holds the session keys with a first record.
        record = await ws.recv(decode=False)
        try:
            first = decode_message(channel.open(record), max_chunk=self.limits.max_chunk)
        except RemoteProtocolError as exc:
            raise HandshakeError(f"key confirmation from {peer_id} failed: {exc}") from exc
        first = confirm_keys(peer_id, first)
        self._authenticated(ws)
        return self._link(peer_id, ws, channel, initiator=False), first

    # --- dialing ---------------------------------------------------------------------------

    async def _dial_forever(self, peer_id: str) -> None:
        low, high = self.config.net.reconnect_min, self.config.net.reconnect_max
        delay = low
        while not self._stopping:
            existing = self.links.get(peer_id)
            if existing is not None:  # e.g. the peer announced itself after a restart
                await existing.closed.wait()
                delay = low
                continue
            await self.resolve_peer(peer_id)
            try:
                link = await self.dial_once(peer_id)
            except DigestMismatch as exc:
                self.events.emit("handshake_fail", peer=peer_id, reason=str(exc), role="initiator")
                log.error("%s: %s", peer_id, exc)
                self.unreached[peer_id] = str(exc)
                delay = high
            except HandshakeError as exc:
                self.events.emit("handshake_fail", peer=peer_id, reason=str(exc), role="initiator")
                log.warning("handshake with %s failed: %s", peer_id, exc)
                self.unreached[peer_id] = f"handshake failed: {exc}"
            except (OSError, TimeoutError, ConnectionClosed, InvalidHandshake, InvalidURI) as exc:
                log.debug("cannot reach %s yet: %s", peer_id, _describe(exc))
                self.unreached[peer_id] = _unreachable(exc, self.config.peers[peer_id].address)
            except Exception as exc:  # never let one surprise end the dialer for good
                log.exception("unexpected error dialing %s", peer_id)
                self.events.emit(
                    "handshake_fail", peer=peer_id, reason=_describe(exc), role="initiator"
                )
                self.unreached[peer_id] = _describe(exc)
            else:
                delay = low
                await self.run_link(link, None)
                if self._stopping:
                    return
            # Exponential backoff with jitter, so restarted peers do not reconnect in lockstep.
            await asyncio.sleep(delay * random.uniform(0.5, 1.5))
            delay = min(delay * 2, high)

    async def dial_once(self, peer_id: str) -> PeerLink:
        """One dial of ``peer_id``: connect, authenticate, send our first STATUS. The link
        is not taken up until ``run_link`` runs it (``_dial_forever`` does both, with
        retries; tests call the two steps apart to order crossing handshakes)."""
        peer = self.config.peers[peer_id]
        ws: ClientConnection = await connect(
            peer.address,
            open_timeout=self.limits.open_timeout,
            proxy=None,
            user_agent_header=None,
            create_connection=_guarded_client(self),
            # (a REPLY naming the fields of a config that differs is bigger than a HELLO)
            **{**self._ws_options(), "max_size": MAX_REPLY_MESSAGE},  # type: ignore[arg-type]
        )
        try:
            # The whole exchange is bounded: whoever answers at that address (the peer, or
            # a squatter that pings and never reads) holds this dialer at most this long.
            async with asyncio.timeout(self.limits.handshake_timeout):
                return await self._initiate(peer_id, ws)
        except BaseException:
            await close_bounded(ws, CLOSE_POLICY)
            raise

    async def _initiate(self, peer_id: str, ws: ClientConnection) -> PeerLink:
        """Our side of the handshake on a fresh websocket: hello, reply, first STATUS."""
        hs = IKHandshake(
            initiator=True,
            static=self.private_key,
            prologue=PROLOGUE,
            remote_static=self.config.peers[peer_id].public_key,
        )
        await ws.send(hs.write_message(encode_hello(self.digest, self.own_id)))
        try:
            answer = await ws.recv(decode=False)
        except ConnectionClosed as exc:
            if exc.rcvd is None or exc.rcvd.code != CLOSE_POLICY:
                raise
            # A responder that does not know our key (or that holds another key for this
            # id) ends the handshake with no answer at all (a policy close).
            raise HandshakeError(
                f"{peer_id} ended the handshake with a policy close, without answering: it "
                "may not know our key (does its peers.yaml list our public key, and ours "
                "its?), or it is not that peer"
            ) from None
        reply = decode_reply(hs.read_message(answer))
        judge_reply(reply, self.digest, self.field_digests)
        self._authenticated(ws)
        channel = Channel(hs.session_keys(), max_plaintext=self.limits.max_record - TAGLEN)
        link = self._link(peer_id, ws, channel, initiator=True)
        await link.send_status(self.events.clock.tick(), self.handler.current_round())
        return link

    # --- a live link -------------------------------------------------------------------------

    async def run_link(self, link: PeerLink, first: Status | None) -> None:
        """Take up an authenticated link (unless the crossing-link rule keeps the old one)
        and read from it until it closes."""
        old = self.links.get(link.peer_id)
        if old is not None and keeps_old_link(
            self.own_id,
            link.peer_id,
            old_initiator=old.initiator,
            new_initiator=link.initiator,
            old_age=time.monotonic() - old.created,
            handshake_timeout=self.limits.handshake_timeout,
        ):
            await link.close(CLOSE_NORMAL, "duplicate")
            return
        self.links[link.peer_id] = link
        self.unreached.pop(link.peer_id, None)
        if old is not None:  # the peer restarted or reconnected: the new link wins
            self.spawn(self._retire(old))
        self.events.emit("connect", peer=link.peer_id, role="out" if link.initiator else "in")
        self.events.emit("handshake_ok", peer=link.peer_id)
        log.info("%s: connected to %s", self.own_id, link.peer_id)
        reason = "closed"
        try:
            if not link.initiator:
                await link.send_status(self.events.clock.tick(), self.handler.current_round())
            self.handler.link_up(link)
            if first is not None:
                self._dispatch(link, first)
            while True:
                record = await link.ws.recv(decode=False)
                link.last_heard = time.monotonic()
                link.bytes_received += len(record)
                msg = decode_message(link.channel.open(record), max_chunk=self.limits.max_chunk)
                self._dispatch(link, msg)
        except RemoteProtocolError as exc:
            reason = f"protocol error: {exc}"
            self.events.emit("reject", peer=link.peer_id, reason=str(exc))
            log.warning("dropping %s: %s", link.peer_id, exc)
            await link.close(CLOSE_POLICY, "protocol error")
        except ConnectionClosed as exc:
            reason = _describe(exc)
            if exc.sent is not None and exc.sent.code == CLOSE_TOO_BIG:
                self.events.emit("reject", peer=link.peer_id, reason="frame above the size limit")
                log.warning("dropping %s: frame above the size limit", link.peer_id)
        except asyncio.CancelledError:
            reason = "shutting down"
            raise
        except Exception as exc:  # a bug of ours: drop this link, keep the node
            reason = f"internal error: {type(exc).__name__}"
            log.exception("internal error on the link to %s", link.peer_id)
            self.events.emit("reject", peer=link.peer_id, reason=reason)
            await link.close(CLOSE_INTERNAL_ERROR, "")
        finally:
            link.receiver.abort()
            link.closed.set()
            if self.links.get(link.peer_id) is link:
                del self.links[link.peer_id]
            if not self._stopping:
                self.spawn(self.resolve_peer(link.peer_id))  # it may come back from elsewhere
            self.events.emit("disconnect", peer=link.peer_id, reason=reason)
            self.handler.link_down(link, reason)

    async def _retire(self, link: PeerLink) -> None:
        """A link replaced by a newer one to the same peer. Nothing new goes out on it (it
        is no longer in ``links``), but what is under way may finish: with crossing dials
        the peer may be streaming this round's model on it, and closing it at once lost
        that model for the round. It closes when the peer closes it, or after one
        handshake timeout (the peer retires it the same way)."""
        self._retiring.add(link)
        try:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(link.closed.wait(), self.limits.handshake_timeout)
            await link.close(CLOSE_NORMAL, "replaced")
        finally:
            self._retiring.discard(link)

    def _dispatch(self, link: PeerLink, msg: Message) -> None:
        self.events.clock.observe(msg.lamport)
        self.handler.message(link, msg)

    def check_heartbeats(self, now: float, timeout: float) -> None:
        """Close links that have been silent for longer than ``timeout``."""
        for link in list(self.links.values()):
            if now - link.last_heard > timeout:
                self.events.emit("reject", peer=link.peer_id, reason="heartbeat timeout")
                self.spawn(link.close(CLOSE_GOING_AWAY, "heartbeat timeout"))

    def keep_alive(self, round_index: int, now: float, idle: float) -> None:
        """A STATUS on every link that has sent nothing for ``idle`` seconds: a live node's
        silences stay short, whatever its rounds take (the neighbours' failure detectors
        read them)."""
        stale = [link for link in self.links.values() if now - link.last_sent >= idle]
        if stale:
            lamport = self.events.clock.tick()
            for link in stale:
                link.last_sent = now  # (one STATUS in flight per link is enough)
                self.spawn(_quiet(link.send_status(lamport, round_index)))

    def broadcast_status(
        self, round_index: int, peers: Callable[[str], bool] | None = None
    ) -> None:
        """Tell connected peers our round (fire and forget; ordering per link is kept)."""
        lamport = self.events.clock.tick()
        for link in list(self.links.values()):
            if peers is None or peers(link.peer_id):
                self.spawn(_quiet(link.send_status(lamport, round_index)))


def _counted_connection(network_: Network) -> type[ServerConnection]:
    """Server connections that enter the pending-connection budget at TCP accept (so sockets
    that never upgrade count too), and log upgrades that fail before ``_accept`` runs."""

    class CountedConnection(GuardedConnection, ServerConnection):
        network = network_
        evicted = False
        #: Loop time of the TCP accept: the handshake's deadline counts from here, so the
        #: websocket upgrade and our handshake share one ``handshake_timeout``.
        accepted_at = 0.0

        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            super().connection_made(transport)
            self.accepted_at = asyncio.get_running_loop().time()
            if self.network.stopping:  # accepted by the kernel before the listener closed
                self.transport.abort()
                return
            source = source_key(_address(self).rpartition(":")[0])
            evicted = self.network.admission.admit(
                self, source, protected=source in self.network.peer_sources
            )
            if isinstance(evicted, CountedConnection):
                evicted.evicted = True
                self.network.refuse(evicted, "reject", "too many unauthenticated connections")
                evicted.transport.abort()

        def connection_lost(self, exc: Exception | None) -> None:
            self.network.admission.discard(self)
            super().connection_lost(exc)

        async def handshake(self, *args: Any, **kwargs: Any) -> None:
            try:
                await super().handshake(*args, **kwargs)
            except asyncio.CancelledError:  # open_timeout expired, or we are shutting down
                if not self.network.stopping and not self.evicted and not self.cut:
                    self.network.refuse(
                        self, "handshake_fail", "timed out before the websocket upgrade"
                    )
                raise
            if self.protocol.state is not State.OPEN and not self.evicted and not self.cut:
                exc = self.protocol.handshake_exc
                self.network.refuse(
                    self,
                    "handshake_fail",
                    f"websocket upgrade failed: {exc or 'connection closed'}",
                )

    return CountedConnection


def _guarded_client(network_: Network) -> type[ClientConnection]:
    """Client connections guarded like the server's: a listener at a peer's address that
    pings, or sends and never reads, is cut, and the dialer moves on."""

    class GuardedClientConnection(GuardedConnection, ClientConnection):
        network = network_

    return GuardedClientConnection


async def quietly(send: Coroutine[Any, Any, None]) -> None:
    """A short message sent in the background (``Network.spawn``): a link that died
    meanwhile is the waiting side's business, since every wait is bounded."""
    with contextlib.suppress(Exception):
        await send


async def _quiet(coro: Coroutine[Any, Any, None]) -> None:
    with contextlib.suppress(ConnectionClosed, OSError):
        await coro


def _getaddrinfo(host: str, finished: Callable[[], None]) -> asyncio.Future[list[Any]]:
    """``socket.getaddrinfo`` in a daemon thread of its own; ``finished`` is called on the
    loop when that thread is done. Not the loop's executor: a look-up that hangs (a slow
    or hostile DNS server) would hold one of the threads that training and checkpoints
    run on, and keep the process from exiting."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[list[Any]] = loop.create_future()
    # Nobody may be waiting any more (the caller timed out): mark an error as seen.
    future.add_done_callback(lambda f: f.cancelled() or f.exception())

    def settle(result: list[Any] | None, exc: OSError | None) -> None:
        finished()
        if future.done():
            return
        if exc is not None:
            future.set_exception(exc)
        else:
            future.set_result(result or [])

    def work() -> None:
        try:
            result, exc = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM), None
        except OSError as error:
            result, exc = None, error
        with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
            loop.call_soon_threadsafe(settle, result, exc)

    threading.Thread(target=work, name=f"resolve {host}", daemon=True).start()
    return future


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def source_key(host: str) -> str:
    """What one source owns: an IPv4 address, or an IPv6 /64 (one host's usual allocation)."""
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return host
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return str(ip)


def _address(ws: Connection) -> str:
    try:
        host, port = ws.remote_address[:2]
        return f"{host}:{port}"
    except (TypeError, ValueError):
        return "?"


def _unreachable(exc: BaseException, address: str) -> str:
    """Why a dial of ``address`` failed, for an operator."""
    if isinstance(exc, ConnectionRefusedError):
        return f"connection refused at {address}: not running yet, or another port?"
    if isinstance(exc, socket.gaierror):
        return f"cannot resolve the host of {address}: {exc.strerror}"
    if isinstance(exc, TimeoutError):
        return f"no answer from {address}: unreachable, or a firewall?"
    if isinstance(exc, OSError) and exc.strerror:
        return f"cannot reach {address}: {exc.strerror}"
    return f"cannot reach {address}: {_describe(exc)}"


def _describe(exc: BaseException) -> str:
    if isinstance(exc, ConnectionClosed):
        frame = exc.rcvd or exc.sent
        if frame is None:
            return "connection lost"
        reason = printable(frame.reason, 123)  # (the other end's words: maybe not ours)
        if frame.code == CLOSE_TOO_BIG:
            return f"frame above the size limit ({reason})"
        return f"closed ({frame.code}{' ' + reason if reason else ''})"
    if isinstance(exc, TimeoutError):
        return "timed out"
    return f"{type(exc).__name__}: {exc}"
