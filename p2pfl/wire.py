"""Wire messages: the handshake payloads and the plaintext of every record, sans I/O.

Everything is fixed-layout binary decoded with exact length checks; nothing from the
network is ever unpickled or evaluated. A record carries exactly one message:

    header  = type:u8  lamport:u64  round:u32          (13 bytes, big-endian)
    STATUS        header                               "I am at round R" (R == rounds: done)
    PARAMS_BEGIN  header  total_bytes:u64  dtype:u8    a parameter stream for round R starts
    PARAMS_CHUNK  header  offset:u64  data             the next piece of that stream

A parameter stream is one PARAMS_BEGIN then chunks in order until ``total_bytes`` arrived.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass

from p2pfl.errors import HandshakeError, MessageError

PROTOCOL_VERSION = 1
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
#: A survivor's reply to a recovery request: the sum of its masks with the missing members.
DTYPE_RECOVERY_U32 = 3
DTYPES = frozenset({DTYPE_FLOAT32, DTYPE_MASKED_U32, DTYPE_RECOVERY_U32})
#: A recovery request names at most this many missing members (a group is a neighbourhood).
MAX_RECOVER_IDS = 64
MAX_ID_BYTES = 64
#: Largest Lamport time accepted from a peer. Far below u64 (our own clock must stay encodable
#: after observing it), int64 (the checkpoint) and 2**53 (jq and JavaScript read JSON numbers
#: as doubles, and the logs are merged by lamport).
MAX_LAMPORT = 2**53 - 1


class MessageType(enum.IntEnum):
    STATUS = 0x01
    PARAMS_BEGIN = 0x10
    PARAMS_CHUNK = 0x11
    RECOVER = 0x20
    SEED = 0x21


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
class Recover:
    """Secure aggregation, owner to each member it counts as present in round R: "send me
    your self-mask seed, and the sum of your masks with these missing members (if any)"."""

    lamport: int
    round: int
    missing: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Seed:
    """A member's answer: the seed of its self-mask on its round-R contribution to us."""

    lamport: int
    round: int
    seed: bytes


SEED_BYTES = 32

Message = Status | ParamsBegin | ParamsChunk | Recover | Seed


def encode_seed(lamport: int, round_index: int, seed: bytes) -> bytes:
    if len(seed) != SEED_BYTES:
        raise ValueError(f"a seed is {SEED_BYTES} bytes")
    return _HEADER.pack(MessageType.SEED, lamport, round_index) + seed


def encode_recover(lamport: int, round_index: int, missing: tuple[str, ...]) -> bytes:
    if not 0 <= len(missing) <= MAX_RECOVER_IDS:
        raise ValueError(f"0..{MAX_RECOVER_IDS} missing members, got {len(missing)}")
    body = bytearray([len(missing)])
    for peer in missing:
        raw = peer.encode("utf-8")
        if not 0 < len(raw) <= MAX_ID_BYTES:
            raise ValueError(f"peer id of {len(raw)} bytes")
        body += bytes([len(raw)]) + raw
    return _HEADER.pack(MessageType.RECOVER, lamport, round_index) + bytes(body)


def _decode_recover(lamport: int, round_index: int, body: memoryview) -> Recover:
    if not body:
        raise MessageError("RECOVER without a body")
    count = body[0]
    if count > MAX_RECOVER_IDS:
        raise MessageError(f"RECOVER naming {count} members (at most {MAX_RECOVER_IDS})")
    ids: list[str] = []
    at = 1
    for _ in range(count):
        if at >= len(body):
            raise MessageError("RECOVER truncated")
        size = body[at]
        if not 0 < size <= MAX_ID_BYTES or at + 1 + size > len(body):
            raise MessageError("RECOVER with a malformed member id")
        try:
            ids.append(bytes(body[at + 1 : at + 1 + size]).decode("utf-8"))
        except UnicodeDecodeError:
            raise MessageError("RECOVER member id is not UTF-8") from None
        at += 1 + size
    if at != len(body):
        raise MessageError(f"RECOVER with {len(body) - at} trailing bytes")
    if len(set(ids)) != len(ids):
        raise MessageError("RECOVER names a member twice")
    return Recover(lamport, round_index, tuple(ids))


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
    if kind == MessageType.RECOVER:
        return _decode_recover(lamport, round_index, memoryview(plaintext)[HEADER_BYTES:])
    if kind == MessageType.SEED:
        if body != SEED_BYTES:
            raise MessageError(f"SEED body of {body} bytes, expected {SEED_BYTES}")
        return Seed(lamport, round_index, bytes(plaintext[HEADER_BYTES:]))
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
    """Second handshake payload (responder -> initiator)."""

    version: int
    status: int
    digest: bytes


def encode_hello(digest: bytes, peer_id: str) -> bytes:
    raw_id = peer_id.encode("ascii")
    return _HELLO.pack(PROTOCOL_VERSION, digest, len(raw_id)) + raw_id


def decode_hello(payload: bytes) -> Hello:
    if len(payload) < _HELLO.size:
        raise HandshakeError(f"hello payload of {len(payload)} bytes is too short")
    version, digest, id_len = _HELLO.unpack_from(payload, 0)
    if version != PROTOCOL_VERSION:
        raise HandshakeError(f"unsupported protocol version {version}")
    if len(payload) != _HELLO.size + id_len:
        raise HandshakeError("hello payload length does not match its id length")
    try:
        peer_id = payload[_HELLO.size :].decode("ascii")
    except UnicodeDecodeError:
        raise HandshakeError("hello payload id is not ASCII") from None
    return Hello(version, digest, peer_id)


def encode_reply(status: int, digest: bytes) -> bytes:
    return _REPLY.pack(PROTOCOL_VERSION, status, digest)


def decode_reply(payload: bytes) -> Reply:
    if len(payload) != _REPLY.size:
        raise HandshakeError(f"reply payload of {len(payload)} bytes, expected {_REPLY.size}")
    version, status, digest = _REPLY.unpack(payload)
    if version != PROTOCOL_VERSION:
        raise HandshakeError(f"unsupported protocol version {version}")
    if status not in (REPLY_OK, REPLY_DIGEST_MISMATCH):
        raise HandshakeError(f"unknown handshake reply status {status}")
    return Reply(version, status, digest)
