"""Hostile compressed parameter streams against a real node on 127.0.0.1.

With ``aggregation.compression`` on, a parameter stream (dtype code ``DTYPE_COMPRESSED``)
carries a payload of ``p2pfl.core.compress``: ``kind:u8 base:u32 count:u32`` little-endian,
then a body per kind, applied to alice's copy of bob's public copy
(``p2pfl.core.public_copy.PeerCopies``). Each test starts alice in a compressed network,
authenticates as bob with his real key (``as_bob``) and sends a stream that is valid right up
to the one thing that is wrong; alice must log a ``reject`` naming it, drop the link, and
then train with the real bob to the end (``Target.trains_with_bob``). The payloads are built
with the package's own encoders and patched by hand, except the top-k indices, which are
LEB128-coded here from the module's docstring. The last test is the honest case: a valid
int8 difference is received, and the real bob, finding round 0 done, joins at round 1.
"""

from __future__ import annotations

import struct
from collections.abc import Callable

import numpy as np
import pytest
from websockets.asyncio.client import ClientConnection

from p2pfl.core.compress import (
    INITIAL,
    decode,
    encode_delta,
    encode_keyframe,
    max_payload_bytes,
    parse_compression,
)
from p2pfl.proto.channel import Channel
from p2pfl.proto.wire import (
    DTYPE_COMPRESSED,
    DTYPE_FLOAT32,
    DTYPE_MASKED_U32,
    encode_params_begin,
    encode_params_chunk,
)

from .conftest import LocalNetwork
from .test_node import read_events
from .test_rejections import (
    CLOSE_POLICY,
    Target,
    as_bob,
    drain,
    hostile,
    model_bytes,
    running_alice,
)

#: Header of every payload, as documented in p2pfl.core.compress: kind:u8 base:u32 count:u32.
_HEAD = struct.Struct("<BII")
_HEAD_BYTES = _HEAD.size
#: Payload kinds (p2pfl.core.compress), spelled out so a change to them is noticed here.
KEYFRAME, FP16, INT8, TOPK = 1, 2, 3, 4
BLOCK = 256
TOPK_FRACTION = "topk:0.1"
LAMPORT = 2


def _delta(count: int, seed: int = 3) -> np.ndarray:
    """A small, finite, honest-looking difference (every block has a nonzero scale)."""
    return (np.random.default_rng(seed).standard_normal(count) * 0.01).astype(np.float32)


def _int8(count: int, base: int = INITIAL) -> bytearray:
    return bytearray(encode_delta(_delta(count), parse_compression("int8"), base).tobytes())


def _fp16(count: int, base: int = INITIAL) -> bytearray:
    return bytearray(encode_delta(_delta(count), parse_compression("fp16"), base).tobytes())


