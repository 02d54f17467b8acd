"""The secure-aggregation arithmetic: exact unmasking, bounded fixed-point error, masks that
cancel only when every member is in, and contributions that look like noise."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from hypothesis import given, settings
from hypothesis import strategies as st

from p2pfl.keys import pairwise_secret
from p2pfl.secagg import (
    FixedPoint,
    add_keystream,
    group_sum,
    mask_key,
    masked_contribution,
    member_mask,
    recovery_mask,
    unmask_average,
)

FIXED = FixedPoint(clip=64.0, frac_bits=20)


def secrets_for(peers: list[str], seed: int = 0) -> dict[str, dict[str, bytes]]:
    """secrets[a][b]: a's pairwise mask secret with b (real X25519 + HKDF, as nodes do)."""
    keys = {
        p: X25519PrivateKey.from_private_bytes(bytes([seed, i + 1]) * 16)
        for i, p in enumerate(peers)
    }
    return {
        a: {
            b: pairwise_secret(
                keys[a],
                keys[b].public_key().public_bytes(Encoding.Raw, PublicFormat.Raw),
                network="test",
                own_id=a,
                their_id=b,
                purpose=b"mask",
            )
            for b in peers
            if b != a
        }
        for a in peers
    }


def contributions(
    owner: str,
    group: list[str],
    xs: dict[str, np.ndarray],
    weights: dict[str, float],
    secrets: dict[str, dict[str, bytes]],
    round_index: int = 3,
) -> dict[str, np.ndarray]:
    size = next(iter(xs.values())).size
    out = {}
    for member in group:
        if member == owner:
            continue
        mask = member_mask(member, owner, group, round_index, secrets[member], size)
        out[member], _ = masked_contribution(
            xs[member], weights[member], mask, FIXED, SEEDS[member]
        )
    return out


#: Each member's self-mask seed (fresh randomness in a node; fixed here for the tests).
SEEDS = {f"p{i}": bytes([i + 1]) * 32 for i in range(8)} | {
    p: bytes([ord(p)]) * 32 for p in "abcde"
}


@settings(max_examples=40, deadline=None)
@given(
    members=st.integers(min_value=3, max_value=6),
    size=st.integers(min_value=1, max_value=300),
    seed=st.integers(min_value=0, max_value=2**16),
)
def test_unmasked_sum_equals_the_weighted_sum_within_the_bound(
    members: int, size: int, seed: int
) -> None:
    rng = np.random.default_rng(seed)
    group = [f"p{i}" for i in range(members)]
    owner = group[int(rng.integers(members))]
    xs = {p: rng.normal(scale=5.0, size=size).astype(np.float32) for p in group}
    raw = rng.random(members) + 0.05
    weights = dict(zip(group, (raw / raw.sum()).tolist(), strict=True))
    got = contributions(owner, group, xs, weights, secrets_for(group))
    average, clipped = unmask_average(
        list(got.values()), [SEEDS[p] for p in got], [], xs[owner], weights[owner], 1.0, FIXED
    )
    expected = sum(weights[p] * xs[p].astype(np.float64) for p in group)
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


def test_a_missing_member_leaves_the_masks_in() -> None:
    group = ["a", "b", "c", "d"]
    rng = np.random.default_rng(1)
    xs = {p: rng.normal(size=1000).astype(np.float32) for p in group}
    weights = dict.fromkeys(group, 0.25)
    got = contributions("a", group, xs, weights, secrets_for(group))
    # d is missing: even with b's and c's self-masks removed, their masks with d stay
    partial, _ = unmask_average(
        [got["b"], got["c"]], [SEEDS["b"], SEEDS["c"]], [], xs["a"], 0.25, 0.75, FIXED
    )
    expected = sum(0.25 * xs[p] for p in ("a", "b", "c")) / 0.75
    assert np.mean(np.abs(partial - expected)) > 100  # noise, not the partial sum


def test_every_subset_of_contributions_short_of_all_stays_masked() -> None:
    group = ["a", "b", "c", "d"]
    xs = {p: np.full(512, 0.5, dtype=np.float32) for p in group}
    got = contributions("a", group, xs, dict.fromkeys(group, 0.25), secrets_for(group))
    for size in (1, 2):
        for subset in itertools.combinations(["b", "c", "d"], size):
            total = FIXED.decode(group_sum([got[p] for p in subset]))
            assert np.std(total) > 100, subset  # far from any (sum of) 0.125s


