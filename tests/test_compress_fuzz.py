"""Compressed payloads from hostile peers: ``decode`` and ``PeerCopies.apply`` are strict.

A payload comes from an authenticated but possibly malicious neighbour. For any bytes,
``decode`` returns a finite float32 vector of ``count`` values or raises ``MessageError``
never a bare numpy/Python exception, a
numpy floating-point warning (pytest runs with warnings as errors, and a RuntimeWarning
there would be a crash, not a logged rejection), a non-finite value, or an allocation
out of proportion to the payload and the model. Honest use keeps the sender's public copy
and every receiver's copy of it bit-identical, round after round, for every compression.

The explicit cases at the end are the ones a review found.
"""

from __future__ import annotations

import functools
import struct
import tracemalloc
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import numpy as np
import pytest

from p2pfl.core.compress import (
    FP16,
    HEAD_BYTES,
    INITIAL,
    INT8,
    KEYFRAME,
    TOPK,
    Compression,
    decode,
    encode_delta,
    encode_keyframe,
    parse_compression,
)
from p2pfl.core.public_copy import OwnCopy, PeerCopies
from p2pfl.errors import MessageError

KINDS = ["fp16", "int8", "topk:1", "topk:0.5", "topk:0.3", "topk:0.1", "topk:0.01", "topk:0.001"]
SIZES = [1, 255, 256, 257, 1000, 4097]
F32_MAX = np.finfo(np.float32).max
#: The largest scale ``decode`` accepted when this was written (float32 max / 127).
INT8_SCALE_BOUND = np.float32(F32_MAX / np.float32(127))
SNAN32 = struct.pack("<I", 0x7F800001)


def head(kind: int, base: int, count: int) -> bytes:
    """A payload header: kind u8, base u32, count u32."""
    return struct.pack("<BII", kind, base, count)


def f32(*values: float) -> bytes:
    return np.array(values, dtype="<f4").tobytes()


