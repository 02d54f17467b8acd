"""Secure aggregation inside one neighbourhood: the arithmetic, no I/O.

Node i's group for round r is G = {i} plus its neighbours. Every other member j sends i

    y_j = encode(w_ij * x_j) + M_j,    M_j = sum over k in G, k not in {i, j}, of
                                             s(j, k) * PRG(K_jk(r, i))

in the ring of unsigned 32-bit integers, where s(j, k) = +1 if j sorts before k, else -1,
and K_jk(r, i) is a key only j and k can derive (HKDF from their pairwise secret, bound to
the round and the group owner). Over all members the masks cancel pair by pair, so
i learns sum_j encode(w_ij x_j), adds its own encode(w_ii x_i) and decodes the weighted
average, and nothing else: each y_j alone is uniformly distributed as long as one other
member k does not collude with i. The owner takes no part in the masks (it knows its own
term), which is why a group needs at least two members besides the owner.

Masks depend on keys, round and owner only, never on parameters: a node computes them
while it trains, and the round path pays only for encode-and-add.

``encode`` is fixed point: values are clipped to [-clip, clip] (clipped entries are counted)
and scaled by 2**frac_bits. The weights of a group sum to one, so the sum stays within
clip * 2**frac_bits, which ``FixedPoint`` checks is below 2**31 (the decoded sum is read as
a signed 32-bit integer). Each term is rounded once: the decoded average is off by at most
len(group) / 2**(frac_bits + 1) per entry.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

#: Salt of the per-round mask keys (the pairwise secret is already bound to its purpose).
MASK_SALT = b"p2pfl/v1 mask"
#: Elements handled at a time: bounded temporaries whatever the model size.
CHUNK = 1 << 16
_ZERO_BLOCK = bytes(CHUNK * 4)
_AES_BLOCK = 16


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
        if out.dtype != np.uint32 or out.shape != x.shape:
            raise ValueError("out must be a uint32 array shaped like x")
        if not np.isfinite(np.sum(x, dtype=np.float64)):
            raise ValueError("non-finite parameters cannot be encoded")
        factor = weight * self.scale
        clipped = 0
        for start in range(0, x.size, CHUNK):
            part = np.asarray(x[start : start + CHUNK], dtype=np.float64)
            over = np.abs(part) > self.clip
            n_over = int(np.count_nonzero(over))
            if n_over:
                clipped += n_over
                part = np.clip(part, -self.clip, self.clip)
            scaled = np.rint(part * factor).astype(np.int64).astype(np.uint32)
            view = out[start : start + CHUNK]
            np.add(view, scaled, out=view)
        return clipped

    def decode(self, total: np.ndarray) -> np.ndarray:
        """The float32 value of a group sum (read as signed 32-bit two's complement)."""
        if total.dtype != np.uint32:
            raise ValueError("a group sum is a uint32 array")
        result = np.empty(total.shape, dtype=np.float32)
        for start in range(0, total.size, CHUNK):
            signed = total[start : start + CHUNK].view(np.int32)
            result[start : start + CHUNK] = signed / self.scale
        return result


def mask_key(pair_secret: bytes, round_index: int, owner: str) -> bytes:
    """K_jk(r, i): 32 bytes only j and k can derive, for one round and one group owner."""
    if len(pair_secret) != 32:
        raise ValueError("a pairwise secret is 32 bytes")
    owner_bytes = owner.encode("utf-8")
    info = struct.pack(">QH", round_index, len(owner_bytes)) + owner_bytes
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=MASK_SALT, info=info).derive(pair_secret)


