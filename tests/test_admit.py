"""Who becomes a link (p2pfl.proto.admit), decided without sockets."""

from __future__ import annotations

import itertools

import pytest

from p2pfl.errors import DigestMismatch, HandshakeError
from p2pfl.proto.admit import (
    MAX_NAMED_FIELDS,
    confirm_keys,
    differing_fields,
    is_canonical,
    judge_hello,
    judge_reply,
    keeps_old_link,
)
from p2pfl.proto.wire import (
    PROTOCOL_VERSION,
    REPLY_DIGEST_MISMATCH,
    REPLY_OK,
    Hello,
    ParamsBegin,
    Reply,
    Status,
)

ALICE, BOB, MALLORY = b"a" * 32, b"b" * 32, b"m" * 32
ROSTER = {ALICE: "alice", BOB: "bob"}
DIGEST, OTHER = b"d" * 32, b"e" * 32


def hello(peer_id: str = "bob", digest: bytes = DIGEST) -> Hello:
    return Hello(PROTOCOL_VERSION, digest, peer_id)


def judge(h: Hello, key: bytes) -> int:
    return judge_hello(h, key, roster=ROSTER, own_id="alice", digest=DIGEST).reply


def test_a_roster_peer_with_our_config_is_answered_ok() -> None:
    verdict = judge_hello(hello(), BOB, roster=ROSTER, own_id="alice", digest=DIGEST)
    assert (verdict.peer_id, verdict.reply) == ("bob", REPLY_OK)
    verdict.fail_if_mismatch(DIGEST, DIGEST)


def test_an_unknown_key_gets_no_answer_and_its_fingerprint_is_named() -> None:
    with pytest.raises(HandshakeError, match=r"unknown public key bW1tbW1tbW1t"):
        judge(hello(), MALLORY)


def test_a_known_key_with_another_id_gets_no_answer() -> None:
    with pytest.raises(HandshakeError, match="key of 'bob' presented with id 'carol'"):
        judge(hello("carol"), BOB)


def test_our_own_key_gets_no_answer() -> None:
    with pytest.raises(HandshakeError, match="our own key"):
        judge(hello("alice"), ALICE)


def test_another_config_is_answered_with_a_mismatch_then_refused() -> None:
    verdict = judge_hello(hello(digest=OTHER), BOB, roster=ROSTER, own_id="alice", digest=DIGEST)
    assert verdict.reply == REPLY_DIGEST_MISMATCH
    with pytest.raises(
        DigestMismatch, match=f"ours {DIGEST.hex()[:16]}, theirs {OTHER.hex()[:16]}"
    ):
        verdict.fail_if_mismatch(DIGEST, OTHER)


@pytest.mark.parametrize(
    "reply",
    [
        Reply(PROTOCOL_VERSION, REPLY_DIGEST_MISMATCH, OTHER),
        Reply(PROTOCOL_VERSION, REPLY_DIGEST_MISMATCH, DIGEST),  # says mismatch, sends ours
        Reply(PROTOCOL_VERSION, REPLY_OK, OTHER),  # says OK, runs another config
    ],
)
def test_the_initiator_refuses_any_reply_but_ok_with_our_digest(reply: Reply) -> None:
    with pytest.raises(DigestMismatch):
        judge_reply(reply, DIGEST)
    judge_reply(Reply(PROTOCOL_VERSION, REPLY_OK, DIGEST), DIGEST)


def test_key_confirmation_needs_a_status_first() -> None:
    status = Status(3, 0)
    assert confirm_keys("bob", status) is status
    with pytest.raises(HandshakeError, match="bob did not open with STATUS"):
        confirm_keys("bob", ParamsBegin(3, 0, 40, 1))


def test_the_smaller_id_dials_the_canonical_link() -> None:
    assert is_canonical("alice", "bob", initiator=True)
    assert not is_canonical("alice", "bob", initiator=False)
    assert is_canonical("bob", "alice", initiator=False)


def test_crossing_links_both_ends_keep_the_same_one() -> None:
    """alice dials bob while bob announces himself: two links, one from each end. Each
    end judges the link that arrived second against the first; both must keep the link
    alice dialled, whichever order they saw them in."""
    for alice_first, bob_first in itertools.product([True, False], repeat=2):
        kept = []
        # a link is named by who initiated it: "alice" (canonical) or "bob"
        for own, peer, first_is_alice in (
            ("alice", "bob", alice_first),
            ("bob", "alice", bob_first),
        ):
            old, new = ("alice", "bob") if first_is_alice else ("bob", "alice")
            keep_old = keeps_old_link(
                own,
                peer,
                old_initiator=old == own,
                new_initiator=new == own,
                old_age=0.01,
                handshake_timeout=5.0,
            )
            kept.append(old if keep_old else new)
        assert kept == ["alice", "alice"], (alice_first, bob_first)


def test_a_stale_link_gives_way_to_a_new_one() -> None:
    """The peer restarted: its new link replaces ours even if ours was the canonical one."""
    args = {"old_initiator": True, "new_initiator": False, "handshake_timeout": 5.0}
    assert keeps_old_link("alice", "bob", old_age=0.5, **args)
    assert not keeps_old_link("alice", "bob", old_age=5.0, **args)
    # a new canonical link always replaces the old one
    assert not keeps_old_link(
        "alice", "bob", old_initiator=False, new_initiator=True, old_age=0.1, handshake_timeout=5
    )


def test_a_mismatch_names_the_fields_that_differ() -> None:
    ours = {"seed": b"1" * 8, "training.rounds": b"2" * 8, "peers.dave": b"3" * 8}
    theirs = {"seed": b"1" * 8, "training.rounds": b"9" * 8, "peers.erin": b"4" * 8}
    with pytest.raises(DigestMismatch) as info:
        judge_reply(Reply(PROTOCOL_VERSION, REPLY_DIGEST_MISMATCH, OTHER, theirs), DIGEST, ours)
    assert info.value.fields == (
        "training.rounds",
        "peers.erin (only theirs)",
        "peers.dave (only ours)",
    )
    assert "peers.yaml differs in training.rounds, peers.erin (only theirs)" in str(info.value)


def test_a_cut_field_list_does_not_blame_what_it_left_out() -> None:
    ours = {"seed": b"1" * 8, "peers.dave": b"3" * 8}
    assert differing_fields(ours, {"seed": b"2" * 8}, truncated=True) == ("seed",)


def test_a_long_list_of_differences_is_shortened() -> None:
    ours = {f"f{i:02d}": b"1" * 8 for i in range(20)}
    theirs = {f"f{i:02d}": b"2" * 8 for i in range(20)}
    named = differing_fields(ours, theirs)
    assert len(named) == MAX_NAMED_FIELDS + 1 and named[-1] == "and 8 more"


def test_field_digests_change_only_where_the_config_does() -> None:
    from p2pfl.config.schema import field_digests

    shared = {
        "seed": 3,
        "peers": {"alice": {"address": "ws://a"}, "bob": {"address": "ws://b"}},
        "training": {"rounds": 5, "learning_rate": 0.1, "model": {"kind": "mlp"}},
    }
    before = field_digests(shared)
    assert list(before) == [
        "seed",
        "training.learning_rate",
        "training.model",
        "training.rounds",
        "peers.alice",
        "peers.bob",
    ]
    shared["training"]["learning_rate"] = 0.2
    after = field_digests(shared)
    assert [k for k in before if before[k] != after[k]] == ["training.learning_rate"]
