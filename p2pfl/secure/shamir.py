"""Shamir secret sharing of 32-byte secrets: any ``threshold`` shares give the secret back,
fewer give nothing (every value is equally likely). Sans I/O.

The field is the integers modulo the Mersenne prime 2**521 - 1, big enough for any 32-byte
secret; a share is the value of a random polynomial of degree threshold - 1 at x = 1..n, with
the secret at x = 0. Coefficients come from the caller's source of randomness: the OS's
(``secrets``) unless a test passes a seeded one.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Mapping

from p2pfl.errors import SecureAggregationError

#: The field's modulus (a Mersenne prime).
PRIME = 2**521 - 1
#: Bytes of one encoded share value.
SHARE_BYTES = 66
SECRET_BYTES = 32


class ShareError(SecureAggregationError):
    """Shares that cannot give a secret back: too few, out of range, or inconsistent."""


def split(
    secret: bytes,
    count: int,
    threshold: int,
    randbelow: Callable[[int], int] = secrets.randbelow,
) -> list[bytes]:
    """``count`` shares of ``secret`` (share k is for x = k + 1); any ``threshold`` of them
    reconstruct it. ``randbelow(n)`` draws the coefficients uniformly below n; it must be a
    cryptographic source outside tests (the default is)."""
    if len(secret) != SECRET_BYTES:
        raise ValueError(f"a secret is {SECRET_BYTES} bytes")
    if not 1 <= threshold <= count:
        raise ValueError(f"threshold {threshold} must be between 1 and the count {count}")
    coefficients = [int.from_bytes(secret, "big")]
    coefficients += [randbelow(PRIME) for _ in range(threshold - 1)]
    return [_encode(_evaluate(coefficients, x)) for x in range(1, count + 1)]


def combine(shares: Mapping[int, bytes], threshold: int) -> bytes:
    """The secret from shares keyed by their x (1..n). Uses the first ``threshold`` and
    checks every further share lies on the same polynomial: a wrong share is caught as soon
    as there is one share more than needed."""
    if len(shares) < threshold:
        raise ShareError(f"{len(shares)} shares, {threshold} needed")
    points = sorted((x, _decode(raw)) for x, raw in shares.items())
    if any(x < 1 for x, _ in points):
        raise ShareError("share x must be at least 1")
    basis, extra = points[:threshold], points[threshold:]
    for x, y in extra:
        if _interpolate(basis, x) != y:
            raise ShareError(f"share {x} is inconsistent with the others")
    secret = _interpolate(basis, 0)
    if secret >= 2 ** (8 * SECRET_BYTES):
        raise ShareError("the shares give no 32-byte secret")
    return secret.to_bytes(SECRET_BYTES, "big")


def _evaluate(coefficients: list[int], x: int) -> int:
    result = 0
    for c in reversed(coefficients):
        result = (result * x + c) % PRIME
    return result


def _interpolate(points: list[tuple[int, int]], at: int) -> int:
    """The value at ``at`` of the polynomial through ``points`` (Lagrange)."""
    total = 0
    for i, (xi, yi) in enumerate(points):
        numerator, denominator = 1, 1
        for j, (xj, _) in enumerate(points):
            if i != j:
                numerator = numerator * (at - xj) % PRIME
                denominator = denominator * (xi - xj) % PRIME
        total = (total + yi * numerator * pow(denominator, -1, PRIME)) % PRIME
    return total


def _encode(value: int) -> bytes:
    return value.to_bytes(SHARE_BYTES, "big")


def _decode(raw: bytes) -> int:
    if len(raw) != SHARE_BYTES:
        raise ShareError(f"a share is {SHARE_BYTES} bytes, got {len(raw)}")
    value = int.from_bytes(raw, "big")
    if value >= PRIME:
        raise ShareError("share value outside the field")
    return value
