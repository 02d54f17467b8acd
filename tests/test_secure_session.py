"""Secure aggregation's decisions across rounds (``p2pfl.secure.session``), sans I/O: one
test (or a few) per rule of the session's docstring, with no event loop, no sockets and
seeded randomness. A ``Cluster`` of sessions passes their messages to each other by hand."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import pytest

from p2pfl.core.clock import LamportClock
from p2pfl.core.liveness import DetectorSettings, Liveness
from p2pfl.core.rounds import RoundTracker
from p2pfl.proto.wire import Confirm, Keys, Present, Reveal, Shares, Unmask
from p2pfl.secure.arithmetic import FixedPoint, sum_contributions, unmask_sum
from p2pfl.secure.group import MemberRound
from p2pfl.secure.session import (
    Contribute,
    Event,
    MakeMask,
    SecureMessage,
    SecureSession,
    Settings,
)

from .test_secure_group import SeededRandomness, secrets_for

PEERS = ("alice", "bob", "carol", "dave")
GRAPH = {p: frozenset(PEERS) - {p} for p in PEERS}
SETTINGS = Settings(
    rounds=10, max_buffered_rounds=2, threshold=0.5, round_timeout=10.0, recovery_timeout=3.0
)
FIXED = FixedPoint(clip=64.0, frac_bits=20)
SIZE = 50
GRACE = 1.0


class Cluster:
    """Four sessions, full graph, all linked: what one sends is handed to the other by
    ``deliver``; masks are made and vectors encoded on the spot."""

    def __init__(self, settings: Settings = SETTINGS, *, restart_through: int = -1) -> None:
        pair = secrets_for(list(PEERS))
        self.trackers = {
            p: RoundTracker(
                total_rounds=settings.rounds,
                neighbours_of=lambda r, p=p: GRAPH[p],
                max_buffered_rounds=settings.max_buffered_rounds,
                down_grace=GRACE,
                liveness=Liveness(DetectorSettings()),
            )
            for p in PEERS
        }
        self.sessions = {
            p: SecureSession(
                p,
                settings,
                tracker=self.trackers[p],
                graph=lambda r: GRAPH,
                clock=LamportClock(),
                pair_secret=pair[p].__getitem__,
                restart_through=restart_through if p == "alice" else -1,
                rng=SeededRandomness(i),
            )
            for i, p in enumerate(PEERS)
        }
        for p, session in self.sessions.items():
            for q in PEERS:
                if q != p:
                    session.link_up(q)
        #: Messages on their way: (sender, recipient, message).
        self.wire: list[tuple[str, str, SecureMessage]] = []
        self.events: dict[str, list[Event]] = {p: [] for p in PEERS}
        self.jobs: dict[str, list[MakeMask | Contribute]] = {p: [] for p in PEERS}
        #: Each owner's received vectors, per round.
        self.vectors: dict[tuple[str, int], dict[str, np.ndarray]] = {}
        self.params = {
            p: np.linspace(-1, 1, SIZE, dtype=np.float32) * (i + 1) for i, p in enumerate(PEERS)
        }

    def drain(self, peers: Iterable[str] = PEERS) -> None:
        for p in peers:
            session = self.sessions[p]
            self.wire += [(p, q, m) for q, m in session.data_to_send()]
            self.events[p] += session.events_to_log()
            self.jobs[p] += session.jobs_to_run()

    def start(self, r: int, peers: Iterable[str] = PEERS) -> None:
        for p in peers:
            self.trackers[p].start_round(r)
            session = self.sessions[p]
            session.start_round(r, session.rounds_to_join(r))
            for q in PEERS:
                if q != p:
                    session.offer_keys(q, r)
        self.drain()

    def deliver(self, now: float = 0.0, kinds: type | tuple[type, ...] = object) -> None:
        """Hand every message of the given kinds to its recipient, until none is left on
        the wire (the others stay there)."""
        held: list[tuple[str, str, SecureMessage]] = []
        while self.wire:
            sender, recipient, msg = self.wire.pop(0)
            if isinstance(msg, kinds):
                self.sessions[recipient].receive(sender, msg, now)
                self.drain([recipient])
            else:
                held.append((sender, recipient, msg))
        self.wire = held

    def run_jobs(self, peer: str) -> None:
        """Make the masks, encode the contributions, hand the vectors to their owners."""
        session = self.sessions[peer]
        masks: dict[tuple[int, str], np.ndarray] = {}
        while self.jobs[peer]:
            job = self.jobs[peer].pop(0)
            if isinstance(job, MakeMask):
                key = (job.member.round, job.member.owner)
                masks[key] = job.member.mask(SIZE)
                session.mask_made(*key)
            else:
                targets = {o: masks.pop((job.round, o)) for o in job.weights}
                FIXED.encode_add_many(
                    self.params[peer], [(job.weights[o], targets[o]) for o in targets]
                )
                for owner in session.contributed(job.round, targets):
                    self.vectors.setdefault((owner, job.round), {})[peer] = targets[owner]
            self.drain([peer])

    def masks_made(self, peer: str) -> list[tuple[int, str]]:
        return [
            (j.member.round, j.member.owner) for j in self.jobs[peer] if isinstance(j, MakeMask)
        ]


def keyed(peer: str) -> tuple[Cluster, SecureSession]:
    """Round 0 started and every key exchange done; ``peer``'s session."""
    cluster = Cluster()
    cluster.start(0)
    cluster.deliver()
    return cluster, cluster.sessions[peer]


