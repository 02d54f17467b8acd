"""Tests of p2pfl.learning: models, gradients, weight plumbing, data files, model factory."""

from __future__ import annotations

import pickle
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from p2pfl.errors import ConfigError, DataError
from p2pfl.learning import (
    MLP,
    Dataset,
    Evaluation,
    Learner,
    SoftmaxRegression,
    build_learner,
    check_compatible,
    flatten,
    load_dataset,
    unflatten,
)
from p2pfl.learning.prepare import load_digits_arrays, split_iid, write_partitions

# --------------------------------------------------------------------------------------
# helpers


def _random_problem(
    seed: int, n: int = 9, inputs: int = 6, classes: int = 3
) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, inputs))
    y = rng.integers(0, classes, size=n)
    return x, y


def _numeric_gradients(
    model: MLP | SoftmaxRegression, x: np.ndarray, y: np.ndarray
) -> list[np.ndarray]:
    """Central differences, perturbing the live parameter views in place."""
    eps = 1e-6
    out: list[np.ndarray] = []
    for w in model.get_weights():
        g = np.zeros_like(w)
        for idx in np.ndindex(w.shape):
            old = w[idx]
            w[idx] = old + eps
            plus = model.loss_and_gradients(x, y)[0]
            w[idx] = old - eps
            minus = model.loss_and_gradients(x, y)[0]
            w[idx] = old
            g[idx] = (plus - minus) / (2 * eps)
        out.append(g)
    return out


def _relative_error(a: list[np.ndarray], b: list[np.ndarray]) -> float:
    fa, fb = np.concatenate([v.ravel() for v in a]), np.concatenate([v.ravel() for v in b])
    scale = float(np.linalg.norm(fa)) + float(np.linalg.norm(fb))
    return float(np.linalg.norm(fa - fb)) / max(scale, 1e-300)


def _same_weights(a: Learner, b: Learner) -> bool:
    wa, wb = a.get_weights(), b.get_weights()
    return len(wa) == len(wb) and all(
        u.shape == v.shape and u.dtype == v.dtype and u.tobytes() == v.tobytes()
        for u, v in zip(wa, wb, strict=True)
    )


# --------------------------------------------------------------------------------------
# gradients


@pytest.mark.parametrize(
    "make",
    [
        lambda: SoftmaxRegression(6, 3, seed=1, dtype=np.float64),
        lambda: MLP(6, 3, [5, 4], seed=2, dtype=np.float64),
    ],
    ids=["softmax", "mlp-2-hidden"],
)
def test_gradients_match_central_differences(make: Callable[[], MLP | SoftmaxRegression]) -> None:
    model = make()
    # Non-zero biases, so their gradients flow through every layer meaningfully.
    rng = np.random.default_rng(3)
    model.set_weights([w + 0.1 * rng.standard_normal(w.shape) for w in model.get_weights()])
    x, y = _random_problem(4)
    loss, analytic = model.loss_and_gradients(x, y)
    numeric = _numeric_gradients(model, x, y)
    assert np.isfinite(loss) and loss > 0
    assert [g.shape for g in analytic] == [w.shape for w in model.get_weights()]
    assert _relative_error(analytic, numeric) < 1e-5


def test_loss_is_stable_for_huge_logits() -> None:
    model = SoftmaxRegression(2, 3, seed=0, dtype=np.float32)
    model.set_weights([np.array([[1e4, 0, -1e4], [0, 0, 0]], np.float32), np.zeros(3, np.float32)])
    x = np.array([[10.0, 0.0], [-10.0, 0.0]], np.float32)
    loss, grads = model.loss_and_gradients(x, np.array([0, 2]))
    assert loss == pytest.approx(0.0, abs=1e-6)  # both rows confidently right
    loss, grads = model.loss_and_gradients(x, np.array([1, 1]))
    assert loss == pytest.approx(1e5, rel=1e-4)  # confidently wrong, but finite
    assert all(np.isfinite(g).all() for g in grads)


