"""The secure-aggregation protocol of one group (``p2pfl.secure.group``), sans I/O: exact
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
from p2pfl.proto.keys import pairwise_secret
from p2pfl.secure.arithmetic import (
    FixedPoint,
    add_keystream,
    keystream_sum,
    masked_contribution,
    unmask_average,
    within_clip,
)
from p2pfl.secure.group import (
    KIND_KEY,
    KIND_SELF_SEED,
    MemberRound,
    OwnerRound,
    threshold,
    view_tag,
)
from p2pfl.secure.shamir import combine

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


def group_sum(vectors: list[np.ndarray]) -> np.ndarray:
    """The ring sum of some contributions, computed independently of ``p2pfl.secure.arithmetic``."""
    return np.sum(np.stack(vectors), axis=0, dtype=np.uint32)  # (uint32 wraps mod 2**32)


class Group:
    """One owner and its members, run in memory through the protocol's steps."""

    def __init__(self, members: list[str], seed: int = 0, fraction: float = 0.5) -> None:
        self.names = sorted(members)
        secrets = secrets_for([*self.names, OWNER], seed)
        self.members = {
            m: MemberRound(m, OWNER, self.names, ROUND, secrets[m], fraction) for m in self.names
        }
        self.owner = OwnerRound(OWNER, self.names, ROUND, fraction)

    def exchange_keys(self, keyed: list[str] | None = None) -> None:
        for m in keyed if keyed is not None else self.names:
            self.owner.add_keys(m, self.members[m].public, self.members[m].boxes)
        for m, boxes in self.owner.dispatch().items():
            self.members[m].accept_shares(boxes)

    def confirm_all(self, who: list[str] | None = None) -> None:
        """The owner's PRESENT reaches every member of U2 (or ``who``), whose CONFIRM
        comes back."""
        present = self.owner.present
        assert present is not None
        for m in sorted(who if who is not None else present):
            self.owner.add_confirm(m, self.members[m].confirm(present))

    def reveal(self, member: str) -> dict[str, tuple[int, bytes]]:
        """``member`` answers UNMASK, with the tags the owner relays."""
        return self.members[member].reveal(self.owner.tags_for(member))

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
    group.confirm_all()
    for m in sorted(sent):
        group.owner.add_reveal(m, group.reveal(m))
    present = weights[OWNER] + sum(weights[m] for m in sent)
    average, _ = unmask_average(
        [vectors[m] for m in sorted(sent)],
        group.owner.correction(),
        xs[OWNER],
        weights[OWNER],
        present,
        FIXED,
    )
    expected = sum(weights[p] * xs[p].astype(np.float64) for p in [*sent, OWNER]) / present
    bound = FIXED.error_bound(n + 1) / present + 1e-6 * np.max(np.abs(expected))
    assert np.max(np.abs(average - expected)) <= bound


def test_the_threshold_is_a_strict_majority_of_the_members_unless_configured() -> None:
    assert [threshold(n) for n in range(2, 8)] == [2, 2, 3, 3, 4, 4]
    assert [threshold(n, 2 / 3) for n in range(2, 8)] == [2, 3, 3, 4, 5, 5]
    assert threshold(4, 0.75) == threshold(4, 0.99) == 4
    with pytest.raises(ValueError, match="threshold fraction"):
        threshold(4, 1.0)


