"""Wire messages: the handshake payloads and the plaintext of every record, sans I/O.

Everything is fixed-layout binary decoded with exact length checks; nothing from the
network is ever unpickled or evaluated. A record carries exactly one message:

    header  = type:u8  lamport:u64  round:u32          (13 bytes, big-endian)
    STATUS        header                               "I am at round R" (R == rounds: done)
    PARAMS_BEGIN  header  total_bytes:u64  dtype:u8    a parameter stream for round R starts
    PARAMS_CHUNK  header  offset:u64  data             the next piece of that stream
    KEYS          header  public:32  entries(box:192)  secure aggregation (docs/protocol.md)
    SHARES        header  entries(box:192)
    PRESENT       header  ids
    CONFIRM       header  entries(tag:32)
    UNMASK        header  entries(tag:32)
    REVEAL        header  entries(kind:u8 share:66)

    ids     = count:u8  (id_len:u8  id)*count
    entries = count:u8  (id_len:u8  id  payload)*count   (fixed-size payloads)

A parameter stream is one PARAMS_BEGIN then chunks in order until ``total_bytes`` arrived.
"""

from __future__ import annotations

import enum
import re
import struct
from dataclasses import dataclass, field

from p2pfl.core.clock import MAX_LAMPORT
from p2pfl.errors import HandshakeError, MessageError
from p2pfl.secure.group import (
    BOX_BYTES,
    KIND_KEY,
    KIND_SELF_SEED,
    PUBLIC_BYTES,
    REVEAL_BYTES,
    TAG_BYTES,
)

#: 2: secure aggregation's PRG starts at counter block 2 (its masks differ from version 1's).
PROTOCOL_VERSION = 2
#: Bound into the Noise handshake: peers speaking another protocol fail to authenticate.
PROLOGUE = b"p2pfl/1"

_HEADER = struct.Struct(">BQI")
_BEGIN = struct.Struct(">QB")
_OFFSET = struct.Struct(">Q")
HEADER_BYTES = _HEADER.size
CHUNK_OVERHEAD = HEADER_BYTES + _OFFSET.size
DTYPE_FLOAT32 = 1
#: A masked secure-aggregation contribution: uint32 little-endian, same size as the model.
DTYPE_MASKED_U32 = 2
#: A compressed payload (``aggregation.compression``; ``p2pfl.core.compress``), bytes.
DTYPE_COMPRESSED = 3
DTYPES = frozenset({DTYPE_FLOAT32, DTYPE_MASKED_U32, DTYPE_COMPRESSED})
#: Secure-aggregation messages name at most this many members (a group is a neighbourhood).
MAX_GROUP_IDS = 64
MAX_ID_BYTES = 64


class MessageType(enum.IntEnum):
    STATUS = 0x01
    PARAMS_BEGIN = 0x10
    PARAMS_CHUNK = 0x11
    PRESENT = 0x20
    REVEAL = 0x21
    KEYS = 0x22
    SHARES = 0x23
    CONFIRM = 0x24
    UNMASK = 0x25
    MOMENTS = 0x30
    STANDARDIZED = 0x31


_SECURE_TYPES = frozenset(
    {
        MessageType.PRESENT,
        MessageType.UNMASK,
        MessageType.REVEAL,
        MessageType.KEYS,
        MessageType.SHARES,
        MessageType.CONFIRM,
    }
)


@dataclass(frozen=True, slots=True)
class Status:
    lamport: int
    round: int


@dataclass(frozen=True, slots=True)
class ParamsBegin:
    lamport: int
    round: int
    total_bytes: int
    dtype: int = DTYPE_FLOAT32


@dataclass(frozen=True, slots=True)
class ParamsChunk:
    lamport: int
    round: int
    offset: int
    data: memoryview


