"""The failure detector (phi accrual) and the round core's rule for silent neighbours:
pure, with the time passed in."""

from __future__ import annotations

import numpy as np
import pytest

from p2pfl.core.liveness import MIN_STD, ArrivalHistory, DetectorSettings, Liveness
from p2pfl.core.rounds import RoundTracker

SETTINGS = DetectorSettings(threshold=8.0, pause=0.3, expected_gap=0.1)


def regular(history: ArrivalHistory, start: float, gap: float, count: int) -> float:
    t = start
    for _ in range(count):
        t += gap
        history.heard(t)
    return t


def test_phi_grows_with_silence_and_resets_on_arrival() -> None:
    history = ArrivalHistory(SETTINGS, 0.0)
    last = regular(history, 0.0, 0.02, 100)
    levels = [history.phi(last + s) for s in (0.0, 0.2, 0.4, 0.6, 0.8)]
    assert levels == sorted(levels) and levels[0] < 1e-6 and levels[-1] > 8.0
    history.heard(last + 0.8)
    assert history.phi(last + 0.8) < 0.01


def test_a_regular_fast_neighbour_is_suspected_well_within_a_second() -> None:
    """Gaps of 20 ms (a 25 ms-round loopback network): suspected after mean + pause + a few
    floor-sigmas of silence, between 0.5 and 0.8 s."""
    history = ArrivalHistory(SETTINGS, 0.0)
    last = regular(history, 0.0, 0.02, 200)
    after = history.suspect_at() - last
    assert 0.5 < after < 0.8
    assert history.phi(history.suspect_at() - 0.01) < 8.0
    assert history.phi(history.suspect_at()) == pytest.approx(8.0)


def test_irregular_gaps_push_suspicion_out() -> None:
    """A neighbour whose gaps vary (here 0.05-1.0 s) is given proportionally longer."""
    rng = np.random.default_rng(3)
    calm, jumpy = ArrivalHistory(SETTINGS, 0.0), ArrivalHistory(SETTINGS, 0.0)
    t = 0.0
    for gap in rng.uniform(0.05, 1.0, size=200):
        t += float(gap)
        jumpy.heard(t)
    regular(calm, 0.0, 0.1, 200)
    assert jumpy.std > 4 * MIN_STD
    assert jumpy.suspect_at() - jumpy.last > 2 * (calm.suspect_at() - calm.last)


def test_bursts_refresh_the_time_but_add_no_gaps() -> None:
    """The chunks of one model arrive microseconds apart: they must not drag the mean to
    zero (which would make every pause look long)."""
    history = ArrivalHistory(SETTINGS, 0.0)
    t = regular(history, 0.0, 0.1, 50)
    mean = history.mean
    for i in range(1000):
        history.heard(t + i * 1e-5)
    assert history.mean == pytest.approx(mean)
    assert history.last == pytest.approx(t + 999e-5)


def test_liveness_reports_a_suspicion_once_and_its_end() -> None:
    live = Liveness(SETTINGS)
    assert not live.suspected("bob", 100.0)  # never heard: not suspected
    assert live.heard("bob", 0.0) is None
    regular(live.histories["bob"], 0.0, 0.05, 100)  # last heard at 5.0
    at = live.suspect_at("bob")
    assert at is not None
    assert live.newly_suspected(frozenset({"bob"}), at - 0.01) == []
    fresh = live.newly_suspected(frozenset({"bob"}), at)
    assert [p for p, _ in fresh] == ["bob"] and fresh[0][1] == pytest.approx(8.0)
    assert live.newly_suspected(frozenset({"bob"}), at + 1) == []  # once
    assert live.heard("bob", at + 2) == pytest.approx(at + 2 - 5.0)  # silence it ended
    assert live.heard("bob", at + 2.1) is None


# --- the round core ----------------------------------------------------------------------------


def tracker(min_models: int = 0) -> tuple[RoundTracker, Liveness]:
    live = Liveness(SETTINGS)
    t = RoundTracker(
        total_rounds=10,
        neighbours_of=lambda r: frozenset({"bob", "carol"}),
        max_buffered_rounds=2,
        down_grace=2.0,
        liveness=live,
        min_models=min_models,
    )
    t.start_round(0)
    t.start_collecting(0.0, 30.0)
    return t, live