def _leb128(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _topk_raw(
    count: int, k: int, indices: bytes, *, coding: int = 0, base: int = INITIAL, bad: float = 0.01
) -> bytes:
    """A top-k payload of ``k`` values (the last one ``bad``) with ``indices`` as given."""
    values = np.full(k, 0.01, dtype="<f4")
    values[-1:] = bad
    return (
        _HEAD.pack(TOPK, base, count) + struct.pack("<IB", k, coding) + indices + values.tobytes()
    )


def _topk(count: int, gaps: list[int], base: int = INITIAL, bad: float = 0.01) -> bytes:
    """A top-k payload (varint coding) whose index gaps are exactly ``gaps``: the first is
    the first index, each later one the distance to the previous index."""
    indices = b"".join(_leb128(g) for g in gaps)
    return _topk_raw(count, len(gaps), indices, base=base, bad=bad)


def _bitmap(count: int, index: list[int]) -> bytes:
    bits = np.zeros(-(-count // 8) * 8, dtype=bool)
    bits[index] = True
    return np.packbits(bits, bitorder="little").tobytes()


# --- payload builders: (count) -> payload bytes, each wrong in exactly one way -------------


def _int8_code(code: int) -> Callable[[int], bytes]:
    def build(count: int) -> bytes:
        payload = _int8(count)
        nblocks = -(-count // BLOCK)
        payload[_HEAD_BYTES + 4 * nblocks + 5] = code & 0xFF  # the sixth value's code
        return bytes(payload)

    return build


def _int8_scale(scale: float, block: int = 0) -> Callable[[int], bytes]:
    def build(count: int) -> bytes:
        payload = _int8(count)
        struct.pack_into("<f", payload, _HEAD_BYTES + 4 * block, scale)
        return bytes(payload)

    return build


def _fp16_value(value: float) -> Callable[[int], bytes]:
    def build(count: int) -> bytes:
        payload = _fp16(count)
        nblocks = -(-count // BLOCK)
        struct.pack_into("<e", payload, _HEAD_BYTES + 4 * nblocks + 2 * 7, value)
        return bytes(payload)

    return build


def _recount(delta: int) -> Callable[[int], bytes]:
    """An honest int8 payload, for a model of ``count + delta`` parameters."""
    return lambda count: bytes(_int8(count + delta))


def _keyframe_with(bad: float) -> Callable[[int], bytes]:
    def build(count: int) -> bytes:
        copy = np.zeros(count, dtype=np.float32)
        copy[count // 2] = bad
        return encode_keyframe(copy).tobytes()

    return build


def _keyframe_with_both_infinities(count: int) -> bytes:
    copy = np.zeros(count, dtype=np.float32)
    copy[3], copy[4] = np.inf, -np.inf
    return encode_keyframe(copy).tobytes()


def _keyframe_based(count: int) -> bytes:
    payload = bytearray(encode_keyframe(np.zeros(count, dtype=np.float32)).tobytes())
    _HEAD.pack_into(payload, 0, KEYFRAME, 0, count)
    return bytes(payload)


def _unknown_kind(count: int) -> bytes:
    payload = _int8(count)
    payload[0] = 9
    return bytes(payload)


def _int8_truncated(count: int) -> bytes:
    return bytes(_int8(count)[:-1])


def _topk_bitmap_past_the_end(count: int) -> bytes:
    assert count % 8, "the model fills its bitmap's last byte: no spare bit to set"
    return _topk_raw(count, 2, _bitmap(count, [0, count]), coding=1)


def _topk_too_many(count: int) -> bytes:
    most = parse_compression(TOPK_FRACTION).topk_count(count)
    return _topk(count, [0] + [1] * most)  # indices 0..most: one value too many


# --- sending ---------------------------------------------------------------------------------


async def send_stream(
    ws: ClientConnection,
    channel: Channel,
    target: Target,
    payload: bytes,
    *,
    round_index: int = 0,
    dtype: int = DTYPE_COMPRESSED,
) -> None:
    """PARAMS_BEGIN for ``payload``, then its chunks of at most ``limits.chunk_bytes``."""
    await ws.send(channel.seal(encode_params_begin(LAMPORT, round_index, len(payload), dtype)))
    step = target.net.config.limits.chunk_bytes
    for offset in range(0, len(payload), step):
        chunk = encode_params_chunk(LAMPORT, round_index, offset, payload[offset : offset + step])
        await ws.send(channel.seal(chunk))


def _count(target: Target) -> int:
    count = int(target.node.params.size)
    assert count > 2 * BLOCK  # the payloads below patch values past the first block's start
    return count


def _no_recv_from_bob(target: Target) -> None:
    assert not [e for e in target.events() if e["type"] == "recv" and e.get("peer") == "bob"]


async def _refused(target: Target, reason: str) -> None:
    """alice logged ``reason`` for bob and dropped him, kept nothing, and trains on."""
    await target.wait_event("reject", peer="bob", reason=reason)
    await target.wait_event("disconnect", peer="bob", reason="protocol error")
    _no_recv_from_bob(target)
    copies = target.node.peer_copies
    assert copies is None or not [p for p, _, _ in copies.copies.values() if p == "bob"]
    await target.trains_with_bob()


# --- 1. the stream's length and dtype, judged at PARAMS_BEGIN -------------------------------


@pytest.mark.parametrize(
    ("total", "reason"),
    [
        pytest.param(
            lambda limit: limit + 1,
            "compressed stream of {total} bytes, the limit is {limit} (a keyframe",
            id="one-byte-above-a-keyframe",
        ),
        pytest.param(
            lambda limit: 2**64 - 1,
            "compressed stream of {total} bytes, the limit is {limit}",
            id="u64-max",
        ),
        pytest.param(
            lambda limit: 0, "compressed stream of 0 bytes, the limit is {limit}", id="empty"
        ),
    ],
)
async def test_compressed_stream_of_a_bad_length_is_refused_at_its_begin(
    make_network: Callable[..., LocalNetwork],
    total: Callable[[int], int],
    reason: str,
) -> None:
    async with running_alice(make_network, aggregation={"compression": "int8"}) as target:
        limit = max_payload_bytes(_count(target))
        announced = total(limit)
        async with hostile(target) as ws:
            channel = await as_bob(ws, target)
            # no chunk follows: the length alone is refused
            await ws.send(
                channel.seal(encode_params_begin(LAMPORT, 0, announced, DTYPE_COMPRESSED))
            )
            _, code = await drain(ws)
        assert code == CLOSE_POLICY
        await _refused(target, reason.format(total=announced, limit=limit))


@pytest.mark.parametrize(
    ("compression", "dtype", "uses"),
    [
        pytest.param("int8", DTYPE_FLOAT32, DTYPE_COMPRESSED, id="float32-in-int8"),
        pytest.param(TOPK_FRACTION, DTYPE_FLOAT32, DTYPE_COMPRESSED, id="float32-in-topk"),
        pytest.param("fp16", DTYPE_MASKED_U32, DTYPE_COMPRESSED, id="masked-u32-in-fp16"),
        # and the other way round: a compressed stream where nobody compresses
        pytest.param("none", DTYPE_COMPRESSED, DTYPE_FLOAT32, id="compressed-in-none"),
    ],
)
async def test_stream_of_another_dtype_than_the_network_uses_is_refused(
    make_network: Callable[..., LocalNetwork], compression: str, dtype: int, uses: int
) -> None:
    """A model-sized stream, refused at PARAMS_BEGIN for its dtype code alone."""
    async with running_alice(make_network, aggregation={"compression": compression}) as target:
        params = np.zeros(_count(target), dtype=np.float32)
        assert params.nbytes == model_bytes(target)
        async with hostile(target) as ws:
            channel = await as_bob(ws, target)
            await send_stream(ws, channel, target, params.tobytes(), dtype=dtype)
            _, code = await drain(ws)
        assert code == CLOSE_POLICY
        await _refused(target, f"parameters of dtype code {dtype}, this network uses {uses} ")


# --- 2. payloads that cannot be decoded, or cannot apply ------------------------------------


@pytest.mark.parametrize(
    ("compression", "build", "reason"),
    [
        # the header
        pytest.param(
            "int8",
            lambda count: bytes(_int8(count))[: _HEAD_BYTES - 1],
            "compressed payload of 8 bytes is shorter than its header",
            id="shorter-than-header",
        ),
        pytest.param(
            "int8",
            _recount(+1),
            "compressed payload for {plus} parameters, the model has {count}",
            id="count-one-more",
        ),
        pytest.param(
            "int8",
            _recount(-1),
            "compressed payload for {minus} parameters, the model has {count}",
            id="count-one-less",
        ),
        pytest.param(
            "int8",
            lambda count: bytes(_fp16(count)),
            "fp16 payload, this network uses compression int8",
            id="fp16-in-int8",
        ),
        pytest.param(
            "fp16",
            lambda count: bytes(_int8(count)),
            "int8 payload, this network uses compression fp16",
            id="int8-in-fp16",
        ),
        pytest.param(
            TOPK_FRACTION,
            lambda count: bytes(_int8(count)),
            f"int8 payload, this network uses compression {TOPK_FRACTION}",
            id="int8-in-topk",
        ),
        pytest.param(
            "int8",
            lambda count: _topk(count, [0, 1]),
            "topk payload, this network uses compression int8",
            id="topk-in-int8",
        ),
        pytest.param(
            "int8",
            _unknown_kind,
            "unknown kind 9 payload, this network uses compression int8",
            id="unknown-kind",
        ),
        # int8 and fp16 bodies
        pytest.param("int8", _int8_code(-128), "int8 payload with the code -128", id="code-128"),
        pytest.param(
            "int8",
            _int8_scale(float("nan")),
            "int8 payload with a scale out of bounds",
            id="scale-nan",
        ),
        pytest.param(
            "int8",
            _int8_scale(float("inf"), block=1),
            "int8 payload with a scale out of bounds",
            id="scale-inf",
        ),
        pytest.param(
            "int8",
            _int8_scale(-0.5, block=1),
            "int8 payload with a scale out of bounds",
            id="scale-negative",
        ),
        pytest.param(
            "int8",
            _int8_truncated,
            "int8 payload body of",
            id="int8-truncated",
        ),
        pytest.param(
            "fp16",
            _fp16_value(float("nan")),
            "fp16 payload with a value outside [-1, 1] or not finite",
            id="fp16-nan",
        ),
        pytest.param(
            "fp16",
            _fp16_value(1.5),
            "fp16 payload with a value outside [-1, 1] or not finite",
            id="fp16-above-one",
        ),
        # top-k bodies
        pytest.param(
            TOPK_FRACTION,
            lambda count: _topk(count, [0, count]),
            "top-k index {count} out of range (model has {count})",
            id="topk-index-out-of-range",
        ),
        pytest.param(
            TOPK_FRACTION,
            lambda count: _topk(count, [3, 0]),
            "top-k indices repeat (a gap of 0)",
            id="topk-index-repeated",
        ),
        pytest.param(
            TOPK_FRACTION,
            lambda count: _topk(count, [0, 1, 2], bad=float("nan")),
            "top-k payload with non-finite values",
            id="topk-value-nan",
        ),
        pytest.param(
            TOPK_FRACTION,
            lambda count: (
                _topk_raw(count, 2, b"\x00\x01", bad=float("-inf"))[:-8]
                + np.array([np.inf, -np.inf], dtype="<f4").tobytes()
            ),
            "top-k payload with non-finite values",
            id="topk-inf-and-minus-inf",
        ),
        pytest.param(
            TOPK_FRACTION,
            lambda count: _topk_raw(count, 2, b"\x00\x81\x00"),
            "top-k index varint not in its shortest form",
            id="topk-varint-padded",
        ),
        pytest.param(
            TOPK_FRACTION,
            lambda count: _topk_raw(count, 2, b"\x00\x81"),
            "top-k indices are not 2 whole varints",
            id="topk-varint-unterminated",
        ),
        pytest.param(
            TOPK_FRACTION,
            lambda count: _topk_raw(count, 2, b"\x00\x05", coding=2),
            "top-k payload with an unknown index coding 2",
            id="topk-coding-unknown",
        ),
        pytest.param(
            TOPK_FRACTION,
            _topk_bitmap_past_the_end,
            "top-k bitmap with bits set past the model's end",
            id="topk-bitmap-past-the-end",
        ),
        pytest.param(
            TOPK_FRACTION,
            lambda count: _topk_raw(count, 2, _bitmap(count, [0, 1, 2]), coding=1),
            "top-k bitmap marks 3 values, the payload has 2",
            id="topk-bitmap-count",
        ),
        pytest.param(
            TOPK_FRACTION,
            lambda count: _topk_raw(count, 0, b""),
            "top-k payload with 0 values, expected 1 to {most}",
            id="topk-no-values",
        ),
        pytest.param(
            TOPK_FRACTION,
            _topk_too_many,
            "top-k payload with {most_plus} values, expected 1 to {most}",
            id="topk-too-many-values",
        ),
        # keyframes
        pytest.param(
            "int8", _keyframe_with(float("nan")), "keyframe with non-finite values", id="key-nan"
        ),
        pytest.param(
            TOPK_FRACTION,
            _keyframe_with(float("-inf")),
            "keyframe with non-finite values",
            id="key-inf",
        ),
        pytest.param(
            "int8",
            _keyframe_with_both_infinities,
            "keyframe with non-finite values",
            id="key-inf-and-minus-inf",
        ),
        pytest.param(
            "int8", _keyframe_based, "keyframe with a base version 0", id="key-with-a-base"
        ),
        # a difference alice cannot apply
        pytest.param(
            "int8",
            lambda count: bytes(_int8(count, base=5)),
            "a difference to version 5 of bob's model on a connection that brought no copy",
            id="base-without-a-copy",
        ),
        pytest.param(
            TOPK_FRACTION,
            lambda count: _topk(count, [0, 1], base=5),
            "a difference to version 5 of bob's model on a connection that brought no copy",
            id="topk-base-without-a-copy",
        ),
    ],
)
async def test_bad_compressed_payload_is_refused(
    make_network: Callable[..., LocalNetwork],
    compression: str,
    build: Callable[[int], bytes],
    reason: str,
) -> None:
    async with running_alice(make_network, aggregation={"compression": compression}) as target:
        count = _count(target)
        payload = build(count)
        assert 0 < len(payload) <= max_payload_bytes(count)  # past PARAMS_BEGIN's check
        async with hostile(target) as ws:
            channel = await as_bob(ws, target)
            await send_stream(ws, channel, target, payload)
            _, code = await drain(ws)
        assert code == CLOSE_POLICY
        most = parse_compression(compression).topk_count(count)
        await _refused(
            target,
            reason.format(
                count=count, plus=count + 1, minus=count - 1, most=most, most_plus=most + 1
            ),
        )


# --- 3. the honest case: a valid difference is accepted -------------------------------------


async def test_valid_int8_difference_from_the_initial_model_is_accepted(
    make_network: Callable[..., LocalNetwork],
) -> None:
    async with running_alice(make_network, aggregation={"compression": "int8"}) as target:
        count = _count(target)
        payload = bytes(_int8(count, base=INITIAL))
        compression = parse_compression("int8")
        assert len(payload) < max_payload_bytes(count)  # smaller than a keyframe
        async with hostile(target) as ws:
            channel = await as_bob(ws, target)
            after = len(target.events())
            await send_stream(ws, channel, target, payload)
            event = await target.wait_event("recv", after=after, peer="bob")
            copies = target.node.peer_copies
            assert copies is not None
            # (the copy is the connection's: it goes when the connection closes)
            [(peer, version, copy)] = copies.copies.values()
            assert (peer, version) == ("bob", 0)
            expected = copies.initial + decode(payload, count, compression).delta
            np.testing.assert_array_equal(copy, expected)
            await ws.close()
        assert event["round"] == 0
        assert event["bytes"] == len(payload)
        assert event["sent_lamport"] == LAMPORT
        assert not [e for e in target.events()[after:] if e["type"] == "reject"]
        # The stream was bob's round 0 (it carried his key): alice used it, and the real bob,
        # finding her ahead, resumes at round 1; from there both train to the end.
        await _trains_with_bob_after_round_0(target)


async def _trains_with_bob_after_round_0(target: Target) -> None:
    """``Target.trains_with_bob`` for a round 0 that bob's key already completed."""
    after = len(target.events())
    await target.trains_with_bob(first_rounds={"bob": 1})
    bob_events = read_events(target.net.state("bob") / "events.jsonl")
    assert [e["round"] for e in bob_events if e["type"] == "resume"] == [1]
    # alice's copy of bob's public copy followed the real bob from round 1 on
    recv = [e for e in target.events()[after:] if e["type"] == "recv" and e["peer"] == "bob"]
    assert [e["round"] for e in recv] == [1]
