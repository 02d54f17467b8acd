"""The network's feature mean and standard deviation, computed without pooling data
(``training.standardize: federated``), sans I/O.

Every node sums its own features and their squares (and counts its rows); the network
needs only the totals. Each node masks its vector so that no one else can read it, and
every vector reaches every node by flooding (each node passes on, once, what it has not
seen); a node that holds all of them adds them up, the masks cancel, and it has the
totals. Every node adds the same integers, so every node gets the same bits: one
standardisation for the whole network, which peers then compare (``digest``).

- Fixed point: each total is encoded as ``round(v * 2**48)`` in the ring of
  integers modulo ``2**128``: sums of squares of any realistic data fit, and addition in
  the ring is exact and order-free (floats would differ in their last bits between nodes).
- Masks: for every pair (i, j), a keystream from their pairwise secret (AES-256-CTR),
  added by the smaller id and subtracted by the larger: the masks cancel in the total and
  only there. With two peers each learns the other's vector from the total: the price of
  any exact total.
- Authenticity: the origin tags its vector for every other peer with a key only the two
  share, so a peer that passes it on cannot change it unseen.
- Every peer must take part: the totals exist once all vectors are in (bounded by the
  node's start-up timeout in the shell).
"""

from __future__ import annotations

import hashlib
import hmac
import math
from collections.abc import Collection, Mapping

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from p2pfl.errors import MessageError

FRAC_BITS = 48
RING = 1 << 128
#: Bytes of one ring element on the wire.
ENTRY_BYTES = 16
TAG_BYTES = 32
#: A standard deviation below this is "constant feature": it is divided by 1 instead.
MIN_STD = 1e-12


def local_moments(x: np.ndarray) -> np.ndarray:
    """``[rows, sum of each feature, sum of each feature's square]`` in float64."""
    x64 = np.asarray(x, dtype=np.float64)
    return np.concatenate([[float(len(x64))], x64.sum(axis=0), np.square(x64).sum(axis=0)])


def encode(values: np.ndarray, peers: int = 1) -> list[int]:
    """Fixed point in Z_2^128 (negative values wrap around), small enough that the sum of
    ``peers`` such vectors still decodes (below 2**79 in all)."""
    scale = 1 << FRAC_BITS
    bound = 2.0 ** (79 - math.ceil(math.log2(max(peers, 1))))
    out = []
    for v in values.tolist():
        if not math.isfinite(v) or abs(v) >= bound:
            raise ValueError(f"a feature total of {v:g} is too large to standardise with")
        out.append(round(v * scale) % RING)
    return out


def decode(ints: list[int]) -> np.ndarray:
    half = RING >> 1
    return np.array(
        [(i - RING if i >= half else i) / (1 << FRAC_BITS) for i in ints], dtype=np.float64
    )


def _keystream(key: bytes, count: int) -> list[int]:
    encryptor = Cipher(algorithms.AES(key), modes.CTR(bytes(16))).encryptor()
    raw = encryptor.update(bytes(ENTRY_BYTES * count)) + encryptor.finalize()
    return [
        int.from_bytes(raw[k : k + ENTRY_BYTES], "big") for k in range(0, len(raw), ENTRY_BYTES)
    ]


def _mask_key(secret: bytes, context: bytes) -> bytes:
    return hmac.new(secret, b"p2pfl/v1 moments mask" + context, hashlib.sha256).digest()


def _tag_key(secret: bytes, context: bytes) -> bytes:
    return hmac.new(secret, b"p2pfl/v1 moments tag" + context, hashlib.sha256).digest()


def to_bytes(ints: list[int]) -> bytes:
    return b"".join(i.to_bytes(ENTRY_BYTES, "big") for i in ints)


def from_bytes(raw: bytes) -> list[int]:
    if len(raw) % ENTRY_BYTES:
        raise MessageError(f"a moments vector of {len(raw)} bytes")
    return [
        int.from_bytes(raw[k : k + ENTRY_BYTES], "big") for k in range(0, len(raw), ENTRY_BYTES)
    ]


def masked_share(
    own_id: str, values: np.ndarray, secrets: Mapping[str, bytes], context: bytes
) -> bytes:
    """Our vector under the pairwise masks with every other peer (``secrets[peer]``)."""
    ints = encode(values, len(secrets) + 1)
    for peer in sorted(secrets):
        stream = _keystream(_mask_key(secrets[peer], context), len(ints))
        sign = 1 if own_id < peer else -1
        ints = [(a + sign * m) % RING for a, m in zip(ints, stream, strict=True)]
    return to_bytes(ints)