def test_a_round_stops_waiting_for_a_silent_neighbour() -> None:
    """bob delivered; carol is connected but silent: the round waits for her until she is
    suspected (well before the 30 s deadline), and the wake-up is that moment."""
    t, live = tracker()
    live.heard("bob", 0.0)
    live.heard("carol", 0.0)
    t.deliver("bob", 0, np.zeros(2, np.float32))
    suspect = live.suspect_at("carol")
    assert suspect is not None and suspect < 2.0  # a new link: ~1.8 s (see below)
    assert t.waiting_for(0.1) == {"carol"} and not t.collection_done(0.1)
    assert t.next_wakeup(0.1) == pytest.approx(suspect)
    assert t.collection_done(suspect)
    # She speaks again: waited for again (her model may still come this round).
    live.heard("carol", suspect + 0.1)
    assert t.waiting_for(suspect + 0.1) == {"carol"}


def test_too_few_models_in_waits_for_silent_neighbours_until_gone() -> None:
    """Every neighbour silent and none delivered (this host is the one cut off): with
    min_models 1 the round does not go on alone while the links may come back; once they
    are closed for down_grace it does."""
    t, live = tracker(min_models=1)
    live.heard("bob", 0.0)
    live.heard("carol", 0.0)
    assert t.waiting_for(5.0) == {"bob", "carol"}
    t.mark_down("bob", 10.0)
    t.mark_down("carol", 10.0)
    assert not t.collection_done(11.0)
    assert t.collection_done(12.0)


def test_a_disconnected_neighbour_keeps_its_grace() -> None:
    """Suspicion is about silent connections: a closed one is waited for down_grace (it
    may be reconnecting), however long it has been silent."""
    t, live = tracker()
    live.heard("bob", 0.0)
    live.heard("carol", 0.0)
    t.deliver("bob", 0, np.zeros(2, np.float32))
    t.mark_down("carol", 0.5)
    assert t.waiting_for(2.0) == {"carol"}
    assert t.next_wakeup(2.0) == pytest.approx(2.5)
    assert t.waiting_for(2.5) == frozenset()


def test_without_a_detector_nothing_changes() -> None:
    t = RoundTracker(
        total_rounds=10,
        neighbours_of=lambda r: frozenset({"bob"}),
        max_buffered_rounds=2,
        down_grace=2.0,
    )
    t.start_round(0)
    t.start_collecting(0.0, 30.0)
    assert t.waiting_for(29.0) == {"bob"} and t.next_wakeup(1.0) == 30.0


def test_an_outage_does_not_make_the_next_one_slow_to_notice() -> None:
    """A silence past the threshold (a cut that healed) joins the history only up to the
    threshold, and one spanning a reconnection not at all: after a 30 s cut the next
    silence is suspected as fast as before."""
    live = Liveness(SETTINGS)
    t = 0.0
    live.heard("p", t)
    for _ in range(300):
        t += 0.05
        live.heard("p", t)
    before = live.suspect_at("p")
    assert before is not None
    before -= t
    for reconnected in (False, True):
        t += 30.0
        live.heard("p", t, reconnected=reconnected)
        for _ in range(20):
            t += 0.05
            live.heard("p", t)
        after = live.suspect_at("p")
        assert after is not None and after - t < before + 0.05


def test_a_young_link_is_given_longer_until_it_has_shown_its_rhythm() -> None:
    """Over its first gaps a link may stall for TCP's own reasons (slow start, a first
    retransmission on a thin link): it is suspected after ~1.8 s of silence at first, and
    after ~0.6 s once twenty regular gaps have been seen."""
    history = ArrivalHistory(SETTINGS, 0.0)
    assert 1.5 < history.suspect_at() < 2.0
    last = regular(history, 0.0, 0.02, 20)
    assert 0.5 < history.suspect_at() - last < 0.8