def test_a_higher_threshold_stops_an_owner_with_a_colluding_member() -> None:
    """Odd group, majority threshold: the owner plus one colluding member (its shares and
    tags for anything) can split the honest members between two present sets, one with v
    and one without, and rebuild both of v's secrets. With t = 4 of 5 it cannot."""
    names = [f"m{i}" for i in range(5)]
    for fraction, broken in ((0.5, True), (0.75, False)):
        group = Group(names, fraction=fraction)
        group.exchange_keys()
        group.contribute(
            {m: np.zeros(1, dtype=np.float32) for m in names}, dict.fromkeys(names, 0.1)
        )
        t = group.owner.threshold
        colluder, target = "m4", "m0"
        with_v, without_v = frozenset({"m0", "m1", "m4"}), frozenset({"m2", "m3", "m4"})
        seeds: dict[int, bytes] = {}
        keys: dict[int, bytes] = {}
        own = group.members[colluder]  # the colluder hands over its own shares
        seeds[5] = own._held[target].seed_share
        keys[5] = own._held[target].key_share
        for present, honest in ((with_v, ["m0", "m1"]), (without_v, ["m2", "m3"])):
            colluder_tags = {
                m: view_tag(own._secrets[m], ROUND, OWNER, colluder, m, present) for m in honest
            }
            try:
                tags = {m: group.members[m].confirm(present) for m in honest}
            except SecureAggregationError:  # (3 present are too few for t = 4)
                continue
            for m in honest:
                relayed = {s: tags[s][m] for s in honest if s != m} | {colluder: colluder_tags[m]}
                try:
                    answer = group.members[m].reveal(relayed)
                except SecureAggregationError:
                    continue
                kind, share = answer[target]
                (seeds if kind == KIND_SELF_SEED else keys)[names.index(m) + 1] = share
        assert (len(seeds) >= t and len(keys) >= t) is broken, fraction