def test_float32_model_computes_in_float32() -> None:
    model = MLP(6, 3, [5], seed=0)
    x, y = _random_problem(0)  # float64 input is cast to the model's dtype
    _, grads = model.loss_and_gradients(x, y)
    assert all(g.dtype == np.float32 for g in grads)
    model.fit(x, y, epochs=1, batch_size=4, learning_rate=0.1, rng=np.random.default_rng(0))
    assert all(w.dtype == np.float32 for w in model.get_weights())


# --------------------------------------------------------------------------------------
# initialisation, weights in and out


def test_same_seed_gives_identical_weights_and_different_seed_does_not() -> None:
    assert _same_weights(MLP(64, 10, [32, 16], seed=7), MLP(64, 10, [32, 16], seed=7))
    assert _same_weights(SoftmaxRegression(64, 10, seed=7), SoftmaxRegression(64, 10, seed=7))
    assert not _same_weights(MLP(64, 10, [32, 16], seed=7), MLP(64, 10, [32, 16], seed=8))
    # The dtype does not change which values are drawn.
    w32 = MLP(8, 3, [4], seed=5).get_weights()
    w64 = MLP(8, 3, [4], seed=5, dtype=np.float64).get_weights()
    for a, b in zip(w32, w64, strict=True):
        np.testing.assert_array_equal(a, b.astype(np.float32))


def test_initialisation_is_he_scaled_with_zero_biases() -> None:
    w1, b1, w2, b2 = MLP(400, 10, [300], seed=0).get_weights()
    assert w1.std() == pytest.approx(np.sqrt(2 / 400), rel=0.05)
    assert w2.std() == pytest.approx(np.sqrt(2 / 300), rel=0.1)
    assert not b1.any() and not b2.any()


def test_weights_are_views_of_one_contiguous_buffer() -> None:
    model = MLP(5, 3, [4, 4], seed=0)
    weights = model.get_weights()
    assert [w.shape for w in weights] == [(5, 4), (4,), (4, 4), (4,), (4, 3), (3,)]
    base = weights[0].base
    assert isinstance(base, np.ndarray)
    assert all(np.shares_memory(w, base) for w in weights)
    assert base.flags.c_contiguous and base.size == model.n_parameters == sum(
        w.size for w in weights
    )
    weights[1][:] = 5.0  # writing into a returned view writes into the model
    assert (model.get_weights()[1] == 5.0).all()


def test_set_get_roundtrip_copies_values_in() -> None:
    model = MLP(5, 3, [4], seed=0)
    source = MLP(5, 3, [4], seed=1)
    new = [w.astype(np.float64) * 2 for w in source.get_weights()]
    model.set_weights(new)
    for got, want in zip(model.get_weights(), new, strict=True):
        np.testing.assert_array_equal(got, want.astype(np.float32))
        assert not np.shares_memory(got, want)
    new[0][...] = 0  # the model holds copies, not the caller's arrays
    assert model.get_weights()[0].any()
    model.set_weights(model.get_weights())  # aliasing its own buffer is harmless
    np.testing.assert_array_equal(model.get_weights()[2], source.get_weights()[2] * 2)


def test_set_weights_rejects_mismatches_without_partial_update() -> None:
    model = MLP(5, 3, [4], seed=0)
    before = [w.copy() for w in model.get_weights()]
    good = [np.ones_like(w) for w in before]
    with pytest.raises(ValueError, match="shape"):
        model.set_weights([*good[:3], np.ones(4, np.float32)])  # last bias should be (3,)
    with pytest.raises(ValueError, match="shape"):
        model.set_weights([good[0].T, *good[1:]])
    with pytest.raises(ValueError, match="expected 4 weight arrays"):
        model.set_weights(good[:3])
    with pytest.raises(ValueError, match="numeric"):
        model.set_weights([good[0].astype(str), *good[1:]])
    for got, want in zip(model.get_weights(), before, strict=True):
        np.testing.assert_array_equal(got, want)


