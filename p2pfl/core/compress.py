"""Compressed parameter payloads (``aggregation.compression``): encoding, and strict
decoding, pure numpy.

What is compressed is a *difference*: the change of a node's public copy of its model
(``p2pfl.core.public_copy``), never the model itself, which stays float32. A payload is

    kind:u8  base:u32  count:u32  body                   (9 bytes, little-endian)

    KEYFRAME (1)  f32[count]                             the public copy itself, exact
    FP16     (2)  scale:f32[B]  f16[count]               B = ceil(count / 256) blocks
    INT8     (3)  scale:f32[B]  i8[count]                codes -127..127 (never -128)
    TOPK     (4)  k:u32  coding:u8  indices  f32[k]      coding 0: LEB128 gaps, 1: bitmap

``base`` is the version of the public copy the difference applies to (the sender's round
that made it, or ``INITIAL``: the shared initial model); a keyframe's is ``INITIAL``.

Blockwise quantisation: every block of 256 values has its own scale, the block's largest
magnitude (FP16: values / scale, in [-1, 1]; INT8: scale / 127 per code). Rounding is to
nearest (``np.rint``), not stochastic: a node feeds back what its neighbours did not get
(the public copy keeps the error until it is sent), so a bias cannot build up, and nearest
rounding halves the error of each round; it is also deterministic.

Top-k indices are increasing; LEB128 codes the first index and then each gap (varints of
1-5 bytes), and the bitmap (bit i of byte i // 8, least significant first) is used where
it is smaller (more than about 1 value in 8 sent). Decoding checks every size, code, index
and scale and raises ``MessageError``; a decoded difference is always finite.
"""

from __future__ import annotations

import math
import re
import struct
from dataclasses import dataclass

import numpy as np

from p2pfl.errors import MessageError

__all__ = [
    "BLOCK",
    "INITIAL",
    "Compression",
    "Payload",
    "decode",
    "encode_delta",
    "encode_keyframe",
    "max_payload_bytes",
    "parse_compression",
]

#: Values per quantisation block (one float32 scale each: 1.6% on top of int8).
BLOCK = 256
#: ``base`` of a difference from the shared initial model, and of every keyframe.
INITIAL = 0xFFFFFFFF

KEYFRAME = 1
FP16 = 2
INT8 = 3
TOPK = 4
KIND_NAMES = {KEYFRAME: "keyframe", FP16: "fp16", INT8: "int8", TOPK: "topk"}

CODING_VARINT = 0
CODING_BITMAP = 1

_HEAD = struct.Struct("<BII")
_TOPK_HEAD = struct.Struct("<IB")
HEAD_BYTES = _HEAD.size
_F32 = np.dtype("<f4")
_F16 = np.dtype("<f2")
_COMPRESSION_RE = re.compile(r"(none|fp16|int8)|topk:(\S+)")
_F32_MAX = np.finfo(np.float32).max
#: The largest scale a block may have: no code times it leaves float32 (f32max / 127
#: rounds up in float32, so one step below it for int8).
_SCALE_MAX = {
    FP16: _F32_MAX,
    INT8: np.nextafter(_F32_MAX / np.float32(127), np.float32(0)),
}


@dataclass(frozen=True)
class Compression:
    """A parsed ``aggregation.compression``: ``kind`` none, fp16, int8 or topk, and for
    topk the ``fraction`` of the values sent each round."""

    kind: str = "none"
    fraction: float = 1.0

    def __str__(self) -> str:
        return f"topk:{self.fraction:g}" if self.kind == "topk" else self.kind

    @property
    def enabled(self) -> bool:
        return self.kind != "none"

    def topk_count(self, count: int) -> int:
        """How many values a top-k difference of ``count`` carries (at least one)."""
        return max(1, min(count, math.ceil(self.fraction * count)))

    def default_step(self) -> float:
        """The consensus step size (CHOCO-SGD's gamma) when none is configured: 1 for the
        quantisers, whose error is small; for top-k, 6 x the fraction, at most 1. A
        step too large for the fraction sent makes the models drift apart, one too small
        mixes slowly: digits, 8 peers, Dirichlet 0.5, top-10%, 3 seeds, mean accuracy
        0.920 / 0.937 / 0.942 / 0.942 / 0.939 / 0.908 / 0.845 at gamma 0.3 / 0.5 / 0.6 /
        0.7 / 0.8 / 0.9 / 1 (0.6: a margin below where it falls off)."""
        if self.kind == "topk":
            return min(1.0, 6.0 * self.fraction)
        return 1.0


