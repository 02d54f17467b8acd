"""The secure-aggregation protocol of one group (``secure_group``), sans I/O: exact
averages after any dropout the threshold allows, masked vectors that look like noise, and
a lying owner that learns no single member's vector whatever stories it tells."""

from __future__ import annotations

import itertools
from collections.abc import Mapping

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from hypothesis import given, settings
from hypothesis import strategies as st

from p2pfl.errors import SecureAggregationError
from p2pfl.keys import pairwise_secret
from p2pfl.secagg import FixedPoint, add_keystream, group_sum, masked_contribution, unmask_average
from p2pfl.secure_group import (
    KIND_KEY,
    KIND_SELF_SEED,
    MemberRound,
    OwnerRound,
    threshold,
)
from p2pfl.shamir import combine

FIXED = FixedPoint(clip=64.0, frac_bits=20)
OWNER = "own"
ROUND = 7


def secrets_for(peers: list[str], seed: int = 0) -> dict[str, dict[str, bytes]]:
    """secrets[a][b]: a's long-term pairwise secret with b (real X25519 + HKDF)."""
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
                purpose=b"share",
            )
            for b in peers
            if b != a
        }
        for a in peers
    }


class Group:
    """One owner and its members, run in memory through the protocol's steps."""

    def __init__(self, members: list[str], seed: int = 0) -> None:
        self.names = sorted(members)
        secrets = secrets_for([*self.names, OWNER], seed)
        self.members = {m: MemberRound(m, OWNER, self.names, ROUND, secrets[m]) for m in self.names}
        self.owner = OwnerRound(OWNER, self.names, ROUND)

    def exchange_keys(self, keyed: list[str] | None = None) -> None:
        for m in keyed if keyed is not None else self.names:
            self.owner.add_keys(m, self.members[m].public, self.members[m].boxes)
        for m, boxes in self.owner.dispatch().items():
            self.members[m].accept_shares(boxes)

    def contribute(self, xs: Mapping[str, np.ndarray], weights: Mapping[str, float]) -> dict:
        out = {}
        for m, x in xs.items():
            out[m], _ = masked_contribution(x, weights[m], self.members[m].mask(x.size), FIXED)
            self.members[m].contributed = True
        return out


@settings(max_examples=30, deadline=None)
@given(
    n=st.integers(min_value=2, max_value=7),
    seed=st.integers(min_value=0, max_value=2**16),
    data=st.data(),
)
def test_any_dropout_the_threshold_allows_gives_the_exact_average(
    n: int, seed: int, data: st.DataObject
) -> None:
    """Members miss the key exchange or the vector deadline at random; whenever at least
    ``threshold`` vectors are in, the owner gets the renormalised weighted average of those
    present (within the fixed-point bound), else it refuses to unmask."""
    rng = np.random.default_rng(seed)
    names = [f"m{i}" for i in range(n)]
    group = Group(names, seed=seed % 200)
    keyed = data.draw(st.lists(st.sampled_from(names), unique=True, min_size=threshold(n)))
    sent = data.draw(st.lists(st.sampled_from(sorted(keyed)), unique=True))
    group.exchange_keys(keyed)
    size = int(rng.integers(1, 200))
    xs = {p: rng.normal(scale=3.0, size=size).astype(np.float32) for p in [*names, OWNER]}
    raw = rng.random(n + 1) + 0.05
    weights = dict(zip([*names, OWNER], (raw / raw.sum()).tolist(), strict=True))
    vectors = group.contribute({m: xs[m] for m in sent}, weights)
    if len(sent) < threshold(n):
        with pytest.raises(SecureAggregationError, match="needed"):
            group.owner.unmask_request(vectors)
        return
    dropped = group.owner.unmask_request(vectors)
    assert dropped == set(keyed) - set(sent)
    for m in sorted(sent):
        group.owner.add_reveal(m, group.members[m].reveal(dropped))
    present = weights[OWNER] + sum(weights[m] for m in sent)
    average, _ = unmask_average(
        [vectors[m] for m in sorted(sent)],
        group.owner.correction(size),
        xs[OWNER],
        weights[OWNER],
        present,
        FIXED,
    )
    expected = sum(weights[p] * xs[p].astype(np.float64) for p in [*sent, OWNER]) / present
    bound = FIXED.error_bound(n + 1) / present + 1e-6 * np.max(np.abs(expected))
    assert np.max(np.abs(average - expected)) <= bound


def test_the_threshold_is_a_strict_majority_of_the_members() -> None:
    assert [threshold(n) for n in range(2, 8)] == [2, 2, 3, 3, 4, 4]


