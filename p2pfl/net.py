"""The websockets shell: listen, dial, handshake, and move encrypted records.

This module only moves bytes. What the bytes mean is decided by the pure modules
(``handshake``, ``channel``, ``wire``) and by the node, which receives authenticated
messages through the ``LinkHandler`` callbacks. Anything a remote end does wrong ends that
one connection with a logged rejection; the node keeps running.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import ipaddress
import logging
import random
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from websockets.asyncio.client import ClientConnection, connect
from websockets.asyncio.connection import Connection
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidURI
from websockets.protocol import State

from p2pfl.channel import Channel
from p2pfl.config import Config
from p2pfl.errors import DigestMismatch, HandshakeError, P2PFLError, RemoteProtocolError
from p2pfl.events import EventLog
from p2pfl.guard import Admission, Throttle
from p2pfl.handshake import MAX_HANDSHAKE_MESSAGE, TAGLEN, IKHandshake
from p2pfl.transfer import StreamReceiver, iter_chunks
from p2pfl.wire import (
    CHUNK_OVERHEAD,
    DTYPE_FLOAT32,
    PROLOGUE,
    REPLY_DIGEST_MISMATCH,
    REPLY_OK,
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

log = logging.getLogger("p2pfl.net")

#: Close codes we send. Reasons stay generic: details go to our log, not to the peer.
CLOSE_NORMAL = 1000
CLOSE_GOING_AWAY = 1001
CLOSE_POLICY = 1008
CLOSE_TOO_BIG = 1009
CLOSE_INTERNAL_ERROR = 1011
CLOSE_TRY_LATER = 1013


def fingerprint(public_key: bytes) -> str:
    """A short, log-safe name for a public key."""
    return base64.b64encode(public_key).decode()[:12]


class LinkHandler(Protocol):
    """What the network needs from the node."""

    def current_round(self) -> int: ...

    def link_up(self, link: PeerLink) -> None: ...

    def link_down(self, link: PeerLink, reason: str) -> None: ...

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
    ) -> None:
        self.peer_id = peer_id
        self.ws = ws
        self.channel = channel
        self.initiator = initiator
        self.receiver = StreamReceiver(expected_bytes, allocate)
        self.stream_started = 0.0
        #: The sender's Lamport time of the stream being received (its ``send`` event's).
        self.stream_lamport = 0
        self.last_heard = time.monotonic()
        self.created = self.last_heard
        self.bytes_sent = 0
        self.bytes_received = 0
        #: The round whose parameters were sent on this link (each link gets them once).
        self.sent_round: int | None = None
        #: The round whose secure-aggregation KEYS were sent on this link.
        self.keys_round: int | None = None
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
        await self.ws.send(record)

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
        flat_params: np.ndarray,
        chunk_bytes: int,
        dtype: int = DTYPE_FLOAT32,
    ) -> int:
        """Send one parameter stream; returns the bytes put on the wire."""
        before = self.bytes_sent
        async with self._stream_lock:
            async with self._send_lock:
                await self._send_record(
                    encode_params_begin(lamport, round_index, flat_params.nbytes, dtype)
                )
            for offset, piece in iter_chunks(flat_params, chunk_bytes):
                record = encode_params_chunk(lamport, round_index, offset, piece)
                async with self._send_lock:
                    await self._send_record(record)
        return self.bytes_sent - before

    async def close(self, code: int = CLOSE_NORMAL, reason: str = "", timeout: float = 2.0) -> None:
        """Close, bounded: websockets' close() waits in drain() without a timeout when the
        peer stopped reading, so after ``timeout`` the TCP connection is aborted."""
        try:
            async with asyncio.timeout(timeout):
                await self.ws.close(code, reason)
        except Exception:
            pass
        finally:
            if self.ws.state is not State.CLOSED:
                self.ws.transport.abort()


@dataclass(frozen=True)
class NetLimits:
    """Every limit of the transport in one place (derived from config and model size)."""

    max_record: int
    max_chunk: int
    max_connections: int
    handshake_timeout: float
    open_timeout: float
    max_queue: int = 16


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
    ) -> None:
        self.config = config
        self.own_id = own_id
        self.private_key = private_key
        self.handler = handler
        self.events = events
        self.expected_bytes = expected_bytes
        #: Where a received model goes (a float32 array of expected_bytes): see ``pool``.
        self.allocate = allocate
        chunk = config.limits.chunk_bytes
        self.limits = NetLimits(
            max_record=chunk + CHUNK_OVERHEAD + TAGLEN,
            max_chunk=chunk,
            max_connections=config.limits.max_connections or 2 * len(config.peers) + 8,
            handshake_timeout=config.limits.handshake_timeout,
            open_timeout=config.limits.handshake_timeout,
        )
        self.id_by_key = {p.public_key: p.id for p in config.peers.values()}
        self.links: dict[str, PeerLink] = {}
        self.admission: Admission[ServerConnection] = Admission(self.limits.max_connections)
        self._throttle = Throttle()
        self._throttle_all = Throttle(burst=50, window=10.0)  # all unauthenticated sources
        self.peer_sources = {source_key(p.host) for p in config.peers.values()}
        self._server: Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._stopping = False

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
        self.events.emit("listen", host=host, port=bound)
        log.info("%s listening on %s:%d", self.own_id, host, bound)
        return bound

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
            link = await self._dial_once(peer_id)
        except (P2PFLError, OSError, TimeoutError, ConnectionClosed, InvalidHandshake) as exc:
            log.debug("announcing ourselves to %s failed: %s", peer_id, _describe(exc))
            return
        await self._run_link(link, None)

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
        await asyncio.gather(
            *(link.close(CLOSE_GOING_AWAY, "shutting down") for link in list(self.links.values()))
        )
        if self._server is not None:
            # A TCP connection accepted just before the listener closed may still be on its
            # way to connection_made (accept task -> transport -> callback): let it get
            # there, then drop every unauthenticated connection. One that never starts its
            # upgrade would otherwise wait out open_timeout, or leak if the loop ends first.
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

    # --- accepting -------------------------------------------------------------------------

    async def _accept(self, ws: ServerConnection) -> None:
        # Admission (the pending-connection budget) is enforced per TCP connection, in
        # _counted_connection, before the websocket upgrade.
        remote = _address(ws)
        try:
            async with asyncio.timeout(self.limits.handshake_timeout):
                link, first = await self._respond(ws, remote)
        except HandshakeError as exc:
            self.refuse(ws, "handshake_fail", str(exc))
            await ws.close(CLOSE_POLICY, "")
            return
        except (ConnectionClosed, TimeoutError) as exc:
            self.refuse(ws, "handshake_fail", _describe(exc))
            await ws.close(CLOSE_POLICY, "")
            return
        await self._run_link(link, first)

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

    def _authenticated(self, ws: Connection) -> None:
        """The peer proved its identity: full-size records from now on, and it leaves the
        pending-connection budget."""
        ws.protocol.max_message_size = self.limits.max_record
        if isinstance(ws, ServerConnection):
            self.admission.authenticated(ws)

    async def _respond(self, ws: ServerConnection, remote: str) -> tuple[PeerLink, Status]:
        msg1 = await ws.recv(decode=False)
        hs = IKHandshake(initiator=False, static=self.private_key, prologue=PROLOGUE)
        hello = decode_hello(hs.read_message(msg1))
        peer_id = self.id_by_key.get(hs.remote_static)
        if peer_id is None:
            raise HandshakeError(f"unknown public key {fingerprint(hs.remote_static)}")
        if hello.peer_id != peer_id:
            raise HandshakeError(f"key of {peer_id!r} presented with id {hello.peer_id!r}")
        if peer_id == self.own_id:
            raise HandshakeError("a peer presented our own key")
        if hello.digest != self.config.digest:
            await ws.send(hs.write_message(encode_reply(REPLY_DIGEST_MISMATCH, self.config.digest)))
            raise DigestMismatch(self.config.digest.hex()[:16], hello.digest.hex()[:16])
        await ws.send(hs.write_message(encode_reply(REPLY_OK, self.config.digest)))
        channel = Channel(hs.session_keys(), max_plaintext=self.limits.max_record - TAGLEN)
        # Key confirmation: message 1 alone could be a replay, so the link only counts once
        # the initiator proves it holds the session keys with a first record.
        record = await ws.recv(decode=False)
        try:
            first = decode_message(channel.open(record), max_chunk=self.limits.max_chunk)
        except RemoteProtocolError as exc:
            raise HandshakeError(f"key confirmation from {peer_id} failed: {exc}") from exc
        if not isinstance(first, Status):
            raise HandshakeError(f"{peer_id} did not open with STATUS")
        self._authenticated(ws)
        link = PeerLink(
            peer_id,
            ws,
            channel,
            expected_bytes=self.expected_bytes,
            initiator=False,
            allocate=self.allocate,
        )
        return link, first

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
            try:
                link = await self._dial_once(peer_id)
            except DigestMismatch as exc:
                self.events.emit("handshake_fail", peer=peer_id, reason=str(exc), role="initiator")
                log.error("%s: %s", peer_id, exc)
                delay = high
            except HandshakeError as exc:
                self.events.emit("handshake_fail", peer=peer_id, reason=str(exc), role="initiator")
                log.warning("handshake with %s failed: %s", peer_id, exc)
            except (OSError, TimeoutError, ConnectionClosed, InvalidHandshake, InvalidURI) as exc:
                log.debug("cannot reach %s yet: %s", peer_id, _describe(exc))
            except Exception as exc:  # never let one surprise end the dialer for good
                log.exception("unexpected error dialing %s", peer_id)
                self.events.emit(
                    "handshake_fail", peer=peer_id, reason=_describe(exc), role="initiator"
                )
            else:
                delay = low
                await self._run_link(link, None)
                if self._stopping:
                    return
            # Exponential backoff with jitter, so restarted peers do not reconnect in lockstep.
            await asyncio.sleep(delay * random.uniform(0.5, 1.5))
            delay = min(delay * 2, high)

    async def _dial_once(self, peer_id: str) -> PeerLink:
        peer = self.config.peers[peer_id]
        ws: ClientConnection = await connect(
            peer.address,
            open_timeout=self.limits.open_timeout,
            proxy=None,
            user_agent_header=None,
            **self._ws_options(),  # type: ignore[arg-type]
        )
        try:
            timeout = self.limits.handshake_timeout
            hs = IKHandshake(
                initiator=True,
                static=self.private_key,
                prologue=PROLOGUE,
                remote_static=peer.public_key,
            )
            await ws.send(hs.write_message(encode_hello(self.config.digest, self.own_id)))
            async with asyncio.timeout(timeout):
                message2 = await ws.recv(decode=False)
            reply = decode_reply(hs.read_message(message2))
            if reply.status == REPLY_DIGEST_MISMATCH or reply.digest != self.config.digest:
                raise DigestMismatch(self.config.digest.hex()[:16], reply.digest.hex()[:16])
            self._authenticated(ws)
            channel = Channel(hs.session_keys(), max_plaintext=self.limits.max_record - TAGLEN)
            link = PeerLink(
                peer_id,
                ws,
                channel,
                expected_bytes=self.expected_bytes,
                initiator=True,
                allocate=self.allocate,
            )
            await link.send_status(self.events.clock.tick(), self.handler.current_round())
            return link
        except BaseException:
            await ws.close(CLOSE_POLICY, "")
            raise

    # --- a live link -------------------------------------------------------------------------

    def _canonical(self, link: PeerLink) -> bool:
        """Dialed by the smaller id (the direction _dial_forever keeps up)."""
        return link.initiator == (self.own_id < link.peer_id)

    async def _run_link(self, link: PeerLink, first: Status | None) -> None:
        old = self.links.get(link.peer_id)
        if (
            old is not None
            and self._canonical(old)
            and not self._canonical(link)
            and time.monotonic() - old.created < self.limits.handshake_timeout
        ):
            # Crossing dials (the smaller id's dialer and the larger id's announce): both
            # ends keep the smaller id's link. A stale link (peer restarted) is older.
            await link.close(CLOSE_NORMAL, "duplicate")
            return
        self.links[link.peer_id] = link
        if old is not None:  # the peer restarted or reconnected: the new link wins
            self.spawn(old.close(CLOSE_NORMAL, "replaced"))
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
            self.events.emit("disconnect", peer=link.peer_id, reason=reason)
            self.handler.link_down(link, reason)

    def _dispatch(self, link: PeerLink, msg: Message) -> None:
        self.events.clock.observe(msg.lamport)
        self.handler.message(link, msg)

    def check_heartbeats(self, now: float, timeout: float) -> None:
        """Close links that have been silent for longer than ``timeout``."""
        for link in list(self.links.values()):
            if now - link.last_heard > timeout:
                self.events.emit("reject", peer=link.peer_id, reason="heartbeat timeout")
                self.spawn(link.close(CLOSE_GOING_AWAY, "heartbeat timeout"))

    def broadcast_status(
        self, round_index: int, peers: Callable[[str], bool] | None = None
    ) -> None:
        """Tell connected peers our round (fire and forget; ordering per link is kept)."""
        lamport = self.events.clock.tick()
        for link in list(self.links.values()):
            if peers is None or peers(link.peer_id):
                self.spawn(_quiet(link.send_status(lamport, round_index)))


def _counted_connection(network: Network) -> type[ServerConnection]:
    """Server connections that enter the pending-connection budget at TCP accept (so sockets
    that never upgrade count too), and log upgrades that fail before ``_accept`` runs."""

    class CountedConnection(ServerConnection):
        evicted = False

        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            super().connection_made(transport)
            source = source_key(_address(self).rpartition(":")[0])
            evicted = network.admission.admit(
                self, source, protected=source in network.peer_sources
            )
            if isinstance(evicted, CountedConnection):
                evicted.evicted = True
                network.refuse(evicted, "reject", "too many unauthenticated connections")
                evicted.transport.abort()

        def connection_lost(self, exc: Exception | None) -> None:
            network.admission.discard(self)
            super().connection_lost(exc)

        async def handshake(self, *args: Any, **kwargs: Any) -> None:
            try:
                await super().handshake(*args, **kwargs)
            except asyncio.CancelledError:  # open_timeout expired, or we are shutting down
                if not network._stopping and not self.evicted:
                    network.refuse(self, "handshake_fail", "timed out before the websocket upgrade")
                raise
            if self.protocol.state is not State.OPEN and not self.evicted:
                exc = self.protocol.handshake_exc
                network.refuse(
                    self,
                    "handshake_fail",
                    f"websocket upgrade failed: {exc or 'connection closed'}",
                )

    return CountedConnection


async def _quiet(coro: Coroutine[Any, Any, None]) -> None:
    with contextlib.suppress(ConnectionClosed, OSError):
        await coro


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


def _describe(exc: BaseException) -> str:
    if isinstance(exc, ConnectionClosed):
        frame = exc.rcvd or exc.sent
        if frame is None:
            return "connection lost"
        if frame.code == CLOSE_TOO_BIG:
            return f"frame above the size limit ({frame.reason})"
        return f"closed ({frame.code}{' ' + frame.reason if frame.reason else ''})"
    if isinstance(exc, TimeoutError):
        return "timed out"
    return f"{type(exc).__name__}: {exc}"