def share_tags(vector: bytes, secrets: Mapping[str, bytes], context: bytes) -> dict[str, bytes]:
    """Our tag on our masked vector, for each other peer."""
    return {
        peer: hmac.new(_tag_key(secret, context), vector, hashlib.sha256).digest()
        for peer, secret in sorted(secrets.items())
    }


class Equivocation(MessageError):
    """An origin sent two different shares, each tagged for us: only it can make those
    tags, so it told different peers different totals."""


class NetworkMoments:
    """The vectors of every peer, as they arrive; the totals once all are in."""

    def __init__(
        self,
        own_id: str,
        peers: Collection[str],
        features: int,
        secrets: Mapping[str, bytes],
        context: bytes,
    ) -> None:
        self.own_id = own_id
        self.peers = frozenset(peers)
        self.features = features
        self.context = context
        self._secrets = secrets
        #: origin -> (masked vector, its tags for every peer): what we pass on.
        self.shares: dict[str, tuple[bytes, dict[str, bytes]]] = {}

    def add_own(self, values: np.ndarray) -> None:
        vector = masked_share(self.own_id, values, self._secrets, self.context)
        self.shares[self.own_id] = (vector, share_tags(vector, self._secrets, self.context))

    def add_own_share(self, vector: bytes, tags: Mapping[str, bytes]) -> None:
        """The share an earlier life of this node already sent (the same masks must never
        cover other totals: the difference would show)."""
        self.shares[self.own_id] = (vector, dict(tags))

    def add(self, origin: str, vector: bytes, tags: Mapping[str, bytes]) -> bool:
        """A peer's share, first-hand or passed on. True if new (then pass it on); raises
        MessageError if it is not a peer's, has the wrong size, or its tag for us fails."""
        if origin not in self.peers or origin == self.own_id:
            raise MessageError(f"moments from {origin!r}, not another peer of this network")
        if len(vector) != ENTRY_BYTES * (2 * self.features + 1):
            raise MessageError(
                f"moments of {len(vector)} bytes, expected {2 * self.features + 1} entries"
            )
        expected = hmac.new(_tag_key(self._secrets[origin], self.context), vector, hashlib.sha256)
        if not hmac.compare_digest(tags.get(self.own_id, b""), expected.digest()):
            raise MessageError(f"moments of {origin} with a tag that does not verify")
        if origin in self.shares:
            if self.shares[origin][0] != vector:
                raise Equivocation(f"{origin} sent two different feature totals, both its own")
            return False
        # (only the tags of known peers are kept and passed on)
        self.shares[origin] = (vector, {p: t for p, t in tags.items() if p in self.peers})
        return True

    def missing(self) -> list[str]:
        return sorted(self.peers - self.shares.keys())

    def totals(self) -> np.ndarray:
        """``[rows, sums..., sums of squares...]`` over the network (all shares in)."""
        if self.missing():
            raise ValueError(f"moments missing from {', '.join(self.missing())}")
        total = [0] * (2 * self.features + 1)
        for vector, _ in self.shares.values():
            total = [(a + b) % RING for a, b in zip(total, from_bytes(vector), strict=True)]
        return decode(total)


def mean_std(totals: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The network's per-feature mean and (population) standard deviation; a constant
    feature gets a deviation of 1 (it is only centred)."""
    rows = totals[0]
    features = (len(totals) - 1) // 2
    sums, squares = totals[1 : 1 + features], totals[1 + features :]
    # Totals that no data can give (a peer that lied, or an overflow) are refused.
    if not (rows >= 1 and abs(rows - round(rows)) < 1e-6):
        raise ValueError(f"the network's row count {rows:g} is not a positive whole number")
    if (squares < 0).any() or (rows * squares < np.square(sums) * (1 - 1e-9) - 1e-6).any():
        raise ValueError("the network's sums of squares are smaller than its sums allow")
    mean = sums / rows
    if not np.isfinite(mean).all() or (np.abs(mean) > np.finfo(np.float32).max).any():
        raise ValueError("the network's feature means are beyond float32")
    variance = np.maximum(squares / rows - np.square(mean), 0.0)
    std = np.sqrt(variance)
    return mean, np.where(std < MIN_STD, 1.0, std)


def digest(mean: np.ndarray, std: np.ndarray) -> str:
    """A short name for a standardisation, for peers to compare."""
    raw = (
        np.ascontiguousarray(mean, np.float64).tobytes()
        + np.ascontiguousarray(std, np.float64).tobytes()
    )
    return hashlib.sha256(raw).hexdigest()[:16]
