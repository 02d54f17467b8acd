"""Differential privacy: clipping, noise of the configured scale, and the RDP accountant."""

from __future__ import annotations

import math

import numpy as np
import pytest

from p2pfl.core.privacy import DPConfig, epsilon, privatize


def test_epsilon_matches_the_closed_form_optimum() -> None:
    # One release at sigma = 1, delta = 1e-5: min over alpha of alpha/2 + ln(1e5)/(alpha-1),
    # optimum at alpha = 1 + sqrt(2 ln 1e5) -> 0.5 + sqrt(2 ln 1e5); the grid is near it.
    best = 0.5 + math.sqrt(2 * math.log(1e5))
    assert epsilon(1, 1.0, 1e-5) == pytest.approx(best, rel=0.01)


def test_epsilon_grows_with_rounds_and_shrinks_with_noise() -> None:
    assert epsilon(0, 1.0, 1e-5) == 0.0
    values = [epsilon(t, 1.1, 1e-5) for t in (1, 10, 100)]
    assert values == sorted(values) and values[0] < values[-1]
    assert epsilon(30, 4.0, 1e-5) < epsilon(30, 1.0, 1e-5)
    assert epsilon(30, 1.0, 1e-3) < epsilon(30, 1.0, 1e-6)


def test_large_composition_is_close_to_the_gaussian_rdp_bound() -> None:
    # T releases compose to RDP T*alpha/(2 sigma^2): the continuous optimum is
    # T/(2 s^2) + sqrt(2 T ln(1/d)) / s.
    t, s, d = 100, 5.0, 1e-5
    exact = t / (2 * s**2) + math.sqrt(2 * t * math.log(1 / d)) / s
    assert epsilon(t, s, d) == pytest.approx(exact, rel=0.02)


def test_privatize_clips_the_update_and_adds_noise_of_the_right_scale() -> None:
    dp = DPConfig(clip_norm=1.0, noise_multiplier=0.5, delta=1e-5)
    start = np.zeros(200_000, dtype=np.float32)
    trained = np.full(200_000, 0.01, dtype=np.float32)  # norm ~4.47 > 1: clipped
    out, norm, clipped = privatize(start, trained, dp, np.random.default_rng(0))
    assert clipped and norm == pytest.approx(math.sqrt(200_000) * 0.01, rel=1e-4)
    noise = out - (trained / norm)  # the clipped update is trained / norm here
    assert np.std(noise) == pytest.approx(0.5, rel=0.01)
    small = np.full(10, 0.01, dtype=np.float32)
    _, _, clipped_small = privatize(np.zeros(10), small, dp, np.random.default_rng(0))
    assert not clipped_small


@pytest.mark.parametrize("kwargs", [{"clip_norm": 0.0}, {"noise_multiplier": -1.0}, {"delta": 1.0}])
def test_bad_dp_settings_are_refused(kwargs: dict[str, float]) -> None:
    base = {"clip_norm": 1.0, "noise_multiplier": 1.0, "delta": 1e-5}
    with pytest.raises(ValueError):
        DPConfig(**{**base, **kwargs})
