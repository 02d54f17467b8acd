"""The aggregation rules on crafted inputs (pure numpy, no network)."""

from __future__ import annotations

import numpy as np
import pytest

from p2pfl.core import aggregate as agg
from p2pfl.core.aggregate import RobustRule, aggregate, coordinate_median, parse_rule, trimmed_mean


def vec(*values: float) -> np.ndarray:
    return np.array(values, dtype=np.float32)


WEIGHTS = {"a": 0.4, "b": 0.2, "c": 0.2, "d": 0.2}


def test_parse_rule() -> None:
    assert parse_rule("metropolis") == RobustRule("metropolis")
    assert parse_rule("median") == RobustRule("median")
    assert parse_rule("trimmed-mean:0.2") == RobustRule("trimmed-mean", 0.2)
    assert parse_rule("clipped:5") == RobustRule("clipped", 5.0)
    assert str(parse_rule("clipped:2.5")) == "clipped:2.5"
    assert not parse_rule("metropolis").robust and parse_rule("median").robust
    for bad, why in (
        ("mean", "unknown rule"),
        ("trimmed-mean:0.5", "0 <= BETA < 0.5"),
        ("trimmed-mean:-0.1", "0 <= BETA < 0.5"),
        ("clipped:0", "TAU > 0"),
        ("clipped:inf", "TAU > 0"),
        ("clipped:x", "not a number"),
        ("median:3", "unknown rule"),
    ):
        with pytest.raises(ValueError, match=why):
            parse_rule(bad)


def test_coordinate_median_and_trimmed_mean() -> None:
    vectors = [vec(1, 10), vec(2, -5), vec(3, 0), vec(100, 1), vec(-50, 2)]
    out = np.empty(2, dtype=np.float32)
    assert coordinate_median(vectors, out).tolist() == [2, 1]
    # beta 0.2 of 5 drops one from each end: (1, 2, 3) and (0, 1, 2)
    assert trimmed_mean(vectors, 0.2, out).tolist() == [2, 1]
    assert trimmed_mean(vectors, 0.0, out).tolist() == pytest.approx([11.2, 1.6])
    assert trimmed_mean(vectors[:2], 0.49, out).tolist() == [1.5, 2.5]  # floor(0.98) = 0
    with pytest.raises(ValueError, match="leaves nothing"):
        trimmed_mean(vectors[:2], 0.5, out)


def test_coordinate_rules_work_in_slices_and_may_write_into_an_input(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(agg, "_CHUNK", 3)  # several slices, the last one short
    rng = np.random.default_rng(0)
    vectors = [rng.standard_normal(10).astype(np.float32) for _ in range(5)]
    expected = np.median(np.stack(vectors), axis=0)
    first = vectors[0].copy()
    out = coordinate_median([first, *vectors[1:]], first)  # out is an input
    assert out is first and np.allclose(out, expected)
    trimmed = trimmed_mean(vectors, 0.2, np.empty(10, dtype=np.float32))
    assert np.allclose(trimmed, np.sort(np.stack(vectors), axis=0)[1:4].mean(axis=0))


def test_median_rule_resists_a_liar_and_flags_it() -> None:
    own = vec(1.0, 1.0)
    received = {"b": vec(1.2, 0.8), "c": vec(0.9, 1.1), "d": vec(1000.0, -1000.0)}
    result, used, flagged = aggregate(RobustRule("median"), "a", own, received, WEIGHTS)
    assert result is own
    assert result.tolist() == pytest.approx([1.1, 0.9])
    assert used == {m: 0.25 for m in "abcd"}
    assert flagged == {"d": "far"}


def test_trimmed_mean_rule() -> None:
    received = {"b": vec(2.0), "c": vec(3.0), "d": vec(-1000.0)}
    result, _, flagged = aggregate(
        RobustRule("trimmed-mean", 0.25), "a", vec(1.0), received, WEIGHTS
    )
    assert result.tolist() == [1.5]  # drops -1000 and 3: mean of 1 and 2
    assert flagged == {"d": "far"}


def test_clipped_rule_bounds_each_neighbours_pull() -> None:
    own = vec(0.0, 0.0)
    received = {"b": vec(3.0, 4.0), "c": vec(0.3, 0.4)}  # b is 5 away, c 0.5
    weights = {"a": 0.5, "b": 0.25, "c": 0.25}
    result, used, flagged = aggregate(RobustRule("clipped", 1.0), "a", own, received, weights)
    # b clipped to (0.6, 0.8); Metropolis: 0.25 * (0.6, 0.8) + 0.25 * (0.3, 0.4)
    assert result.tolist() == pytest.approx([0.225, 0.3])
    assert used == weights and flagged == {"b": "clipped"}


def test_every_rule_drops_non_finite_vectors() -> None:
    for rule in ("metropolis", "median", "trimmed-mean:0.1", "clipped:10"):
        received = {"b": vec(2.0, 2.0), "c": vec(np.nan, 1.0), "d": vec(np.inf, 0.0)}
        result, used, flagged = aggregate(parse_rule(rule), "a", vec(1.0, 1.0), received, WEIGHTS)
        assert np.isfinite(result).all(), rule
        assert set(used) == {"a", "b"}, rule
        assert flagged == {"c": "non-finite", "d": "non-finite"}, rule


def test_metropolis_rule_is_the_plain_average() -> None:
    received = {"b": vec(4.0), "c": vec(8.0)}
    result, used, flagged = aggregate(
        RobustRule("metropolis"), "a", vec(0.0), received, {"a": 0.5, "b": 0.25, "c": 0.25}
    )
    assert result.tolist() == [3.0] and flagged == {}
    assert used == {"a": 0.5, "b": 0.25, "c": 0.25}


def test_alone_a_robust_rule_keeps_the_own_model() -> None:
    for rule in ("median", "trimmed-mean:0.4", "clipped:1"):
        result, used, flagged = aggregate(parse_rule(rule), "a", vec(1.0, 2.0), {}, WEIGHTS)
        assert result.tolist() == [1.0, 2.0] and used == {"a": 1.0} and flagged == {}


def test_a_neighbour_flagged_repeatedly_becomes_a_suspect_once() -> None:
    from p2pfl.core.scoring import Suspect, SuspectTracker

    tracker = SuspectTracker(window=5, threshold=3)
    assert tracker.record({"b", "c"}, {"c": "far"}) == []
    assert tracker.record({"b", "c"}, {}) == []
    assert tracker.record({"b", "c"}, {"c": "clipped"}) == []
    assert tracker.record({"b", "c"}, {"c": "far"}) == [Suspect("c", "far", 3, 5)]
    assert tracker.record({"b", "c"}, {"c": "far"}) == []  # already reported
    for _ in range(4):  # behaves: the flags age out of the window
        assert tracker.record({"b", "c"}, {}) == []
    assert "c" not in tracker.suspected
    for _ in range(2):
        tracker.record({"b"}, {"c": "non-finite"})
    assert tracker.record({"b"}, {"c": "non-finite"}) == [Suspect("c", "non-finite", 3, 5)]
    assert "b" not in tracker.suspected