def test_constructor_validation() -> None:
    with pytest.raises(ValueError, match="hidden"):
        MLP(4, 3, [], seed=0)
    with pytest.raises(ValueError, match="classes"):
        SoftmaxRegression(4, 1, seed=0)
    with pytest.raises(ValueError, match="dtype"):
        SoftmaxRegression(4, 3, seed=0, dtype=np.float16)
    with pytest.raises(ValueError, match="hidden layer size"):
        MLP(4, 3, [0], seed=0)


def test_models_satisfy_the_learner_protocol() -> None:
    assert isinstance(SoftmaxRegression(4, 3, seed=0), Learner)
    assert isinstance(MLP(4, 3, [2], seed=0), Learner)
    assert not isinstance(object(), Learner)


# --------------------------------------------------------------------------------------
# flatten / unflatten


def test_flatten_single_float32_array_is_a_view() -> None:
    a = np.arange(12, dtype=np.float32).reshape(3, 4)
    flat = flatten([a])
    assert flat.shape == (12,) and flat.dtype == np.float32
    assert np.shares_memory(flat, a)
    flat[0] = 99.0
    assert a[0, 0] == 99.0


def test_flatten_copies_when_it_must() -> None:
    a = np.arange(12, dtype=np.float32).reshape(3, 4)
    t = flatten([a.T])  # not C-contiguous
    assert not np.shares_memory(t, a)
    np.testing.assert_array_equal(t, a.T.ravel())
    d = flatten([a.astype(np.float64)])
    assert d.dtype == np.float32
    several = flatten([a, np.ones(2, np.float64)])
    assert several.dtype == np.float32 and several.shape == (14,)
    assert not np.shares_memory(several, a)
    assert flatten([]).shape == (0,)


def test_flatten_unflatten_roundtrip_on_model_weights() -> None:
    weights = MLP(7, 4, [5, 3], seed=0).get_weights()
    flat = flatten(weights)
    parts = unflatten(flat, weights)
    assert all(np.shares_memory(p, flat) for p in parts)
    for p, w in zip(parts, weights, strict=True):
        np.testing.assert_array_equal(p, w)
    with pytest.raises(ValueError, match="template needs"):
        unflatten(flat[:-1], weights)
    with pytest.raises(ValueError, match="1-D"):
        unflatten(flat.reshape(1, -1), weights)


@settings(max_examples=50, deadline=None)
@given(st.lists(st.lists(st.integers(0, 4), min_size=0, max_size=3), min_size=1, max_size=5))
def test_unflatten_inverts_flatten(shapes: list[list[int]]) -> None:
    rng = np.random.default_rng(0)
    arrays = [rng.standard_normal(tuple(s)).astype(np.float32) for s in shapes]
    back = unflatten(flatten(arrays), arrays)
    assert [b.shape for b in back] == [a.shape for a in arrays]
    for b, a in zip(back, arrays, strict=True):
        np.testing.assert_array_equal(b, a)


# --------------------------------------------------------------------------------------
# training


@pytest.fixture(scope="module")
def digits_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    x, y = load_digits_arrays()
    return write_partitions(x, y, 1, tmp_path_factory.mktemp("digits"), seed=0, names=["solo"])


@pytest.mark.parametrize(
    ("make", "learning_rate", "epochs"),
    [
        (lambda: SoftmaxRegression(64, 10, seed=0), 0.5, 5),
        (lambda: MLP(64, 10, [64], seed=0), 0.2, 8),
    ],
    ids=["softmax", "mlp-64"],
)
def test_training_on_digits_reaches_093(
    digits_dir: Path, make: Callable[[], Learner], learning_rate: float, epochs: int
) -> None:
    ds = load_dataset(digits_dir / "solo.npz")
    assert ds.x_val is not None and ds.y_val is not None
    check_compatible(ds, 64, 10, "solo.npz")
    model = make()
    before = model.evaluate(ds.x_val, ds.y_val)
    rng = np.random.default_rng(1)
    losses = [
        model.fit(ds.x, ds.y, epochs=1, batch_size=32, learning_rate=learning_rate, rng=rng)
        for _ in range(epochs)
    ]
    after = model.evaluate(ds.x_val, ds.y_val)
    assert losses == sorted(losses, reverse=True)  # training loss falls every epoch
    assert after.loss < before.loss
    assert after.accuracy >= 0.93, after


