"""Compressed payloads and public copies (``p2pfl.core.compress``, ``core.public_copy``):
the pure core, seeded, no sockets. What hostile bytes do is in test_compress_fuzz.py and,
against a real node, test_compress_rejections.py."""

from __future__ import annotations

import numpy as np
import pytest

from p2pfl.core.compress import (
    BLOCK,
    CODING_BITMAP,
    CODING_VARINT,
    HEAD_BYTES,
    INITIAL,
    Compression,
    decode,
    encode_delta,
    encode_keyframe,
    max_payload_bytes,
    parse_compression,
)
from p2pfl.core.public_copy import (
    NotFinite,
    OwnCopy,
    PeerCopies,
    consensus_step,
)
from p2pfl.errors import MessageError

INT8 = parse_compression("int8")
FP16 = parse_compression("fp16")


def vector(n: int, seed: int = 0, scale: float = 0.01) -> np.ndarray:
    return (np.random.default_rng(seed).normal(size=n) * scale).astype(np.float32)


@pytest.mark.parametrize("n", [1, 255, 256, 257, 5000])
def test_int8_error_is_at_most_half_a_step_of_its_block(n: int) -> None:
    v = vector(n)
    v[: min(n, BLOCK)] *= 100  # blocks of very different scales
    payload = encode_delta(v, INT8, 3)
    blocks = -(-n // BLOCK)
    assert payload.size == HEAD_BYTES + 4 * blocks + n
    out = decode(payload, n, INT8)
    assert out.base == 3 and not out.keyframe
    for start in range(0, n, BLOCK):
        block = v[start : start + BLOCK]
        step = np.abs(block).max() / 127
        error = np.abs(out.delta[start : start + BLOCK] - block).max()
        assert error <= step / 2 * (1 + 1e-5)


def test_fp16_keeps_eleven_bits_of_each_blocks_largest_value() -> None:
    v = vector(3000, seed=1)
    payload = encode_delta(v, FP16, INITIAL)
    assert payload.size == HEAD_BYTES + 4 * 12 + 2 * 3000
    out = decode(payload, 3000, FP16).delta
    for start in range(0, 3000, BLOCK):
        block = v[start : start + BLOCK]
        assert np.abs(out[start : start + BLOCK] - block).max() <= np.abs(block).max() * 2**-11


def test_a_zero_block_stays_zero() -> None:
    v = np.zeros(600, dtype=np.float32)
    v[300] = 1.5
    for compression in (INT8, FP16):
        out = decode(encode_delta(v, compression, 0), 600, compression).delta
        assert out[300] == pytest.approx(1.5) and np.count_nonzero(out) == 1


@pytest.mark.parametrize(("fraction", "coding"), [(0.01, CODING_VARINT), (0.5, CODING_BITMAP)])
def test_topk_sends_the_largest_values_exactly(fraction: float, coding: int) -> None:
    n = 10_000
    v = vector(n, seed=2)
    compression = parse_compression(f"topk:{fraction}")
    k = compression.topk_count(n)
    payload = encode_delta(v, compression, 7)
    assert payload[HEAD_BYTES + 4] == coding
    out = decode(payload, n, compression).delta
    chosen = np.flatnonzero(out)
    assert chosen.size == k
    assert np.array_equal(out[chosen], v[chosen])
    assert np.abs(v[chosen]).min() >= np.sort(np.abs(v))[-k]


def test_topk_indices_cost_about_a_byte_each_when_sparse() -> None:
    n = 100_000
    compression = parse_compression("topk:0.1")
    payload = encode_delta(vector(n, seed=3), compression, 0)
    k = compression.topk_count(n)
    index_bytes = payload.size - HEAD_BYTES - 5 - 4 * k
    assert k <= index_bytes <= 1.1 * k  # gaps of ~10 fit one LEB128 byte
    assert payload.size < 0.13 * 4 * n


def test_a_keyframe_is_exact_and_the_largest_payload() -> None:
    v = vector(777, seed=4)
    payload = encode_keyframe(v)
    assert payload.size == max_payload_bytes(777)
    out = decode(payload, 777, INT8)
    assert out.keyframe and np.array_equal(out.delta, v)


def test_parse_compression_and_its_defaults() -> None:
    assert str(parse_compression("topk:0.25")) == "topk:0.25"
    assert not parse_compression("none").enabled
    assert parse_compression("int8").default_step() == 1.0
    assert parse_compression("topk:0.1").default_step() == pytest.approx(0.6)
    assert parse_compression("topk:0.5").default_step() == 1.0
    assert Compression("topk", 0.001).topk_count(10) == 1
    for bad in ("int4", "topk", "topk:0", "topk:-1", "topk:2", "topk:nan"):
        with pytest.raises(ValueError):
            parse_compression(bad)


# --- public copies ------------------------------------------------------------------------


def test_a_difference_needs_the_copy_it_was_made_against() -> None:
    initial = vector(300, seed=5)
    own = OwnCopy(INT8, initial)
    copies = PeerCopies(INT8, initial)
    first = own.advance(initial + 0.1, 0)
    payload, keyframe = first.for_version(None)
    assert not keyframe  # from the shared initial model: any neighbour can apply it
    assert np.array_equal(copies.apply("link", "bob", 0, payload), own.copy)
    second = own.advance(initial + 0.2, 1)
    assert second.for_version(0) == (second.delta, False)
    payload, keyframe = second.for_version(None)  # a connection that did not carry round 0
    assert keyframe
    assert np.array_equal(copies.apply("new link", "bob", 1, payload), own.copy)
    with pytest.raises(MessageError, match="that brought no copy"):
        copies.apply("third link", "bob", 1, second.for_version(0)[0])
    assert np.array_equal(copies.apply("link", "bob", 1, second.for_version(0)[0]), own.copy)
    with pytest.raises(MessageError, match="round 1's payload on a connection whose copy is at 1"):
        copies.apply("link", "bob", 1, second.for_version(0)[0])  # the same round again
    third = own.advance(initial + 0.3, 2)
    fourth = own.advance(initial + 0.4, 3)
    assert third.delta is not None and fourth.delta is not None
    with pytest.raises(MessageError, match="ours is at 1"):  # round 2's never came
        copies.apply("link", "bob", 3, fourth.delta)


def test_a_restarted_sender_naming_a_round_again_does_not_mix_copies() -> None:
    """The review's case: bob sent round 5, then died before his checkpoint said so, and
    resumed at round 4 with another model. His new connection's copy is built from its
    own keyframe, never from the old connection's round-5 copy."""
    initial = vector(300, seed=8)
    before = OwnCopy(INT8, initial)
    copies = PeerCopies(INT8, initial)
    for r in range(6):
        out = before.advance(initial + 0.01 * (r + 1), r)
        copies.apply("old link", "bob", r, out.for_version(r - 1 if r else None)[0])
    copies.forget("old link")  # (the connection died with him)
    after = OwnCopy(INT8, None)
    for r in range(4, 10):
        out = after.advance(initial - 0.02 * r, r)
        copy = copies.apply("new link", "bob", r, out.for_version(r - 1 if r > 4 else None)[0])
        assert np.array_equal(copy, after.copy)


def test_after_a_restart_the_first_round_sends_keyframes() -> None:
    own = OwnCopy(INT8, None)
    params = vector(100, seed=6)
    out = own.advance(params, 4)
    assert out.delta is None and out.for_version(3)[1]
    assert np.array_equal(decode(out.for_version(3)[0], 100, INT8).delta, params)
    assert own.advance(params + 1, 5).base == 4


def test_copies_of_peers_that_are_no_neighbours_are_forgotten() -> None:
    initial = vector(10)
    copies = PeerCopies(INT8, initial)
    for peer in ("a", "b", "c"):
        copies.apply(f"link to {peer}", peer, 0, encode_keyframe(initial))
    copies.keep_only(frozenset({"b"}))
    assert set(copies.copies) == {"link to b"}
    copies.forget("link to b")
    assert not copies.copies


def ring_of(n: int) -> np.ndarray:
    """Metropolis weights of a 4-regular circulant graph (each peer: +-1, +-2)."""
    w = np.zeros((n, n))
    for i in range(n):
        for d in (1, 2, n - 1, n - 2):
            w[i, (i + d) % n] = 1 / 5
        w[i, i] = 1 - w[i].sum()
    return w


@pytest.mark.parametrize(
    ("spelled", "gamma", "most"),
    [("fp16", None, 1.01), ("int8", None, 1.01), ("topk:0.1", None, 8), ("topk:0.02", None, 15)],
)
def test_compressed_gossip_keeps_the_average_and_reaches_consensus(
    spelled: str, gamma: float | None, most: float
) -> None:
    """CHOCO gossip over 8 peers whose models are pulled towards different targets:
    the network's average is exactly the uncompressed one's, and the models spread about as
    little as without compression (top-k: a few times more; it mixes more slowly)."""
    spread, spread_plain = gossip(spelled, gamma)
    assert spread <= most * spread_plain


def test_topk_with_a_full_consensus_step_drifts_apart() -> None:
    """Why top-k's default step is below 1: with gamma 1 the spread grows many times."""
    spread, spread_plain = gossip("topk:0.1", 1.0)
    assert spread > 10 * gossip("topk:0.1", None)[0] > 10 * spread_plain


def gossip(spelled: str, gamma: float | None) -> tuple[float, float]:
    """150 rounds of 8 peers, compressed and plain: the spread of the models around
    their average at the end, compressed and plain (after checking both averages agree)."""
    compression = parse_compression(spelled)
    n, size, rounds = 8, 2000, 150
    w = ring_of(n)
    rng = np.random.default_rng(9)
    targets = rng.normal(size=(n, size)).astype(np.float32)
    x = np.zeros((n, size), dtype=np.float32)
    plain = x.copy()
    own = [OwnCopy(compression, np.zeros(size, np.float32)) for _ in range(n)]
    copies = [PeerCopies(compression, np.zeros(size, np.float32)) for _ in range(n)]
    step = gamma or compression.default_step()
    for r in range(rounds):
        x += 0.1 * (targets - x)
        plain += 0.1 * (targets - plain)
        plain = (w @ plain).astype(np.float32)
        sent = [own[i].advance(x[i], r).for_version(r - 1 if r else None)[0] for i in range(n)]
        for i in range(n):
            mixed = w[i, i] * own[i].copy
            for j in np.flatnonzero(w[i]):
                if j != i:
                    mixed = mixed + w[i, j] * copies[i].apply(j, str(j), r, sent[j])
            consensus_step(x[i], own[i].copy, mixed.astype(np.float32), step)
    assert np.allclose(x.mean(0), plain.mean(0), atol=1e-4)
    return float(np.linalg.norm(x - x.mean(0))), float(np.linalg.norm(plain - plain.mean(0)))


def test_a_model_that_is_not_finite_is_not_sent() -> None:
    own = OwnCopy(INT8, np.zeros(10, np.float32))
    params = np.ones(10, np.float32)
    params[3] = np.nan
    with pytest.raises(NotFinite):
        own.advance(params, 0)
    assert own.version == INITIAL and not own.copy.any()  # (its copy is unchanged)


def test_a_keyframe_is_made_only_within_its_round() -> None:
    """The keyframe is the copy at the round's version, made when first needed: once the
    copy moved on, it would carry another round's copy under this round's name."""
    own = OwnCopy(INT8, np.zeros(10, np.float32))
    own.advance(np.ones(10, np.float32), 0)
    second = own.advance(np.full(10, 2, np.float32), 1)
    assert second.for_version(None)[1]  # a keyframe, in its round
    third = own.advance(np.full(10, 3, np.float32), 2)
    own.advance(np.full(10, 4, np.float32), 3)
    with pytest.raises(RuntimeError, match="after its round"):
        third.for_version(None)