def test_any_threshold_of_answers_is_enough() -> None:
    names = ["a", "b", "c", "d", "e"]
    group = Group(names)
    group.exchange_keys()
    xs = {m: np.full(10, 0.5, dtype=np.float32) for m in names}
    vectors = group.contribute(xs, dict.fromkeys(names, 0.2))
    group.owner.unmask_request(vectors)
    for m in ("a", "c", "e"):  # b and d never answer
        group.owner.add_reveal(m, group.members[m].reveal(frozenset()))
    assert group.owner.enough() and not group.owner.complete()
    total = group_sum(list(vectors.values()))
    np.subtract(total, group.owner.correction(10), out=total)
    assert np.allclose(FIXED.decode(total), 0.5)


def test_a_vector_looks_uniformly_random() -> None:
    """What the owner receives from one member: flat byte histogram, no correlation with
    the member's true parameters."""
    names = ["a", "b", "c"]
    group = Group(names)
    group.exchange_keys()
    rng = np.random.default_rng(2)
    x = np.cumsum(rng.normal(size=200_000)).astype(np.float32) / 100  # strongly structured
    vectors = group.contribute({"a": x, "b": x, "c": -x}, dict.fromkeys(names, 1 / 4))
    data = vectors["b"].view(np.uint8)
    counts = np.bincount(data, minlength=256)
    expected = data.size / 256
    chi2 = float(np.sum((counts - expected) ** 2 / expected))
    assert chi2 < 340  # 255 degrees of freedom: p ~ 0.0003 for a uniform source
    assert abs(np.corrcoef(vectors["b"].view(np.int32).astype(np.float64), x)[0, 1]) < 0.02


def test_no_subset_of_vectors_unmasks_without_the_reveals() -> None:
    names = ["a", "b", "c", "d"]
    group = Group(names)
    group.exchange_keys()
    xs = {m: np.full(512, 0.5, dtype=np.float32) for m in names}
    vectors = group.contribute(xs, dict.fromkeys(names, 0.2))
    for size in range(1, len(names) + 1):
        for subset in itertools.combinations(names, size):
            total = FIXED.decode(group_sum([vectors[p] for p in subset]))
            assert np.std(total) > 100, subset  # the self-masks stay on even for all four


def stories(names: list[str]) -> list[dict[str, frozenset[str]]]:
    """Every way a lying owner can tell each member who dropped out (members refuse
    stories that leave fewer than the threshold present, so those are not sent)."""
    t = threshold(len(names))
    options = {
        m: [
            frozenset(d)
            for size in range(len(names) - t + 1)
            for d in itertools.combinations([k for k in names if k != m], size)
        ]
        for m in names
    }
    return [dict(zip(names, pick, strict=True)) for pick in itertools.product(*options.values())]


def isolatable(names: list[str], seeds: set[str], keys: set[str]) -> set[str]:
    """Members whose vector the owner can isolate, given the self-mask seeds and ephemeral
    keys it rebuilt: the sum over S is readable when every member of S has its seed known
    and every mask between S and the rest has one end's key known; x_v is isolatable when
    its indicator lies in the span of the readable sets."""
    readable = []
    for size in range(1, len(names) + 1):
        for subset in itertools.combinations(names, size):
            inside = set(subset)
            if not inside <= seeds:
                continue
            crossing = [(a, c) for a in inside for c in names if c not in inside]
            if all(a in keys or c in keys for a, c in crossing):
                readable.append([1.0 if m in inside else 0.0 for m in names])
    if not readable:
        return set()
    basis = np.array(readable)
    rank = np.linalg.matrix_rank(basis)
    found = set()
    for i, m in enumerate(names):
        unit = np.zeros(len(names))
        unit[i] = 1.0
        if np.linalg.matrix_rank(np.vstack([basis, unit])) == rank:
            found.add(m)
    return found


def rebuilt_secrets(group: Group, story: dict[str, frozenset[str]]) -> tuple[set[str], set[str]]:
    """Every member answers the owner's story for it; the owner rebuilds each secret of
    which it collected ``threshold`` shares."""
    t = group.owner.threshold
    xs = {m: i + 1 for i, m in enumerate(group.names)}
    seed_shares: dict[str, dict[int, bytes]] = {m: {} for m in group.names}
    key_shares: dict[str, dict[int, bytes]] = {m: {} for m in group.names}
    for member, dropped in story.items():
        for k, (kind, share) in group.members[member].reveal(dropped).items():
            (key_shares if kind == KIND_KEY else seed_shares)[k][xs[member]] = share
        group.members[member].answered = False  # replay the same member under every story
    seeds = {k for k, shares in seed_shares.items() if len(shares) >= t}
    keys = {k for k, shares in key_shares.items() if len(shares) >= t}
    for k in seeds:
        combine(seed_shares[k], t)  # well-formed: the owner really gets these secrets
    return seeds, keys


