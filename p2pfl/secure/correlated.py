"""Correlated noise that cancels across the network (DECOR: Allouah, Koloskova, El
Firdoussi, Jaggi and Guerraoui, ICML 2024), generated from the pairs' secrets.

Every pair of neighbours {i, j} derives, each round, the same Gaussian vector v_ij from a
secret only they share; i adds +v_ij to what it sends and j adds -v_ij (the one whose id
sorts first adds it). Summed over the network the pairs cancel, so the network's average is
untouched and gossip averages the noise away, while every single message carries the
noise of all its node's pairs. An eavesdropper, or a curious peer that does not know a
pair's secret, sees noise of std ``correlated_multiplier * clip_norm`` per neighbour pair
on top of the node's own independent DP noise (``core.privacy`` accounts for both).

Keys: the pair's X25519 secret through HKDF under its own purpose (never a channel or mask
key), then one key per round (HMAC-SHA256 of the round); the round key's AES-256-CTR
keystream (``secure.arithmetic``'s PRG) gives uniform 32-bit words, turned into normals by
Box-Muller in float64. Both ends compute the same bits up to the last ulp of the math
library (float64 log/cos/sin), far below float32's precision: the cancellation is exact
to float32 rounding.
"""

from __future__ import annotations

import hashlib
import hmac
import math
from collections.abc import Iterator, Mapping

import numpy as np

from p2pfl.secure.arithmetic import _ZERO_BLOCK, CHUNK, _keystream

__all__ = ["PURPOSE", "add_correlated_noise", "gaussian", "round_key"]

#: The pairwise secret's HKDF purpose: unrelated to the channel's, the masks', the moments'.
PURPOSE = b"p2pfl/v1 correlated noise"
_TWO_PI = 2.0 * math.pi


def round_key(pair_secret: bytes, round_index: int) -> bytes:
    """The pair's key for one round (a PRG key is used for one stream only)."""
    if len(pair_secret) != 32:
        raise ValueError("a pair secret is 32 bytes")
    if round_index < 0:
        raise ValueError(f"round must be >= 0, got {round_index}")
    return hmac.new(pair_secret, b"round" + round_index.to_bytes(8, "big"), hashlib.sha256).digest()


def gaussian(key: bytes, size: int) -> np.ndarray:
    """``size`` standard normal float64 values from ``key``'s keystream (see ``_slices``)."""
    out = np.empty(size, dtype=np.float64)
    for start, values in _slices(key, size):
        out[start : start + values.size] = values
    return out


def _slices(key: bytes, size: int) -> Iterator[tuple[int, np.ndarray]]:
    """The normals of ``key``'s keystream, ``CHUNK`` at a time (so a big model never
    needs a model-sized float64 array): Box-Muller on two 32-bit words per two values,
    uniforms in (0, 1), never 0."""
    cipher = _keystream(key)
    words = np.empty(CHUNK + 2 + 4, dtype="<u4")  # (update_into wants 15 spare bytes)
    raw = words.data.cast("B")
    for start in range(0, size, CHUNK):
        count = min(CHUNK, size - start)
        even = count + (count & 1)
        cipher.update_into(_ZERO_BLOCK[: 4 * even], raw)
        uniform = (words[:even].astype(np.float64) + 0.5) * (1.0 / 4294967296.0)
        first, second = uniform[0::2], uniform[1::2]
        radius = np.sqrt(-2.0 * np.log(first))
        angle = _TWO_PI * second
        values = np.empty(even, dtype=np.float64)
        values[0::2] = radius * np.cos(angle)
        values[1::2] = radius * np.sin(angle)
        yield start, values[:count]


def add_correlated_noise(
    params: np.ndarray,
    own_id: str,
    pair_secrets: Mapping[str, bytes],
    round_index: int,
    std: float,
) -> None:
    """``params += sum over neighbours j of sign(own, j) * std * v_ij`` in place, for the
    neighbours in ``pair_secrets`` (this round's), slice by slice."""
    if std <= 0:
        return
    for peer, secret in sorted(pair_secrets.items()):
        if peer == own_id:
            raise ValueError("no pair with oneself")
        scale = std if own_id < peer else -std
        for start, values in _slices(round_key(secret, round_index), params.size):
            part = params[start : start + values.size]
            part += (scale * values).astype(params.dtype)