def sent(cluster: Cluster, kind: type, sender: str | None = None) -> list[tuple[str, str, int]]:
    return [
        (s, r, m.round)
        for s, r, m in cluster.wire
        if isinstance(m, kind) and (sender is None or s == sender)
    ]


def last_reject(cluster: Cluster, peer: str) -> str:
    rejects = [e for e in cluster.events[peer] if e.kind == "reject"]
    assert rejects, "nothing was refused"
    return str(rejects[-1].fields["reason"])


# --- rule 1: joining ---------------------------------------------------------------------


def test_a_round_and_the_next_are_joined_once_each_and_only_once_journalled() -> None:
    session = Cluster().sessions["bob"]
    assert session.rounds_to_join(0) == [0, 1]
    session.start_round(0, [0, 1])
    assert {k[0] for k in session.members} == {0, 1}
    assert session.rounds_to_join(1) == [2]  # round 1 is joined already
    public = session.members[(1, "alice")].public
    session.start_round(1, [2])
    assert session.members[(1, "alice")].public == public  # the same secrets, not new ones
    assert session.rounds_to_join(SETTINGS.rounds - 1) == [
        SETTINGS.rounds - 1
    ]  # no round after the last


def test_without_buffered_rounds_no_round_is_joined_ahead() -> None:
    """The no-keys-ahead guard: with max_buffered_rounds 0 a neighbour would refuse next
    round's KEYS (it keeps nothing ahead), so none are drawn or sent."""
    cluster = Cluster(Settings(10, 0, 0.5, 10.0, 3.0))
    cluster.start(0)
    session = cluster.sessions["bob"]
    assert session.rounds_to_join(0) == []
    assert {k[0] for k in session.members} == {0}
    assert {r for _, _, r in sent(cluster, Keys)} == {0}


def test_a_round_not_journalled_is_sat_out_and_the_next_not_joined_ahead() -> None:
    cluster = Cluster()
    bob, tracker = cluster.sessions["bob"], cluster.trackers["bob"]
    tracker.start_round(0)
    bob.start_round(0, journalled=[])  # the journal could not be written for round 0
    assert bob.sits_out(0) and not bob.members
    assert tracker.excluded == GRAPH["bob"]  # nobody is waited for
    assert bob.rounds_to_join(1) == [1, 2]  # round 1 was never journalled: it may be joined
    tracker.start_round(1)
    bob.start_round(1, journalled=[1])  # ... and round 2's line failed
    assert not bob.sits_out(1) and bob.sits_out(2)
    assert {k[0] for k in bob.members} == {1}