def test_a_contribution_looks_uniformly_random() -> None:
    """What the owner receives from one neighbour: byte histogram flat, no correlation with
    the neighbour's true parameters."""
    group = ["a", "b", "c"]
    rng = np.random.default_rng(2)
    x = np.cumsum(rng.normal(size=200_000)).astype(np.float32) / 100  # strongly structured
    xs = {"a": x, "b": x, "c": -x}
    got = contributions("a", group, xs, dict.fromkeys(group, 1 / 3), secrets_for(group))
    data = got["b"].view(np.uint8)
    counts = np.bincount(data, minlength=256)
    expected = data.size / 256
    chi2 = float(np.sum((counts - expected) ** 2 / expected))
    assert chi2 < 340  # 255 degrees of freedom: p ~ 0.0003 for a uniform source
    as_float = got["b"].view(np.int32).astype(np.float64)
    assert abs(np.corrcoef(as_float, x)[0, 1]) < 0.02


def test_mask_keys_are_shared_by_the_pair_and_differ_by_round_and_owner() -> None:
    s = secrets_for(["a", "b", "c"])
    assert s["a"]["b"] == s["b"]["a"]
    k = mask_key(s["a"]["b"], 5, "c")
    assert k == mask_key(s["b"]["a"], 5, "c")
    assert k != mask_key(s["a"]["b"], 6, "c")
    assert k != mask_key(s["a"]["b"], 5, "d")
    assert k != mask_key(s["a"]["c"], 5, "b")


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


def test_a_group_needs_a_member_to_mask_with() -> None:
    with pytest.raises(ValueError, match="no other member"):
        member_mask("b", "a", ["a", "b"], 0, {"a": b"x" * 32}, 10)


@settings(max_examples=40, deadline=None)
@given(
    members=st.integers(min_value=4, max_value=7),
    seed=st.integers(min_value=0, max_value=2**16),
    data=st.data(),
)
def test_recovery_after_random_drops_is_exact_and_never_reveals_one_vector(
    members: int, seed: int, data: st.DataObject
) -> None:
    """Any drop pattern leaving >= 2 survivors: the owner recovers exactly the renormalised
    weighted average of those present; and one survivor's contribution minus its recovery
    answer is still masked (by the other survivors)."""
    rng = np.random.default_rng(seed)
    group = [f"p{i}" for i in range(members)]
    owner = group[0]
    others = group[1:]
    dropped = data.draw(
        st.lists(st.sampled_from(others), unique=True, min_size=1, max_size=len(others) - 2)
    )
    survivors = [p for p in others if p not in dropped]
    size = 64
    xs = {p: rng.normal(size=size).astype(np.float32) for p in group}
    raw = rng.random(members) + 0.05
    weights = dict(zip(group, (raw / raw.sum()).tolist(), strict=True))
    secrets = secrets_for(group)
    got = contributions(owner, group, xs, weights, secrets, round_index=9)
    answers = {s: recovery_mask(s, owner, dropped, 9, secrets[s], size) for s in survivors}
    present = weights[owner] + sum(weights[s] for s in survivors)
    average, _ = unmask_average(
        [got[s] for s in survivors],
        [SEEDS[s] for s in survivors],
        list(answers.values()),
        xs[owner],
        weights[owner],
        present,
        FIXED,
    )
    expected = (
        weights[owner] * xs[owner].astype(np.float64)
        + sum(weights[s] * xs[s].astype(np.float64) for s in survivors)
    ) / present
    assert np.max(np.abs(average - expected)) <= FIXED.error_bound(members) / present + 1e-6
    # one survivor alone, its recovery answer removed: still noise
    lone = survivors[0]
    alone = FIXED.decode(got[lone] - answers[lone])
    assert np.std(alone - weights[lone] * xs[lone]) > 100


def test_a_late_vector_stays_masked_after_an_honest_recovery() -> None:
    """The review's F2: the owner declared b missing and recovered with the others' masks
    with b; then b's vector arrives anyway. The survivors' answers strip every pairwise
    mask off it, but b was not asked for its self-mask seed (it was declared missing), so
    the owner still cannot read it."""
    group = ["a", "b", "c", "d", "e"]
    rng = np.random.default_rng(5)
    xs = {p: rng.normal(size=500).astype(np.float32) for p in group}
    secrets = secrets_for(group)
    got = contributions("a", group, xs, dict.fromkeys(group, 0.2), secrets)
    stripped = got["b"].copy()
    for k in ("c", "d", "e"):
        np.add(stripped, recovery_mask(k, "a", ["b"], 3, secrets[k], 500), out=stripped)
    assert np.std(FIXED.decode(stripped) - 0.2 * xs["b"]) > 100  # the self-mask still hides b
    add_keystream(stripped, SEEDS["b"], -1)  # (had b revealed its seed, it would be exposed)
    assert np.max(np.abs(FIXED.decode(stripped) - 0.2 * xs["b"])) < 1e-5


def test_non_finite_parameters_are_not_encoded() -> None:
    out = np.zeros(3, dtype=np.uint32)
    with pytest.raises(ValueError, match="non-finite"):
        FIXED.encode_add(np.array([0.0, np.nan, 1.0], dtype=np.float32), 1.0, out)