def parse_compression(text: str) -> Compression:
    """``none``, ``fp16``, ``int8`` or ``topk:FRACTION`` (0 < FRACTION <= 1); ValueError
    saying what is wrong otherwise."""
    match = _COMPRESSION_RE.fullmatch(text.strip())
    if match is None:
        raise ValueError(
            f"unknown compression {text!r}: expected none, fp16, int8 or topk:FRACTION "
            "(0 < FRACTION <= 1)"
        )
    if match.group(1):
        return Compression(match.group(1))
    raw = match.group(2)
    try:
        fraction = float(raw)
    except ValueError:
        raise ValueError(f"topk: {raw!r} is not a number") from None
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"topk: the fraction must be > 0 and <= 1, got {raw}")
    return Compression("topk", fraction)


def max_payload_bytes(count: int) -> int:
    """The largest payload any peer may send for a model of ``count`` parameters: a
    keyframe (every other kind is smaller, checked by ``decode``)."""
    return HEAD_BYTES + 4 * count


@dataclass(frozen=True)
class Payload:
    """A decoded payload: a difference to add to the copy of version ``base``, or (``kind``
    KEYFRAME) the copy itself. ``values`` holds every value, or with ``index`` (top-k)
    only those at these indices: adding k values costs O(k), not a model-sized pass."""

    kind: int
    base: int
    values: np.ndarray
    index: np.ndarray | None = None
    count: int = 0

    @property
    def keyframe(self) -> bool:
        return self.kind == KEYFRAME

    @property
    def delta(self) -> np.ndarray:
        """Every value, dense (a new array for a top-k payload)."""
        if self.index is None:
            return self.values
        dense = np.zeros(self.count, dtype=np.float32)
        dense[self.index] = self.values
        return dense

    def add_to(self, target: np.ndarray) -> bool:
        """``target += delta``, the same float32 additions on every node; whether what
        changed is still finite (top-k: checked on its k values, and ``target`` is left
        as it was when not; dense: written either way)."""
        with np.errstate(over="ignore"):
            if self.index is None:
                target += self.values
                return bool(np.isfinite(target).all())
            changed = target[self.index] + self.values
        if not np.isfinite(changed).all():
            return False
        target[self.index] = changed
        return True


# --- encoding ------------------------------------------------------------------------------


def encode_keyframe(copy: np.ndarray) -> np.ndarray:
    """The public copy itself, exact (a neighbour whose copy of ours is not in step)."""
    out = np.empty(HEAD_BYTES + 4 * copy.size, dtype=np.uint8)
    _HEAD.pack_into(out.data, 0, KEYFRAME, INITIAL, copy.size)
    out[HEAD_BYTES:].view(_F32)[:] = copy
    return out


def encode_delta(
    delta: np.ndarray, compression: Compression, base: int, scratch: np.ndarray | None = None
) -> np.ndarray:
    """``delta`` (float32, finite) compressed as ``compression`` says, as a payload.
    ``scratch``: a float32 array of delta's size that top-k may use (saves page faults)."""
    delta = np.ascontiguousarray(delta, dtype=np.float32)
    if compression.kind in ("fp16", "int8"):
        return _encode_quantised(delta, compression.kind, base)
    if compression.kind == "topk":
        return _encode_topk(delta, compression.topk_count(delta.size), base, scratch)
    raise ValueError(f"no payload for compression {compression}")


