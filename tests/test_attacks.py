"""The harness's poisoning learner (pure: no processes)."""

from __future__ import annotations

import numpy as np
import pytest

from p2pfl.harness.attacks import RANDOM_STD, ByzantineLearner, parse_attack
from p2pfl.learning import MLP


def test_parse_attack() -> None:
    assert parse_attack("random") == ("random", 1.0)
    assert parse_attack("sign-flip") == ("sign-flip", 1.0)
    assert parse_attack("scaled:-4") == ("scaled", -4.0)
    for bad in ("scaled:x", "scaled:inf", "loud", "sign-flip:2"):
        with pytest.raises(ValueError):
            parse_attack(bad)


def trained(kind: str, factor: float = 1.0) -> tuple[ByzantineLearner, list[np.ndarray]]:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((40, 6)).astype(np.float32)
    y = rng.integers(0, 3, 40)
    learner = ByzantineLearner(MLP(6, 3, [40], seed=1), kind, factor)
    before = [w.copy() for w in learner.inner.get_weights()]
    learner.fit(x, y, epochs=1, batch_size=8, learning_rate=0.1, rng=rng)
    return learner, before


def test_sign_flip_sends_the_negated_model() -> None:
    learner, _ = trained("sign-flip")
    honest = learner.inner.get_weights()
    for sent, real in zip(learner.get_weights(), honest, strict=True):
        assert np.array_equal(sent, -real)


def test_scaled_multiplies_the_update() -> None:
    learner, before = trained("scaled", -3.0)
    for sent, real, old in zip(
        learner.get_weights(), learner.inner.get_weights(), before, strict=True
    ):
        assert np.allclose(sent, old - 3.0 * (real - old), atol=1e-6)


def test_random_sends_noise_and_still_trains_and_evaluates() -> None:
    learner, before = trained("random")
    sent = np.concatenate([w.ravel() for w in learner.get_weights()])
    assert abs(float(sent.std()) - RANDOM_STD) < 0.15 * RANDOM_STD
    assert not all(
        np.array_equal(a, b) for a, b in zip(learner.inner.get_weights(), before, strict=True)
    )
    assert learner.evaluate(np.zeros((2, 6), np.float32), np.array([0, 1])).accuracy is not None
