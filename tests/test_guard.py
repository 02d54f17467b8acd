"""Admission budget and event throttling for unauthenticated traffic."""

from __future__ import annotations

import pytest

from p2pfl.proto.guard import Admission, Throttle


def test_admission_evicts_the_oldest_pending() -> None:
    budget: Admission[str] = Admission(2)
    assert budget.admit("a") is None
    assert budget.admit("b") is None
    assert budget.admit("c") == "a"
    assert "a" not in budget and len(budget) == 2
    budget.authenticated("b")  # authenticated links leave the budget
    assert budget.admit("d") is None
    assert budget.admit("e") == "c"
    budget.discard("d")
    budget.discard("never-there")
    assert len(budget) == 1


def test_admission_evicts_from_the_busiest_source() -> None:
    budget: Admission[str] = Admission(4)
    for conn, source in [("peer1", "10.0.0.1"), ("x1", "6.6.6.6"), ("x2", "6.6.6.6")]:
        assert budget.admit(conn, source) is None
    assert budget.admit("peer2", "10.0.0.2") is None
    # The flooder's own oldest connection goes, not the older one from a real peer.
    assert budget.admit("x3", "6.6.6.6") == "x1"
    assert budget.admit("peer3", "10.0.0.3") == "x2"
    assert "peer1" in budget and "peer2" in budget


def test_admission_ties_between_sources_evict_the_oldest() -> None:
    budget: Admission[str] = Admission(2)
    budget.admit("a", "1.1.1.1")
    budget.admit("b", "2.2.2.2")
    assert budget.admit("c", "1.1.1.1") == "a"  # tie between sources: the oldest of them
    budget2: Admission[str] = Admission(1)
    budget2.admit("a", "1.1.1.1")
    assert budget2.admit("b", "2.2.2.2") == "a"


def test_admission_needs_capacity() -> None:
    with pytest.raises(ValueError):
        Admission(0)


def test_throttle_limits_bursts_and_reports_suppressed() -> None:
    t = Throttle(burst=2, window=10.0)
    assert t.allow("1.2.3.4", 0.0) == 0
    assert t.allow("1.2.3.4", 1.0) == 0
    assert t.allow("1.2.3.4", 2.0) is None
    assert t.allow("1.2.3.4", 3.0) is None
    assert t.allow("5.6.7.8", 3.0) == 0  # other sources are not affected
    assert t.allow("1.2.3.4", 10.5) == 2  # new window: says how many were dropped
    assert t.allow("1.2.3.4", 10.6) == 0


def test_throttle_memory_is_bounded() -> None:
    t = Throttle(burst=1, window=10.0, max_keys=100)
    for i in range(1000):
        t.allow(f"10.0.{i // 256}.{i % 256}", 0.0)
    assert len(t) <= 100


def test_text_from_the_other_end_is_one_safe_log_line() -> None:
    from p2pfl.proto.guard import printable

    assert printable("bye\n2026 ERROR forged\x1b[2J") == "bye\\n2026 ERROR forged\\x1b[2J"
    assert printable("x" * 300, 10) == "x" * 10 + "..."
    assert printable("plain words") == "plain words"
