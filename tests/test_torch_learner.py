"""Tests of p2pfl.learning.torch_learner: a torch.nn.Module behind the Learner contract
(flat float32 storage shared with the module, seeded builds, SGD+momentum/Adam, regression).

The numpy-free half of the torch support (config parsing, the error without torch) is in
test_torch_config.py and test_torch_missing.py, which run without PyTorch.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

from p2pfl.errors import ConfigError
from p2pfl.learning import Learner, build_learner
from p2pfl.learning.prepare import load_digits_arrays

torch = pytest.importorskip("torch", reason="PyTorch is an optional extra: pip install '.[torch]'")
from torch import nn  # noqa: E402

from p2pfl.learning.torch_learner import (  # noqa: E402
    OptimizerSpec,
    TorchLearner,
    build_module,
    use_threads,
)

CNN = "p2pfl.learning.examples.torch_models:cnn"
MLP = "p2pfl.learning.examples.torch_models:mlp"


@pytest.fixture(autouse=True, scope="module")
def one_thread() -> Iterator[None]:
    """One intra-op thread, as in a peer process: on a shared machine torch's default pool
    made an 8x8-digits epoch 100x slower. Restored afterwards for the rest of the session."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def cnn_model(**fields: Any) -> dict[str, Any]:
    return {
        "kind": "torch",
        "inputs": 64,
        "classes": 10,
        "factory": CNN,
        "options": {"channels": [8, 16], "hidden": 32},
        **fields,
    }


def torch_learner(model: dict[str, Any], seed: int = 7) -> TorchLearner:
    learner = build_learner(model, seed)
    assert isinstance(learner, TorchLearner)
    return learner