@dataclass(frozen=True, slots=True)
class Present:
    """Secure aggregation, owner to each member whose round-R vector arrived: "these are
    the members whose vectors I count" (U2; see ``p2pfl.secure.group``)."""

    lamport: int
    round: int
    present: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Confirm:
    """Member to owner: a tag on U2 for each other member of U2, for the owner to relay."""

    lamport: int
    round: int
    tags: dict[str, bytes]


@dataclass(frozen=True, slots=True)
class Unmask:
    """Owner to member: the other members' tags on U2 for it; "now reveal your shares"."""

    lamport: int
    round: int
    tags: dict[str, bytes]


@dataclass(frozen=True, slots=True)
class Reveal:
    """A member's answer to UNMASK: per keyed member, (kind, share)."""

    lamport: int
    round: int
    shares: dict[str, tuple[int, bytes]]


@dataclass(frozen=True, slots=True)
class Keys:
    """Member to owner at the start of round R: its ephemeral public key for the owner's
    group, and one sealed share box per other member, for the owner to relay."""

    lamport: int
    round: int
    public: bytes
    boxes: dict[str, bytes]


@dataclass(frozen=True, slots=True)
class Shares:
    """Owner to member: the boxes the other keyed members sealed for it."""

    lamport: int
    round: int
    boxes: dict[str, bytes]


@dataclass(frozen=True, slots=True)
class Moments:
    """Before round 0 (``training.standardize: federated``): one peer's masked feature
    totals, first-hand or passed on, with its tag for each other peer
    (``p2pfl.core.moments``)."""

    lamport: int
    round: int
    origin: str
    vector: bytes
    tags: dict[str, bytes]


@dataclass(frozen=True, slots=True)
class Standardized:
    """After ``standardize: federated``: the digest of the mean and deviation the sender
    computed; neighbours whose digests differ refuse each other."""

    lamport: int
    round: int
    digest: bytes


STANDARDIZED_DIGEST_BYTES = 8


def encode_standardized(lamport: int, digest: bytes) -> bytes:
    if len(digest) != STANDARDIZED_DIGEST_BYTES:
        raise ValueError("a standardisation digest is 8 bytes")
    return _HEADER.pack(MessageType.STANDARDIZED, lamport, 0) + digest


_MOMENTS_HEAD = struct.Struct(">I")  # vector bytes
#: Tag bytes per peer in MOMENTS (HMAC-SHA256).
MOMENTS_TAG_BYTES = 32


def encode_moments(lamport: int, origin: str, vector: bytes, tags: dict[str, bytes]) -> bytes:
    raw = origin.encode("ascii")
    body = bytes([len(raw)]) + raw + _MOMENTS_HEAD.pack(len(vector)) + vector
    return (
        _HEADER.pack(MessageType.MOMENTS, lamport, 0)
        + body
        + _encode_entries(tags, MOMENTS_TAG_BYTES)
    )


def _decode_moments(lamport: int, round_index: int, body: memoryview) -> Moments:
    if not body or not 0 < body[0] <= MAX_ID_BYTES or len(body) < 1 + body[0] + 4:
        raise MessageError("MOMENTS with a malformed origin")
    end = 1 + body[0]
    try:
        origin = bytes(body[1:end]).decode("ascii")
    except UnicodeDecodeError:
        raise MessageError("MOMENTS origin is not ASCII") from None
    (size,) = _MOMENTS_HEAD.unpack_from(body, end)
    start = end + _MOMENTS_HEAD.size
    if size == 0 or size % 16 or start + size > len(body):
        raise MessageError(f"MOMENTS with a vector of {size} bytes")
    vector = bytes(body[start : start + size])
    tags, _ = _decode_entries("MOMENTS", body[start + size :], MOMENTS_TAG_BYTES)
    return Moments(lamport, round_index, origin, vector, tags)


Message = (
    Status
    | ParamsBegin
    | ParamsChunk
    | Present
    | Confirm
    | Unmask
    | Reveal
    | Keys
    | Shares
    | Moments
    | Standardized
)