def test_fit_is_deterministic_given_the_rng_and_evaluate_is_pure() -> None:
    x, y = _random_problem(0, n=50)
    models = [MLP(6, 3, [8], seed=0) for _ in range(2)]
    losses = [
        m.fit(x, y, epochs=3, batch_size=7, learning_rate=0.05, rng=np.random.default_rng(9))
        for m in models
    ]
    assert losses[0] == losses[1]
    assert _same_weights(models[0], models[1])
    snapshot = [w.copy() for w in models[0].get_weights()]
    result = models[0].evaluate(x, y)
    assert isinstance(result, Evaluation) and 0.0 <= result.accuracy <= 1.0
    for got, want in zip(models[0].get_weights(), snapshot, strict=True):
        np.testing.assert_array_equal(got, want)


def test_fit_loss_is_the_mean_over_the_last_epoch() -> None:
    x, y = _random_problem(1, n=10)
    model = SoftmaxRegression(6, 3, seed=0, dtype=np.float64)
    start = model.loss_and_gradients(x, y)[0]
    # One full batch: the reported loss is the loss before the single update.
    assert model.fit(
        x, y, epochs=1, batch_size=100, learning_rate=0.1, rng=np.random.default_rng(0)
    ) == pytest.approx(start)


def test_fit_and_evaluate_validate_inputs() -> None:
    model = SoftmaxRegression(6, 3, seed=0)
    x, y = _random_problem(0)
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="labels"):
        model.evaluate(x, y + 3)
    with pytest.raises(ValueError, match="integer"):
        model.evaluate(x, y.astype(np.float64))
    with pytest.raises(ValueError, match="shape"):
        model.evaluate(x[:, :5], y)
    with pytest.raises(ValueError, match="shape"):
        model.evaluate(x, y[:-1])
    with pytest.raises(ValueError, match="batch_size"):
        model.fit(x, y, epochs=1, batch_size=0, learning_rate=0.1, rng=rng)
    with pytest.raises(ValueError, match="learning_rate"):
        model.fit(x, y, epochs=1, batch_size=2, learning_rate=float("nan"), rng=rng)


def test_predict_matches_evaluate_accuracy() -> None:
    x, y = _random_problem(2, n=40)
    model = MLP(6, 3, [8], seed=0)
    model.fit(x, y, epochs=20, batch_size=8, learning_rate=0.1, rng=np.random.default_rng(0))
    assert model.evaluate(x, y).accuracy == pytest.approx(float(np.mean(model.predict(x) == y)))


# --------------------------------------------------------------------------------------
# data preparation


def test_load_digits_arrays_is_scaled() -> None:
    x, y = load_digits_arrays()
    assert x.shape == (1797, 64) and x.dtype == np.float32
    assert x.min() == 0.0 and x.max() == 1.0
    assert y.dtype == np.int64 and set(np.unique(y).tolist()) == set(range(10))


def test_split_iid_partitions_every_index_once() -> None:
    parts = split_iid(103, 4, seed=3)
    assert [p.size for p in parts] == [26, 26, 26, 25]
    np.testing.assert_array_equal(np.sort(np.concatenate(parts)), np.arange(103))
    again = split_iid(103, 4, seed=3)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again, strict=True))
    assert not np.array_equal(parts[0], split_iid(103, 4, seed=4)[0])
    with pytest.raises(ValueError):
        split_iid(3, 4, seed=0)