def add_keystream(out: np.ndarray, key: bytes, sign: int) -> None:
    """``out += sign * PRG(key)`` in place (mod 2**32), PRG = the AES-256-CTR keystream
    read as little-endian uint32. Each key is used for one mask only (it is bound to the
    pair, the round and the owner), so the all-zero counter block never repeats a stream."""
    if out.dtype != np.uint32 or not out.flags.c_contiguous:
        raise ValueError("out must be a contiguous uint32 array")
    if sign not in (1, -1):
        raise ValueError("sign must be +1 or -1")
    stream = Cipher(algorithms.AES(key), modes.CTR(bytes(_AES_BLOCK))).encryptor()
    buffer = np.empty(CHUNK + _AES_BLOCK // 4, dtype="<u4")
    raw = buffer.data.cast("B")
    for start in range(0, out.size, CHUNK):
        count = min(CHUNK, out.size - start)
        stream.update_into(_ZERO_BLOCK[: count * 4], raw)
        view = out[start : start + count]
        if sign > 0:
            np.add(view, buffer[:count], out=view)
        else:
            np.subtract(view, buffer[:count], out=view)


def member_mask(
    member: str,
    owner: str,
    group: Sequence[str],
    round_index: int,
    pair_secrets: Mapping[str, bytes],
    size: int,
) -> np.ndarray:
    """M_j: what ``member`` adds to its contribution to ``owner``'s group this round.
    ``pair_secrets[k]`` is the member's pairwise mask secret with k."""
    if owner not in group or member not in group or member == owner:
        raise ValueError("the member and the owner must be two different group members")
    others = [k for k in group if k not in (owner, member)]
    if len(others) < 1:
        raise ValueError(f"{owner}'s group has no other member to mask {member} with")
    mask = np.zeros(size, dtype=np.uint32)
    for k in others:
        add_keystream(mask, mask_key(pair_secrets[k], round_index, owner), 1 if member < k else -1)
    return mask


def masked_contribution(
    x: np.ndarray, weight: float, mask: np.ndarray, fixed: FixedPoint, self_seed: bytes
) -> tuple[np.ndarray, int]:
    """y_j = encode(weight * x) + mask + PRG(self_seed), and how many entries were clipped.
    ``mask`` is consumed (the result is written into it). The self-mask's seed is fresh
    randomness the member reveals only when the owner counts it as present: a vector the
    owner declared missing (e.g. a late one) stays masked even after a recovery."""
    clipped = fixed.encode_add(np.ravel(x), weight, mask)
    add_keystream(mask, self_seed, 1)
    return mask, clipped


def group_sum(contributions: Sequence[np.ndarray]) -> np.ndarray:
    """The ring sum of the members' contributions (masks cancel once all are in)."""
    if not contributions:
        raise ValueError("no contributions")
    total = np.zeros(contributions[0].shape, dtype=np.uint32)
    for y in contributions:
        if y.dtype != np.uint32 or y.shape != total.shape:
            raise ValueError("contributions must be uint32 arrays of one shape")
        np.add(total, y, out=total)
    return total


def recovery_mask(
    member: str,
    owner: str,
    missing: Sequence[str],
    round_index: int,
    pair_secrets: Mapping[str, bytes],
    size: int,
) -> np.ndarray:
    """A survivor's answer to a recovery request: the part of its mask M_j made with the
    ``missing`` members. The owner subtracts it; the masks among survivors still cancel."""
    if member == owner or member in missing or owner in missing:
        raise ValueError("recovery is about other members than the owner and the survivor")
    mask = np.zeros(size, dtype=np.uint32)
    for m in missing:
        add_keystream(mask, mask_key(pair_secrets[m], round_index, owner), 1 if member < m else -1)
    return mask


def unmask_average(
    contributions: Sequence[np.ndarray],
    seeds: Sequence[bytes],
    recoveries: Sequence[np.ndarray],
    own: np.ndarray,
    own_weight: float,
    present_weight: float,
    fixed: FixedPoint,
) -> tuple[np.ndarray, int]:
    """The owner's step: the present members' contributions, minus their self-masks (from
    the ``seeds`` they revealed) and, after dropouts, minus their masks with the missing
    (``recoveries``), plus its own term; decoded and renormalised over those present
    (``present_weight`` = own weight + the present members' weights; 1 with no dropout)."""
    total = group_sum(contributions)
    for seed in seeds:
        add_keystream(total, seed, -1)
    for r in recoveries:
        if r.dtype != np.uint32 or r.shape != total.shape:
            raise ValueError("recovery masks must be uint32 arrays shaped like the model")
        np.subtract(total, r, out=total)
    clipped = fixed.encode_add(np.ravel(own), own_weight, total)
    average = fixed.decode(total)
    average /= np.float32(present_weight)
    return average, clipped