def _encode_entries(entries: dict[str, bytes], size: int) -> bytes:
    """count:u8, then per entry id_len:u8 id payload (``size`` bytes each; 0: ids only)."""
    if not 0 <= len(entries) <= MAX_GROUP_IDS:
        raise ValueError(f"0..{MAX_GROUP_IDS} member ids, got {len(entries)}")
    body = bytearray([len(entries)])
    for peer, payload in entries.items():
        raw = peer.encode("utf-8")
        if not 0 < len(raw) <= MAX_ID_BYTES:
            raise ValueError(f"peer id of {len(raw)} bytes")
        if len(payload) != size:
            raise ValueError(f"an entry payload is {size} bytes, got {len(payload)}")
        body += bytes([len(raw)]) + raw + payload
    return bytes(body)


def _decode_entries(name: str, body: memoryview, size: int) -> tuple[dict[str, bytes], int]:
    """The inverse of ``_encode_entries`` (``size`` 0: ids only), with exact lengths."""
    if not body:
        raise MessageError(f"{name} without a body")
    count = body[0]
    if count > MAX_GROUP_IDS:
        raise MessageError(f"{name} naming {count} members (at most {MAX_GROUP_IDS})")
    out: dict[str, bytes] = {}
    at = 1
    for _ in range(count):
        if at >= len(body):
            raise MessageError(f"{name} truncated")
        id_len = body[at]
        end = at + 1 + id_len + size
        if not 0 < id_len <= MAX_ID_BYTES or end > len(body):
            raise MessageError(f"{name} with a malformed entry")
        try:
            peer = bytes(body[at + 1 : at + 1 + id_len]).decode("utf-8")
        except UnicodeDecodeError:
            raise MessageError(f"{name} member id is not UTF-8") from None
        if peer in out:
            raise MessageError(f"{name} names a member twice")
        out[peer] = bytes(body[at + 1 + id_len : end])
        at = end
    if at != len(body):
        raise MessageError(f"{name} with {len(body) - at} trailing bytes")
    return out, at


def encode_present(lamport: int, round_index: int, present: tuple[str, ...]) -> bytes:
    body = _encode_entries(dict.fromkeys(present, b""), 0)
    return _HEADER.pack(MessageType.PRESENT, lamport, round_index) + body


def encode_confirm(lamport: int, round_index: int, tags: dict[str, bytes]) -> bytes:
    body = _encode_entries(tags, TAG_BYTES)
    return _HEADER.pack(MessageType.CONFIRM, lamport, round_index) + body


def encode_unmask(lamport: int, round_index: int, tags: dict[str, bytes]) -> bytes:
    body = _encode_entries(tags, TAG_BYTES)
    return _HEADER.pack(MessageType.UNMASK, lamport, round_index) + body


def encode_reveal(lamport: int, round_index: int, shares: dict[str, tuple[int, bytes]]) -> bytes:
    entries = {k: bytes([kind]) + share for k, (kind, share) in shares.items()}
    body = _encode_entries(entries, REVEAL_BYTES)
    return _HEADER.pack(MessageType.REVEAL, lamport, round_index) + body


def encode_keys(lamport: int, round_index: int, public: bytes, boxes: dict[str, bytes]) -> bytes:
    if len(public) != PUBLIC_BYTES:
        raise ValueError(f"a public key is {PUBLIC_BYTES} bytes")
    body = _encode_entries(boxes, BOX_BYTES)
    return _HEADER.pack(MessageType.KEYS, lamport, round_index) + public + body


def encode_shares(lamport: int, round_index: int, boxes: dict[str, bytes]) -> bytes:
    body = _encode_entries(boxes, BOX_BYTES)
    return _HEADER.pack(MessageType.SHARES, lamport, round_index) + body