def test_a_restarted_node_sits_out_its_journalled_rounds_as_member_and_owner() -> None:
    """alice crashed in round 0 after joining round 1 ahead (journal: contributed 1): round
    1 KEYS that reach her in round 0 get an empty SHARES, not a key exchange she would
    never finish (her earlier life may have sent other SHARES for round 1)."""
    cluster = Cluster(restart_through=1)
    alice = cluster.sessions["alice"]
    assert alice.rounds_to_join(0) == [] and alice.rounds_to_join(1) == []
    assert alice.rounds_to_join(2) == [2, 3]
    cluster.start(0)
    assert not alice.members and cluster.trackers["alice"].excluded == GRAPH["alice"]
    assert not sent(cluster, Keys, "alice")
    cluster.deliver(kinds=Keys)
    assert 1 not in alice.owners and 0 not in alice.owners
    empty = [(s, r, m.round) for s, r, m in cluster.wire if s == "alice" and not m.boxes]
    assert sorted(empty) == sorted(("alice", p, r) for p in GRAPH["alice"] for r in (0, 1))
    assert "we sit round 1 out" in last_reject(cluster, "alice")


# --- rule 2: keys go ahead only as far as they are kept -----------------------------------


@pytest.mark.parametrize(
    ("announced", "rounds"),
    [(None, []), (3, [3, 4]), (2, [3, 4]), (1, [3]), (0, []), (4, [4])],
)
def test_keys_go_out_only_for_rounds_the_neighbour_keeps(
    announced: int | None, rounds: list[int]
) -> None:
    """At round 3 with a window of 2: a neighbour that announced round a keeps round r's
    KEYS when r - 2 <= a <= r."""
    cluster = Cluster()
    bob = cluster.sessions["bob"]
    cluster.trackers["bob"].start_round(3)
    bob.start_round(3, bob.rounds_to_join(3))
    bob.offer_keys("alice", announced)
    assert [m.round for _, m in bob.data_to_send()] == rounds


def test_keys_go_once_per_link_and_again_on_a_new_link() -> None:
    cluster = Cluster()
    bob = cluster.sessions["bob"]
    cluster.trackers["bob"].start_round(0)
    bob.start_round(0, bob.rounds_to_join(0))
    bob.offer_keys("alice", 0)
    first = bob.data_to_send()
    assert [m.round for _, m in first] == [0, 1]
    bob.offer_keys("alice", 0)
    assert bob.data_to_send() == []
    bob.link_up("alice")  # a reconnect: what went out on the old link may be lost
    bob.offer_keys("alice", 0)
    again = bob.data_to_send()
    assert [(m.round, m.public) for _, m in again] == [(m.round, m.public) for _, m in first]  # type: ignore[union-attr]
    bob.link_down("alice")
    bob.offer_keys("alice", 0)
    assert bob.data_to_send() == []  # no link, nothing to send on


# --- rule 3: owning ----------------------------------------------------------------------


def test_keys_outside_the_buffering_window_are_refused() -> None:
    cluster = Cluster()
    cluster.start(0)
    alice = cluster.sessions["alice"]
    member = MemberRound("bob", "alice", GRAPH["alice"], 3, secrets_for(list(PEERS))["bob"])
    alice.receive("bob", Keys(1, 3, member.public, member.boxes), 0.0)
    assert "KEYS for round 3 outside rounds 0..2" in last_reject_of(alice)
    assert 3 not in alice.owners and alice.data_to_send() == []


def test_shares_go_out_once_every_member_sent_keys() -> None:
    cluster = Cluster()
    cluster.start(0)
    cluster.deliver(kinds=Keys)
    shares = sent(cluster, Shares, "alice")
    assert sorted(shares) == sorted(("alice", p, r) for p in GRAPH["alice"] for r in (0, 1))
    assert cluster.sessions["alice"].owners[0].keyed == GRAPH["alice"]


def _without_dave_keys(cluster: Cluster) -> None:
    """Round 0 under way; alice got bob's and carol's round-0 KEYS, not dave's."""
    cluster.start(0)
    cluster.wire = [
        w
        for w in cluster.wire
        if isinstance(w[2], Keys) and w[1] == "alice" and w[0] != "dave" and w[2].round == 0
    ]
    cluster.deliver()
    assert cluster.sessions["alice"].owners[0].keyed is None