@pytest.mark.parametrize("n", [2, 3, 4])
def test_a_lying_owner_learns_no_single_vector_whatever_it_tells_whom(n: int) -> None:
    """Exhaustive over every combination of stories, for groups of 2, 3 and 4 members:
    the owner never rebuilds both kinds of secret of one member, and never isolates one
    member's vector (not even as a difference of readable sums)."""
    names = [f"m{i}" for i in range(n)]
    group = Group(names)
    group.exchange_keys()
    group.contribute({m: np.zeros(1, dtype=np.float32) for m in names}, dict.fromkeys(names, 0.1))
    for story in stories(names):
        seeds, keys = rebuilt_secrets(group, story)
        assert not seeds & keys, story
        assert not isolatable(names, seeds, keys), story


def test_a_lying_owner_learns_no_single_vector_in_a_group_of_five() -> None:
    names = [f"m{i}" for i in range(5)]
    group = Group(names)
    group.exchange_keys()
    group.contribute({m: np.zeros(1, dtype=np.float32) for m in names}, dict.fromkeys(names, 0.1))
    every = stories(names)
    rng = np.random.default_rng(0)
    for i in rng.choice(len(every), size=1500, replace=False):
        seeds, keys = rebuilt_secrets(group, every[int(i)])
        assert not seeds & keys and not isolatable(names, seeds, keys)


def test_the_old_cyclic_attack_now_leaves_every_vector_masked() -> None:
    """The attack the last review found against direct mask revelation, at degree 3: tell
    a that b dropped, b that c dropped, c that a dropped. Now each answer is one share per
    member, and no secret reaches the threshold in both kinds: the owner strips what it
    can and still reads noise."""
    names = ["a", "b", "c"]
    group = Group(names)
    group.exchange_keys()
    rng = np.random.default_rng(4)
    xs = {m: rng.normal(size=300).astype(np.float32) for m in names}
    vectors = group.contribute(xs, dict.fromkeys(names, 0.25))
    story = {"a": frozenset("b"), "b": frozenset("c"), "c": frozenset("a")}
    seeds, keys = rebuilt_secrets(group, story)
    assert keys == set()  # one "dropped" vote per member: below the threshold of 2
    for m in names:
        stripped = vectors[m].copy()
        assert m in seeds
        # even with its self-mask removed, a's pairwise masks stay on
        group.members[m]._self_seed  # noqa: B018 (the seed the owner rebuilt)
        add_keystream(stripped, group.members[m]._self_seed, -1)
        assert np.std(FIXED.decode(stripped) - 0.25 * xs[m]) > 100


def test_a_late_vector_stays_masked_after_its_sender_was_dropped() -> None:
    """b's vector came after the owner declared b dropped: the owner rebuilt b's ephemeral
    key (so it can strip every pairwise mask of b's), but nobody reveals b's self-mask
    seed, so b's late vector stays unreadable."""
    names = ["a", "b", "c", "d"]
    group = Group(names)
    group.exchange_keys()
    rng = np.random.default_rng(5)
    xs = {m: rng.normal(size=500).astype(np.float32) for m in names}
    vectors = group.contribute(xs, dict.fromkeys(names, 0.2))
    late = vectors.pop("b")
    dropped = group.owner.unmask_request(vectors)
    assert dropped == {"b"}
    for m in vectors:
        answer = group.members[m].reveal(dropped)
        assert answer["b"][0] == KIND_KEY and all(
            kind == KIND_SELF_SEED for k, (kind, _) in answer.items() if k != "b"
        )
        group.owner.add_reveal(m, answer)
    group.owner.correction(500)  # the rebuilt key matches b's public key
    stripped = late.copy()
    member_b = group.members["b"]
    # everything except the self-mask: what the owner could compute from b's rebuilt key
    pair_only = member_b.mask(500)
    add_keystream(pair_only, member_b._self_seed, -1)
    np.subtract(stripped, pair_only, out=stripped)
    assert np.std(FIXED.decode(stripped) - 0.2 * xs["b"]) > 100


def test_a_box_altered_or_moved_by_the_owner_does_not_open() -> None:
    names = ["a", "b", "c"]
    group = Group(names)
    for m in names:
        group.owner.add_keys(m, group.members[m].public, group.members[m].boxes)
    shares = group.owner.dispatch()
    flipped = dict(shares["a"])
    flipped["b"] = bytes([flipped["b"][0] ^ 1]) + flipped["b"][1:]
    with pytest.raises(SecureAggregationError, match="does not open"):
        group.members["a"].accept_shares(flipped)
    assert group.members["a"].failure is not None
    with pytest.raises(SecureAggregationError, match="second SHARES"):
        group.members["a"].accept_shares(shares["a"])
    # c's box for b handed to a as if from b: sealed for another pair, it does not open
    with pytest.raises(SecureAggregationError, match="does not open"):
        group.members["b"].accept_shares({"a": shares["c"]["b"], "c": shares["b"]["c"]})
    with pytest.raises(SecureAggregationError, match="not another group member"):
        group.members["c"].accept_shares({"zed": shares["c"]["a"]})