def encode_secure(msg: Keys | Shares | Present | Confirm | Unmask | Reveal) -> bytes:
    """Any secure-aggregation message, as its own ``encode_*`` writes it."""
    if isinstance(msg, Keys):
        return encode_keys(msg.lamport, msg.round, msg.public, msg.boxes)
    if isinstance(msg, Shares):
        return encode_shares(msg.lamport, msg.round, msg.boxes)
    if isinstance(msg, Present):
        return encode_present(msg.lamport, msg.round, msg.present)
    if isinstance(msg, Confirm):
        return encode_confirm(msg.lamport, msg.round, msg.tags)
    if isinstance(msg, Unmask):
        return encode_unmask(msg.lamport, msg.round, msg.tags)
    return encode_reveal(msg.lamport, msg.round, msg.shares)


def _decode_secure(kind: int, lamport: int, round_index: int, body: memoryview) -> Message:
    if kind == MessageType.PRESENT:
        return Present(lamport, round_index, tuple(_decode_entries("PRESENT", body, 0)[0]))
    if kind == MessageType.CONFIRM:
        return Confirm(lamport, round_index, _decode_entries("CONFIRM", body, TAG_BYTES)[0])
    if kind == MessageType.UNMASK:
        return Unmask(lamport, round_index, _decode_entries("UNMASK", body, TAG_BYTES)[0])
    if kind == MessageType.REVEAL:
        shares: dict[str, tuple[int, bytes]] = {}
        for k, raw in _decode_entries("REVEAL", body, REVEAL_BYTES)[0].items():
            if raw[0] not in (KIND_SELF_SEED, KIND_KEY):
                raise MessageError(f"REVEAL with an unknown share kind {raw[0]}")
            shares[k] = (raw[0], raw[1:])
        return Reveal(lamport, round_index, shares)
    if kind == MessageType.KEYS:
        if len(body) < PUBLIC_BYTES:
            raise MessageError("KEYS shorter than a public key")
        boxes, _ = _decode_entries("KEYS", body[PUBLIC_BYTES:], BOX_BYTES)
        return Keys(lamport, round_index, bytes(body[:PUBLIC_BYTES]), boxes)
    return Shares(lamport, round_index, _decode_entries("SHARES", body, BOX_BYTES)[0])


def encode_status(lamport: int, round_index: int) -> bytes:
    return _HEADER.pack(MessageType.STATUS, lamport, round_index)


def encode_params_begin(
    lamport: int, round_index: int, total_bytes: int, dtype: int = DTYPE_FLOAT32
) -> bytes:
    return _HEADER.pack(MessageType.PARAMS_BEGIN, lamport, round_index) + _BEGIN.pack(
        total_bytes, dtype
    )


def encode_params_chunk(
    lamport: int, round_index: int, offset: int, data: memoryview | bytes
) -> bytearray:
    """Build a chunk message with one copy of ``data`` (it may be a view of the model)."""
    out = bytearray(CHUNK_OVERHEAD + len(data))
    _HEADER.pack_into(out, 0, MessageType.PARAMS_CHUNK, lamport, round_index)
    _OFFSET.pack_into(out, HEADER_BYTES, offset)
    out[CHUNK_OVERHEAD:] = data
    return out


