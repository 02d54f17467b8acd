"""The secure-aggregation arithmetic: fixed-point encoding with a bounded error, clipping
counted, keystream masks that cancel and wrap, and non-finite values refused."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from p2pfl.secure import arithmetic as secagg
from p2pfl.secure.arithmetic import (
    CHUNK,
    FixedPoint,
    add_keystream,
    keystream_sum,
    masked_contribution,
    sum_contributions,
    unmask_average,
    unmask_sum,
)

FIXED = FixedPoint(clip=64.0, frac_bits=20)


@settings(max_examples=40, deadline=None)
@given(
    members=st.integers(min_value=2, max_value=8),
    size=st.integers(min_value=1, max_value=300),
    seed=st.integers(min_value=0, max_value=2**16),
)
def test_unmasked_sum_equals_the_weighted_sum_within_the_bound(
    members: int, size: int, seed: int
) -> None:
    """Masks that cancel (here: one key added by one member, subtracted by the next) plus
    a correction leave the weighted sum, off by at most one rounding per term."""
    rng = np.random.default_rng(seed)
    xs = [rng.normal(scale=5.0, size=size).astype(np.float32) for _ in range(members)]
    raw = rng.random(members) + 0.05
    weights = (raw / raw.sum()).tolist()
    vectors = []
    for i in range(1, members):
        mask = np.zeros(size, dtype=np.uint32)
        add_keystream(mask, bytes([i]) * 32, 1)
        if i > 1:
            add_keystream(mask, bytes([i - 1]) * 32, -1)
        add_keystream(mask, bytes([100 + i]) * 32, 1)  # a self-mask
        vectors.append(masked_contribution(xs[i], weights[i], mask, FIXED)[0])
    # the last pair mask is left over, and every self-mask
    correction = [(bytes([members - 1]) * 32, 1)]
    correction += [(bytes([100 + i]) * 32, 1) for i in range(1, members)]
    average, clipped = unmask_average(vectors, correction, xs[0], weights[0], 1.0, FIXED)
    expected = sum(w * x.astype(np.float64) for w, x in zip(weights, xs, strict=True))
    assert clipped == 0
    assert np.max(np.abs(average - expected)) <= FIXED.error_bound(members) + 1e-6 * np.max(
        np.abs(expected)
    )


def test_clipping_is_counted_and_applied() -> None:
    fixed = FixedPoint(clip=1.0, frac_bits=20)
    out = np.zeros(4, dtype=np.uint32)
    clipped = fixed.encode_add(np.array([0.5, 3.0, -7.0, -0.25], dtype=np.float32), 1.0, out)
    assert clipped == 2
    assert np.allclose(fixed.decode(out), [0.5, 1.0, -1.0, -0.25])


def test_keystream_masks_cancel_and_wrap() -> None:
    out = np.array([0, 1, 2**32 - 1] * 50_000, dtype=np.uint32)
    before = out.copy()
    add_keystream(out, b"k" * 32, 1)
    assert not np.array_equal(out, before)
    add_keystream(out, b"k" * 32, -1)
    assert np.array_equal(out, before)


@pytest.mark.parametrize(
    ("clip", "bits"), [(0.0, 20), (2048.0, 20), (1024.5, 20), (1.0, 0), (1.0, 31)]
)
def test_fixed_point_refuses_settings_that_could_overflow(clip: float, bits: int) -> None:
    with pytest.raises(ValueError):
        FixedPoint(clip=clip, frac_bits=bits)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("where", [1, CHUNK + 5, 3 * CHUNK - 1])
def test_non_finite_parameters_are_not_encoded(bad: float, where: int) -> None:
    """Found by each chunk's range check, in any chunk."""
    x = np.zeros(3 * CHUNK, dtype=np.float32)
    x[where] = bad
    out = np.zeros(x.size, dtype=np.uint32)
    with pytest.raises(ValueError, match="non-finite"):
        FIXED.encode_add_many(x, [(0.5, out), (0.25, out.copy())])


def test_encoding_into_many_outputs_at_once_matches_one_by_one() -> None:
    rng = np.random.default_rng(3)
    x = rng.normal(scale=40.0, size=200_000).astype(np.float32)  # some entries clipped
    targets = [(0.2, np.arange(x.size, dtype=np.uint32)) for _ in range(2)]
    targets.append((0.35, np.full(x.size, 7, dtype=np.uint32)))
    expected = [out.copy() for _, out in targets]
    counts = {FIXED.encode_add(x, w, out) for (w, _), out in zip(targets, expected, strict=True)}
    clipped = FIXED.encode_add_many(x, targets)
    assert counts == {clipped} and clipped > 0
    for (_, out), want in zip(targets, expected, strict=True):
        assert np.array_equal(out, want)