def test_shares_go_out_without_a_member_half_a_round_timeout_into_collection() -> None:
    cluster = Cluster()
    _without_dave_keys(cluster)
    alice = cluster.sessions["alice"]
    alice.start_collecting(100.0)
    assert alice.next_wakeup(0, 100.0) == 100.0 + SETTINGS.round_timeout / 2
    assert not alice.collection_done(0, 104.9) and alice.owners[0].keyed is None
    alice.collection_done(0, 105.0)
    assert alice.owners[0].keyed == {"bob", "carol"}
    assert "dave" in cluster.trackers["alice"].excluded  # not waited for
    shares = [(q, m.round) for q, m in alice.data_to_send() if isinstance(m, Shares)]
    assert sorted(shares) == [("bob", 0), ("carol", 0)]


@pytest.mark.parametrize("why", ["gone", "later round", "silent"])
def test_shares_go_out_after_training_once_the_missing_will_not_send(why: str) -> None:
    """dave sent no keys and will not: his link closed for down_grace (gone), he is past
    the round, or his link went silent past the failure detector's threshold."""
    cluster = Cluster()
    _without_dave_keys(cluster)
    alice, tracker = cluster.sessions["alice"], cluster.trackers["alice"]
    alice.start_collecting(0.0)
    when = GRACE
    if why == "gone":
        tracker.mark_down("dave", 0.0)
    elif why == "silent":
        assert tracker.liveness is not None
        tracker.liveness.heard("dave", 0.0)
        alice.trained(0)
        suspect_at = tracker.gives_up_at("dave")
        assert suspect_at is not None and 0.0 < suspect_at < SETTINGS.round_timeout / 2
        assert alice.next_wakeup(0, 0.0) == suspect_at
        alice.collection_done(0, suspect_at - 0.01)
        assert alice.owners[0].keyed is None  # still waited for
        when = suspect_at
    else:
        tracker.note_peer_round("dave", 1)
    if why != "silent":
        alice.collection_done(0, when)
        assert alice.owners[0].keyed is None  # not before our own training is done
        alice.trained(0)
    alice.collection_done(0, when)
    assert alice.owners[0].keyed == {"bob", "carol"}


def test_the_same_keys_again_get_the_same_shares_and_late_keys_an_empty_one() -> None:
    """bob's link dropped as alice sent round 0's SHARES: the same KEYS on his new link
    get the same SHARES again. dave's KEYS after the SHARES went out: an empty SHARES at
    once, so he stops waiting."""
    cluster = Cluster()
    _without_dave_keys(cluster)
    alice = cluster.sessions["alice"]
    alice.start_collecting(0.0)
    alice.collection_done(0, SETTINGS.round_timeout)
    first = {q: m for q, m in alice.data_to_send() if isinstance(m, Shares)}
    bob_keys = cluster.sessions["bob"].members[(0, "alice")]
    alice.receive("bob", Keys(9, 0, bob_keys.public, bob_keys.boxes), 0.0)
    (again,) = alice.data_to_send()
    assert again[0] == "bob" and again[1].boxes == first["bob"].boxes  # type: ignore[union-attr]
    dave_keys = cluster.sessions["dave"].members[(0, "alice")]
    alice.receive("dave", Keys(9, 0, dave_keys.public, dave_keys.boxes), 0.0)
    (late,) = alice.data_to_send()
    assert late[0] == "dave" and isinstance(late[1], Shares) and late[1].boxes == {}
    assert "after the shares went out" in str(alice.events_to_log()[-1].fields["reason"])


# --- rule 4: masks -----------------------------------------------------------------------


def test_masks_start_at_shares_and_the_next_rounds_are_low_priority() -> None:
    cluster = Cluster()
    cluster.start(0)
    cluster.deliver()
    jobs = [j for j in cluster.jobs["bob"] if isinstance(j, MakeMask)]
    assert sorted((j.member.round, j.member.owner, j.ahead) for j in jobs) == sorted(
        (r, o, r == 1) for o in GRAPH["bob"] for r in (0, 1)
    )


def test_ready_masks_get_the_parameters_in_one_pass_later_ones_as_they_come() -> None:
    _cluster, bob = keyed("bob")
    bob.mask_made(0, "alice")
    bob.mask_made(0, "carol")
    assert bob.jobs_to_run() == []  # not trained yet
    bob.trained(0)
    (batch,) = bob.jobs_to_run()
    assert isinstance(batch, Contribute) and sorted(batch.weights) == ["alice", "carol"]
    assert batch.weights["alice"] == pytest.approx(1 / 4)  # Metropolis, full graph of 4
    bob.mask_made(0, "dave")
    (single,) = bob.jobs_to_run()
    assert isinstance(single, Contribute) and list(single.weights) == ["dave"]
    bob.mask_made(1, "dave")  # the next round's mask waits for the next round's training
    assert bob.jobs_to_run() == []