def test_write_partitions_layout(tmp_path: Path) -> None:
    x, y = load_digits_arrays()
    out = write_partitions(x, y, 3, tmp_path / "parts", seed=5, names=["a", "b", "c"])
    assert out == tmp_path / "parts"
    test = load_dataset(out / "test.npz")
    assert test.x_val is None
    # Stratified: each class keeps about its share of the held-out set.
    counts = np.bincount(test.y, minlength=10)
    assert counts.min() >= 30 and abs(test.y.size - 0.2 * y.size) <= 10
    rows: list[np.ndarray] = []
    for name in "abc":
        ds = load_dataset(out / f"{name}.npz")
        assert ds.x_val is not None and ds.y_val is not None
        np.testing.assert_array_equal(ds.x_val, test.x)
        np.testing.assert_array_equal(ds.y_val, test.y)
        rows.append(ds.x)
    sizes = [r.shape[0] for r in rows]
    assert max(sizes) - min(sizes) <= 1
    assert sum(sizes) + test.y.size == y.size
    # Every original row ends up in exactly one place (digits has a few duplicate images,
    # so compare multisets of rows rather than sets).
    everything = np.concatenate([*rows, test.x])
    np.testing.assert_array_equal(np.unique(everything, axis=0), np.unique(x, axis=0))
    with pytest.raises(ValueError, match="names"):
        write_partitions(x, y, 2, tmp_path, seed=0, names=["a"])
    with pytest.raises(ValueError, match="file name"):
        write_partitions(x, y, 2, tmp_path, seed=0, names=["a", "test"])


def test_peer_imports_do_not_load_sklearn() -> None:
    code = "import sys, p2pfl.learning; assert 'sklearn' not in sys.modules, 'sklearn imported'"
    root = Path(__file__).resolve().parents[1]
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=root, capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr


# --------------------------------------------------------------------------------------
# load_dataset


def _npz(tmp_path: Path, name: str, **arrays: np.ndarray) -> Path:
    path = tmp_path / name
    np.savez(path, allow_pickle=True, **arrays)  # the loader must refuse pickles itself
    return path


_X = np.arange(12, dtype=np.float64).reshape(4, 3)
_Y = np.array([0, 1, 2, 1])


def test_load_npz_converts_types(tmp_path: Path) -> None:
    ds = load_dataset(
        _npz(tmp_path, "d.npz", x=_X, y=_Y.astype(np.float64), x_val=_X[:2], y_val=_Y[:2])
    )
    assert ds.x.dtype == np.float32 and ds.y.dtype == np.int64
    assert ds.x_val is not None and ds.x_val.dtype == np.float32
    assert ds.y_val is not None and ds.y_val.dtype == np.int64
    np.testing.assert_array_equal(ds.y, _Y)
    assert ds.features == 3


@pytest.mark.parametrize(
    ("arrays", "message"),
    [
        ({"x": _X}, "missing array 'y'"),
        ({"y": _Y}, "missing array 'x'"),
        ({"x": _X, "y": _Y[:3]}, "3 labels but x has 4 rows"),
        ({"x": _X, "y": np.array([0, 1.5, 2, 1])}, "integer class labels, found 1.5 at index 1"),
        ({"x": _X, "y": np.array([0, np.nan, 2, 1])}, "integer class labels"),
        ({"x": _X, "y": _Y.astype(str)}, "integer class labels, got dtype"),
        ({"x": _X, "y": np.array([0, -1, 2, 1])}, "negative label"),
        ({"x": _X.ravel(), "y": _Y}, "x must be 2-D"),
        ({"x": _X, "y": _Y.reshape(4, 1)}, "y must be 1-D"),
        ({"x": _X.astype(str), "y": _Y}, "x must be numeric"),
        ({"x": np.where(_X == 4, np.nan, _X), "y": _Y}, r"NaN or infinite value \(row 1\)"),
        ({"x": np.full((4, 3), 1e300), "y": _Y}, r"too large for float32 \(row 0\)"),
        ({"x": np.empty((0, 3)), "y": np.empty(0, np.int64)}, "x is empty"),
        ({"x": _X, "y": _Y, "x_val": _X}, "has 'x_val' but not 'y_val'"),
        ({"x": _X, "y": _Y, "y_val": _Y}, "has 'y_val' but not 'x_val'"),
        ({"x": _X, "y": _Y, "x_val": _X[:, :2], "y_val": _Y}, "x_val has 2 features but x has 3"),
        ({"x": _X, "y": _Y, "x_val": _X, "y_val": _Y[:2]}, "y_val has 2 labels but x_val has 4"),
    ],
)
def test_load_npz_errors(tmp_path: Path, arrays: dict[str, np.ndarray], message: str) -> None:
    path = _npz(tmp_path, "d.npz", **arrays)
    with pytest.raises(DataError, match=message) as info:
        load_dataset(path)
    assert str(path) in str(info.value)