def _blocks(count: int) -> int:
    return -(-count // BLOCK)


def _encode_quantised(delta: np.ndarray, kind: str, base: int) -> np.ndarray:
    count = delta.size
    nblocks = _blocks(count)
    fp16 = kind == "fp16"
    width = 2 if fp16 else 1
    out = np.empty(HEAD_BYTES + 4 * nblocks + width * count, dtype=np.uint8)
    _HEAD.pack_into(out.data, 0, FP16 if fp16 else INT8, base, count)
    scales = out[HEAD_BYTES : HEAD_BYTES + 4 * nblocks].view(_F32)
    codes = out[HEAD_BYTES + 4 * nblocks :].view(_F16 if fp16 else np.int8)
    limit = np.float32(1.0 if fp16 else 127.0)
    bound = _SCALE_MAX[FP16 if fp16 else INT8]
    step = _SLICE // BLOCK  # blocks per slice: the temporaries stay in cache
    work = np.empty((step, BLOCK), dtype=np.float32)
    for first in range(0, nblocks, step):
        last = min(nblocks, first + step)
        start, stop = first * BLOCK, min(count, last * BLOCK)
        # (the last block, padded with zeros, is quantised like the others)
        part = delta[start:stop] if stop == last * BLOCK else _padded(delta[start:], last - first)
        block = part.reshape(-1, BLOCK)
        scratch = work[: last - first]
        np.abs(block, out=scratch)
        peak = np.max(scratch, axis=1)
        scale = np.minimum(peak / limit, bound)
        scales[first:last] = scale
        # (a division: the inverse of a subnormal scale would overflow)
        np.divide(block, np.where(scale > 0, scale, np.float32(1.0))[:, None], out=scratch)
        np.clip(scratch, -limit, limit, out=scratch)
        if not fp16:
            np.rint(scratch, out=scratch)
        codes[start:stop] = scratch.reshape(-1)[: stop - start]
    return out


#: Values per slice of the encoders (64 K: 256 KiB of float32 temporaries).
_SLICE = 1 << 16


def _padded(values: np.ndarray, blocks: int) -> np.ndarray:
    """``values`` followed by zeros, ``blocks`` whole blocks long."""
    out = np.zeros(blocks * BLOCK, dtype=np.float32)
    out[: values.size] = values
    return out


def _encode_topk(delta: np.ndarray, k: int, base: int, scratch: np.ndarray | None) -> np.ndarray:
    index = _largest(delta, k, scratch)
    values = delta[index].astype(_F32)
    bitmap_bytes = -(-delta.size // 8)
    # (a varint is at least a byte: with more than count / 8 values the bitmap wins)
    varint = _varint_encode(index) if k <= bitmap_bytes else None
    if varint is not None and varint.size <= bitmap_bytes:
        coding, indices = CODING_VARINT, varint
    else:
        bits = np.zeros(delta.size, dtype=bool)
        bits[index] = True
        coding, indices = CODING_BITMAP, np.packbits(bits, bitorder="little")
    out = np.empty(HEAD_BYTES + _TOPK_HEAD.size + indices.size + 4 * k, dtype=np.uint8)
    _HEAD.pack_into(out.data, 0, TOPK, base, delta.size)
    _TOPK_HEAD.pack_into(out.data, HEAD_BYTES, k, coding)
    start = HEAD_BYTES + _TOPK_HEAD.size
    out[start : start + indices.size] = indices
    out[start + indices.size :].view(_F32)[:] = values
    return out


def _largest(delta: np.ndarray, k: int, scratch: np.ndarray | None = None) -> np.ndarray:
    """The indices of the ``k`` largest magnitudes, increasing. A full partial sort of a
    10M vector takes ~180 ms here; a threshold from a sample first keeps the candidates
    to a little over k (~60 ms), and the exact k are picked among them."""
    n = delta.size
    if k >= n:
        return np.arange(n, dtype=np.int64)
    magnitude = np.abs(delta, out=scratch)
    candidates: np.ndarray | None = None
    if n > 4 * _SLICE:
        sample = magnitude[:: n // _SLICE]
        # A slightly lower quantile than k/n asks for, so the threshold almost surely
        # lets at least k through (checked; else the full partial sort).
        keep = min(1.0, k / n + 4.0 / np.sqrt(sample.size) + 1.0 / sample.size)
        threshold = np.quantile(sample, 1.0 - keep)
        found = np.flatnonzero(magnitude >= threshold)
        if found.size >= k:
            candidates = found
    if candidates is None:
        candidates = np.arange(n, dtype=np.int64)
    chosen = np.argpartition(magnitude[candidates], candidates.size - k)[candidates.size - k :]
    index = candidates[chosen]
    index.sort()
    return index


def _varint_encode(index: np.ndarray) -> np.ndarray:
    """LEB128 of the first index and of each gap after it, vectorised: one pass for every
    varint's first byte, then the few longer ones (a gap of 128 or more) byte by byte."""
    gaps = np.diff(index, prepend=0).astype(np.int64)
    lengths = np.ones(gaps.size, dtype=np.int64)
    for bits in (7, 14, 21, 28):
        lengths += gaps >= (1 << bits)
    ends = np.cumsum(lengths)
    out = np.empty(int(ends[-1]) if gaps.size else 0, dtype=np.uint8)
    starts = ends - lengths
    out[starts] = (gaps & 0x7F) | ((lengths > 1) << 7)
    longer = np.flatnonzero(lengths > 1)
    for byte in range(1, 5):
        longer = longer[lengths[longer] > byte]
        if not longer.size:
            break
        more = (lengths[longer] > byte + 1) << 7
        out[starts[longer] + byte] = ((gaps[longer] >> (7 * byte)) & 0x7F) | more
    return out


# --- decoding (strict) -----------------------------------------------------------------------


def decode(
    payload: np.ndarray | memoryview | bytes,
    count: int,
    compression: Compression,
    out: np.ndarray | None = None,
) -> Payload:
    """Decode a payload for a model of ``count`` parameters under ``compression``; raises
    MessageError on anything an honest peer cannot have sent: a wrong count, kind or size,
    an index out of range or repeated, a code or scale out of bounds, a non-finite value.
    The values go into ``out`` (float32, ``count`` long) if given: a model-sized array
    made afresh costs its page faults on every round (~10 ms for 10M parameters)."""
    raw = np.frombuffer(payload, dtype=np.uint8)
    if raw.size < HEAD_BYTES:
        raise MessageError(f"compressed payload of {raw.size} bytes is shorter than its header")
    kind, base, sent_count = _HEAD.unpack_from(raw[:HEAD_BYTES].tobytes())
    if sent_count != count:
        raise MessageError(f"compressed payload for {sent_count} parameters, the model has {count}")
    body = raw[HEAD_BYTES:]
    if kind == KEYFRAME:
        if base != INITIAL:
            raise MessageError(f"keyframe with a base version {base}")
        if body.size != 4 * count:
            raise MessageError(f"keyframe of {body.size} bytes, expected {4 * count}")
        out = np.empty(count, dtype=np.float32) if out is None else out
        out[:] = body.view(_F32)
        _require_finite(out, "keyframe")
        return Payload(KEYFRAME, base, out, None, count)
    expected = {"fp16": FP16, "int8": INT8, "topk": TOPK}.get(compression.kind)
    if kind != expected:
        name = KIND_NAMES.get(kind, f"unknown kind {kind}")
        raise MessageError(f"{name} payload, this network uses compression {compression}")
    if kind == TOPK:
        index, values = _decode_topk(body, count, compression.topk_count(count))
        return Payload(kind, base, values, index, count)
    out = np.empty(count, dtype=np.float32) if out is None else out
    _decode_quantised(body, count, kind, out)
    return Payload(kind, base, out, None, count)


def _require_finite(values: np.ndarray, what: str) -> None:
    # (Not a float64 sum: +inf and -inf together would warn before the check.)
    if not np.isfinite(values).all():
        raise MessageError(f"{what} with non-finite values")


def _decode_quantised(body: np.ndarray, count: int, kind: int, out: np.ndarray) -> None:
    nblocks = _blocks(count)
    width = 2 if kind == FP16 else 1
    if body.size != 4 * nblocks + width * count:
        name = KIND_NAMES[kind]
        raise MessageError(
            f"{name} payload body of {body.size} bytes, expected {4 * nblocks + width * count}"
        )
    scales = body[: 4 * nblocks].view(_F32)
    # A scale is a block's largest magnitude (/127): finite, >= 0, and small enough that no
    # code times it overflows float32.
    if not (np.all(scales >= 0) and np.all(scales <= _SCALE_MAX[kind])):
        raise MessageError(f"{KIND_NAMES[kind]} payload with a scale out of bounds")
    codes = body[4 * nblocks :]
    if kind == FP16:
        values = codes.view(_F16)
        # |value| <= 1 on the bits (sign off: at most 1.0's 0x3C00; NaN and inf are above)
        if not np.all((codes.view("<u2") & 0x7FFF) <= 0x3C00):
            raise MessageError("fp16 payload with a value outside [-1, 1] or not finite")
    else:
        values = codes.view(np.int8)
        if np.any(values == -128):
            raise MessageError("int8 payload with the code -128 (codes are -127..127)")
    out[:] = values
    full = count // BLOCK * BLOCK
    out[:full].reshape(-1, BLOCK)[...] *= scales[: full // BLOCK, None]
    if full < count:
        out[full:] *= scales[-1]


def _decode_topk(body: np.ndarray, count: int, most: int) -> tuple[np.ndarray, np.ndarray]:
    if body.size < _TOPK_HEAD.size:
        raise MessageError("top-k payload shorter than its header")
    k, coding = _TOPK_HEAD.unpack_from(body[: _TOPK_HEAD.size].tobytes())
    if not 1 <= k <= most:
        raise MessageError(f"top-k payload with {k} values, expected 1 to {most}")
    index_bytes = body.size - _TOPK_HEAD.size - 4 * k
    if index_bytes < 0:
        raise MessageError(f"top-k payload of {body.size} bytes is too short for {k} values")
    indices = body[_TOPK_HEAD.size : _TOPK_HEAD.size + index_bytes]
    if coding == CODING_VARINT:
        index = _varint_decode(indices, k, count)
    elif coding == CODING_BITMAP:
        index = _bitmap_decode(indices, k, count)
    else:
        raise MessageError(f"top-k payload with an unknown index coding {coding}")
    values = body[_TOPK_HEAD.size + index_bytes :].view(_F32).astype(np.float32)
    _require_finite(values, "top-k payload")
    return index, values


def _varint_decode(data: np.ndarray, k: int, count: int) -> np.ndarray:
    if data.size < k or data.size > 5 * k:
        raise MessageError(f"top-k index bytes {data.size} cannot hold {k} varints")
    last = data < 0x80
    ends = np.flatnonzero(last)
    if ends.size != k or ends[-1] != data.size - 1:
        raise MessageError(f"top-k indices are not {k} whole varints")
    starts = np.concatenate(([0], ends[:-1] + 1))
    lengths = ends - starts + 1
    if np.any(lengths > 5):
        raise MessageError("top-k index varint longer than 5 bytes")
    if np.any(data[ends[lengths > 1]] == 0):
        raise MessageError("top-k index varint not in its shortest form")
    gaps = (data[starts] & 0x7F).astype(np.int64)
    longer = np.flatnonzero(lengths > 1)  # (few: a gap of 128 or more)
    for byte in range(1, 5):
        longer = longer[lengths[longer] > byte]
        if not longer.size:
            break
        gaps[longer] |= (data[starts[longer] + byte] & 0x7F).astype(np.int64) << (7 * byte)
    if np.any(gaps[1:] == 0):
        raise MessageError("top-k indices repeat (a gap of 0)")
    index = np.cumsum(gaps)
    if index[-1] >= count:  # (gaps are >= 0 and < 2**35: the sum cannot wrap)
        raise MessageError(f"top-k index {int(index[-1])} out of range (model has {count})")
    return index


def _bitmap_decode(data: np.ndarray, k: int, count: int) -> np.ndarray:
    if data.size != -(-count // 8):
        raise MessageError(f"top-k bitmap of {data.size} bytes, expected {-(-count // 8)}")
    bits = np.unpackbits(data, bitorder="little")
    if bits[count:].any():
        raise MessageError("top-k bitmap with bits set past the model's end")
    index = np.flatnonzero(bits[:count])
    if index.size != k:
        raise MessageError(f"top-k bitmap marks {index.size} values, the payload has {k}")
    return index
