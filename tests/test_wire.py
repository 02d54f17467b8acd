"""Message encoding, strict decoding, and parameter streams, without sockets."""

from __future__ import annotations

import contextlib

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from p2pfl.errors import HandshakeError, MessageError
from p2pfl.proto.transfer import StreamReceiver, iter_chunks
from p2pfl.proto.wire import (
    MAX_REPLY_PAYLOAD,
    PROTOCOL_VERSION,
    REPLY_DIGEST_MISMATCH,
    REPLY_OK,
    ParamsBegin,
    ParamsChunk,
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

MAX_CHUNK = 1024


def test_roundtrip_each_message() -> None:
    assert decode_message(encode_status(5, 3), max_chunk=MAX_CHUNK) == Status(5, 3)
    assert decode_message(encode_params_begin(6, 3, 400), max_chunk=MAX_CHUNK) == ParamsBegin(
        6, 3, 400
    )
    msg = decode_message(bytes(encode_params_chunk(7, 3, 256, b"abcd")), max_chunk=MAX_CHUNK)
    assert isinstance(msg, ParamsChunk)
    assert (msg.lamport, msg.round, msg.offset, bytes(msg.data)) == (7, 3, 256, b"abcd")


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"\x01\x00",
        encode_status(1, 1) + b"x",  # trailing bytes
        encode_params_begin(1, 1, 8)[:-1],  # truncated
        encode_params_begin(1, 1, 8)[:-1] + b"\x07",  # unknown dtype
        bytes(encode_params_chunk(1, 1, 0, b"")),  # chunk without data
        b"\x7f" + b"\x00" * 12,  # unknown type
    ],
)
def test_malformed_messages_rejected(raw: bytes) -> None:
    with pytest.raises(MessageError):
        decode_message(raw, max_chunk=MAX_CHUNK)


def test_oversized_chunk_rejected() -> None:
    raw = bytes(encode_params_chunk(1, 1, 0, b"x" * (MAX_CHUNK + 1)))
    with pytest.raises(MessageError, match="exceeds limit"):
        decode_message(raw, max_chunk=MAX_CHUNK)


def test_hello_and_reply() -> None:
    digest = bytes(range(32))
    hello = decode_hello(encode_hello(digest, "alice"))
    assert (hello.digest, hello.peer_id) == (digest, "alice")
    reply = decode_reply(encode_reply(REPLY_DIGEST_MISMATCH, digest))
    assert reply.status == REPLY_DIGEST_MISMATCH
    other_version = bytes([PROTOCOL_VERSION + 1]) + encode_hello(digest, "a")[1:]
    for bad in [b"", encode_hello(digest, "alice")[:-1], other_version]:
        with pytest.raises(HandshakeError):
            decode_hello(bad)
    with pytest.raises(HandshakeError, match=f"version 1 \\(this p2pfl speaks {PROTOCOL_VERSION}"):
        decode_reply(b"\x01" + encode_reply(REPLY_OK, digest)[1:])
    with pytest.raises(HandshakeError):
        decode_reply(encode_reply(9, digest))


def stream(params: np.ndarray, chunk: int) -> list[tuple[int, memoryview]]:
    return list(iter_chunks(params, chunk))


def test_stream_reassembles_exactly() -> None:
    params = np.random.default_rng(0).standard_normal(1000).astype(np.float32)
    rx = StreamReceiver(params.nbytes)
    rx.begin(4, params.nbytes, keep=True)
    done = None
    pieces = stream(params, 256)
    assert len(pieces) == 16
    for offset, piece in pieces:
        assert done is None
        done = rx.chunk(4, offset, piece)
    assert done is not None and done.round == 4
    assert done.params is not None
    np.testing.assert_array_equal(done.params, params)
    assert not rx.in_progress


def test_stream_discarded_when_not_kept() -> None:
    params = np.ones(64, dtype=np.float32)
    rx = StreamReceiver(params.nbytes)
    rx.begin(1, params.nbytes, keep=False)
    results = [rx.chunk(1, o, p) for o, p in stream(params, 100)]
    assert results[-1] is not None and results[-1].params is None