_UNPICKLED: list[str] = []


def _tripwire() -> str:
    _UNPICKLED.append("unpickled!")
    return "boom"


class _Payload:
    """Unpickling this object calls ``_tripwire``: proof the loader ran pickle."""

    def __reduce__(self) -> tuple[Callable[[], str], tuple[()]]:
        return (_tripwire, ())


def test_load_npz_never_unpickles(tmp_path: Path) -> None:
    objects = np.empty(4, dtype=object)
    objects[:] = [_Payload() for _ in range(4)]
    path = _npz(tmp_path, "d.npz", x=_X, y=objects)
    with pytest.raises(DataError, match="cannot read array 'y'"):
        load_dataset(path)
    # A bare pickle saved with an .npz name: np.load would fall back to unpickling it.
    raw = tmp_path / "raw.npz"
    raw.write_bytes(pickle.dumps({"x": _X, "y": _Payload()}))
    with pytest.raises(DataError, match=r"cannot read as an \.npz archive"):
        load_dataset(raw)
    assert _UNPICKLED == []


def test_load_npz_unreadable_files(tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.npz"
    garbage.write_bytes(b"PK\x03\x04 definitely not a zip archive")
    with pytest.raises(DataError, match=r"garbage\.npz"):
        load_dataset(garbage)
    single = tmp_path / "single.npz"
    with single.open("wb") as fh:
        np.save(fh, _X)
    with pytest.raises(DataError, match=r"single \.npy array"):
        load_dataset(single)
    with pytest.raises(DataError, match="does not exist"):
        load_dataset(tmp_path / "nope.npz")
    with pytest.raises(DataError, match="not a regular file"):
        load_dataset(tmp_path)
    other = tmp_path / "data.parquet"
    other.write_bytes(b"")
    with pytest.raises(DataError, match=r"unknown data file extension '\.parquet'"):
        load_dataset(other)


def _csv(tmp_path: Path, text: str, name: str = "d.csv") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def test_load_csv_without_header_uses_last_column(tmp_path: Path) -> None:
    ds = load_dataset(_csv(tmp_path, "0.5,1,2\n1.5,3,0\n\n2.5,4,1\n"))
    np.testing.assert_array_equal(ds.x, np.array([[0.5, 1], [1.5, 3], [2.5, 4]], np.float32))
    np.testing.assert_array_equal(ds.y, [2, 0, 1])
    assert ds.x_val is None and ds.y_val is None


@pytest.mark.parametrize("label", ["label", "y", '"Label"'])
def test_load_csv_with_header_finds_the_label_column(tmp_path: Path, label: str) -> None:
    text = f"# exported by some tool\na,{label},b\n0.5,2,1\n1.5,0,3\n"
    ds = load_dataset(_csv(tmp_path, text))
    np.testing.assert_array_equal(ds.x, np.array([[0.5, 1], [1.5, 3]], np.float32))
    np.testing.assert_array_equal(ds.y, [2, 0])


def test_load_csv_with_bom_header(tmp_path: Path) -> None:
    path = tmp_path / "bom.csv"
    path.write_bytes("\ufefff1,f2,label\n1,2,0\n".encode())
    np.testing.assert_array_equal(load_dataset(path).y, [0])


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("label,y,c\n1,2,0\n", "more than one label column"),
        ("a,label\n", "no data rows"),
        ("", "no data rows"),
        ("1,2,0\n1,abc,1\n", "line 2, column 2: 'abc' is not a number"),
        ("# comment\na,b,label\n1,2,0\n\n1,x,1\n", "line 5, column 'b': 'x' is not a number"),
        ("1,2,0\n1,2\n", "line 2 has 2 fields, the others 3"),
        ("1,2,0.5\n", "integer class labels"),
        ("1\n2\n", "at least one feature column"),
        ("a,b,label\n1,2,3,4\n", "malformed CSV|header has 3 columns"),
        ("1,nan,0\n", "NaN or infinite"),
    ],
)
def test_load_csv_errors(tmp_path: Path, text: str, message: str) -> None:
    path = _csv(tmp_path, text)
    with pytest.raises(DataError, match=message) as info:
        load_dataset(path)
    assert str(path) in str(info.value)


