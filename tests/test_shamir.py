"""Shamir sharing of 32-byte secrets: any threshold of shares gives the secret back, fewer
refuse, and a wrong share is caught when there is one share more than needed."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from p2pfl.secure.shamir import PRIME, SHARE_BYTES, ShareError, combine, split


@settings(max_examples=50, deadline=None)
@given(
    secret=st.binary(min_size=32, max_size=32),
    count=st.integers(min_value=1, max_value=9),
    data=st.data(),
)
def test_any_threshold_of_shares_gives_the_secret(
    secret: bytes, count: int, data: st.DataObject
) -> None:
    t = data.draw(st.integers(min_value=1, max_value=count))
    shares = split(secret, count, t)
    assert all(len(s) == SHARE_BYTES for s in shares)
    picked = data.draw(st.lists(st.integers(1, count), unique=True, min_size=t))
    assert combine({x: shares[x - 1] for x in picked}, t) == secret


def test_fewer_than_the_threshold_refuse() -> None:
    shares = split(b"s" * 32, 5, 3)
    with pytest.raises(ShareError, match="2 shares, 3 needed"):
        combine({1: shares[0], 2: shares[1]}, 3)


def test_shares_differ_each_time_and_below_the_threshold_say_nothing() -> None:
    """Fresh randomness per split; and t - 1 shares fit every possible secret (for any
    guess there is a polynomial through them): two secrets' shares are alike."""
    assert split(b"s" * 32, 3, 2) != split(b"s" * 32, 3, 2)
    one = split(b"\x00" * 32, 4, 3)[:2]
    for guess in (b"\x00" * 32, b"\xff" * 32):
        # a third point chosen to make the guess come out: always possible
        assert combine({1: one[0], 2: one[1], 3: _completing(one, guess)}, 3) == guess


def _completing(shares: list[bytes], secret: bytes) -> bytes:
    """The share at x = 3 that makes (0, secret), (1, s1), (2, s2), (3, ?) one quadratic."""
    s0 = int.from_bytes(secret, "big")
    s1, s2 = (int.from_bytes(s, "big") for s in shares)
    # Lagrange through x = 0, 1, 2, evaluated at 3: p(3) = p(0) - 3 p(1) + 3 p(2)
    return ((s0 - 3 * s1 + 3 * s2) % PRIME).to_bytes(SHARE_BYTES, "big")


def test_a_wrong_share_is_caught_with_one_share_to_spare() -> None:
    shares = split(b"k" * 32, 4, 3)
    for bad in range(4):
        altered = list(shares)
        altered[bad] = (int.from_bytes(altered[bad], "big") ^ 1).to_bytes(SHARE_BYTES, "big")
        with pytest.raises(ShareError):
            combine({x + 1: s for x, s in enumerate(altered)}, 3)


@pytest.mark.parametrize(
    "share",
    [b"\x00" * (SHARE_BYTES - 1), PRIME.to_bytes(SHARE_BYTES, "big"), b"\xff" * SHARE_BYTES],
)
def test_malformed_shares_are_refused(share: bytes) -> None:
    good = split(b"k" * 32, 2, 2)
    with pytest.raises(ShareError):
        combine({1: good[0], 2: share}, 2)


def test_split_refuses_bad_arguments() -> None:
    for secret, count, t in ((b"short", 3, 2), (b"k" * 32, 3, 4), (b"k" * 32, 3, 0)):
        with pytest.raises(ValueError):
            split(secret, count, t)
    assert list(itertools.chain(split(b"k" * 32, 1, 1)))  # a 1-of-1 sharing works