def test_a_contribution_whose_round_ended_meanwhile_is_dropped() -> None:
    cluster, bob = keyed("bob")
    bob.trained(0)
    bob.mask_made(0, "alice")
    assert bob.jobs_to_run()
    cluster.trackers["bob"].start_round(1)
    bob.start_round(1, bob.rounds_to_join(1))  # the round ended while we encoded
    assert bob.contributed(0, ["alice"]) == []
    bob.mask_made(0, "carol")  # a mask of a round that is over
    assert bob.jobs_to_run() == []


def test_a_late_shares_is_refused_and_starts_no_mask() -> None:
    """A SHARES for a round that already ended would start a model-sized mask nothing ever
    collects (the second review's F2)."""
    cluster = Cluster()
    cluster.start(0)
    cluster.deliver(kinds=Keys)
    old = [(s, m) for s, r, m in cluster.wire if r == "bob" and s == "alice" and m.round == 0]
    cluster.wire = []
    cluster.start(1)
    bob = cluster.sessions["bob"]
    bob.receive("alice", old[0][1], 0.0)
    assert "unrequested SHARES for round 0" in last_reject_of(bob)
    assert bob.jobs_to_run() == []


def test_a_failed_mask_is_not_waited_for() -> None:
    cluster, bob = keyed("bob")
    bob.start_collecting(0.0)
    for owner in ("alice", "carol"):
        bob.mask_made(0, owner)
    bob.trained(0)
    (job,) = bob.jobs_to_run()
    bob.contributed(0, job.weights)  # type: ignore[union-attr]
    cluster.trackers["bob"].exclude(GRAPH["bob"])  # (its own collection is not the point)
    assert not bob.collection_done(0, 0.0)  # dave's vector is still due
    bob.contribution_failed(0, "dave", "a key that does not agree")
    assert bob.collection_done(0, 0.0)


# --- rule 5: collection ------------------------------------------------------------------


@pytest.mark.parametrize("why", ["gone", "later round", "silent"])
def test_collection_waits_for_our_own_vectors_while_their_owners_may_take_them(why: str) -> None:
    cluster = Cluster()
    cluster.start(0)
    cluster.deliver()
    bob, tracker = cluster.sessions["bob"], cluster.trackers["bob"]
    tracker.exclude(GRAPH["bob"])  # the neighbours' vectors are not the point here
    bob.start_collecting(0.0)
    tracker.start_collecting(0.0, SETTINGS.round_timeout)
    assert not bob.collection_done(0, 0.0)
    assert bob.next_wakeup(0, 0.0) == SETTINGS.round_timeout  # the round's deadline
    for owner in GRAPH["bob"]:
        if why == "gone":
            tracker.mark_down(owner, 0.0)
        elif why == "silent":  # connected, heard at 0, then nothing
            assert tracker.liveness is not None
            tracker.liveness.heard(owner, 0.0)
        else:
            tracker.note_peer_round(owner, 1)
    ends = [t for o in GRAPH["bob"] if (t := tracker.gives_up_at(o)) is not None]
    done_at = max(ends) if why == "silent" else GRACE
    assert done_at < SETTINGS.round_timeout
    if why != "later round":
        assert bob.next_wakeup(0, 0.0) == min(ends)
        assert not bob.collection_done(0, done_at - 0.01)
    assert bob.collection_done(0, done_at)