def test_masks_and_group_sums_written_into_given_arrays_match_new_ones() -> None:
    """Reused arrays (``pool``) hold old contents: every entry is overwritten."""
    rng = np.random.default_rng(5)
    streams = [(bytes([1]) * 32, 1), (bytes([2]) * 32, -1)]
    dirty = rng.integers(0, 2**32, size=CHUNK + 7, dtype=np.uint32)
    fresh = keystream_sum(dirty.size, streams)
    assert keystream_sum(dirty.size, streams, dirty) is dirty
    assert np.array_equal(dirty, fresh)
    with pytest.raises(ValueError, match="entries"):
        keystream_sum(dirty.size + 1, streams, dirty)

    own = rng.normal(size=dirty.size).astype(np.float32)
    vectors = [keystream_sum(dirty.size, streams[:1]), keystream_sum(dirty.size, streams[1:])]
    expected, _ = unmask_average(vectors, streams, own, 0.5, 0.75, FIXED)
    spare = rng.integers(0, 2**32, size=dirty.size, dtype=np.uint32)
    total, _ = sum_contributions(vectors, own, 0.5, FIXED, spare)
    average = unmask_sum(total, streams, 0.75, FIXED)
    assert np.shares_memory(average, spare)  # (the average takes the sum's memory)
    assert np.array_equal(average, expected)
    with pytest.raises(ValueError, match="uint32"):
        sum_contributions(vectors, own, 0.5, FIXED, np.empty(dirty.size, dtype=np.float32))


def test_decoding_rounds_once_like_the_exact_quotient() -> None:
    """int32 -> float32 then the exact power-of-two scale equals the float64 quotient
    rounded to float32, so the one-pass decode loses nothing."""
    rng = np.random.default_rng(9)
    sums = rng.integers(-(2**31), 2**31, size=100_000, dtype=np.int64).astype(np.int32)
    own = np.zeros(sums.size, dtype=np.float32)
    average, _ = unmask_average([sums.view(np.uint32)], [], own, 0.0, 1.0, FIXED)
    assert np.array_equal(average, (sums / FIXED.scale).astype(np.float32))


def test_the_prg_is_the_aes_ctr_keystream_from_counter_block_two() -> None:
    """The spec (docs/protocol.md) says AES-256-CTR from block 0^96 || 2; the code takes it
    from OpenSSL's GCM path, which is faster. Both must agree, across chunk boundaries."""
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

    key = bytes(range(32))
    size = 2 * CHUNK + 3
    ctr = Cipher(algorithms.AES(key), modes.CTR(bytes(15) + b"\x02")).encryptor()
    expected = np.frombuffer(ctr.update(bytes(size * 4)), dtype="<u4")
    assert np.array_equal(keystream_sum(size, [(key, 1)]), expected)
    negated = keystream_sum(size, [(key, -1)])  # (written by the zero-then-subtract path)
    assert np.array_equal(negated, (-expected.astype(np.int64)) % 2**32)
    both = keystream_sum(size, [(bytes(32), -1), (key, 1)])
    assert np.array_equal(both - keystream_sum(size, [(bytes(32), -1)]), expected)

    # Around the chunk boundaries, where writing the first stream straight into ``out``
    # needs 15 spare bytes after the chunk, every sign order gives the reference sums.
    def reference(k: bytes, n: int) -> np.ndarray:
        stream = Cipher(algorithms.AES(k), modes.CTR(bytes(15) + b"\x02")).encryptor()
        return np.frombuffer(stream.update(bytes(n * 4)), dtype="<u4").astype(np.int64)

    other = bytes(range(32, 64))
    for n in [1, 5, CHUNK - 1, CHUNK, CHUNK + 1, CHUNK + 4, CHUNK + 5, 2 * CHUNK + 5, 3 * CHUNK]:
        for first, second in [(1, 1), (1, -1), (-1, 1), (-1, -1)]:
            want = (first * reference(key, n) + second * reference(other, n)) % 2**32
            dirty = np.full(n, 0xDEADBEEF, dtype=np.uint32)
            got = keystream_sum(n, [(key, first), (other, second)], dirty)
            assert np.array_equal(got, want), (n, first, second)
    # One key's 32-bit block counter runs from 2: no model may need more of it.
    secagg.check_stream_size(secagg.MAX_STREAM)
    with pytest.raises(ValueError, match="exceed one keystream"):
        secagg.check_stream_size(secagg.MAX_STREAM + 1)


def test_a_group_sum_with_non_finite_own_parameters_is_refused() -> None:
    own = np.zeros(CHUNK + 3, dtype=np.float32)
    own[-1] = np.nan
    vectors = [np.zeros(own.size, dtype=np.uint32)] * 2
    with pytest.raises(ValueError, match="non-finite"):
        sum_contributions(vectors, own, 0.5, FIXED)
