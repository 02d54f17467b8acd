"""Who becomes a link, decided without a socket.

The shell (``daemon/net.py``) runs the Noise handshake over a websocket and asks these
functions at each step: is this HELLO acceptable and what do we answer (the responder);
is this REPLY acceptable (the initiator); does the first record confirm the keys; and
when a second link to a peer comes up while one exists, which one stays. As websockets
decides a handshake in a pure ``accept(request) -> Response``, these rules are tested
one by one without a network (tests/test_admit.py).
"""

from __future__ import annotations

import base64
from collections.abc import Mapping
from dataclasses import dataclass

from p2pfl.errors import DigestMismatch, HandshakeError
from p2pfl.proto.wire import REPLY_DIGEST_MISMATCH, REPLY_OK, Hello, Message, Reply, Status


def fingerprint(public_key: bytes) -> str:
    """A short, log-safe name for a public key."""
    return base64.b64encode(public_key).decode()[:12]


@dataclass(frozen=True)
class HelloVerdict:
    """A HELLO that deserves an answer: who sent it, and the REPLY status to send. With
    ``REPLY_DIGEST_MISMATCH`` the responder answers (so both ends can log both digests),
    then ends the connection."""

    peer_id: str
    reply: int

    def fail_if_mismatch(self, ours: bytes, theirs: bytes) -> None:
        if self.reply == REPLY_DIGEST_MISMATCH:
            raise DigestMismatch(ours.hex()[:16], theirs.hex()[:16])


def judge_hello(
    hello: Hello,
    remote_static: bytes,
    *,
    roster: Mapping[bytes, str],
    own_id: str,
    digest: bytes,
) -> HelloVerdict:
    """The responder's judgement of an authenticated HELLO. Raises HandshakeError when the
    connection must end with no answer at all: an unknown key, a known key presenting
    another id, or our own key."""
    peer_id = roster.get(remote_static)
    if peer_id is None:
        raise HandshakeError(f"unknown public key {fingerprint(remote_static)}")
    if hello.peer_id != peer_id:
        raise HandshakeError(f"key of {peer_id!r} presented with id {hello.peer_id!r}")
    if peer_id == own_id:
        raise HandshakeError("a peer presented our own key")
    status = REPLY_OK if hello.digest == digest else REPLY_DIGEST_MISMATCH
    return HelloVerdict(peer_id, status)


def judge_reply(reply: Reply, digest: bytes, fields: Mapping[str, bytes] | None = None) -> None:
    """The initiator's judgement of the REPLY: the responder must run the same config
    (its status and the digest it sends must both say so). ``fields``: our own field
    digests, to name where the configs differ."""
    if reply.status != REPLY_OK or reply.digest != digest:
        differ = differing_fields(fields or {}, reply.fields, truncated=reply.truncated)
        raise DigestMismatch(digest.hex()[:16], reply.digest.hex()[:16], differ)


#: The most differing fields a mismatch names (the rest are counted).
MAX_NAMED_FIELDS = 12


def differing_fields(
    ours: Mapping[str, bytes], theirs: Mapping[str, bytes], *, truncated: bool = False
) -> tuple[str, ...]:
    """The fields whose digests differ, or that only one side has (``theirs`` may have
    been cut short: then ours that it lacks are not counted as differing)."""
    names = [n for n in ours if n in theirs and ours[n] != theirs[n]]
    names += [f"{n} (only theirs)" for n in theirs if n not in ours]
    if not truncated:
        names += [f"{n} (only ours)" for n in ours if n not in theirs]
    if len(names) > MAX_NAMED_FIELDS:
        names = [*names[:MAX_NAMED_FIELDS], f"and {len(names) - MAX_NAMED_FIELDS} more"]
    return tuple(names)


def confirm_keys(peer_id: str, first: Message) -> Status:
    """Key confirmation: message 1 alone could be a replay, so a link counts only once the
    initiator's first record (which proves it holds the session keys) is a STATUS."""
    if not isinstance(first, Status):
        raise HandshakeError(f"{peer_id} did not open with STATUS")
    return first


def is_canonical(own_id: str, peer_id: str, *, initiator: bool) -> bool:
    """Dialled by the smaller id: the direction whose dialer keeps the pair connected."""
    return initiator == (own_id < peer_id)


def keeps_old_link(
    own_id: str,
    peer_id: str,
    *,
    old_initiator: bool,
    new_initiator: bool,
    old_age: float,
    handshake_timeout: float,
) -> bool:
    """A new link to ``peer_id`` came up while ``old`` exists: keep the old one?

    Crossing dials (the smaller id's dialer and the larger id's announce) make two links
    at once; both ends must keep the same one, the smaller id's, or each closes the one the
    other kept. But an old link that is no longer fresh is stale (the peer restarted and
    dialled again): the new one wins, as on any reconnection.
    """
    return (
        is_canonical(own_id, peer_id, initiator=old_initiator)
        and not is_canonical(own_id, peer_id, initiator=new_initiator)
        and old_age < handshake_timeout
    )