def decode_message(plaintext: bytes, *, max_chunk: int) -> Message:
    """Decode one record's plaintext, enforcing exact lengths and limits."""
    if len(plaintext) < HEADER_BYTES:
        raise MessageError(f"message of {len(plaintext)} bytes is shorter than a header")
    kind, lamport, round_index = _HEADER.unpack_from(plaintext, 0)
    if lamport > MAX_LAMPORT:
        raise MessageError(f"lamport {lamport} above the limit {MAX_LAMPORT}")
    body = len(plaintext) - HEADER_BYTES
    if kind == MessageType.STATUS:
        if body:
            raise MessageError(f"STATUS with {body} unexpected body bytes")
        return Status(lamport, round_index)
    if kind == MessageType.PARAMS_BEGIN:
        if body != _BEGIN.size:
            raise MessageError(f"PARAMS_BEGIN body of {body} bytes, expected {_BEGIN.size}")
        total, dtype = _BEGIN.unpack_from(plaintext, HEADER_BYTES)
        if dtype not in DTYPES:
            raise MessageError(f"PARAMS_BEGIN with unknown dtype code {dtype}")
        return ParamsBegin(lamport, round_index, total, dtype)
    if kind == MessageType.PARAMS_CHUNK:
        data_len = body - _OFFSET.size
        if data_len <= 0:
            raise MessageError("PARAMS_CHUNK without data")
        if data_len > max_chunk:
            raise MessageError(f"PARAMS_CHUNK of {data_len} bytes exceeds limit {max_chunk}")
        (offset,) = _OFFSET.unpack_from(plaintext, HEADER_BYTES)
        return ParamsChunk(lamport, round_index, offset, memoryview(plaintext)[CHUNK_OVERHEAD:])
    if kind in _SECURE_TYPES:
        return _decode_secure(kind, lamport, round_index, memoryview(plaintext)[HEADER_BYTES:])
    if kind == MessageType.MOMENTS:
        return _decode_moments(lamport, round_index, memoryview(plaintext)[HEADER_BYTES:])
    if kind == MessageType.STANDARDIZED:
        if body != STANDARDIZED_DIGEST_BYTES:
            raise MessageError(f"STANDARDIZED body of {body} bytes, expected 8")
        return Standardized(lamport, round_index, bytes(plaintext[HEADER_BYTES:]))
    raise MessageError(f"unknown message type 0x{kind:02x}")


# --- handshake payloads ---------------------------------------------------------------

_HELLO = struct.Struct(">B32sB")
_REPLY = struct.Struct(">BB32s")
REPLY_OK = 0
REPLY_DIGEST_MISMATCH = 1


@dataclass(frozen=True, slots=True)
class Hello:
    """First handshake payload (initiator -> responder), encrypted by Noise."""

    version: int
    digest: bytes
    peer_id: str


@dataclass(frozen=True, slots=True)
class Reply:
    """Second handshake payload (responder -> initiator). With ``REPLY_DIGEST_MISMATCH``
    it also carries the responder's per-field digests (``config.field_digests``), so the
    initiator can name the fields that differ; ``truncated``: some did not fit."""

    version: int
    status: int
    digest: bytes
    fields: dict[str, bytes] = field(default_factory=dict)
    truncated: bool = False


#: The most a REPLY payload may hold (the initiator accepts a handshake message this
#: size plus Noise's ephemeral key and tag: ``handshake.MAX_REPLY_MESSAGE``).
MAX_REPLY_PAYLOAD = 8000
_FIELDS_HEAD = struct.Struct(">BH")  # flags (bit 0: truncated), count
_FIELD_DIGEST = 8
_MAX_FIELD_NAME = 200
#: What a field name may hold: peer ids and config keys, joined by dots.
_FIELD_NAME = re.compile(r"[A-Za-z0-9._-]{1,200}")


def encode_hello(digest: bytes, peer_id: str) -> bytes:
    raw_id = peer_id.encode("ascii")
    return _HELLO.pack(PROTOCOL_VERSION, digest, len(raw_id)) + raw_id


def decode_hello(payload: bytes) -> Hello:
    if len(payload) < _HELLO.size:
        raise HandshakeError(f"hello payload of {len(payload)} bytes is too short")
    version, digest, id_len = _HELLO.unpack_from(payload, 0)
    if version != PROTOCOL_VERSION:
        raise HandshakeError(
            f"unsupported protocol version {version} (this p2pfl speaks {PROTOCOL_VERSION})"
        )
    if len(payload) != _HELLO.size + id_len:
        raise HandshakeError("hello payload length does not match its id length")
    try:
        peer_id = payload[_HELLO.size :].decode("ascii")
    except UnicodeDecodeError:
        raise HandshakeError("hello payload id is not ASCII") from None
    return Hello(version, digest, peer_id)