@pytest.fixture(scope="module")
def digits() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Digits 8x8 (x in [0, 1]) with a seeded held-out set of 397 rows."""
    x, y = load_digits_arrays()
    order = np.random.default_rng(0).permutation(y.shape[0])
    train, test = order[:1400], order[1400:]
    return x[train], y[train], x[test], y[test]


def batchnorm_factory(*, inputs: int, outputs: int) -> nn.Module:
    return nn.Sequential(nn.Linear(inputs, 3), nn.BatchNorm1d(3), nn.ReLU(), nn.Linear(3, outputs))


def dropout_factory(*, inputs: int, outputs: int) -> nn.Module:
    return nn.Sequential(nn.Linear(inputs, 32), nn.ReLU(), nn.Dropout(0.5), nn.Linear(32, outputs))


def not_a_module(*, inputs: int, outputs: int) -> object:
    """A torch factory that forgot to return the module (named in a config test below)."""
    return {"inputs": inputs, "outputs": outputs}


# --------------------------------------------------------------------------------------
# the flat weight vector


def test_is_a_learner_with_one_flat_float32_vector() -> None:
    learner = torch_learner(cnn_model())
    assert isinstance(learner, Learner)
    (flat,) = learner.get_weights()
    assert flat.dtype == np.float32 and flat.ndim == 1 and flat.flags.c_contiguous
    n = sum(p.numel() for p in learner.module.parameters())
    assert flat.size == learner.n_parameters == n  # the CNN has no floating buffers


def test_set_then_get_is_exact_bit_for_bit() -> None:
    learner = torch_learner(cnn_model())
    original = learner.get_weights()[0].copy()
    perturbed = original + np.random.default_rng(1).standard_normal(original.size).astype(
        np.float32
    )
    learner.set_weights([perturbed])
    got = learner.get_weights()[0]
    assert got.tobytes() == perturbed.tobytes()
    assert not np.shares_memory(got, perturbed)  # copied in, not aliased
    # float64 input is cast to the model's float32 exactly as numpy casts it
    as64 = perturbed.astype(np.float64) * 0.5
    learner.set_weights([as64])
    assert learner.get_weights()[0].tobytes() == as64.astype(np.float32).tobytes()


def test_get_weights_is_a_view_of_the_module_storage() -> None:
    learner = torch_learner(cnn_model())
    flat = learner.get_weights()[0]
    first = next(learner.module.parameters())
    before = flat[: first.numel()].copy()
    with torch.no_grad():
        first.add_(1.0)  # in place on the module's own parameter
    np.testing.assert_array_equal(flat[: first.numel()], before + np.float32(1.0))
    # and the other way: writing into the returned array writes into the module
    flat[0] = 123.0
    assert first.detach().reshape(-1)[0].item() == 123.0
    # every floating parameter lives inside the flat vector
    assert all(np.shares_memory(p.detach().numpy(), flat) for p in learner.module.parameters())


def test_set_weights_changes_the_module_outputs() -> None:
    learner = torch_learner(cnn_model())
    x = torch.from_numpy(np.random.default_rng(2).random((5, 64), dtype=np.float32))
    learner.module.eval()
    with torch.no_grad():
        out_before = learner.module(x).clone()
    original = learner.get_weights()[0].copy()
    learner.set_weights([original * np.float32(1.5)])
    with torch.no_grad():
        out_scaled = learner.module(x).clone()
    assert not torch.equal(out_before, out_scaled)
    learner.set_weights([original])
    with torch.no_grad():
        assert torch.equal(learner.module(x), out_before)  # back to the same bits


def test_floating_buffers_are_in_the_vector_and_state_dict_follows() -> None:
    module = build_module(batchnorm_factory, inputs=4, outputs=2, seed=3, options={})
    learner = TorchLearner(module, task="classification", outputs=2)
    params = [p for p in module.parameters()]
    n_params = sum(p.numel() for p in params)
    # parameters (4*3+3, 3+3, 3*2+2) then running_mean and running_var; the integer
    # num_batches_tracked stays out of the vector
    assert n_params == 29 and learner.n_parameters == 29 + 3 + 3
    bn = module[1]
    assert bn.num_batches_tracked.dtype == torch.int64
    vector = np.arange(learner.n_parameters, dtype=np.float32) / 10
    learner.set_weights([vector])
    state = learner.state_dict()
    np.testing.assert_array_equal(state["1.running_mean"].numpy(), vector[29:32])
    np.testing.assert_array_equal(state["1.running_var"].numpy(), vector[32:35])
    np.testing.assert_array_equal(state["0.weight"].numpy().ravel(), vector[:12])
    # state_dict tensors have their own storage (torch.save of a view writes the whole vector)
    assert not np.shares_memory(state["1.running_mean"].numpy(), learner.get_weights()[0])
    # training moves the running statistics, and the vector shows it (they are views)
    rng = np.random.default_rng(4)
    x = rng.standard_normal((64, 4)).astype(np.float32) * 3 + 5
    y = rng.integers(0, 2, 64)
    before = learner.get_weights()[0].copy()
    learner.fit(x, y, epochs=1, batch_size=16, learning_rate=0.01, rng=rng)
    after = learner.get_weights()[0]
    assert not np.array_equal(after[29:35], before[29:35])
    np.testing.assert_array_equal(after[29:32], bn.running_mean.numpy())
    assert int(bn.num_batches_tracked) == 4  # local, not part of the weights


# --------------------------------------------------------------------------------------
# seeded builds


def test_same_seed_builds_bit_identical_weights() -> None:
    a = torch_learner(cnn_model(), seed=11).get_weights()[0]
    b = torch_learner(cnn_model(), seed=11).get_weights()[0]
    c = torch_learner(cnn_model(), seed=12).get_weights()[0]
    assert a.tobytes() == b.tobytes()
    assert not np.array_equal(a, c)


def test_build_does_not_disturb_torch_global_generator() -> None:
    torch.manual_seed(99)
    expected = torch.rand(3)
    torch.manual_seed(99)
    torch_learner(cnn_model(), seed=5)
    assert torch.equal(torch.rand(3), expected)


# --------------------------------------------------------------------------------------
# training


@pytest.mark.parametrize(
    ("optimizer", "learning_rate"),
    [({"kind": "sgd", "momentum": 0.9}, 0.05), ({"kind": "adam"}, 0.003)],
    ids=["sgd-momentum", "adam"],
)
def test_cnn_learns_digits(digits, optimizer: dict[str, Any], learning_rate: float) -> None:
    x, y, x_test, y_test = digits
    learner = torch_learner(cnn_model(optimizer=optimizer))
    start = learner.evaluate(x_test, y_test)
    assert start.metric == "accuracy" and start.r2 is None
    assert start.score < 0.2  # chance is 0.1
    rng = np.random.default_rng(1)
    losses = [
        learner.fit(x, y, epochs=1, batch_size=32, learning_rate=learning_rate, rng=rng)
        for _ in range(5)
    ]
    end = learner.evaluate(x_test, y_test)
    assert losses[-1] < losses[0]
    assert end.accuracy is not None and end.accuracy > 0.85, end
    assert end.loss < start.loss / 3


def test_regression_mlp_fits_a_linear_target_and_loss_is_the_mse() -> None:
    rng = np.random.default_rng(0)
    w_true = np.array([[1.5, -2.0], [0.5, 1.0], [-1.0, 0.0], [2.0, 0.5]])
    x = rng.standard_normal((400, 4)).astype(np.float32)
    y = (x @ w_true + np.array([0.3, -0.7])).astype(np.float32)  # noiseless, two outputs
    x_train, y_train, x_test, y_test = x[:300], y[:300], x[300:], y[300:]
    model = {
        "kind": "torch",
        "task": "regression",
        "inputs": 4,
        "outputs": 2,
        "factory": MLP,
        "options": {"hidden": [16]},
        "optimizer": {"kind": "adam"},
    }
    learner = torch_learner(model)
    start = learner.evaluate(x_test, y_test)
    assert start.metric == "r2" and start.accuracy is None
    fit_rng = np.random.default_rng(1)
    for _ in range(40):
        learner.fit(x_train, y_train, epochs=1, batch_size=32, learning_rate=0.01, rng=fit_rng)
    end = learner.evaluate(x_test, y_test)
    assert start.score < 0.5 and end.score > 0.9, (start, end)
    # loss and R^2 by hand from the module's own predictions
    learner.module.eval()
    with torch.no_grad():
        pred = learner.module(torch.from_numpy(x_test)).numpy().astype(np.float64)
    err = pred - y_test
    assert end.loss == pytest.approx(np.mean(err**2), rel=1e-9)
    centred = y_test - y_test.mean(axis=0, dtype=np.float64)
    assert end.r2 == pytest.approx(1 - np.sum(err**2) / np.sum(centred**2), rel=1e-9)


def test_regression_accepts_one_dimensional_targets() -> None:
    rng = np.random.default_rng(3)
    x = rng.standard_normal((50, 3)).astype(np.float32)
    y = (x @ np.array([1.0, -1.0, 0.5])).astype(np.float32)
    model = {"kind": "torch", "task": "regression", "inputs": 3, "outputs": 1, "factory": MLP}
    learner = torch_learner(model)
    loss = learner.fit(x, y, epochs=2, batch_size=10, learning_rate=0.01, rng=rng)
    assert np.isfinite(loss)
    assert learner.evaluate(x, y).loss == pytest.approx(learner.evaluate(x, y[:, None]).loss)
    with pytest.raises(ValueError, match="must have shape"):
        learner.evaluate(x, np.zeros((50, 2), dtype=np.float32))


def test_fit_is_reproducible_from_the_rng_seed(digits) -> None:
    x, y = digits[0][:300], digits[1][:300]

    def trained(rng_seed: int, factory: Any) -> np.ndarray:
        if factory is None:
            learner = torch_learner(cnn_model(optimizer={"kind": "sgd", "momentum": 0.9}))
        else:  # dropout: fit must seed torch's generator from rng too
            module = build_module(factory, inputs=64, outputs=10, seed=7, options={})
            learner = TorchLearner(module, task="classification", outputs=10)
        rng = np.random.default_rng(rng_seed)
        learner.fit(x, y, epochs=2, batch_size=32, learning_rate=0.05, rng=rng)
        return learner.get_weights()[0].copy()

    for factory in (None, dropout_factory):
        first, again, other = trained(5, factory), trained(5, factory), trained(6, factory)
        assert first.tobytes() == again.tobytes()
        assert not np.array_equal(first, other)


def test_optimizer_state_is_local_and_persists_across_fits(digits) -> None:
    x, y = digits[0][:200], digits[1][:200]
    learner = torch_learner(cnn_model(optimizer={"kind": "sgd", "momentum": 0.9}))
    n = learner.n_parameters
    rng = np.random.default_rng(0)
    learner.fit(x, y, epochs=1, batch_size=50, learning_rate=0.05, rng=rng)
    optimizer = learner.optimizer
    assert isinstance(optimizer, torch.optim.SGD)
    params = list(learner.module.parameters())
    buffers = [optimizer.state[p]["momentum_buffer"] for p in params]
    assert all(b is not None and torch.any(b != 0) for b in buffers)
    snapshot = [b.clone() for b in buffers]
    # not part of the weights: the vector has exactly the parameters, and no momentum
    # buffer lives in its storage
    (flat,) = learner.get_weights()
    assert flat.size == n == sum(p.numel() for p in params)
    assert not any(np.shares_memory(b.numpy(), flat) for b in buffers)
    # set_weights (an aggregate arriving) leaves the momentum alone
    learner.set_weights([flat * np.float32(0.5)])
    assert all(torch.equal(b, s) for b, s in zip(buffers, snapshot, strict=True))
    # the next fit goes on with the same optimiser and its state, at the new learning rate
    learner.fit(x, y, epochs=1, batch_size=50, learning_rate=0.01, rng=rng)
    assert learner.optimizer is optimizer
    assert all(g["lr"] == 0.01 for g in optimizer.param_groups)
    assert not all(
        torch.equal(optimizer.state[p]["momentum_buffer"], s)
        for p, s in zip(params, snapshot, strict=True)
    )


def test_adam_moments_stay_out_of_the_weights(digits) -> None:
    learner = torch_learner(cnn_model(optimizer={"kind": "adam", "weight_decay": 0.001}))
    rng = np.random.default_rng(0)
    learner.fit(
        digits[0][:64], digits[1][:64], epochs=1, batch_size=32, learning_rate=0.001, rng=rng
    )
    optimizer = learner.optimizer
    assert isinstance(optimizer, torch.optim.Adam)
    assert optimizer.param_groups[0]["weight_decay"] == 0.001
    state = optimizer.state[next(learner.module.parameters())]
    assert int(state["step"]) == 2 and "exp_avg" in state and "exp_avg_sq" in state
    assert learner.get_weights()[0].size == learner.n_parameters


def test_optimizer_spec_from_the_config_reaches_the_learner() -> None:
    learner = torch_learner(cnn_model(optimizer={"kind": "sgd", "momentum": 0.5}))
    assert learner.optimizer_spec == OptimizerSpec("sgd", 0.5, 0.0)
    assert torch_learner(cnn_model()).optimizer_spec == OptimizerSpec()


# --------------------------------------------------------------------------------------
# errors


def test_set_weights_refuses_wrong_shapes_and_types() -> None:
    learner = torch_learner(cnn_model())
    flat = learner.get_weights()[0].copy()
    with pytest.raises(ValueError, match="expected shape"):
        learner.set_weights([flat[:-1]])
    with pytest.raises(ValueError, match="expected shape"):
        learner.set_weights([flat.reshape(1, -1)])
    with pytest.raises(ValueError, match="expected 1 weight array"):
        learner.set_weights([flat[:10], flat[10:]])
    with pytest.raises(ValueError, match="expected 1 weight array"):
        learner.set_weights([])
    with pytest.raises(ValueError, match="real numeric"):
        learner.set_weights([flat.astype(np.complex64)])
    assert learner.get_weights()[0].tobytes() == flat.tobytes()  # unchanged by the refusals


def test_labels_out_of_range_or_not_integers_are_refused(digits) -> None:
    x, y = digits[0][:20], digits[1][:20].copy()
    learner = torch_learner(cnn_model())
    kwargs: dict[str, Any] = {
        "epochs": 1,
        "batch_size": 8,
        "learning_rate": 0.1,
        "rng": np.random.default_rng(0),
    }
    before = learner.get_weights()[0].copy()
    high = y.copy()
    high[3] = 10
    with pytest.raises(ValueError, match=r"labels must lie in 0\.\.9, found 0\.\.10"):
        learner.fit(x, high, **kwargs)
    low = y.copy()
    low[0] = -1
    with pytest.raises(ValueError, match="labels must lie in"):
        learner.evaluate(x, low)
    with pytest.raises(ValueError, match="integer class indices"):
        learner.fit(x, y.astype(np.float32), **kwargs)
    with pytest.raises(ValueError, match="must have shape"):
        learner.fit(x, y[:-1], **kwargs)
    with pytest.raises(ValueError, match="epochs and batch_size"):
        learner.fit(x, y, **{**kwargs, "epochs": 0})
    with pytest.raises(ValueError, match="learning_rate"):
        learner.fit(x, y, **{**kwargs, "learning_rate": float("nan")})
    assert learner.get_weights()[0].tobytes() == before.tobytes()


def test_factory_returning_a_non_module_is_a_config_error() -> None:
    model = {"kind": "torch", "inputs": 4, "classes": 2, "factory": f"{__name__}:not_a_module"}
    with pytest.raises(ConfigError) as caught:
        build_learner(model, 1, source="shared.yaml")
    err = caught.value
    assert err.file == "shared.yaml" and err.field == "training.model.factory"
    assert "not a torch.nn.Module" in err.problem and "dict" in err.problem


def test_module_without_weights_is_a_config_error() -> None:
    # nn.Identity takes (and ignores) any arguments: a module with nothing to learn
    model = {"kind": "torch", "inputs": 4, "classes": 2, "factory": "torch.nn:Identity"}
    with pytest.raises(ConfigError) as caught:
        build_learner(model, 1)
    assert caught.value.field == "training.model.factory"
    assert "has no weights" in caught.value.problem


@pytest.mark.parametrize("clash", ["inputs", "outputs"])
def test_options_clashing_with_the_model_section_are_refused(clash: str) -> None:
    with pytest.raises(ConfigError) as caught:
        build_learner(cnn_model(options={"hidden": 8, clash: 3}), 1)
    assert caught.value.field == "training.model.options"
    assert f"must not set {clash}" in caught.value.problem


def test_factory_failures_and_unknown_optimizer_name_their_field() -> None:
    with pytest.raises(ConfigError) as caught:
        build_learner(cnn_model(options={"channels": [8, 16, 32, 64]}), 1)
    assert caught.value.field == "training.model.factory"
    assert "ValueError" in caught.value.problem and "too small" in caught.value.problem
    with pytest.raises(ConfigError) as caught:
        build_learner(cnn_model(factory="p2pfl.learning.examples.no_such:cnn"), 1)
    assert caught.value.field == "training.model.factory"
    with pytest.raises(ConfigError) as caught:
        build_learner(cnn_model(optimizer={"kind": "rmsprop"}), 1)
    assert caught.value.field == "training.model.optimizer.kind"
    assert "rmsprop" in caught.value.problem


def test_task_must_be_known() -> None:
    with pytest.raises(ValueError, match="task must be one of"):
        TorchLearner(nn.Linear(2, 2), task="ranking", outputs=2)  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------
# threads


def test_use_threads_sets_torch_threads() -> None:
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        use_threads(1)  # a peer process
        assert torch.get_num_threads() == 1
        use_threads(2)
        assert torch.get_num_threads() == 2
        use_threads(0)  # never below one
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(old)


def test_build_learner_leaves_threads_alone_when_asked() -> None:
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        build_learner(cnn_model(), 1, torch_threads=None)
        assert torch.get_num_threads() == 2
        build_learner(cnn_model(), 1)  # the default: one thread (a peer process)
        assert torch.get_num_threads() == 1
        build_learner(cnn_model(), 1, torch_threads=2)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(old)