def test_stream_rejects_wrong_size_gaps_and_interleaving() -> None:
    rx = StreamReceiver(400)
    with pytest.raises(MessageError, match="model has 400"):
        rx.begin(0, 4 * 10**9, keep=True)  # refused before allocating 4 GB
    rx.begin(0, 400, keep=True)
    with pytest.raises(MessageError, match="expected 0"):
        rx.chunk(0, 100, memoryview(b"x" * 100))
    with pytest.raises(MessageError, match="before round 0 ended"):
        rx.begin(1, 400, keep=True)
    with pytest.raises(MessageError, match="inside a round 0"):
        rx.chunk(1, 0, memoryview(b"x" * 100))
    rx.chunk(0, 0, memoryview(b"x" * 300))
    with pytest.raises(MessageError, match="past the end"):
        rx.chunk(0, 300, memoryview(b"x" * 200))
    rx.abort()
    with pytest.raises(MessageError, match="without a stream"):
        rx.chunk(0, 0, memoryview(b"x"))


@settings(max_examples=2000, deadline=None)
@given(st.binary(max_size=64))
def test_decoding_random_bytes_only_ever_raises_message_error(raw: bytes) -> None:
    with contextlib.suppress(MessageError):
        decode_message(raw, max_chunk=MAX_CHUNK)


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=128))
def test_decoding_random_handshake_payloads_only_raises_handshake_error(raw: bytes) -> None:
    for decode in (decode_hello, decode_reply):
        with contextlib.suppress(HandshakeError):
            decode(raw)


@settings(max_examples=300, deadline=None)
@given(
    st.lists(st.tuples(st.integers(0, 3), st.integers(0, 500), st.integers(1, 300)), max_size=12)
)
def test_stream_receiver_never_corrupts_state(ops: list[tuple[int, int, int]]) -> None:
    """Arbitrary sequences of begin/chunk calls either complete a stream of exactly the
    model's size or fail with MessageError; nothing else escapes."""
    rx = StreamReceiver(400)
    for kind, offset, length in ops:
        try:
            if kind == 0:
                rx.begin(offset % 3, 400, keep=True)
            else:
                done = rx.chunk(offset % 3, offset, memoryview(bytes(length)))
                if done is not None:
                    assert done.params is not None and done.params.nbytes == 400
        except MessageError:
            rx.abort()


def test_present_round_trips_and_malformed_ones_are_refused() -> None:
    from p2pfl.proto.wire import Present, encode_present

    msg = decode_message(encode_present(7, 3, ("carol", "dave")), max_chunk=1024)
    assert msg == Present(7, 3, ("carol", "dave"))
    assert decode_message(encode_present(7, 3, ()), max_chunk=1024) == Present(7, 3, ())
    good = encode_present(7, 3, ("carol",))
    for bad, problem in (
        (good[:13], "without a body"),
        (good[:13] + b"\x41", "naming 65 members"),
        (good[:-1], "malformed entry"),
        (good + b"x", "trailing bytes"),
        (good[:13] + b"\x02\x01a\x01a", "names a member twice"),
        (good[:13] + b"\x01\x02\xff\xfe", "not UTF-8"),
    ):
        with pytest.raises(MessageError, match=problem):
            decode_message(bad, max_chunk=1024)


