"""The round state machine and aggregation, without sockets."""

from __future__ import annotations

import numpy as np
import pytest

from p2pfl.core.aggregate import metropolis_average
from p2pfl.core.rounds import RoundTracker, may_send

NEIGHBOURS = frozenset({"b", "c"})


def tracker(**kw: int) -> RoundTracker:
    return RoundTracker(
        total_rounds=kw.get("total", 10),
        neighbours_of=lambda r: NEIGHBOURS,
        max_buffered_rounds=kw.get("buffer", 2),
        start_round=kw.get("start", 0),
    )


def vec(value: float) -> np.ndarray:
    return np.full(4, value, dtype=np.float32)


def test_collect_until_all_neighbours_delivered() -> None:
    t = tracker()
    t.start_round(0)
    t.start_collecting(now=0.0, timeout=5.0)
    assert not t.collection_done(1.0)
    assert t.deliver("b", 0, vec(1)).keep
    assert not t.collection_done(1.0)
    assert t.deliver("c", 0, vec(2)).keep
    assert t.collection_done(1.0)
    assert set(t.take_received()) == {"b", "c"}


def test_deadline_ends_collection() -> None:
    t = tracker()
    t.start_collecting(now=10.0, timeout=5.0)
    t.deliver("b", 0, vec(1))
    assert not t.collection_done(14.9)
    assert t.collection_done(15.0)
    assert t.missing() == {"c"}


def test_neighbour_already_past_this_round_is_not_waited_for() -> None:
    t = tracker()
    t.start_round(3)
    t.start_collecting(now=0.0, timeout=100.0)
    t.deliver("b", 3, vec(1))
    t.note_peer_round("c", 4)
    assert t.collection_done(0.1)


def test_disconnected_neighbour_is_waited_for_only_during_its_grace() -> None:
    t = RoundTracker(
        total_rounds=10, neighbours_of=lambda r: NEIGHBOURS, max_buffered_rounds=2, down_grace=2.0
    )
    t.start_collecting(now=0.0, timeout=100.0)
    t.deliver("b", 0, vec(1))
    t.mark_down("c", now=1.0)
    t.mark_down("c", now=1.5)  # the first loss counts
    assert t.waiting_for(2.9) == {"c"}
    assert t.next_wakeup(2.9) == 3.0  # the grace ends before the deadline
    assert not t.collection_done(2.9)
    assert t.collection_done(3.0)
    assert t.next_wakeup(3.0) == 100.0


def test_reconnected_neighbour_is_waited_for_again() -> None:
    t = RoundTracker(
        total_rounds=10, neighbours_of=lambda r: NEIGHBOURS, max_buffered_rounds=2, down_grace=2.0
    )
    t.start_collecting(now=0.0, timeout=100.0)
    t.mark_down("c", now=0.0)
    t.mark_up("c")
    assert t.waiting_for(50.0) == {"b", "c"}
    assert t.next_wakeup(50.0) == 100.0
    assert not t.collection_done(50.0)


@pytest.mark.parametrize(
    ("peer", "round_index", "reason"),
    [
        ("b", 1, "past round"),
        ("b", 5, "too far ahead"),
        ("z", 2, "not a neighbour"),
        ("b", 10, "beyond the last round"),
    ],
)
def test_judge_rejects(peer: str, round_index: int, reason: str) -> None:
    t = tracker()
    t.start_round(2)
    verdict = t.judge(peer, round_index)
    assert not verdict.keep and reason in verdict.reason


def test_future_rounds_buffered_then_used_and_duplicates_dropped() -> None:
    t = tracker()
    t.start_round(2)
    assert t.deliver("b", 4, vec(4)).keep
    assert "duplicate" in t.deliver("b", 4, vec(4)).reason
    assert t.buffered_rounds() == [4]
    t.start_round(4)
    t.start_collecting(0.0, 1.0)
    assert t.waiting_for(0.0) == {"c"}


def test_a_peers_claim_does_not_widen_the_buffer_window() -> None:
    """Otherwise a neighbour claiming a late round could make us hold one model per round."""
    t = tracker(start=2)
    t.start_round(2)
    t.note_peer_round("b", 7)
    assert "too far ahead" in t.judge("b", 7).reason


def test_next_round_follows_the_neighbours_majority() -> None:
    t = tracker(total=10)
    t.start_round(2)
    assert t.next_round() == 3
    t.note_peer_round("b", 6)  # one neighbour alone cannot make us skip rounds
    t.note_peer_round("c", 2)
    assert t.next_round() == 3
    t.note_peer_round("c", 6)  # both are ahead (we restarted): jump to them
    assert t.next_round() == 6
    t.note_peer_round("b", 10**6)
    t.note_peer_round("c", 10**6)  # claims are capped at the last round
    assert t.next_round() == 10


def test_a_finished_neighbour_is_not_forgotten_when_it_leaves() -> None:
    """It will never send again: nobody should wait a round_timeout for it."""
    t = tracker(total=10)
    t.start_round(8)
    t.note_peer_round("b", 10)
    t.forget_peer("b")
    t.start_collecting(0.0, 100.0)
    assert t.waiting_for(0.0) == {"c"}