def test_members_refuse_requests_that_could_unmask() -> None:
    names = ["a", "b", "c", "d"]
    group = Group(names)
    group.exchange_keys()
    b = group.members["b"]
    with pytest.raises(SecureAggregationError, match="no vector"):
        b.reveal(frozenset())  # not contributed yet
    b.contributed = True
    for dropped, problem in (
        ({"b"}, "outside the keyed group, or us"),
        ({"zed"}, "outside the keyed group, or us"),
        ({"c", "d"}, "2 members would be present, 3 needed"),
    ):
        with pytest.raises(SecureAggregationError, match=problem):
            b.reveal(frozenset(dropped))
    b.reveal(frozenset({"d"}))
    with pytest.raises(SecureAggregationError, match="already answered"):
        b.reveal(frozenset())


def test_the_owner_refuses_malformed_keys_and_reveals() -> None:
    names = ["a", "b", "c"]
    group = Group(names)
    a = group.members["a"]
    with pytest.raises(SecureAggregationError, match="one box for every other member"):
        group.owner.add_keys("a", a.public, {"b": a.boxes["b"]})
    with pytest.raises(SecureAggregationError, match="not in this round's group"):
        group.owner.add_keys("zed", a.public, a.boxes)
    group.exchange_keys()
    with pytest.raises(SecureAggregationError, match=r"second KEYS|after the shares"):
        group.owner.add_keys("a", a.public, a.boxes)
    vectors = group.contribute(
        {m: np.zeros(4, dtype=np.float32) for m in names}, dict.fromkeys(names, 0.2)
    )
    with pytest.raises(SecureAggregationError, match="unrequested"):
        group.owner.add_reveal("a", {})
    group.owner.unmask_request(vectors)
    honest = group.members["a"].reveal(frozenset())
    wrong_kind = {k: (KIND_KEY, share) for k, (_, share) in honest.items()}
    with pytest.raises(SecureAggregationError, match="wrong kind"):
        group.owner.add_reveal("a", wrong_kind)
    with pytest.raises(SecureAggregationError, match="every keyed member"):
        group.owner.add_reveal("a", {"a": honest["a"]})
    group.owner.add_reveal("a", honest)
    with pytest.raises(SecureAggregationError, match="second reveal"):
        group.owner.add_reveal("a", honest)


def test_too_few_keys_means_no_secure_round_and_members_learn_it_at_once() -> None:
    names = ["a", "b", "c", "d"]
    group = Group(names)
    group.owner.add_keys("a", group.members["a"].public, group.members["a"].boxes)
    group.owner.add_keys("b", group.members["b"].public, group.members["b"].boxes)
    shares = group.owner.dispatch()
    assert shares == {"a": {}, "b": {}} and group.owner.failure is not None
    with pytest.raises(SecureAggregationError, match="1 of 4 members, 3 needed"):
        group.members["a"].accept_shares(shares["a"])
    with pytest.raises(SecureAggregationError, match="2 of 4 members, 3 needed"):
        group.owner.unmask_request(["a", "b"])


def test_a_wrong_share_is_caught() -> None:
    """With one answer more than the threshold, a lying member's share is found; a wrong
    share of a dropped member's key is caught by its public key even at the threshold."""
    names = ["a", "b", "c", "d"]
    group = Group(names)
    group.exchange_keys()
    vectors = group.contribute(
        {m: np.zeros(4, dtype=np.float32) for m in names}, dict.fromkeys(names, 0.2)
    )
    del vectors["d"]
    dropped = group.owner.unmask_request(vectors)
    answers = {m: group.members[m].reveal(dropped) for m in vectors}
    kind, share = answers["c"]["d"]
    answers["c"]["d"] = (kind, bytes(len(share) - 1) + b"\x01")
    for m in ("a", "b", "c"):  # exactly the threshold (3)
        group.owner.add_reveal(m, answers[m])
    with pytest.raises(SecureAggregationError, match=r"does not match|no 32-byte secret"):
        group.owner.correction(4)


def test_one_answer_more_than_the_threshold_catches_a_wrong_seed_share() -> None:
    names = ["a", "b", "c", "d"]
    group = Group(names)
    group.exchange_keys()
    vectors = group.contribute(
        {m: np.zeros(4, dtype=np.float32) for m in names}, dict.fromkeys(names, 0.2)
    )
    group.owner.unmask_request(vectors)
    answers = {m: group.members[m].reveal(frozenset()) for m in names}
    kind, share = answers["d"]["a"]
    answers["d"]["a"] = (kind, share[:-1] + bytes([share[-1] ^ 1]))
    for m in names:
        group.owner.add_reveal(m, answers[m])
    with pytest.raises(SecureAggregationError, match="inconsistent"):
        group.owner.correction(4)