@contextmanager
def strict() -> Iterator[None]:
    """numpy overflow/invalid/divide raise, and every warning is an error (underflow is
    left to numpy's default, ignore: honest subnormal scales underflow too)."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with np.errstate(over="raise", invalid="raise", divide="raise", under="ignore"):
            yield


def contract_violation(call: Callable[[], np.ndarray], count: int) -> str | None:
    """None if ``call`` returned a finite float32 vector of ``count`` values or raised
    MessageError; else what went wrong."""
    try:
        with strict():
            out = call()
    except MessageError:
        return None
    except BaseException as exc:  # the point: anything else is a bug
        return f"{type(exc).__name__}: {exc}"
    if out.dtype != np.float32 or out.shape != (count,):
        return f"returned {out.dtype} {out.shape}, expected float32 ({count},)"
    if not np.isfinite(out).all():
        return "returned non-finite values"
    return None


def decode_delta(payload: bytes, count: int, compression: Compression) -> np.ndarray:
    return decode(payload, count, compression).delta


def assert_decode_contract(payload: bytes, count: int, compression: Compression) -> None:
    problem = contract_violation(
        functools.partial(decode_delta, payload, count, compression), count
    )
    assert problem is None, f"{compression} count={count} payload={payload[:48].hex()}: {problem}"


# --- (a) honest use: the copies stay bit-identical ------------------------------------------


def trajectory(rng: np.random.Generator, size: int, rounds: int) -> Iterator[np.ndarray]:
    """Trained models round after round: steps of very different magnitudes, a round
    with no change, and a few large and subnormal entries."""
    params = rng.standard_normal(size).astype(np.float32)
    for r in range(rounds):
        if r == 2:
            yield params.copy()  # no change: a zero difference
            continue
        step = rng.standard_normal(size).astype(np.float32) * np.float32(10.0 ** (r % 5 - 3))
        params = params + step
        if r == 4:
            params[rng.integers(0, size)] = np.float32(1e30)
            params[rng.integers(0, size)] = np.float32(1e-42)
        yield params.copy()


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("kind", KINDS)
def test_honest_copies_stay_bit_identical(kind: str, size: int) -> None:
    """The receiver adds exactly what the sender added: the copies must agree bit for bit
    (CHOCO's averaging is only exact then), from the shared initial model and after a
    restart keyframe, and every honest payload passes the strict decoder."""
    compression = parse_compression(kind)
    rng = np.random.default_rng(size * 31 + len(kind))
    initial = rng.standard_normal(size).astype(np.float32)
    sender = OwnCopy(compression, initial)
    restarted = OwnCopy(compression, None)  # its first round is a keyframe
    receiver = PeerCopies(compression, initial)
    for r, params in enumerate(trajectory(rng, size, 8)):
        for name, own in (("fresh", sender), ("restarted", restarted)):
            out = own.advance(params, r)
            payload, _ = out.for_version(None if r == 0 else r - 1)
            with strict():
                copy = receiver.apply(name, name, r, payload).copy()
            assert own.copy is not None
            assert copy.dtype == np.float32
            assert np.array_equal(copy.view(np.uint32), own.copy.view(np.uint32)), (name, r)
            assert np.isfinite(copy).all()


def test_bitmap_and_varint_codings_both_exercised() -> None:
    """The bit-identity test covers both index codings (the bitmap where more than about
    one value in eight is sent) and the one-value minimum of tiny fractions."""
    delta = np.random.default_rng(0).standard_normal(4097).astype(np.float32)
    coding = {kind: encode_delta(delta, parse_compression(kind), 0)[13] for kind in KINDS[2:]}
    assert coding["topk:0.5"] == 1 and coding["topk:0.01"] == 0
    one = encode_delta(np.ones(255, np.float32), parse_compression("topk:0.001"), 0)
    assert struct.unpack_from("<I", one, HEAD_BYTES)[0] == 1


# --- (b) seeded mutation fuzz ----------------------------------------------------------------

SPECIAL_F32 = [np.inf, -np.inf, np.nan, -0.0, 1e-45, 3.4e38, -3.4e38, float(INT8_SCALE_BOUND)]
SPECIAL_BITS = [0x7F800001, 0xFFC00001, 0x7FFFFFFF, 0x00000001, 0x80000001, 0x7F7FFFFF]
SPECIAL_F16 = [0x7C00, 0xFC00, 0x7E00, 0x7C01, 0x3C01, 0x3C00, 0xBC00, 0x0001, 0x8000]
VARINTS = [
    b"\x80\x00",
    b"\xff\xff\xff\xff\x7f",
    b"\xff" * 6 + b"\x01",
    b"\x00",
    b"\x81\x80\x80\x80\x01",
]


def honest_payload(rng: np.random.Generator, compression: Compression, count: int) -> bytes:
    """A payload an honest node could send (a keyframe one time in five)."""
    with np.errstate(all="ignore"):
        delta = (rng.standard_normal(count) * 10.0 ** int(rng.integers(-40, 38))).astype(np.float32)
    delta[~np.isfinite(delta)] = 0
    if rng.random() < 0.2:
        return encode_keyframe(delta).tobytes()
    base = int(rng.choice([INITIAL, 0, 5]))
    return encode_delta(delta, compression, base).tobytes()


def mutate(rng: np.random.Generator, payload: bytes, count: int) -> bytes:
    """One to three hostile edits: bytes flipped, cut, appended; header fields, k and the
    coding byte replaced; floats and fp16 codes set to inf/NaN/sNaN/huge/subnormal; int8
    -128; overlong, non-minimal and huge varints inserted; the body replaced by noise."""
    b = bytearray(payload)
    for _ in range(int(rng.integers(1, 4))):
        op = int(rng.integers(0, 12))
        topk = len(b) >= 14 and b[0] == TOPK
        if op == 0 and b:
            b[int(rng.integers(0, len(b)))] = int(rng.integers(0, 256))
        elif op == 1 and b:
            del b[int(rng.integers(0, len(b))) :]
        elif op == 2:
            b += rng.integers(0, 256, int(rng.integers(1, 9)), dtype=np.uint8).tobytes()
        elif op == 3 and len(b) >= HEAD_BYTES:
            field = int(rng.integers(0, 3))
            if field == 0:
                b[0] = int(rng.choice([0, 1, 2, 3, 4, 5, 255]))
            elif field == 1:
                b[1:5] = struct.pack("<I", int(rng.choice([0, 1, INITIAL, 2**31])))
            else:
                choice = int(rng.choice([0, count - 1, count + 1, 2**32 - 1, 2 * count]))
                b[5:9] = struct.pack("<I", choice % 2**32)
        elif op == 4 and topk:
            k = int(rng.choice([0, 1, 2, count, count + 1, 2**31, 2**32 - 1]))
            b[9:13] = struct.pack("<I", k % 2**32)
        elif op == 5 and topk:
            b[13] = int(rng.choice([0, 1, 2, 255]))
        elif op == 6 and len(b) >= 13:
            at = int(rng.integers(HEAD_BYTES, len(b) - 3))
            if rng.random() < 0.5:
                b[at : at + 4] = f32(SPECIAL_F32[int(rng.integers(len(SPECIAL_F32)))])
            else:
                b[at : at + 4] = struct.pack("<I", int(rng.choice(SPECIAL_BITS)))
        elif op == 7 and len(b) >= 11:
            at = int(rng.integers(HEAD_BYTES, len(b) - 1))
            b[at : at + 2] = struct.pack("<H", int(rng.choice(SPECIAL_F16)))
        elif op == 8 and len(b) > HEAD_BYTES:
            b[int(rng.integers(HEAD_BYTES, len(b)))] = int(rng.choice([0x80, 0x7F, 0x81, 0xFF, 0]))
        elif op == 9 and len(b) >= 15 and b[0] == TOPK:
            at = 14 + int(rng.integers(0, max(1, min(8, len(b) - 14))))
            varint = VARINTS[int(rng.integers(len(VARINTS)))]
            if rng.random() < 0.5:
                b[at:at] = varint
            else:
                b[at : at + len(varint)] = varint
        elif op == 10 and len(b) >= HEAD_BYTES:
            b[9:13] = f32(SPECIAL_F32[int(rng.integers(len(SPECIAL_F32)))])
        elif op == 11 and len(b) > HEAD_BYTES:
            b[HEAD_BYTES:] = rng.integers(0, 256, len(b) - HEAD_BYTES, dtype=np.uint8).tobytes()
    return bytes(b)


def test_decode_mutation_fuzz() -> None:
    """Seeded: thousands of mutated honest payloads, every compression and size; each
    decodes to a finite vector of the model's size or raises MessageError."""
    rng = np.random.default_rng(20240607)
    failures: list[str] = []
    for _ in range(3000):
        kind = KINDS[int(rng.integers(len(KINDS)))]
        compression, count = parse_compression(kind), int(rng.choice(SIZES))
        payload = mutate(rng, honest_payload(rng, compression, count), count)
        problem = contract_violation(
            functools.partial(decode_delta, payload, count, compression), count
        )
        if problem is not None:
            failures.append(f"{kind} count={count} {payload[:32].hex()}: {problem}")
    assert not failures, f"{len(failures)} contract violations, e.g.\n" + "\n".join(failures[:5])


def test_apply_mutation_fuzz() -> None:
    """Seeded: mutated payloads applied to a peer's copy (held at various versions, with
    large values, so a finite difference can push it to overflow) raise only MessageError,
    and a copy returned is finite."""
    rng = np.random.default_rng(77)
    failures: list[str] = []
    for _ in range(1000):
        kind = KINDS[int(rng.integers(len(KINDS)))]
        compression, count = parse_compression(kind), int(rng.choice(SIZES[:4]))
        with np.errstate(all="ignore"):  # (float32 overflow: zeroed below)
            scale = 10.0 ** int(rng.integers(0, 39))
            initial = (rng.standard_normal(count) * scale).astype(np.float32)
        initial[~np.isfinite(initial)] = 0
        peers = PeerCopies(compression, initial)
        if rng.random() < 0.7:
            peers.apply("link", "p", 5, encode_keyframe(initial))
        payload = mutate(rng, honest_payload(rng, compression, count), count)
        round_index = int(rng.choice([0, 5, 6, 100]))
        problem = contract_violation(
            functools.partial(peers.apply, "link", "p", round_index, payload), count
        )
        if problem is not None:
            failures.append(f"{kind} count={count} {payload[:32].hex()}: {problem}")
    assert not failures, f"{len(failures)} contract violations, e.g.\n" + "\n".join(failures[:5])


@pytest.mark.parametrize(
    ("kind", "payload"),
    [
        ("topk:1", head(TOPK, 0, 1000) + struct.pack("<IB", 2**32 - 1, 0)),
        ("topk:1", head(TOPK, 0, 1000) + struct.pack("<IB", 1000, 0) + b"\xff" * 5000),
        ("topk:1", head(TOPK, 0, 1000) + struct.pack("<IB", 1000, 1) + b"\xff" * 4125),
        ("topk:0.5", head(TOPK, 0, 1000) + struct.pack("<IB", 500, 0) + b"\x80" * 2500),
        ("int8", head(INT8, 0, 1000) + b"\x00" * 3),
        ("fp16", head(FP16, 0, 2**32 - 1)),
        ("fp16", head(KEYFRAME, INITIAL, 1000) + b"\x00" * 4000),
    ],
)
def test_allocation_proportional(kind: str, payload: bytes) -> None:
    """Headers claiming huge k or counts allocate O(payload + count), not what they claim."""
    count = 1000
    tracemalloc.start()
    try:
        assert_decode_contract(payload, count, parse_compression(kind))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 64 * (len(payload) + count) + (1 << 20)


# --- (c) what a review found broken (fixed since) -----------------------------------------


def test_an_int8_scale_at_the_bound_never_decodes_to_inf() -> None:
    """The int8 scale bound float32(max / 127) rounds *up*, and 127 times it is inf: the
    bound is one step below it, so a scale at the old bound and code 127 is refused."""
    payload = head(INT8, 0, 1) + INT8_SCALE_BOUND.tobytes() + b"\x7f"
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore")
        try:
            delta = decode(payload, 1, parse_compression("int8")).delta
        except MessageError:
            return
    assert np.isfinite(delta).all(), f"decoded {delta}"


@pytest.mark.parametrize("count", [1, 257])  # the tail block, and a full block
def test_an_int8_scale_at_the_bound_raises_no_warning(count: int) -> None:
    """The same, strict: no 'overflow encountered in multiply' escapes decode."""
    scales = INT8_SCALE_BOUND.tobytes() * (-(-count // 256))
    payload = head(INT8, 0, count) + scales + b"\x81" * count
    assert_decode_contract(payload, count, parse_compression("int8"))


@pytest.mark.parametrize(
    ("kind", "payload"),
    [
        ("fp16", head(KEYFRAME, INITIAL, 2) + f32(np.inf, -np.inf)),
        ("int8", head(KEYFRAME, INITIAL, 2) + SNAN32 + f32(0.0)),
        (
            "topk:0.5",
            head(TOPK, 0, 4) + struct.pack("<IB", 2, 0) + b"\x00\x01" + f32(np.inf, -np.inf),
        ),
        ("topk:1", head(TOPK, 0, 4) + struct.pack("<IB", 1, 0) + b"\x03" + SNAN32),
    ],
    ids=["keyframe-inf-minus-inf", "keyframe-snan", "topk-inf-minus-inf", "topk-snan"],
)
def test_the_finiteness_check_raises_no_warning(kind: str, payload: bytes) -> None:
    """A float64 sum of inf and -inf (or a signalling NaN) would warn 'invalid value
    encountered in reduce' before the MessageError: the check is ``isfinite().all()``."""
    count = struct.unpack_from("<I", payload, 5)[0]
    assert_decode_contract(payload, count, parse_compression(kind))


@pytest.mark.parametrize("held", [False, True])
def test_a_copy_pushed_past_float32_is_refused_without_a_warning(held: bool) -> None:
    """A finite difference that pushes a finite copy past float32 max: the addition
    overflows quietly and the finiteness check refuses it (MessageError, no warning)."""
    compression = parse_compression("topk:1")
    peers = PeerCopies(compression, np.array([3e38], np.float32))
    base = INITIAL
    if held:
        peers.apply("link", "p", 1, encode_keyframe(np.array([3e38], np.float32)))
        base = 1
    payload = head(TOPK, base, 1) + struct.pack("<IB", 1, 0) + b"\x00" + f32(3e38)
    problem = contract_violation(lambda: peers.apply("link", "p", 2, payload), 1)
    assert problem is None, problem


def test_an_honest_large_fp16_difference_is_sent_and_applied() -> None:
    """fp16 codes are within [-1, 1], so any finite scale is safe (int8's bound, max /
    127, would make the sender refuse its own difference above 2.7e36)."""
    sender = OwnCopy(parse_compression("fp16"), np.zeros(2, np.float32))
    receiver = PeerCopies(parse_compression("fp16"), np.zeros(2, np.float32))
    with strict():
        out = sender.advance(np.array([1e37, -1.0], np.float32), 1)
        copy = receiver.apply("link", "p", 1, out.for_version(None)[0])
    assert sender.copy is not None
    assert np.array_equal(copy, sender.copy)


def test_an_honest_int8_copy_at_float32_max_stays_finite() -> None:
    """Parameters at float32 max: the encoder clamps the scale to the bound, so code 127
    does not decode to inf in the sender's own copy (its neighbours would refuse it)."""
    sender = OwnCopy(parse_compression("int8"), np.zeros(2, np.float32))
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore")
        sender.advance(np.array([F32_MAX, -F32_MAX], np.float32), 1)
    assert sender.copy is not None
    assert np.isfinite(sender.copy).all(), sender.copy