def test_val_path_provides_or_overrides_validation(tmp_path: Path) -> None:
    train = _npz(tmp_path, "train.npz", x=_X, y=_Y, x_val=_X[:1], y_val=_Y[:1])
    val_csv = _csv(tmp_path, "x1,x2,x3,label\n9,9,9,2\n8,8,8,1\n", name="val.csv")
    ds = load_dataset(train, val_path=val_csv)
    assert ds.x_val is not None and ds.x_val.shape == (2, 3)
    np.testing.assert_array_equal(ds.y_val, [2, 1])
    csv_train = _csv(tmp_path, "1,2,3,0\n4,5,6,1\n", name="train.csv")
    val_npz = _npz(tmp_path, "val.npz", x=_X, y=_Y)
    ds = load_dataset(csv_train, val_path=val_npz)
    assert ds.y_val is not None and ds.y_val.shape == (4,)
    narrow = _npz(tmp_path, "narrow.npz", x=_X[:, :2], y=_Y)
    with pytest.raises(DataError, match=r"narrow\.npz: validation data has 2 features"):
        load_dataset(train, val_path=narrow)


def test_check_compatible() -> None:
    ds = Dataset(
        x=np.zeros((3, 4), np.float32),
        y=np.array([0, 1, 2]),
        x_val=np.zeros((1, 4), np.float32),
        y_val=np.array([5]),
        source="alice.npz",
    )
    with pytest.raises(DataError) as info:
        check_compatible(ds, 5, 10, "peers.yaml")
    assert str(info.value) == (
        "alice.npz: data has 4 features but the model (peers.yaml: training.model) expects 5"
    )
    with pytest.raises(DataError, match=r"label 5 in y_val is outside 0\.\.3"):
        check_compatible(ds, 4, 4, "peers.yaml")
    with pytest.raises(DataError, match=r"alice\.npz: label 2 in y is outside 0\.\.1"):
        check_compatible(ds, 4, 2, "peers.yaml")
    check_compatible(ds, 4, 6, "peers.yaml")


def test_a_header_without_label_or_y_takes_the_last_column(tmp_path: Path) -> None:
    path = tmp_path / "cancer.csv"
    path.write_text("radius,texture,diagnosis\n1.5,2,1\n2.5,3,0\n")
    ds = load_dataset(path)
    np.testing.assert_array_equal(ds.y, [1, 0])
    np.testing.assert_array_equal(ds.x, np.array([[1.5, 2], [2.5, 3]], np.float32))


@pytest.mark.parametrize("label", ["diagnosis", "Diagnosis", "1"])
def test_the_label_column_can_be_named_or_numbered(tmp_path: Path, label: str) -> None:
    path = tmp_path / "cancer.csv"
    path.write_text("diagnosis,radius,texture\n1,1.5,2\n0,2.5,3\n")
    ds = load_dataset(path, label_column=label)
    np.testing.assert_array_equal(ds.y, [1, 0])
    assert ds.x.shape == (2, 2) and ds.source == str(path)


def test_an_unknown_label_column_names_the_choices(tmp_path: Path) -> None:
    path = tmp_path / "cancer.csv"
    path.write_text("diagnosis,radius\n1,1.5\n")
    with pytest.raises(
        DataError,
        match=r"'size' is neither a column number 1\.\.2 nor one of "
        r"the header's names \(diagnosis, radius\)",
    ):
        load_dataset(path, label_column="size")


# --------------------------------------------------------------------------------------
# build_learner


def make_custom(*, inputs: int, classes: int, seed: int, width: int = 8) -> MLP:
    """A custom factory as an operator would write one (referenced by module path)."""
    return MLP(inputs, classes, [width, width], seed)