def test_a_whole_round_unmasks_the_exact_group_average() -> None:
    """Keys, shares, masks, vectors, PRESENT, CONFIRM, UNMASK, REVEAL: alice's group average
    comes out of the masked vectors as plain averaging would have it."""
    cluster = Cluster()
    alice, received = _ready_to_unmask(cluster)
    assert sorted(received) == sorted(GRAPH["alice"])
    ask = alice.ask_present(0, received, 0.0)
    cluster.drain(["alice"])
    cluster.deliver()
    assert ask.settled()
    ask = alice.ask_unmask(0, 0.0)
    cluster.drain(["alice"])
    cluster.deliver()
    assert ask.settled()
    state = alice.revealed(0)
    total, _ = sum_contributions(list(received.values()), cluster.params["alice"], 0.25, FIXED)
    average = unmask_sum(total, state.correction(), 1.0, FIXED)
    expected = np.mean([cluster.params[p] for p in PEERS], axis=0)
    assert np.max(np.abs(average - expected)) < 1e-5
    alice.end_unmasking(0)
    cluster.sessions["bob"].receive("alice", Unmask(1, 0, {}), 0.0)  # nothing twice
    assert "already answered" in last_reject_of(cluster.sessions["bob"])


# --- rule 6: unmasking -------------------------------------------------------------------


def _ready_to_unmask(cluster: Cluster) -> tuple[SecureSession, dict[str, np.ndarray]]:
    cluster.start(0)
    cluster.deliver()
    for p in PEERS:
        cluster.sessions[p].trained(0)
        cluster.drain([p])
        cluster.run_jobs(p)
    cluster.wire = []
    return cluster.sessions["alice"], cluster.vectors[("alice", 0)]


def test_a_step_waits_for_members_only_on_the_link_they_were_asked_on() -> None:
    cluster = Cluster()
    alice, received = _ready_to_unmask(cluster)
    ask = alice.ask_present(0, received, 10.0)
    cluster.drain(["alice"])
    assert sorted(r for _, r, _ in sent(cluster, Present)) == sorted(GRAPH["alice"])
    assert ask.wake_up(10.0) == 10.0 + SETTINGS.recovery_timeout
    cluster.wire = [w for w in cluster.wire if w[1] != "dave"]  # dave never answers
    cluster.deliver(now=10.2)
    assert not ask.settled()
    alice.link_up("dave")  # ... and reconnects: the new link was never asked
    assert ask.settled()


def test_once_the_threshold_answered_a_step_waits_as_long_again_at_most() -> None:
    cluster = Cluster()
    alice, received = _ready_to_unmask(cluster)
    ask = alice.ask_present(0, received, 10.0)
    cluster.drain(["alice"])
    cluster.wire = [w for w in cluster.wire if w[1] != "dave"]  # dave stays silent
    cluster.deliver(now=10.2)
    assert ask.wake_up(10.2) == pytest.approx(10.4)  # 0.2 s to the threshold, 0.2 s more
    assert not ask.settled()
    ask = alice.ask_unmask(0, 10.4)
    cluster.drain(["alice"])
    assert sorted(r for _, r, _ in sent(cluster, Unmask)) == ["bob", "carol"]
    cluster.deliver(now=10.5)
    assert ask.settled() and set(alice.revealed(0).reveals) == {"bob", "carol"}


def test_unmasking_fails_below_the_threshold_at_each_step() -> None:
    cluster = Cluster()
    alice, received = _ready_to_unmask(cluster)
    alice.ask_present(0, received, 0.0)
    cluster.drain(["alice"])
    cluster.wire = [w for w in cluster.wire if w[1] == "bob"]
    cluster.deliver()
    with pytest.raises(Exception, match="1 of 3 confirmed the present set"):
        alice.ask_unmask(0, 1.0)
    with pytest.raises(Exception, match="no key exchange"):
        alice.ask_present(5, {}, 0.0)


def test_present_and_unmask_requests_that_could_unmask_are_refused() -> None:
    _cluster, bob = keyed("bob")
    bob.refusals.burst = 100  # every refusal logged here
    everyone = ("bob", "carol", "dave")
    for request, problem in (
        (Present(1, 0, everyone), "sent alice no vector in round 0"),  # not contributed
        (Present(1, 3, everyone), "sent alice no vector in round 3"),
        (Unmask(1, 0, {}), "no present set confirmed"),
    ):
        bob.receive("alice", request, 0.0)
        assert problem in last_reject_of(bob)
    bob.members[(0, "alice")].contributed = True
    for request, problem in (
        (Present(1, 0, ("carol", "dave")), "leaves us out"),
        (Present(1, 0, ("bob", "zed", "dave")), "did not mask with"),
        (Present(1, 0, ("bob",)), "1 members would be present, 2 needed"),
    ):
        bob.receive("alice", request, 0.0)
        assert problem in last_reject_of(bob)
    bob.receive("alice", Present(1, 0, everyone), 0.0)
    (reply,) = bob.data_to_send()
    assert reply[0] == "alice" and isinstance(reply[1], Confirm)
    bob.receive("alice", Unmask(1, 0, {"carol": bytes(32)}), 0.0)
    assert "only 1 members confirm the present set" in last_reject_of(bob)
    assert not [m for _, m in bob.data_to_send() if isinstance(m, Reveal)]