def test_key_exchange_messages_round_trip_with_exact_sizes() -> None:
    from p2pfl.proto.wire import (
        Confirm,
        Keys,
        Reveal,
        Shares,
        Unmask,
        encode_confirm,
        encode_keys,
        encode_reveal,
        encode_shares,
        encode_unmask,
    )
    from p2pfl.secure.group import BOX_BYTES, KIND_KEY, KIND_SELF_SEED
    from p2pfl.secure.shamir import SHARE_BYTES

    boxes = {"bob": b"b" * BOX_BYTES, "carol": b"c" * BOX_BYTES}
    keys = encode_keys(1, 2, b"p" * 32, boxes)
    assert decode_message(keys, max_chunk=8) == Keys(1, 2, b"p" * 32, boxes)
    shares = encode_shares(3, 2, boxes)
    assert decode_message(shares, max_chunk=8) == Shares(3, 2, boxes)
    answer = {"bob": (KIND_SELF_SEED, b"s" * SHARE_BYTES), "dave": (KIND_KEY, b"k" * SHARE_BYTES)}
    reveal = encode_reveal(4, 2, answer)
    assert decode_message(reveal, max_chunk=8) == Reveal(4, 2, answer)
    tags = {"bob": b"t" * 32, "carol": b"u" * 32}
    assert decode_message(encode_confirm(5, 2, tags), max_chunk=8) == Confirm(5, 2, tags)
    assert decode_message(encode_unmask(6, 2, tags), max_chunk=8) == Unmask(6, 2, tags)
    for bad, problem in (
        (keys[:40], "shorter than a public key"),
        (keys[:-1], "malformed entry"),
        (shares + b"x", "trailing bytes"),
        (encode_confirm(5, 2, tags)[:-1], "malformed entry"),
        (reveal[: -SHARE_BYTES - 1] + b"\x09" + reveal[-SHARE_BYTES:], "unknown share kind"),
    ):
        with pytest.raises(MessageError, match=problem):
            decode_message(bad, max_chunk=8)
    with pytest.raises(ValueError, match="payload"):
        encode_shares(1, 1, {"bob": b"short"})


async def test_short_messages_go_out_between_the_chunks_of_a_stream() -> None:
    """A STATUS (or a secure-aggregation message) does not wait behind a whole model: it
    is sent between two chunks, and the chunks stay in order."""
    import asyncio
    import types

    from p2pfl.daemon.net import PeerLink
    from p2pfl.proto.wire import MessageType

    sent: list[bytes] = []

    async def send(record: bytes) -> None:
        await asyncio.sleep(0.001)  # a socket that takes a moment per record
        sent.append(record)

    ws = types.SimpleNamespace(send=send)
    channel = types.SimpleNamespace(seal=bytes)  # plaintext "records" for the test
    link = PeerLink("bob", ws, channel, expected_bytes=4000, initiator=True)  # type: ignore[arg-type]
    stream = asyncio.ensure_future(
        link.send_params(1, 0, np.zeros(1000, dtype=np.float32), chunk_bytes=400)
    )
    await asyncio.sleep(0.0025)  # a couple of chunks are out
    await link.send_status(2, 0)
    await stream
    kinds = [record[0] for record in sent]
    status_at = kinds.index(MessageType.STATUS)
    assert 0 < status_at < len(kinds) - 1  # between the stream's first and last records
    offsets = [int.from_bytes(r[13:21], "big") for r in sent if r[0] == MessageType.PARAMS_CHUNK]
    assert offsets == sorted(offsets) and len(offsets) == 10


async def test_a_record_the_peer_never_takes_ends_the_link() -> None:
    """A peer that stops reading fills the socket; the send then waits in websockets'
    drain() without end, and every send behind it too. After send_timeout the link goes."""
    import asyncio
    import types

    from websockets.exceptions import ConnectionClosed

    from p2pfl.daemon.net import PeerLink

    aborted = asyncio.Event()

    async def send(record: bytes) -> None:
        await asyncio.Event().wait()  # never drains

    transport = types.SimpleNamespace(abort=aborted.set)
    ws = types.SimpleNamespace(send=send, transport=transport)
    channel = types.SimpleNamespace(seal=bytes)
    link = PeerLink(
        "bob",
        ws,  # type: ignore[arg-type]
        channel,  # type: ignore[arg-type]
        expected_bytes=4000,
        initiator=True,
        send_timeout=0.05,
    )
    with pytest.raises(ConnectionClosed):
        await asyncio.wait_for(link.send_status(1, 0), 5)
    assert aborted.is_set()