def make_not_a_learner(*, inputs: int, classes: int, seed: int) -> object:
    return {"inputs": inputs}


def make_broken(*, inputs: int, classes: int, seed: int) -> MLP:
    raise RuntimeError("GPU not found")


NOT_CALLABLE = 42

_FACTORY = "training.model.factory"


def test_build_builtin_kinds_from_the_shared_seed() -> None:
    soft = build_learner({"kind": "softmax", "inputs": 64, "classes": 10}, seed=7)
    assert isinstance(soft, SoftmaxRegression)
    assert _same_weights(soft, SoftmaxRegression(64, 10, seed=7))
    mlp = build_learner({"kind": "mlp", "inputs": 64, "classes": 10, "hidden": [64]}, seed=7)
    assert isinstance(mlp, MLP) and mlp.hidden == (64,)
    assert _same_weights(mlp, MLP(64, 10, [64], seed=7))


def test_build_custom_factory() -> None:
    model = {
        "kind": "custom",
        "inputs": 6,
        "classes": 3,
        "factory": f"{__name__}:make_custom",
        "options": {"width": 5},
    }
    learner = build_learner(model, seed=3)
    assert isinstance(learner, MLP) and learner.hidden == (5, 5)
    assert _same_weights(learner, build_learner(model, seed=3))


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("no_colon_here", "is not of the form 'package.module:function'"),
        (":make_custom", "is not of the form"),
        (f"{__name__}:", "is not of the form"),
        ("a:b:c", "is not of the form"),
        ("p2pfl_no_such_module_xyz:make", "cannot import module 'p2pfl_no_such_module_xyz'"),
        (
            f"{__name__}:no_such_function",
            f"module '{__name__}' has no attribute 'no_such_function'",
        ),
        (f"{__name__}:NOT_CALLABLE", "is not callable"),
        (f"{__name__}:make_not_a_learner", "returned dict, which is not a Learner"),
        (f"{__name__}:make_broken", "failed: RuntimeError: GPU not found"),
        (42, "must be a string"),
    ],
)
def test_build_custom_factory_errors(spec: object, message: str) -> None:
    model = {"kind": "custom", "inputs": 6, "classes": 3, "factory": spec}
    with pytest.raises(ConfigError, match=message) as info:
        build_learner(model, seed=0, source="site/peers.yaml")
    assert info.value.field == _FACTORY
    assert info.value.file == "site/peers.yaml"
    assert str(info.value).startswith(f"site/peers.yaml: {_FACTORY}: ")


@pytest.mark.parametrize(
    ("model", "field", "message"),
    [
        ({"kind": "svm", "inputs": 4, "classes": 3}, "training.model.kind", "unknown model kind"),
        ({"inputs": 4, "classes": 3}, "training.model.kind", "unknown model kind None"),
        ({"kind": "softmax", "classes": 3}, "training.model.inputs", "positive integer"),
        ({"kind": "softmax", "inputs": True, "classes": 3}, "training.model.inputs", "positive"),
        ({"kind": "softmax", "inputs": 4, "classes": 1}, "training.model.classes", "at least 2"),
        ({"kind": "mlp", "inputs": 4, "classes": 3}, "training.model.hidden", "non-empty list"),
        ({"kind": "mlp", "inputs": 4, "classes": 3, "hidden": []}, "training.model.hidden", "list"),
        (
            {"kind": "mlp", "inputs": 4, "classes": 3, "hidden": [8, 0]},
            "training.model.hidden[1]",
            "positive integer",
        ),
        (
            {"kind": "custom", "inputs": 4, "classes": 3, "factory": "m:f", "options": [1]},
            "training.model.options",
            "mapping",
        ),
        (
            {
                "kind": "custom",
                "inputs": 4,
                "classes": 3,
                "factory": f"{__name__}:make_custom",
                "options": {"seed": 1},
            },
            "training.model.options",
            "must not set seed",
        ),
    ],
)
def test_build_learner_config_errors(model: dict[str, object], field: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as info:
        build_learner(model, seed=0)
    assert info.value.field == field
    assert info.value.file == "peers.yaml"