def encode_reply(status: int, digest: bytes, fields: dict[str, bytes] | None = None) -> bytes:
    """A REPLY; with a digest mismatch, then the field digests, in their order, as many as
    fit in ``MAX_REPLY_PAYLOAD``: flags:u8 count:u16, per field len:u8 name digest(8)."""
    head = _REPLY.pack(PROTOCOL_VERSION, status, digest)
    if status != REPLY_DIGEST_MISMATCH:
        return head
    body = bytearray()
    count, truncated = 0, False
    for name, value in (fields or {}).items():
        raw = name.encode("utf-8")
        if len(value) != _FIELD_DIGEST or not _FIELD_NAME.fullmatch(name):
            raise ValueError(f"field {name!r}: a name of 1..{_MAX_FIELD_NAME} bytes, 8-byte digest")
        entry = bytes([len(raw)]) + raw + value
        if len(head) + _FIELDS_HEAD.size + len(body) + len(entry) > MAX_REPLY_PAYLOAD:
            truncated = True
            break
        body += entry
        count += 1
    return head + _FIELDS_HEAD.pack(int(truncated), count) + bytes(body)


def decode_reply(payload: bytes) -> Reply:
    if len(payload) < _REPLY.size:
        raise HandshakeError(f"reply payload of {len(payload)} bytes, expected {_REPLY.size}")
    version, status, digest = _REPLY.unpack_from(payload, 0)
    if version != PROTOCOL_VERSION:
        raise HandshakeError(
            f"unsupported protocol version {version} (this p2pfl speaks {PROTOCOL_VERSION})"
        )
    if status not in (REPLY_OK, REPLY_DIGEST_MISMATCH):
        raise HandshakeError(f"unknown handshake reply status {status}")
    if status == REPLY_OK:
        if len(payload) != _REPLY.size:
            raise HandshakeError(f"reply payload of {len(payload)} bytes, expected {_REPLY.size}")
        return Reply(version, status, digest)
    fields, truncated = _decode_fields(memoryview(payload)[_REPLY.size :])
    return Reply(version, status, digest, fields, truncated)


def _decode_fields(body: memoryview) -> tuple[dict[str, bytes], bool]:
    """The field digests of a mismatch REPLY, with exact lengths and unique names made of
    the characters of ids and config paths. No body at all: none sent (an older peer)."""
    if not body:
        return {}, False
    if len(body) > MAX_REPLY_PAYLOAD or len(body) < _FIELDS_HEAD.size:
        raise HandshakeError(f"a mismatch reply's field list of {len(body)} bytes")
    flags, count = _FIELDS_HEAD.unpack_from(body, 0)
    if flags > 1:
        raise HandshakeError(f"a mismatch reply with unknown flags {flags}")
    fields: dict[str, bytes] = {}
    at = _FIELDS_HEAD.size
    for _ in range(count):
        if at >= len(body):
            raise HandshakeError("a mismatch reply's field list is truncated")
        size = body[at]
        end = at + 1 + size + _FIELD_DIGEST
        if not 0 < size <= _MAX_FIELD_NAME or end > len(body):
            raise HandshakeError("a mismatch reply with a malformed field")
        name = bytes(body[at + 1 : at + 1 + size]).decode("ascii", "replace")
        if not _FIELD_NAME.fullmatch(name):
            raise HandshakeError("a mismatch reply's field name is not a config path")
        if name in fields:
            raise HandshakeError(f"a mismatch reply names field {name!r} twice")
        fields[name] = bytes(body[at + 1 + size : end])
        at = end
    if at != len(body):
        raise HandshakeError(f"a mismatch reply with {len(body) - at} trailing bytes")
    return fields, bool(flags)
