"""Admission budget and event throttling for unauthenticated traffic."""

from __future__ import annotations

import pytest

from p2pfl.guard import Admission, Throttle


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
    assert len(t._state) <= 100