def test_a_mismatch_reply_carries_the_field_digests() -> None:
    digest = bytes(range(32))
    fields = {"seed": b"s" * 8, "training.rounds": b"r" * 8, "peers.bob": b"b" * 8}
    reply = decode_reply(encode_reply(REPLY_DIGEST_MISMATCH, digest, fields))
    assert (reply.fields, reply.truncated) == (fields, False)
    assert list(reply.fields) == list(fields)  # the order is kept
    ok = encode_reply(REPLY_OK, digest, fields)  # an OK reply never carries them
    assert decode_reply(ok).fields == {} and len(ok) == len(encode_reply(REPLY_OK, digest))


def test_a_mismatch_reply_holds_what_fits_and_says_it_was_cut() -> None:
    digest = bytes(32)
    fields = {f"peers.p{i:04d}": i.to_bytes(8, "big") for i in range(2000)}
    raw = encode_reply(REPLY_DIGEST_MISMATCH, digest, fields)
    assert len(raw) <= MAX_REPLY_PAYLOAD
    reply = decode_reply(raw)
    assert reply.truncated and 0 < len(reply.fields) < 2000
    assert all(fields[name] == value for name, value in reply.fields.items())


def _mismatch(body: bytes) -> bytes:
    return encode_reply(REPLY_DIGEST_MISMATCH, bytes(32))[:-_FIELDS_HEAD_SIZE] + body


_FIELDS_HEAD_SIZE = 3
_ONE = bytes([4]) + b"seed" + bytes(8)


@pytest.mark.parametrize(
    ("body", "problem"),
    [
        (bytes([0, 0]), "field list of 2 bytes"),
        (bytes([0, 0, 1]), "truncated"),
        (bytes([2, 0, 0]), "unknown flags 2"),
        (bytes([0, 0, 1]) + bytes([4]) + b"seed" + bytes(7), "malformed field"),
        (bytes([0, 0, 1]) + bytes([0]) + bytes(8), "malformed field"),
        (bytes([0, 0, 1]) + bytes([2]) + b"\xff\xfe" + bytes(8), "not a config path"),
        (bytes([0, 0, 1]) + bytes([3]) + b"a\nb" + bytes(8), "not a config path"),
        (bytes([0, 0, 1]) + bytes([3]) + b"a\x1bb" + bytes(8), "not a config path"),
        (bytes([0, 0, 2]) + _ONE + _ONE, "names field 'seed' twice"),
        (bytes([0, 0, 1]) + _ONE + b"x", "1 trailing bytes"),
        (bytes([0, 0, 0]) + bytes(MAX_REPLY_PAYLOAD), "field list of"),
    ],
)
def test_a_malformed_mismatch_reply_is_refused(body: bytes, problem: str) -> None:
    with pytest.raises(HandshakeError, match=problem):
        decode_reply(_mismatch(body))


def test_an_ok_reply_with_anything_after_it_is_refused() -> None:
    with pytest.raises(HandshakeError, match="expected 34"):
        decode_reply(encode_reply(REPLY_OK, bytes(32)) + b"\x00")


def test_a_mismatch_reply_from_an_older_peer_has_no_fields() -> None:
    reply = decode_reply(encode_reply(REPLY_DIGEST_MISMATCH, bytes(32))[:34])
    assert reply.status == REPLY_DIGEST_MISMATCH and reply.fields == {}


def test_a_detached_stream_goes_on_from_a_copy() -> None:
    """A stream to a silent neighbour outlives its round: once detached it reads the rest
    from a copy, so the model can be averaged in place meanwhile. Streams detached
    together share one copy per array."""
    from p2pfl.proto.transfer import StreamSource

    model = np.arange(8, dtype=np.float32)
    before = model.tobytes()
    first, second = StreamSource(model), StreamSource(model)
    pieces = iter_chunks(first, 8)
    head = [bytes(next(pieces)[1]) for _ in range(2)]
    copies: dict[int, np.ndarray] = {}
    first.detach(copies)
    second.detach(copies)
    assert first.array is second.array and first.array is not model
    model[:] = -1  # the model is averaged in place
    rest = [bytes(piece) for _, piece in pieces]
    assert b"".join(head + rest) == before
    again = StreamSource(model)
    assert bytes(next(iter_chunks(again, 8))[1]) == np.full(2, -1, np.float32).tobytes()
