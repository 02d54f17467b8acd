"""Without PyTorch (an optional extra), a torch model is a config error naming the extra.

Runs with or without torch installed: ``import torch`` is made to fail by a ``None`` entry
in ``sys.modules``, so this file must never ``importorskip`` torch.
"""

from __future__ import annotations

import sys

import numpy as np
import pytest

import p2pfl.learning
from p2pfl.errors import ConfigError
from p2pfl.learning import MLP, build_learner

TORCH_MODEL = {
    "kind": "torch",
    "inputs": 64,
    "classes": 10,
    "factory": "p2pfl.learning.examples.torch_models:cnn",
    "optimizer": {"kind": "sgd", "momentum": 0.9},
}


@pytest.fixture
def no_torch(monkeypatch: pytest.MonkeyPatch) -> None:
    """``import torch`` raises ImportError, and p2pfl's torch module is not cached."""
    monkeypatch.setitem(sys.modules, "torch", None)
    monkeypatch.delitem(sys.modules, "p2pfl.learning.torch_learner", raising=False)
    # `from p2pfl.learning import torch_learner` finds an already imported submodule as an
    # attribute of the package before it looks at sys.modules
    monkeypatch.delattr(p2pfl.learning, "torch_learner", raising=False)
    monkeypatch.delitem(sys.modules, "p2pfl.learning.examples.torch_models", raising=False)


def test_torch_model_without_torch_names_the_extra(no_torch: None) -> None:
    with pytest.raises(ConfigError) as caught:
        build_learner(TORCH_MODEL, 7, source="shared-peers.yaml")
    err = caught.value
    assert err.file == "shared-peers.yaml"
    assert err.field == "training.model.kind"
    assert "needs PyTorch" in err.problem
    assert "p2pfl[torch]" in err.problem and "torch==2.13.0" in err.problem
    assert str(err).startswith("shared-peers.yaml: training.model.kind: ")
    # reported before anything else of the section is looked at (the factory imports torch)
    with pytest.raises(ConfigError) as caught:
        build_learner({**TORCH_MODEL, "options": {"inputs": 3}}, 7)
    assert caught.value.field == "training.model.kind"


def test_regression_torch_model_without_torch_is_the_same_error(no_torch: None) -> None:
    model = {"kind": "torch", "task": "regression", "inputs": 4, "outputs": 1, "factory": "a:b"}
    with pytest.raises(ConfigError) as caught:
        build_learner(model, 7)
    assert caught.value.field == "training.model.kind"
    assert "p2pfl[torch]" in caught.value.problem


def test_numpy_models_do_not_need_torch(no_torch: None) -> None:
    for model in (
        {"kind": "mlp", "inputs": 64, "classes": 10, "hidden": [8]},
        {"kind": "mlp", "task": "regression", "inputs": 4, "outputs": 2, "hidden": [8]},
        {"kind": "softmax", "inputs": 64, "classes": 10},
    ):
        learner = build_learner(model, 7)
        assert learner.get_weights() and "p2pfl.learning.torch_learner" not in sys.modules
    regressor = build_learner(
        {"kind": "mlp", "task": "regression", "inputs": 4, "outputs": 2, "hidden": [8]}, 7
    )
    assert isinstance(regressor, MLP) and regressor.task == "regression"
    x = np.random.default_rng(0).standard_normal((10, 4))
    assert regressor.evaluate(x, np.zeros((10, 2))).metric == "r2"