# --- rule 7: refusals --------------------------------------------------------------------


def test_refusals_are_logged_a_few_times_per_peer_and_window() -> None:
    cluster = Cluster()
    cluster.start(0)
    bob = cluster.sessions["bob"]
    for _ in range(12):
        bob.receive("alice", Unmask(1, 0, {}), 1.0)
    rejects = [e for e in bob.events_to_log() if e.kind == "reject"]
    assert len(rejects) == 5
    bob.receive("alice", Unmask(1, 0, {}), 1.0 + 10.0)
    (later,) = bob.events_to_log()
    assert later.fields["suppressed"] == 7


def last_reject_of(session: SecureSession) -> str:
    rejects = [e for e in session.events_to_log() if e.kind == "reject"]
    assert rejects, "nothing was refused"
    return str(rejects[-1].fields["reason"])


def test_answers_after_the_unmasking_ended_are_late_not_rejected() -> None:
    """dave answers after alice had enough and went on: expected traffic, logged as a
    ``late`` event (a clean secure run logs no reject). An answer for a round alice never
    unmasked is still a reject."""
    cluster = Cluster()
    alice, received = _ready_to_unmask(cluster)
    alice.ask_present(0, received, 0.0)
    cluster.drain(["alice"])
    held = [w for w in cluster.wire if w[1] == "dave"]
    cluster.wire = [w for w in cluster.wire if w[1] != "dave"]
    cluster.deliver()
    alice.ask_unmask(0, 1.0)
    cluster.drain(["alice"])
    cluster.deliver()
    alice.revealed(0)
    alice.end_unmasking(0)
    cluster.wire = held
    cluster.deliver()  # dave's CONFIRM, after the end
    events = cluster.events["alice"]
    assert [e.kind for e in events if e.fields.get("peer") == "dave"] == ["late"]
    assert "CONFIRM after the unmasking of round 0 ended" in events[-1].fields["reason"]
    alice.receive("dave", Reveal(1, 5, {}), 2.0)
    assert last_reject_of(alice) == "REVEAL refused: unrequested reveal for round 5"


def test_silent_members_are_given_up_only_while_the_group_can_be_unmasked() -> None:
    """Each round raises the tracker's floor to the group's threshold; an owner with keys
    from fewer members than that keeps waiting for silent members (a short delay on one
    link must not fail the whole group), and gives them up once enough keys are in."""
    cluster = Cluster()
    cluster.start(0)
    alice, tracker = cluster.sessions["alice"], cluster.trackers["alice"]
    assert tracker.min_models == 2  # the threshold of alice's group of 3

    # Only bob's round-0 KEYS reach alice; carol's are held up, dave's lost.
    def keys_to_alice(sender: str) -> list[tuple[str, str, SecureMessage]]:
        return [
            w
            for w in cluster.wire
            if isinstance(w[2], Keys) and w[1] == "alice" and w[0] == sender and w[2].round == 0
        ]

    held = keys_to_alice("carol")
    cluster.wire = keys_to_alice("bob")
    cluster.deliver()
    assert tracker.liveness is not None
    for peer in ("carol", "dave"):
        tracker.liveness.heard(peer, 0.0)
    alice.start_collecting(0.0)
    alice.trained(0)
    late = max(t for p in ("carol", "dave") if (t := tracker.gives_up_at(p)) is not None) + 1
    alice.collection_done(0, late)
    assert alice.owners[0].keyed is None  # 1 of 3 keys: still waiting for them
    # carol's keys arrive (two of three: enough); dave, silent, is given up.
    cluster.wire = held
    cluster.deliver(late)
    alice.collection_done(0, late)
    assert alice.owners[0].keyed == {"bob", "carol"}