def test_non_neighbours_and_disconnected_peers_do_not_count() -> None:
    t = tracker()
    t.start_round(1)
    t.note_peer_round("z", 8)
    assert t.consensus_round() == 0
    t.note_peer_round("b", 5)
    t.note_peer_round("c", 5)
    assert t.next_round() == 5
    t.forget_peer("b")
    t.forget_peer("c")
    assert t.next_round() == 2


def test_starting_a_round_releases_older_buffers() -> None:
    t = tracker()
    t.deliver("b", 1, vec(1))
    t.deliver("b", 2, vec(2))
    t.start_round(2)
    assert t.buffered_rounds() == [2]


def test_metropolis_average_renormalises_over_present() -> None:
    weights = {"a": 0.5, "b": 0.25, "c": 0.25}
    out, used = metropolis_average("a", vec(0), {"b": vec(4), "c": vec(8)}, weights)
    np.testing.assert_allclose(out, vec(3))
    out, used = metropolis_average("a", vec(0), {"b": vec(3)}, weights)
    assert used == pytest.approx({"a": 2 / 3, "b": 1 / 3})
    np.testing.assert_allclose(out, vec(1))


def test_gossip_averaging_reaches_the_global_mean() -> None:
    """Metropolis weights are doubly stochastic: repeated mixing converges to the true mean,
    even on an irregular graph where a plain neighbour mean would be biased."""
    graph = {"a": {"b"}, "b": {"a", "c", "d"}, "c": {"b", "d"}, "d": {"b", "c"}}
    deg = {k: len(v) for k, v in graph.items()}
    values = {"a": 0.0, "b": 10.0, "c": 20.0, "d": 50.0}
    target = np.mean(list(values.values()))
    x = {k: vec(v) for k, v in values.items()}
    for _ in range(100):
        new = {}
        for i in graph:
            w = {j: 1 / (1 + max(deg[i], deg[j])) for j in graph[i]}
            w[i] = 1 - sum(w.values())
            new[i], _ = metropolis_average(i, x[i].copy(), {j: x[j].copy() for j in graph[i]}, w)
        x = new
    for v in x.values():
        np.testing.assert_allclose(v, vec(target), rtol=1e-4)


def test_a_vector_arriving_after_the_round_was_aggregated_is_refused() -> None:
    """Once the members of a round are fixed (a missing one declared so), its late vector is
    discarded with a reason, not buffered."""
    t = tracker()
    t.start_round(0)
    t.deliver("b", 0, vec(1))
    assert set(t.take_received()) == {"b"}
    late = t.deliver("c", 0, vec(2))
    assert not late.keep and "after its members were fixed" in late.reason


@pytest.mark.parametrize(
    ("announced", "sent_round", "due"),
    [
        (None, None, False),  # the neighbour has not said where it is on this link
        (5, None, True),  # at our round
        (3, None, True),  # two behind: it buffers two rounds ahead
        (2, None, False),  # three behind: it would drop them
        (6, None, False),  # ahead of us: our round is past for it
        (5, 5, False),  # already sent on this link
        (5, 4, True),  # the last round's went out; this one not yet
    ],
)
def test_parameters_go_out_once_when_the_neighbour_can_keep_them(
    announced: int | None, sent_round: int | None, due: bool
) -> None:
    assert may_send(5, announced, sent_round, max_buffered_rounds=2) is due


def test_startup_waits_for_connected_neighbours_with_a_known_round() -> None:
    t = tracker()
    neighbours = frozenset({"b", "c"})
    assert t.not_ready(neighbours, {"b"}, resumed=False, now=0.0) == ["b", "c"]
    t.note_peer_round("b", 0)
    assert t.not_ready(neighbours, {"b"}, resumed=False, now=0.0) == ["c"]
    t.note_peer_round("c", 0)
    assert t.not_ready(neighbours, {"b", "c"}, resumed=False, now=0.0) == []


def test_a_resuming_node_stops_waiting_for_a_neighbour_down_past_its_grace() -> None:
    t = tracker()
    t.down_grace = 2.0
    neighbours = frozenset({"b", "c"})
    t.note_peer_round("b", 4)
    t.mark_down("c", 10.0)
    # A fresh node waits for c until the start-up deadline; a resuming one until c's grace.
    assert t.not_ready(neighbours, {"b"}, resumed=False, now=13.0) == ["c"]
    assert t.startup_wakeup(["c"], resumed=False, deadline=60.0) == 60.0
    assert t.not_ready(neighbours, {"b"}, resumed=True, now=11.0) == ["c"]
    assert t.startup_wakeup(["c"], resumed=True, deadline=60.0) == 12.0
    assert t.not_ready(neighbours, {"b"}, resumed=True, now=12.0) == []


def test_the_buffering_window_is_one_rule_for_streams_keys_and_owners() -> None:
    from p2pfl.core.rounds import announced_keeps

    # a neighbour at round 3 keeps what we send for rounds 3..3+max_buffered_rounds
    assert [r for r in range(8) if announced_keeps(r, 3, 2)] == [3, 4, 5]
    assert may_send(5, 3, None, 2) and not may_send(6, 3, None, 2)
    t = tracker()
    t.start_round(2)
    assert t.horizon == 2 + t.max_buffered_rounds
    assert [r for r in range(8) if t.in_window(r)] == list(range(2, t.horizon + 1))
    assert "too far ahead" in t.judge("b", t.horizon + 1).reason
