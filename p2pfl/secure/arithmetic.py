"""Secure aggregation inside one neighbourhood: the arithmetic, no I/O.

Node i's group for round r is G = {i} plus its neighbours. Every other member j sends i

    y_j = encode(w_ij * x_j) + sum over k in U1, k != j, of s(j, k) * PRG(K_jk) + PRG(b_j)

in the ring of unsigned 32-bit integers, where U1 is the set of members that took part in
the round's key exchange, s(j, k) = +1 if j sorts before k, else -1, K_jk is a key only j and
k can derive and b_j is j's fresh self-mask seed (``group`` has the protocol that
agrees on the keys and recovers from dropouts). Over the members the pairwise masks cancel,
so i learns sum_j encode(w_ij x_j) once it has removed the self-masks, adds its own
encode(w_ii x_i) and decodes the weighted average. The owner takes no part in the masks (it
knows its own term), which is why a group needs at least two members besides the owner.

Masks depend on keys, round and owner only, never on parameters: a node computes them as
soon as the key exchange is done, while it trains, and the round path pays only for
encode-and-add. PRG is the AES-256-CTR keystream from counter block 0^96 || 2 (32-bit
counter), read as little-endian uint32: exactly what AES-256-GCM with the all-zero nonce
encrypts a zero plaintext with, and OpenSSL's GCM code (VAES) makes it faster than its CTR
code (AES-NI) does. At most 2**32 - 2 blocks per key: 16 Gi entries.

``encode`` is fixed point: values are clipped to [-clip, clip] (clipped entries are counted)
and scaled by 2**frac_bits. The weights of a group sum to one, so the sum stays within
clip * 2**frac_bits, which ``FixedPoint`` checks is below 2**31 (the decoded sum is read as
a signed 32-bit integer). Each term is rounded once: the decoded average is off by at most
len(group) / 2**(frac_bits + 1) per entry.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

#: Elements handled at a time: bounded temporaries whatever the model size.
CHUNK = 1 << 16
_ZERO_BLOCK = bytes(CHUNK * 4)
_AES_BLOCK = 16
#: Entries one key's stream covers: its 32-bit block counter starts at 2.
MAX_STREAM = (2**32 - 2) * _AES_BLOCK // 4


@dataclass(frozen=True)
class FixedPoint:
    """Fixed-point encoding into the ring of 32-bit integers."""

    clip: float
    frac_bits: int

    def __post_init__(self) -> None:
        if not 0 < self.frac_bits < 31:
            raise ValueError(f"frac_bits must be between 1 and 30, got {self.frac_bits}")
        if not self.clip > 0 or self.clip * 2.0**self.frac_bits > 2.0**30:
            raise ValueError(
                f"clip * 2**frac_bits must be at most 2**30 (the sum is decoded as a signed "
                f"32-bit integer, and every term is rounded on its own); clip "
                f"{self.clip:g} with {self.frac_bits} bits is "
                f"{self.clip * 2.0**self.frac_bits:.3g}"
            )

    @property
    def scale(self) -> float:
        return float(2**self.frac_bits)

    def error_bound(self, members: int) -> float:
        """Largest per-entry error of a decoded group sum (one rounding per term)."""
        return members * 0.5 / self.scale

    def encode_add(self, x: np.ndarray, weight: float, out: np.ndarray) -> int:
        """``out += encode(weight * x)`` in place (mod 2**32). Returns how many entries of
        ``x`` were clipped. Works chunk by chunk: temporaries stay small."""
        return self.encode_add_many(x, [(weight, out)])

    def encode_add_many(self, x: np.ndarray, targets: Sequence[tuple[float, np.ndarray]]) -> int:
        """``out += encode(weight * x)`` for every (weight, out) of ``targets``, in one pass
        over ``x`` (each weight encoded once per chunk, while the chunk is in cache). Returns
        how many entries of ``x`` were clipped (to [-clip, clip], whatever the weight).
        Non-finite parameters raise ValueError (the outs are then partly written: the
        range check of each chunk finds them, with no pass of its own)."""
        if any(out.dtype != np.uint32 or out.shape != x.shape for _, out in targets):
            raise ValueError("every out must be a uint32 array shaped like x")
        by_weight: dict[float, list[np.ndarray]] = {}
        for weight, out in targets:
            by_weight.setdefault(weight, []).append(out)
        clipped = 0
        scaled = np.empty(min(CHUNK, x.size), dtype=np.float64)
        ints = np.empty(scaled.size, dtype=np.int32)
        for start in range(0, x.size, CHUNK):
            part = x[start : start + CHUNK]
            count = part.size
            if count:
                high, low = part.max(), part.min()  # (NaN if any entry is)
                over = not (high <= self.clip and low >= -self.clip)
                if over and not (np.isfinite(high) and np.isfinite(low)):
                    raise ValueError("non-finite parameters cannot be encoded")
            else:
                over = False
            if over:
                clipped += int(np.count_nonzero(np.abs(part) > self.clip))
            work = scaled[:count]
            for weight, outs in by_weight.items():
                factor = weight * self.scale
                np.multiply(part, factor, out=work)
                if over:
                    limit = self.clip * abs(factor)
                    np.clip(work, -limit, limit, out=work)
                np.rint(work, out=work)
                # |values| <= 2**30: exact in int32, and int32 + uint32 wrap alike mod 2**32.
                np.copyto(ints[:count], work, casting="unsafe")
                for out in outs:
                    view = out[start : start + count]
                    np.add(view, ints[:count].view(np.uint32), out=view)
        return clipped

    def encode(self, x: np.ndarray, weight: float) -> tuple[np.ndarray, int]:
        """A new uint32 array ``encode(weight * x)`` and how many entries were clipped."""
        out = np.empty(x.size, dtype=np.uint32)  # (not np.zeros: see keystream_sum)
        out.fill(0)
        return out, self.encode_add(np.ravel(x), weight, out)

    def decode(self, total: np.ndarray) -> np.ndarray:
        """The float32 value of a group sum (read as signed 32-bit two's complement)."""
        if total.dtype != np.uint32:
            raise ValueError("a group sum is a uint32 array")
        result = np.empty(total.shape, dtype=np.float32)
        for start in range(0, total.size, CHUNK):
            signed = total[start : start + CHUNK].view(np.int32)
            result[start : start + CHUNK] = signed / self.scale
        return result


def _keystream(key: bytes) -> Any:
    """The PRG of ``key``: AES-256-GCM's encryption of zeros under the all-zero nonce is
    the CTR keystream from block 0^96 || 2 (the tag is never computed). Each key is used
    for one mask only (bound to a pair or a member, a round and an owner), so the fixed
    nonce never repeats a stream."""
    return Cipher(algorithms.AES(key), modes.GCM(bytes(12))).encryptor()


def check_stream_size(size: int) -> None:
    if size > MAX_STREAM:
        raise ValueError(f"{size} entries exceed one keystream ({MAX_STREAM})")


def add_keystream(out: np.ndarray, key: bytes, sign: int) -> None:
    """``out += sign * PRG(key)`` in place (mod 2**32); PRG: see the module docstring."""
    add_keystreams(out, [(key, sign)])


def keystream_sum(
    size: int, streams: Sequence[tuple[bytes, int]], out: np.ndarray | None = None
) -> np.ndarray:
    """The sum of sign * PRG(key) over ``streams``, written into ``out`` (a uint32 array of
    ``size`` entries, whatever it held: see ``pool``) or a new array. A new one is allocated
    empty and zeroed chunk by chunk: numpy backs a big empty array with huge pages, while
    np.zeros (calloc) faults in 4 KiB pages, which costs more than the AES itself."""
    if out is None:
        out = np.empty(size, dtype=np.uint32)
    elif out.size != size:
        raise ValueError(f"out has {out.size} entries, not {size}")
    add_keystreams(out, streams, zero_first=True)
    return out


def add_keystreams(
    out: np.ndarray, streams: Sequence[tuple[bytes, int]], *, zero_first: bool = False
) -> None:
    """``out += sum of sign * PRG(key)`` over ``streams`` (``zero_first``: ``out =``), in one
    pass: chunk by chunk, every stream is added while the chunk is in cache (one sweep over
    a big model instead of one per stream)."""
    if out.dtype != np.uint32 or not out.flags.c_contiguous:
        raise ValueError("out must be a contiguous uint32 array")
    if any(sign not in (1, -1) for _, sign in streams):
        raise ValueError("sign must be +1 or -1")
    check_stream_size(out.size)
    # (a positive stream first: it can be written straight into ``out``)
    ciphers = [(_keystream(key), sign) for key, sign in sorted(streams, key=lambda s: s[1] < 0)]
    buffer = np.empty(CHUNK + _AES_BLOCK // 4, dtype="<u4")
    raw = buffer.data.cast("B")
    whole = out.data.cast("B")  # (writable: out is contiguous)
    for start in range(0, out.size, CHUNK):
        count = min(CHUNK, out.size - start)
        view = out[start : start + count]
        rest = ciphers
        if zero_first and ciphers and ciphers[0][1] > 0 and out.size - start > CHUNK + 4:
            # ``out = first stream`` written in place (update_into wants 15 spare bytes: the
            # next chunk's, overwritten in turn): no zeroing pass, no add.
            ciphers[0][0].update_into(_ZERO_BLOCK[: count * 4], whole[start * 4 :])
            rest = ciphers[1:]
        elif zero_first:
            view.fill(0)
        for cipher, sign in rest:
            cipher.update_into(_ZERO_BLOCK[: count * 4], raw)
            if sign > 0:
                np.add(view, buffer[:count], out=view)
            else:
                np.subtract(view, buffer[:count], out=view)


def masked_contribution(
    x: np.ndarray, weight: float, mask: np.ndarray, fixed: FixedPoint
) -> tuple[np.ndarray, int]:
    """y_j = encode(weight * x) + mask, and how many entries were clipped. ``mask`` (the
    pairwise masks plus the self-mask, see ``group``) is consumed: the result is
    written into it."""
    clipped = fixed.encode_add(np.ravel(x), weight, mask)
    return mask, clipped


def within_clip(average: np.ndarray, fixed: FixedPoint, terms: int, total: float) -> bool:
    """Whether a decoded average is one: an average of values clipped to [-clip, clip]
    stays inside that range, up to the rounding of ``terms`` terms over weight ``total``.
    Ring noise (a wrong share, masks that do not cancel) almost surely is not."""
    limit = fixed.clip + fixed.error_bound(terms) / total
    return bool(average.max() <= limit and average.min() >= -limit)  # (no |x| temporary)


def sum_contributions(
    contributions: Sequence[np.ndarray],
    own: np.ndarray,
    own_weight: float,
    fixed: FixedPoint,
    out: np.ndarray | None = None,
) -> tuple[np.ndarray, int]:
    """The owner's first step, which needs no secret (it runs while the members are asked
    for their shares): the ring sum of the present members' contributions plus its own
    term encode(own_weight * own), into ``out`` (a uint32 array, whatever it held) or a new
    array. Returns the sum and how many of our own entries were clipped. Non-finite own
    parameters raise ValueError (``out`` is then partly written)."""
    if not contributions:
        raise ValueError("no contributions")
    shape = contributions[0].shape
    size = contributions[0].size
    if any(y.dtype != np.uint32 or y.shape != shape for y in contributions):
        raise ValueError("contributions must be uint32 arrays of one shape")
    if out is None:
        out = np.empty(size, dtype=np.uint32)
    elif out.dtype != np.uint32 or out.size != size or not out.flags.c_contiguous:
        raise ValueError("out must be a contiguous uint32 array of one contribution's size")
    total = out.reshape(shape)
    flat_own = np.ravel(own)
    clipped = 0
    for start in range(0, size, CHUNK):
        end = min(start + CHUNK, size)
        part = total[start:end]
        if len(contributions) > 1:
            np.add(contributions[0][start:end], contributions[1][start:end], out=part)
        else:
            np.copyto(part, contributions[0][start:end])
        for y in contributions[2:]:
            np.add(part, y[start:end], out=part)
        clipped += fixed.encode_add(flat_own[start:end], own_weight, part)
    return total, clipped


def unmask_sum(
    total: np.ndarray,
    correction: Sequence[tuple[bytes, int]],
    present_weight: float,
    fixed: FixedPoint,
) -> np.ndarray:
    """The owner's last step: the group sum minus the ``correction`` keystreams (the present
    members' self-masks and their masks with dropped members), decoded and renormalised
    over those present (``present_weight`` = own weight + the present members' weights; 1
    with no dropout). One pass, chunk by chunk, the keystreams generated where they are
    subtracted; the float32 average takes the sum's memory (``total`` is consumed)."""
    if total.dtype != np.uint32 or not total.flags.c_contiguous:
        raise ValueError("a group sum is a contiguous uint32 array")
    if any(sign not in (1, -1) for _, sign in correction):
        raise ValueError("sign must be +1 or -1")
    check_stream_size(total.size)
    ciphers = [(_keystream(key), sign) for key, sign in correction]
    stream = np.empty(CHUNK + _AES_BLOCK // 4, dtype="<u4")
    raw = stream.data.cast("B")
    scratch = np.empty(min(CHUNK, total.size), dtype=np.uint32)
    flat = total.reshape(-1)
    average = flat.view(np.float32)
    # 2**-frac_bits is exact in float32, so int32 -> float32 then scaling rounds once, like
    # the exact quotient rounded to float32 (no float64 temporary).
    inverse_scale = np.float32(1.0 / fixed.scale)
    renormalise = np.float32(present_weight)
    for start in range(0, flat.size, CHUNK):
        end = min(start + CHUNK, flat.size)
        count = end - start
        part = scratch[:count]
        np.copyto(part, flat[start:end])  # (then the chunk's memory takes the floats)
        for cipher, sign in ciphers:  # subtract the correction: the opposite signs
            cipher.update_into(_ZERO_BLOCK[: count * 4], raw)
            if sign > 0:
                np.subtract(part, stream[:count], out=part)
            else:
                np.add(part, stream[:count], out=part)
        chunk = average[start:end]
        np.multiply(part.view(np.int32), inverse_scale, out=chunk, dtype=np.float32)
        if renormalise != 1:
            np.divide(chunk, renormalise, out=chunk)
    return average.reshape(total.shape)


def unmask_average(
    contributions: Sequence[np.ndarray],
    correction: Sequence[tuple[bytes, int]],
    own: np.ndarray,
    own_weight: float,
    present_weight: float,
    fixed: FixedPoint,
) -> tuple[np.ndarray, int]:
    """``sum_contributions`` then ``unmask_sum``: the weighted average over those present,
    and how many of our own entries were clipped."""
    total, clipped = sum_contributions(contributions, own, own_weight, fixed)
    return unmask_sum(total, correction, present_weight, fixed), clipped