def test_any_threshold_of_answers_is_enough() -> None:
    names = ["a", "b", "c", "d", "e"]
    group = Group(names)
    group.exchange_keys()
    xs = {m: np.full(10, 0.5, dtype=np.float32) for m in names}
    vectors = group.contribute(xs, dict.fromkeys(names, 0.2))
    group.owner.unmask_request(vectors)
    group.confirm_all()
    for m in ("a", "c", "e"):  # b and d never answer
        group.owner.add_reveal(m, group.reveal(m))
    assert group.owner.enough() and not group.owner.complete()
    total = group_sum(list(vectors.values()))
    np.subtract(total, keystream_sum(10, group.owner.correction()), out=total)
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
    """Every way a lying owner can tell each member which members are present (members
    refuse sets without them or below the threshold, so those are not sent)."""
    t = threshold(len(names))
    options = {
        m: [
            frozenset({m, *others})
            for size in range(t - 1, len(names))
            for others in itertools.combinations([k for k in names if k != m], size)
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


def lying_owner(
    group: Group, story: dict[str, frozenset[str]]
) -> tuple[set[str], set[str], list[str]]:
    """The owner tells each member its own present set and relays every tag it gets;
    returns the self-mask seeds and keys it can rebuild, and the members' refusals."""
    t = group.owner.threshold
    xs = {m: i + 1 for i, m in enumerate(group.names)}
    for member in group.members.values():  # replay the members under every story
        member.present, member.answered = None, False
    tags: dict[str, dict[str, bytes]] = {}
    refusals = []
    for m, present in story.items():
        try:
            tags[m] = group.members[m].confirm(present)
        except SecureAggregationError as exc:
            refusals.append(str(exc))
    seed_shares: dict[str, dict[int, bytes]] = {m: {} for m in group.names}
    key_shares: dict[str, dict[int, bytes]] = {m: {} for m in group.names}
    for m in tags:
        relayed = {s: sent[m] for s, sent in tags.items() if m in sent}
        try:
            answer = group.members[m].reveal(relayed)
        except SecureAggregationError as exc:
            refusals.append(str(exc))
            continue
        for k, (kind, share) in answer.items():
            (key_shares if kind == KIND_KEY else seed_shares)[k][xs[m]] = share
    seeds = {k for k, shares in seed_shares.items() if len(shares) >= t}
    keys = {k for k, shares in key_shares.items() if len(shares) >= t}
    for k in seeds:
        combine(seed_shares[k], t)  # well-formed: the owner really gets these secrets
    return seeds, keys, refusals


def honest_group(names: list[str]) -> Group:
    """Every member keyed and contributed, ready for the owner's stories."""
    group = Group(names)
    group.exchange_keys()
    group.contribute({m: np.zeros(1, dtype=np.float32) for m in names}, dict.fromkeys(names, 0.1))
    return group


@pytest.mark.parametrize("n", [2, 3, 4])
def test_a_lying_owner_learns_no_single_vector_whatever_it_tells_whom(n: int) -> None:
    """Exhaustive over every combination of present sets told to the members, for groups
    of 2, 3 and 4: the owner never rebuilds both kinds of secret of one member, and never
    isolates one member's vector (not even as a difference of readable sums)."""
    names = [f"m{i}" for i in range(n)]
    group = honest_group(names)
    for story in stories(names):
        seeds, keys, _ = lying_owner(group, story)
        assert not seeds & keys, story
        assert not isolatable(names, seeds, keys), story


def test_a_lying_owner_learns_no_single_vector_in_a_group_of_five() -> None:
    names = [f"m{i}" for i in range(5)]
    group = honest_group(names)
    every = stories(names)
    rng = np.random.default_rng(0)
    for i in rng.choice(len(every), size=1500, replace=False):
        seeds, keys, _ = lying_owner(group, every[int(i)])
        assert not seeds & keys and not isolatable(names, seeds, keys)


def test_the_old_cyclic_attack_gets_no_answer_at_all() -> None:
    """The attack the first review found against direct mask revelation, at degree 3:
    tell a that b dropped, b that c dropped, c that a dropped. Each member's present set
    is vouched for by no one else, so nobody reveals anything."""
    group = honest_group(["a", "b", "c"])
    story = {"a": frozenset("ac"), "b": frozenset("ab"), "c": frozenset("bc")}
    seeds, keys, refusals = lying_owner(group, story)
    assert seeds == keys == set()
    assert len(refusals) == 3 and all("confirm the present set" in r for r in refusals)


def test_an_owner_that_splits_the_present_set_gets_one_side_at_most() -> None:
    """Half the group is told everyone is present, the other half that a dropped: with a
    majority threshold only one side can gather enough tags."""
    names = [f"m{i}" for i in range(4)]
    group = honest_group(names)
    full, without_a = frozenset(names), frozenset(names) - {"m0"}
    story = {"m0": full, "m1": full, "m2": without_a, "m3": without_a}
    seeds, keys, refusals = lying_owner(group, story)
    assert seeds == keys == set() and len(refusals) == 4


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
    group.confirm_all()
    for m in vectors:
        answer = group.reveal(m)
        assert answer["b"][0] == KIND_KEY and all(
            kind == KIND_SELF_SEED for k, (kind, _) in answer.items() if k != "b"
        )
        group.owner.add_reveal(m, answer)
    group.owner.correction()  # the rebuilt key matches b's public key
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
        b.confirm(frozenset(names))  # not contributed yet
    b.contributed = True
    with pytest.raises(SecureAggregationError, match="no present set confirmed"):
        b.reveal({})
    for present, problem in (
        ({"a", "c", "d"}, "leaves us out"),
        ({"a", "b", "zed"}, "did not mask with"),
        ({"a", "b"}, "only 2 members would be present, 3 needed"),
    ):
        with pytest.raises(SecureAggregationError, match=problem):
            b.confirm(frozenset(present))
    present = frozenset({"a", "b", "c"})
    group.members["a"].contributed = group.members["c"].contributed = True
    b.confirm(present)
    with pytest.raises(SecureAggregationError, match="already confirmed"):
        b.confirm(frozenset(names))
    tag_a = group.members["a"].confirm(present)["b"]
    tag_c = group.members["c"].confirm(present)["b"]
    with pytest.raises(SecureAggregationError, match="only 1 members confirm the present set"):
        b.reveal({"a": bytes(32), "c": bytes(32)})
    with pytest.raises(SecureAggregationError, match="only 2 members confirm"):
        b.reveal({"a": tag_a, "d": tag_c})  # d is not present; its tag does not count
    answer = b.reveal({"a": tag_a, "c": tag_c})
    assert answer["d"][0] == KIND_KEY and answer["a"][0] == KIND_SELF_SEED
    with pytest.raises(SecureAggregationError, match="already answered"):
        b.reveal({"a": tag_a, "c": tag_c})


def test_the_owner_refuses_malformed_keys_confirms_and_reveals() -> None:
    names = ["a", "b", "c"]
    group = Group(names)
    a = group.members["a"]
    with pytest.raises(SecureAggregationError, match="one box for every other member"):
        group.owner.add_keys("a", a.public, {"b": a.boxes["b"]})
    with pytest.raises(SecureAggregationError, match="not in this round's group"):
        group.owner.add_keys("zed", a.public, a.boxes)
    group.owner.add_keys("a", a.public, a.boxes)
    group.owner.add_keys("a", a.public, a.boxes)  # resent after a reconnect: ignored
    with pytest.raises(SecureAggregationError, match="second KEYS"):
        group.owner.add_keys("a", bytes(31) + b"\x09", a.boxes)
    group.owner._boxes.clear()
    group.owner.publics.clear()
    group.exchange_keys()
    group.owner.add_keys("a", a.public, a.boxes)  # even after the shares went out
    with pytest.raises(SecureAggregationError, match="second KEYS"):
        group.owner.add_keys("a", bytes(31) + b"\x09", a.boxes)
    vectors = group.contribute(
        {m: np.zeros(4, dtype=np.float32) for m in names}, dict.fromkeys(names, 0.2)
    )
    with pytest.raises(SecureAggregationError, match="not asked"):
        group.owner.add_confirm("a", {})
    group.owner.unmask_request({"a": vectors["a"], "b": vectors["b"]})
    with pytest.raises(SecureAggregationError, match="not asked"):
        group.owner.add_confirm("c", {})
    with pytest.raises(SecureAggregationError, match="not present"):
        group.owner.add_confirm("a", {"c": bytes(32)})
    with pytest.raises(SecureAggregationError, match="unrequested"):
        group.owner.add_reveal("a", {})
    group.confirm_all()
    with pytest.raises(SecureAggregationError, match="second CONFIRM"):
        group.owner.add_confirm("a", {})
    honest = group.reveal("a")
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


def unmasked_with(names: list[str], present: list[str], alter: tuple[str, str]) -> Group:
    """Everyone in ``present`` reveals, but member ``alter[0]``'s share of ``alter[1]``'s
    secret is altered on the way."""
    group = Group(names)
    group.exchange_keys()
    vectors = group.contribute(
        {m: np.zeros(4, dtype=np.float32) for m in present}, dict.fromkeys(names, 0.2)
    )
    group.owner.unmask_request(vectors)
    group.confirm_all()
    for m in present:
        answer = group.reveal(m)
        if m == alter[0]:
            kind, share = answer[alter[1]]
            answer[alter[1]] = (kind, share[:-1] + bytes([share[-1] ^ 1]))
        group.owner.add_reveal(m, answer)
    return group


def test_a_wrong_share_is_caught() -> None:
    """A wrong share of a dropped member's key is caught by its public key even at exactly
    the threshold; with one answer more than the threshold, any wrong share is caught."""
    at_threshold = unmasked_with(["a", "b", "c", "d"], ["a", "b", "c"], ("c", "d"))
    with pytest.raises(SecureAggregationError, match=r"does not match|no 32-byte secret"):
        at_threshold.owner.correction()
    one_more = unmasked_with(["a", "b", "c", "d"], ["a", "b", "c", "d"], ("d", "a"))
    with pytest.raises(SecureAggregationError, match="inconsistent"):
        one_more.owner.correction()


def test_a_wrong_seed_share_at_the_threshold_gives_an_average_out_of_range() -> None:
    """Exactly t answers leave nothing to check a self-mask seed share against: the
    decoded 'average' is ring noise, which the range check catches (the node then keeps
    its own model); the honest average passes it."""
    names = ["a", "b", "c", "d"]
    for alter, plausible in ((("c", "a"), False), (("c", "zzz"), True)):
        group = Group(names)
        group.exchange_keys()
        xs = {m: np.full(1000, 0.5, dtype=np.float32) for m in names}
        vectors = group.contribute(xs, dict.fromkeys(names, 0.2))
        group.owner.unmask_request(vectors)
        group.confirm_all()
        for m in ("a", "b", "c"):  # exactly the threshold
            answer = group.reveal(m)
            if m == alter[0] and alter[1] in answer:
                kind, share = answer[alter[1]]
                answer[alter[1]] = (kind, share[:-1] + bytes([share[-1] ^ 1]))
            group.owner.add_reveal(m, answer)
        average, _ = unmask_average(
            [vectors[m] for m in names], group.owner.correction(), xs["a"], 0.2, 1.0, FIXED
        )
        assert within_clip(average, FIXED, 5, 1.0) is plausible


def test_a_low_order_ephemeral_key_is_refused_by_the_owner() -> None:
    group = Group(["a", "b", "c"])
    with pytest.raises(SecureAggregationError, match="low-order"):
        group.owner.add_keys("a", bytes(32), group.members["a"].boxes)


@pytest.mark.parametrize("n", [5, 7, 9])
def test_an_owner_that_shrinks_one_members_key_set_gets_nothing(n: int) -> None:
    """The second review's attack (it read j's vector for n = 5 and 7 or more before the
    present-set tags): the owner gives target j the boxes of only t - 1 partners S, so j
    masks with S alone, and wants b_j plus every key of S. That needs a present set with
    j and without S: j will not confirm it (it names members j did not mask with), and
    without j too few members are left to vouch for it."""
    names = [f"m{i:02d}" for i in range(n)]
    group = Group(names)
    members, owner = group.members, group.owner
    for m in names:
        owner.add_keys(m, members[m].public, members[m].boxes)
    honest = owner.dispatch()
    t = owner.threshold
    j, partners = names[0], names[1:t]
    members[j].accept_shares({k: honest[j][k] for k in partners})
    for m in names[1:]:
        members[m].accept_shares(honest[m])
    group.contribute({m: np.zeros(8, dtype=np.float32) for m in names}, dict.fromkeys(names, 0.2))
    wanted = frozenset(names) - set(partners)
    seeds, keys, refusals = lying_owner(group, dict.fromkeys(names, wanted))
    assert not ({j} <= seeds and set(partners) <= keys)
    assert seeds == keys == set()
    assert any("did not mask with" in r for r in refusals)


class SeededRandomness:
    """A deterministic stand-in for ``secrets`` (tests only: it is not a secret source)."""

    def __init__(self, seed: int) -> None:
        import random

        self._random = random.Random(seed)
        self.calls = 0

    def token_bytes(self, nbytes: int) -> bytes:
        self.calls += 1
        return self._random.randbytes(nbytes)

    def randbelow(self, exclusive_upper_bound: int) -> int:
        self.calls += 1
        return self._random.randrange(exclusive_upper_bound)


def test_a_members_secrets_come_only_from_the_randomness_it_is_given() -> None:
    """The protocol is pure: the same source gives the same keys, boxes and shares, so a
    round can be replayed exactly; the default source is the OS's (``secrets``)."""
    names = ["a", "b", "c", "d"]
    secrets = secrets_for(names)

    def member(rng: SeededRandomness) -> MemberRound:
        return MemberRound("a", OWNER, names, ROUND, secrets["a"], rng=rng)

    first, again = SeededRandomness(1), SeededRandomness(1)
    one, two = member(first), member(again)
    assert first.calls > 0
    assert one.public == two.public and one.boxes == two.boxes
    other = member(SeededRandomness(2))
    assert other.public != one.public and other.boxes != one.boxes
    default = MemberRound("a", OWNER, names, ROUND, secrets["a"])
    assert default.public not in (one.public, other.public)
