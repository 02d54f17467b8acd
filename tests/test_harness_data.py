"""Tests of p2pfl.harness.datasets and p2pfl.harness.partition: loaders, IDX, partitions."""

from __future__ import annotations

import gzip
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from p2pfl.errors import DataError
from p2pfl.harness import datasets
from p2pfl.harness.datasets import (
    DEFAULT_FASHION_DIR,
    FASHION_FILES,
    SplitData,
    describe,
    load_split,
    read_idx,
)
from p2pfl.harness.partition import (
    DEFAULT_MIN_SIZE,
    PartitionSpec,
    classes_per_peer,
    describe_heterogeneity,
    label_histogram,
    parse_partition,
    partition,
)
from p2pfl.learning.prepare import load_digits_arrays, write_partitions

# --------------------------------------------------------------------------------------
# helpers

_CODES = {
    np.dtype(np.uint8): 0x08,
    np.dtype(np.int8): 0x09,
    np.dtype(">i2"): 0x0B,
    np.dtype(">i4"): 0x0C,
    np.dtype(">f4"): 0x0D,
    np.dtype(">f8"): 0x0E,
}


def _idx_bytes(arr: np.ndarray, code: int | None = None) -> bytes:
    """The IDX encoding of ``arr`` (big-endian), written independently of the reader."""
    big = arr.astype(arr.dtype.newbyteorder(">")) if arr.dtype.itemsize > 1 else arr
    code = _CODES[big.dtype] if code is None else code
    header = bytes([0, 0, code, arr.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in arr.shape)
    return header + big.tobytes()


def _write(path: Path, payload: bytes, *, gz: bool) -> Path:
    path.write_bytes(gzip.compress(payload) if gz else payload)
    return path


def _write_idx(path: Path, arr: np.ndarray, *, gz: bool) -> Path:
    return _write(path, _idx_bytes(arr), gz=gz)


def _fake_fashion(
    folder: Path, *, n_train: int = 30, n_test: int = 12, gz: bool = True, seed: int = 0
) -> dict[str, np.ndarray]:
    """Tiny Fashion-MNIST lookalike (28x28 ubyte images, labels 0..3) in ``folder``."""
    rng = np.random.default_rng(seed)
    arrays = {
        "train_images": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "train_labels": rng.integers(0, 4, n_train, dtype=np.uint8),
        "test_images": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "test_labels": rng.integers(0, 4, n_test, dtype=np.uint8),
    }
    arrays["train_images"][0, 0, 0] = 255  # the maximum must map to exactly 1.0
    arrays["train_labels"][:4] = [0, 1, 2, 3]
    folder.mkdir(parents=True, exist_ok=True)
    for key, arr in arrays.items():
        name = FASHION_FILES[key] if gz else FASHION_FILES[key].removesuffix(".gz")
        _write_idx(folder / name, arr, gz=gz)
    return arrays


def _npz(path: Path, **arrays: object) -> Path:
    np.savez(path, **arrays)  # type: ignore[arg-type]
    return path


def _rows_sorted(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Rows of ``[x | y]`` in a canonical order, to compare multisets of samples."""
    table = np.column_stack([x.astype(np.float64), y.astype(np.float64)])
    return table[np.lexsort(table.T[::-1])]


# --------------------------------------------------------------------------------------
# IDX reader


@pytest.mark.parametrize("gz", [False, True])
@pytest.mark.parametrize("dtype", list(_CODES))
def test_read_idx_round_trips_every_type(tmp_path: Path, dtype: np.dtype, gz: bool) -> None:
    rng = np.random.default_rng(1)
    arr = (rng.standard_normal((3, 4, 5)) * 50).astype(dtype)
    got = read_idx(_write_idx(tmp_path / "a.idx", arr, gz=gz))
    assert got.shape == (3, 4, 5)
    assert got.dtype == dtype.newbyteorder("=")
    assert got.dtype.isnative
    np.testing.assert_array_equal(got, arr)
    got[0, 0, 0] = 7  # an independent, writable array
    assert got[0, 0, 0] == 7


def test_read_idx_detects_gzip_by_content_not_name(tmp_path: Path) -> None:
    arr = np.arange(12, dtype=np.uint8).reshape(3, 4)
    gz_no_suffix = _write_idx(tmp_path / "images-idx3-ubyte", arr, gz=True)
    plain_gz_suffix = _write_idx(tmp_path / "labels-idx1-ubyte.gz", arr, gz=False)
    np.testing.assert_array_equal(read_idx(gz_no_suffix), arr)
    np.testing.assert_array_equal(read_idx(str(plain_gz_suffix)), arr)


def test_read_idx_one_dimensional_labels(tmp_path: Path) -> None:
    labels = np.array([9, 0, 0, 3], dtype=np.uint8)
    got = read_idx(_write_idx(tmp_path / "l.idx", labels, gz=False))
    assert got.shape == (4,)
    np.testing.assert_array_equal(got, labels)


_GOOD = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
_GOOD_BYTES = _idx_bytes(_GOOD)
_MALFORMED = {
    "bad magic": (b"\x01" + _GOOD_BYTES[1:], "not an IDX file"),
    "bad magic 2": (b"\x00\x07" + _GOOD_BYTES[2:], "not an IDX file"),
    "unknown dtype": (_GOOD_BYTES[:2] + b"\x0a" + _GOOD_BYTES[3:], "unknown IDX data type 0x0A"),
    "zero dims": (b"\x00\x00\x08\x00", "zero dimensions"),
    "short header": (b"\x00\x00", "truncated IDX header"),
    "short dims": (_GOOD_BYTES[:9], "truncated IDX header"),
    "truncated data": (_GOOD_BYTES[:-1], "truncated IDX data"),
    "no data": (_GOOD_BYTES[:16], "truncated IDX data"),
    "extra bytes": (_GOOD_BYTES + b"\x00", "extra bytes"),
    "absurd dims": (
        b"\x00\x00\x0e\x03" + b"\xff\xff\xff\xff" * 3 + b"\x00" * 8,
        "over the 2147483648 byte limit",
    ),
    "empty file": (b"", "truncated IDX header"),
}


@pytest.mark.parametrize("gz", [False, True])
@pytest.mark.parametrize("case", list(_MALFORMED))
def test_read_idx_rejects_malformed(tmp_path: Path, case: str, gz: bool) -> None:
    payload, fragment = _MALFORMED[case]
    path = _write(tmp_path / "broken-idx3-ubyte", payload, gz=gz)
    with pytest.raises(DataError, match=fragment) as info:
        read_idx(path)
    assert str(path) in str(info.value)


def test_read_idx_just_under_the_size_cap_is_not_absurd(tmp_path: Path) -> None:
    # 2**31 bytes exactly is allowed by the header check, so the fault is truncation.
    payload = b"\x00\x00\x08\x01" + (2**31).to_bytes(4, "big") + b"\x00" * 10
    path = _write(tmp_path / "big.idx", payload, gz=False)
    with pytest.raises(DataError, match="truncated IDX data"):
        read_idx(path)


@pytest.mark.parametrize(
    ("payload", "fragment"),
    [
        (b"\x1f\x8b" + b"garbage" * 5, "cannot read gzip-compressed IDX file"),
        (gzip.compress(_GOOD_BYTES)[:-12], "cannot read gzip-compressed IDX file"),
        (gzip.compress(_GOOD_BYTES) + b"trailing junk", "cannot read gzip-compressed IDX file"),
    ],
    ids=["corrupt stream", "truncated stream", "junk after stream"],
)
def test_read_idx_rejects_broken_gzip(tmp_path: Path, payload: bytes, fragment: str) -> None:
    path = _write(tmp_path / "x.gz", payload, gz=False)
    with pytest.raises(DataError, match=fragment) as info:
        read_idx(path)
    assert str(path) in str(info.value)


def test_read_idx_missing_file_and_directory(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist") as info:
        read_idx(tmp_path / "nope.idx")
    assert "nope.idx" in str(info.value)
    with pytest.raises(DataError, match="is a directory"):
        read_idx(tmp_path)


# --------------------------------------------------------------------------------------
# Fashion-MNIST


@pytest.mark.parametrize("gz", [True, False])
def test_fashion_from_a_folder(tmp_path: Path, gz: bool) -> None:
    arrays = _fake_fashion(tmp_path / "fm", gz=gz)
    split = load_split(f"fashion-mnist:{tmp_path / 'fm'}", seed=0)
    assert split.name == "fashion-mnist"
    assert split.x_train.shape == (30, 784)
    assert split.x_test.shape == (12, 784)
    assert split.x_train.dtype == np.float32 and split.y_train.dtype == np.int64
    assert split.x_train.flags.c_contiguous
    assert split.inputs == 784
    assert split.classes == 4
    assert split.x_train.max() == 1.0 and split.x_train.min() >= 0.0
    expected = arrays["train_images"].reshape(30, -1).astype(np.float32) / np.float32(255)
    np.testing.assert_array_equal(split.x_train, expected)
    np.testing.assert_array_equal(split.y_train, arrays["train_labels"])
    np.testing.assert_array_equal(split.y_test, arrays["test_labels"])
    assert str(tmp_path / "fm") in split.source
    # The split is fixed by the files: the seed and test_fraction change nothing.
    other = load_split(f"fashion-mnist:{tmp_path / 'fm'}", seed=5, test_fraction=0.5)
    np.testing.assert_array_equal(other.x_test, split.x_test)


def test_fashion_default_folder_and_mixed_compression(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = tmp_path / "fm"
    arrays = _fake_fashion(folder, gz=True)
    # One file present only uncompressed, under the name without .gz.
    name = FASHION_FILES["test_labels"]
    (folder / name).unlink()
    _write_idx(folder / name.removesuffix(".gz"), arrays["test_labels"], gz=False)
    monkeypatch.setattr(datasets, "DEFAULT_FASHION_DIR", folder)
    split = load_split("fashion-mnist", seed=0)
    np.testing.assert_array_equal(split.y_test, arrays["test_labels"])


def test_fashion_missing_folder_names_it_and_hints(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="apt install dataset-fashion-mnist") as info:
        load_split(f"fashion-mnist:{tmp_path / 'absent'}", seed=0)
    assert str(tmp_path / "absent") in str(info.value)
    assert "does not exist" in str(info.value)


@pytest.mark.parametrize("key", list(FASHION_FILES))
def test_fashion_missing_file_names_it_and_hints(tmp_path: Path, key: str) -> None:
    _fake_fashion(tmp_path, gz=True)
    (tmp_path / FASHION_FILES[key]).unlink()
    with pytest.raises(DataError, match="apt install dataset-fashion-mnist") as info:
        load_split(f"fashion-mnist:{tmp_path}", seed=0)
    assert str(tmp_path / FASHION_FILES[key]) in str(info.value)


def test_fashion_label_count_must_match_images(tmp_path: Path) -> None:
    arrays = _fake_fashion(tmp_path)
    labels = tmp_path / FASHION_FILES["train_labels"]
    _write_idx(labels, arrays["train_labels"][:-1], gz=True)
    with pytest.raises(DataError, match="29 labels but") as info:
        load_split(f"fashion-mnist:{tmp_path}", seed=0)
    assert str(labels) in str(info.value)
    assert FASHION_FILES["train_images"] in str(info.value)


def test_fashion_rejects_non_byte_images(tmp_path: Path) -> None:
    arrays = _fake_fashion(tmp_path)
    images = tmp_path / FASHION_FILES["test_images"]
    _write_idx(images, arrays["test_images"].astype(">i2"), gz=True)
    with pytest.raises(DataError, match="unsigned-byte images") as info:
        load_split(f"fashion-mnist:{tmp_path}", seed=0)
    assert str(images) in str(info.value)


def test_fashion_rejects_two_dimensional_labels(tmp_path: Path) -> None:
    arrays = _fake_fashion(tmp_path)
    labels = tmp_path / FASHION_FILES["train_labels"]
    _write_idx(labels, arrays["train_labels"].reshape(-1, 1), gz=True)
    with pytest.raises(DataError, match="1-D integer label vector") as info:
        load_split(f"fashion-mnist:{tmp_path}", seed=0)
    assert str(labels) in str(info.value)


def test_fashion_train_and_test_image_sizes_must_agree(tmp_path: Path) -> None:
    _fake_fashion(tmp_path)
    images = tmp_path / FASHION_FILES["test_images"]
    _write_idx(images, np.zeros((12, 27, 28), dtype=np.uint8), gz=True)
    with pytest.raises(DataError, match="756 pixels") as info:
        load_split(f"fashion-mnist:{tmp_path}", seed=0)
    assert str(images) in str(info.value)


def test_fashion_corrupt_file_is_named(tmp_path: Path) -> None:
    _fake_fashion(tmp_path)
    images = tmp_path / FASHION_FILES["train_images"]
    images.write_bytes(images.read_bytes()[:-20])
    with pytest.raises(DataError) as info:
        load_split(f"fashion-mnist:{tmp_path}", seed=0)
    assert str(images) in str(info.value)


@pytest.mark.skipif(not DEFAULT_FASHION_DIR.is_dir(), reason="dataset-fashion-mnist not installed")
def test_real_fashion_mnist() -> None:
    split = load_split("fashion-mnist", seed=0)
    assert split.x_train.shape == (60000, 784)
    assert split.x_test.shape == (10000, 784)
    assert split.y_train.shape == (60000,) and split.y_test.shape == (10000,)
    assert (split.inputs, split.classes) == (784, 10)
    assert split.x_train.dtype == np.float32
    assert split.x_train.min() == 0.0 and split.x_train.max() == 1.0
    assert split.x_test.min() == 0.0 and split.x_test.max() == 1.0
    np.testing.assert_array_equal(np.bincount(split.y_train), [6000] * 10)
    np.testing.assert_array_equal(np.bincount(split.y_test), [1000] * 10)
    assert describe(split) == "fashion-mnist: 60000 train / 10000 test, 784 features, 10 classes"


# --------------------------------------------------------------------------------------
# digits


def test_digits_shapes_ranges_and_stratification() -> None:
    split = load_split("digits", seed=3)
    x_all, y_all = load_digits_arrays()
    assert split.name == "digits"
    assert (split.inputs, split.classes) == (64, 10)
    assert split.x_train.shape[1] == split.x_test.shape[1] == 64
    assert split.y_train.size + split.y_test.size == 1797
    assert describe(split) == "digits: 1438 train / 359 test, 64 features, 10 classes"
    assert 350 <= split.y_test.size <= 370
    assert split.x_train.dtype == np.float32 and split.y_train.dtype == np.int64
    assert split.x_train.min() == 0.0 and split.x_train.max() == 1.0
    # Stratified: every class is held out in proportion (to rounding).
    per_class = np.bincount(y_all)
    held = np.bincount(split.y_test, minlength=10)
    assert (np.abs(held - 0.2 * per_class) <= 0.5 + 1e-9).all()
    # Train and test together are exactly the whole dataset.
    np.testing.assert_array_equal(
        _rows_sorted(
            np.concatenate([split.x_train, split.x_test]),
            np.concatenate([split.y_train, split.y_test]),
        ),
        _rows_sorted(x_all, y_all),
    )


def test_digits_is_seeded_and_matches_write_partitions(tmp_path: Path) -> None:
    a = load_split("digits", seed=7)
    b = load_split("digits", seed=7)
    c = load_split("digits", seed=8)
    np.testing.assert_array_equal(a.x_test, b.x_test)
    np.testing.assert_array_equal(a.y_train, b.y_train)
    assert a.x_test.shape != c.x_test.shape or not np.array_equal(a.x_test, c.x_test)
    # The same held-out set as the one prepare.write_partitions gives the peers.
    x, y = load_digits_arrays()
    write_partitions(x, y, 2, tmp_path, seed=7, names=["a", "b"])
    with np.load(tmp_path / "test.npz") as test:
        np.testing.assert_array_equal(a.x_test, test["x"])
        np.testing.assert_array_equal(a.y_test, test["y"])


def test_digits_test_fraction() -> None:
    split = load_split("digits", seed=0, test_fraction=0.5)
    assert 880 <= split.y_test.size <= 920
    for bad in (0.0, 1.0, -0.1, 1.5):
        with pytest.raises(ValueError, match="test_fraction"):
            load_split("digits", seed=0, test_fraction=bad)


def test_importing_the_harness_data_modules_does_not_import_sklearn() -> None:
    code = (
        "import sys, p2pfl.harness.datasets, p2pfl.harness.partition; "
        "sys.exit('sklearn' in sys.modules)"
    )
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


# --------------------------------------------------------------------------------------
# .npz


def test_npz_with_test_arrays(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 50, (20, 2, 3))  # float64, 3-D, far outside [0, 1]
    y = np.array([7, -5, 100] * 6 + [7, 7])
    x_test = rng.uniform(0, 50, (5, 6))
    y_test = np.array([7, 100, 42, -5, 7])  # 42 appears only in the test set
    path = _npz(tmp_path / "clinic.npz", x=x, y=y, x_test=x_test, y_test=y_test)
    split = load_split(str(path), seed=0)
    assert split.name == "clinic"
    assert (split.inputs, split.classes) == (6, 4)
    assert split.x_train.dtype == np.float32 and split.x_train.shape == (20, 6)
    np.testing.assert_array_equal(split.x_train, x.reshape(20, 6).astype(np.float32))  # no scaling
    np.testing.assert_array_equal(split.x_test, x_test.astype(np.float32))
    # Remapped by sorted value: -5 -> 0, 7 -> 1, 42 -> 2, 100 -> 3.
    mapping = {-5: 0, 7: 1, 42: 2, 100: 3}
    np.testing.assert_array_equal(split.y_train, [mapping[v] for v in y])
    np.testing.assert_array_equal(split.y_test, [mapping[v] for v in y_test])
    assert split.y_train.dtype == np.int64
    assert "x_test" in split.source and str(path) in split.source


def test_npz_without_test_arrays_holds_out_stratified(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    y = np.repeat(np.array([3.0, 1.0, 2.0]), [40, 30, 30])  # whole-number floats are fine
    x = rng.integers(0, 255, (100, 8)).astype(np.uint8)
    path = _npz(tmp_path / "d.npz", x=x, y=y)
    split = load_split(str(path), seed=4, test_fraction=0.25)
    assert split.classes == 3 and split.inputs == 8
    np.testing.assert_array_equal(np.bincount(split.y_test), [8, 8, 10])  # 25% of each class
    np.testing.assert_array_equal(np.bincount(split.y_train), [22, 22, 30])
    assert split.x_train.max() > 1.0  # uint8 values kept as they are
    np.testing.assert_array_equal(
        _rows_sorted(
            np.concatenate([split.x_train, split.x_test]),
            np.concatenate([split.y_train, split.y_test]),
        ),
        _rows_sorted(x, np.searchsorted([1.0, 2.0, 3.0], y)),
    )
    again = load_split(str(path), seed=4, test_fraction=0.25)
    other = load_split(str(path), seed=5, test_fraction=0.25)
    np.testing.assert_array_equal(again.x_test, split.x_test)
    assert not np.array_equal(other.x_test, split.x_test)


def test_npz_one_dimensional_x_is_one_feature(tmp_path: Path) -> None:
    path = _npz(tmp_path / "d.npz", x=np.arange(10.0), y=np.arange(10) % 2)
    split = load_split(str(path), seed=0)
    assert split.inputs == 1


_X = np.ones((10, 3))
_Y = np.arange(10) % 2


@pytest.mark.parametrize(
    ("arrays", "fragment"),
    [
        ({"x": _X}, "missing array 'y'"),
        ({"y": _Y}, "missing array 'x'"),
        ({"x": _X, "y": _Y, "x_test": _X}, "has 'x_test' but not 'y_test'"),
        ({"x": _X, "y": _Y, "y_test": _Y}, "has 'y_test' but not 'x_test'"),
        ({"x": np.array([{"a": 1}] * 10, dtype=object), "y": _Y}, "pickled"),
        ({"x": _X, "y": np.array([1, "a"] * 5, dtype=object)}, "pickled"),
        ({"x": np.where(np.eye(10, 3) > 0, np.nan, 1.0), "y": _Y}, "NaN.*row 0"),
        ({"x": np.where(np.eye(10, 3, -4) > 0, np.inf, 1.0), "y": _Y}, "infinite.*row 4"),
        ({"x": np.full((10, 3), 1e300), "y": _Y}, "too large"),
        ({"x": np.array([["a"] * 3] * 10), "y": _Y}, "must be numeric"),
        ({"x": np.ones((0, 3)), "y": np.zeros(0, int)}, "empty"),
        ({"x": np.float64(1.0), "y": _Y}, "scalar"),
        ({"x": _X, "y": _Y + 0.5}, "integer class labels, found 0.5 at index 0"),
        ({"x": _X, "y": np.r_[_Y[:9], np.nan]}, "integer class labels, found nan at index 9"),
        ({"x": _X, "y": np.array([1j, 2j] * 5)}, "must hold class labels"),
        ({"x": _X, "y": _Y.reshape(5, 2)}, "must be 1-D"),
        ({"x": _X, "y": _Y[:9]}, "y has 9 labels but x has 10 rows"),
        (
            {"x": _X, "y": _Y, "x_test": _X[:4], "y_test": _Y[:3]},
            "y_test has 3 labels but x_test has 4 rows",
        ),
        ({"x": _X, "y": _Y, "x_test": np.ones((4, 2)), "y_test": _Y[:4]}, "x_test has 2 features"),
        ({"x": _X, "y": np.full(10, 3)}, "needs two classes"),
        ({"x": _X[:2], "y": np.array([0, 1])}, "held-out test split would be empty"),
    ],
    ids=[
        "no y",
        "no x",
        "x_test only",
        "y_test only",
        "object x",
        "object y",
        "nan x",
        "inf x",
        "float32 overflow",
        "string x",
        "empty x",
        "scalar x",
        "fractional y",
        "nan y",
        "complex y",
        "2-D y",
        "length mismatch",
        "test length mismatch",
        "test feature mismatch",
        "one class",
        "no holdout possible",
    ],
)
def test_npz_rejects(tmp_path: Path, arrays: dict[str, object], fragment: str) -> None:
    path = _npz(tmp_path / "bad.npz", **arrays)
    with pytest.raises(DataError, match=fragment) as info:
        load_split(str(path), seed=0)
    assert str(path) in str(info.value)


def test_npz_file_problems(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        load_split(str(tmp_path / "absent.npz"), seed=0)
    (tmp_path / "dir.npz").mkdir()
    with pytest.raises(DataError, match="is not a regular file"):
        load_split(str(tmp_path / "dir.npz"), seed=0)
    garbage = tmp_path / "garbage.npz"
    garbage.write_bytes(b"PK\x03\x04 not really a zip archive")
    with pytest.raises(DataError, match=r"cannot read as an \.npz archive") as info:
        load_split(str(garbage), seed=0)
    assert str(garbage) in str(info.value)
    single = tmp_path / "single.npz"
    with single.open("wb") as fh:
        np.save(fh, np.ones(3))
    with pytest.raises(DataError, match=r"single \.npy array"):
        load_split(str(single), seed=0)


@pytest.mark.parametrize(
    "spec", ["mnist", "", "digits:extra", "fashion-mnist:", "fashion", "data.csv", "x.npy"]
)
def test_unknown_spec_lists_accepted_forms(spec: str) -> None:
    with pytest.raises(DataError, match="unknown dataset") as info:
        load_split(spec, seed=0)
    for form in ("'digits'", "'fashion-mnist:DIR'", ".npz"):
        assert form in str(info.value)


def test_describe_and_split_checks() -> None:
    split = SplitData(
        name="toy",
        x_train=np.zeros((5, 3), np.float32),
        y_train=np.zeros(5, np.int64),
        x_test=np.zeros((2, 3), np.float32),
        y_test=np.zeros(2, np.int64),
        classes=2,
        inputs=3,
        source="here",
    )
    assert describe(split) == "toy: 5 train / 2 test, 3 features, 2 classes"
    with pytest.raises(ValueError, match="x_test"):
        SplitData("toy", split.x_train, split.y_train, np.zeros((2, 3)), split.y_test, 2, 3, "")
    with pytest.raises(ValueError, match="y_train"):
        SplitData("toy", split.x_train, split.y_train[:4], split.x_test, split.y_test, 2, 3, "")


# --------------------------------------------------------------------------------------
# partition specs


@pytest.mark.parametrize(
    ("text", "spec", "canonical"),
    [
        ("iid", PartitionSpec("iid"), "iid"),
        (" IID ", PartitionSpec("iid"), "iid"),
        ("dirichlet:0.5", PartitionSpec("dirichlet", alpha=0.5), "dirichlet:0.5"),
        ("Dirichlet: 1", PartitionSpec("dirichlet", alpha=1.0), "dirichlet:1"),
        ("dirichlet:1e-3", PartitionSpec("dirichlet", alpha=0.001), "dirichlet:0.001"),
        ("dirichlet:100.25", PartitionSpec("dirichlet", alpha=100.25), "dirichlet:100.25"),
        ("shards:2", PartitionSpec("shards", shards=2), "shards:2"),
        ("shards:12", PartitionSpec("shards", shards=12), "shards:12"),
    ],
)
def test_parse_partition(text: str, spec: PartitionSpec, canonical: str) -> None:
    parsed = parse_partition(text)
    assert parsed == spec
    assert str(parsed) == canonical
    assert parse_partition(str(parsed)) == parsed


@given(st.floats(min_value=1e-300, max_value=1e300, allow_nan=False))
def test_dirichlet_spec_text_round_trips(alpha: float) -> None:
    spec = PartitionSpec("dirichlet", alpha=alpha)
    assert parse_partition(str(spec)) == spec


@pytest.mark.parametrize(
    "text",
    [
        "",
        "random",
        "iid:1",
        "dirichlet",
        "dirichlet:",
        "dirichlet:0",
        "dirichlet:-1",
        "dirichlet:nan",
        "dirichlet:inf",
        "dirichlet:abc",
        "shards",
        "shards:0",
        "shards:-2",
        "shards:1.5",
        "shards:x",
    ],
)
def test_parse_partition_rejects(text: str) -> None:
    with pytest.raises(ValueError) as info:
        parse_partition(text)
    message = str(info.value)
    assert repr(text) in message
    for form in ("'iid'", "'dirichlet:ALPHA'", "'shards:K'"):
        assert form in message


@pytest.mark.parametrize(
    "kwargs",
    [
        {"kind": "dirichlet"},
        {"kind": "dirichlet", "alpha": 0.0},
        {"kind": "dirichlet", "alpha": float("inf")},
        {"kind": "dirichlet", "alpha": 1.0, "shards": 2},
        {"kind": "shards"},
        {"kind": "shards", "shards": 0},
        {"kind": "shards", "shards": 2, "alpha": 1.0},
        {"kind": "iid", "alpha": 1.0},
        {"kind": "iid", "shards": 1},
        {"kind": "other"},
    ],
)
def test_partition_spec_rejects_inconsistent_fields(kwargs: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        PartitionSpec(**kwargs)  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------
# partitions


@pytest.fixture(scope="module")
def digits_y() -> np.ndarray:
    return load_split("digits", seed=0).y_train


_SPECS = ["iid", "dirichlet:0.3", "dirichlet:5", "shards:2", "shards:1"]


def _check_invariants(parts: list[np.ndarray], n: int, n_peers: int) -> None:
    assert len(parts) == n_peers
    for p in parts:
        assert p.dtype == np.int64
        assert (np.diff(p) > 0).all()  # sorted, no repeats
    joined = np.concatenate(parts)
    assert joined.size == n  # disjoint + below: every sample exactly once
    np.testing.assert_array_equal(np.sort(joined), np.arange(n))


@pytest.mark.parametrize("text", _SPECS)
def test_partition_invariants_and_determinism(digits_y: np.ndarray, text: str) -> None:
    spec = parse_partition(text)
    parts = partition(digits_y, 7, spec, seed=11)
    _check_invariants(parts, digits_y.size, 7)
    assert min(p.size for p in parts) >= DEFAULT_MIN_SIZE
    again = partition(digits_y.copy(), 7, spec, seed=11)
    for a, b in zip(parts, again, strict=True):
        np.testing.assert_array_equal(a, b)
    other = partition(digits_y, 7, spec, seed=12)
    assert any(not np.array_equal(a, b) for a, b in zip(parts, other, strict=True))


def test_iid_is_near_equal_and_balanced(digits_y: np.ndarray) -> None:
    parts = partition(digits_y, 10, PartitionSpec("iid"), seed=0)
    sizes = [p.size for p in parts]
    assert max(sizes) - min(sizes) <= 1
    hist = label_histogram(digits_y, parts, 10)
    assert (hist > 0).all()
    glob = np.bincount(digits_y) / digits_y.size
    assert np.abs(hist / hist.sum(axis=1, keepdims=True) - glob).max() < 0.08


def test_dirichlet_small_alpha_is_skewed_large_alpha_near_iid(digits_y: np.ndarray) -> None:
    glob = np.bincount(digits_y) / digits_y.size
    skewed = label_histogram(
        digits_y, partition(digits_y, 10, parse_partition("dirichlet:0.05"), seed=1), 10
    )
    assert classes_per_peer(skewed).mean() <= 4.0
    shares = skewed / skewed.sum(axis=1, keepdims=True)
    assert np.abs(shares - glob).max() > 0.5
    flat = label_histogram(
        digits_y, partition(digits_y, 10, parse_partition("dirichlet:1000"), seed=1), 10
    )
    assert (classes_per_peer(flat) == 10).all()
    shares = flat / flat.sum(axis=1, keepdims=True)
    assert np.abs(shares - glob).max() < 0.03
    sizes = flat.sum(axis=1)
    assert sizes.min() > 0.9 * sizes.mean() and sizes.max() < 1.1 * sizes.mean()


def test_dirichlet_min_size(digits_y: np.ndarray) -> None:
    for seed in range(5):
        parts = partition(digits_y, 10, parse_partition("dirichlet:0.1"), seed, min_size=80)
        assert min(p.size for p in parts) >= 80
        _check_invariants(parts, digits_y.size, 10)
    with pytest.raises(ValueError, match="impossible"):
        partition(digits_y, 10, parse_partition("dirichlet:0.1"), 0, min_size=144)
    with pytest.raises(ValueError, match="larger alpha or fewer peers"):
        partition(digits_y, 100, parse_partition("dirichlet:0.001"), 0)


def test_default_min_size_shrinks_on_tiny_datasets() -> None:
    y = np.repeat(np.arange(4), 10)  # 40 samples, 4 peers: at most 40 // 8 = 5 demanded
    for seed in range(20):
        parts = partition(y, 4, parse_partition("dirichlet:0.5"), seed)
        assert min(p.size for p in parts) >= 5
    parts = partition(np.arange(3) % 2, 3, PartitionSpec("iid"), 0)  # never an empty peer
    assert [p.size for p in parts] == [1, 1, 1]


def test_shards_give_each_peer_about_k_classes(digits_y: np.ndarray) -> None:
    for k in (1, 2):
        parts = partition(digits_y, 10, PartitionSpec("shards", shards=k), seed=3)
        _check_invariants(parts, digits_y.size, 10)
        sizes = [p.size for p in parts]
        assert max(sizes) - min(sizes) <= k  # shards differ by at most one sample
        hist = label_histogram(digits_y, parts, 10)
        # A shard is about one class long, so it straddles at most a few labels...
        assert (hist > 0).sum(axis=1).max() <= 3 * k
        assert (hist > 0).sum(axis=1).mean() <= k + 1
        # ...and holds essentially one of them.
        assert k - 0.5 <= classes_per_peer(hist).mean() <= k + 0.5
    with pytest.raises(ValueError, match="shards"):
        partition(np.arange(10) % 2, 4, PartitionSpec("shards", shards=3), 0)


def test_shards_are_label_contiguous() -> None:
    # 4 classes of 25, 4 peers x 1 shard: each peer gets exactly one whole class.
    y = np.tile(np.arange(4), 25)
    parts = partition(y, 4, PartitionSpec("shards", shards=1), seed=9)
    assert sorted(int(np.unique(y[p]).item()) for p in parts) == [0, 1, 2, 3]


@pytest.mark.parametrize("text", ["dirichlet:1", "shards:1", "shards:3"])
def test_samples_within_a_class_are_shuffled(text: str) -> None:
    # Files are often sorted (by patient, by time): a peer's share of a class must be a
    # random sample of it, not a contiguous run of indices.
    y = np.zeros(200, dtype=np.int64)
    for seed in range(3):
        for p in partition(y, 2, parse_partition(text), seed):
            assert p[-1] - p[0] + 1 > p.size


@pytest.mark.parametrize(
    ("y", "n_peers", "fragment"),
    [
        (np.arange(10), 0, "n_peers"),
        (np.arange(10), -1, "n_peers"),
        (np.arange(10), 2.5, "n_peers"),
        (np.arange(10), True, "n_peers"),
        (np.arange(3), 4, "cannot split 3 samples among 4 peers"),
        (np.zeros(0, np.int64), 1, "cannot split 0 samples"),
        (np.arange(10).reshape(5, 2), 2, "1-D integer"),
        (np.arange(10.0), 2, "1-D integer"),
    ],
)
def test_partition_rejects_bad_arguments(y: np.ndarray, n_peers: object, fragment: str) -> None:
    with pytest.raises(ValueError, match=fragment):
        partition(y, n_peers, PartitionSpec("iid"), 0)  # type: ignore[arg-type]


def test_partition_rejects_negative_min_size() -> None:
    with pytest.raises(ValueError, match="min_size"):
        partition(np.arange(10), 2, PartitionSpec("iid"), 0, min_size=-1)


@settings(max_examples=150, deadline=None)
@given(
    labels=st.lists(st.integers(0, 4), min_size=1, max_size=120),
    n_peers=st.integers(1, 8),
    kind=st.sampled_from(["iid", "dirichlet", "shards"]),
    alpha=st.floats(0.05, 50.0),
    k=st.integers(1, 3),
    seed=st.integers(0, 2**32 - 1),
)
def test_partition_properties(
    labels: list[int], n_peers: int, kind: str, alpha: float, k: int, seed: int
) -> None:
    y = np.array(labels, dtype=np.int64)
    n = y.size
    if n_peers > n:
        with pytest.raises(ValueError, match="cannot split"):
            partition(y, n_peers, PartitionSpec("iid"), seed)
        return
    spec = {
        "iid": PartitionSpec("iid"),
        "dirichlet": PartitionSpec("dirichlet", alpha=alpha),
        "shards": PartitionSpec("shards", shards=k),
    }[kind]
    floor = max(1, min(DEFAULT_MIN_SIZE, n // (2 * n_peers)))
    try:
        parts = partition(y, n_peers, spec, seed)
    except ValueError as exc:
        # Only these refusals are legitimate; iid always succeeds when n >= n_peers.
        if kind == "dirichlet":
            assert "larger alpha" in str(exc)
        else:
            assert kind == "shards"
            assert n_peers * k > n or (n // (n_peers * k)) * k < floor
        return
    _check_invariants(parts, n, n_peers)
    assert min(p.size for p in parts) >= floor
    hist = label_histogram(y, parts, 5)
    np.testing.assert_array_equal(hist.sum(axis=0), np.bincount(y, minlength=5))
    np.testing.assert_array_equal(hist.sum(axis=1), [p.size for p in parts])
    for a, b in zip(parts, partition(y, n_peers, spec, seed), strict=True):
        np.testing.assert_array_equal(a, b)


def test_label_histogram_and_description() -> None:
    y = np.array([0, 0, 1, 2, 2, 2, 1, 0])
    parts = [np.array([0, 1, 2]), np.array([3, 4, 5, 6, 7])]
    hist = label_histogram(y, parts, 4)
    np.testing.assert_array_equal(hist, [[2, 1, 0, 0], [1, 1, 3, 0]])
    np.testing.assert_array_equal(classes_per_peer(hist), [2, 3])
    np.testing.assert_array_equal(classes_per_peer(hist, threshold=0.25), [2, 1])
    assert describe_heterogeneity(hist) == (
        "2 peers, 3-5 samples each, 2.5 of 4 classes per peer (each >= 5% of its data)"
    )
    assert "of 4 classes" in describe_heterogeneity(hist, threshold=0.25)
    with pytest.raises(ValueError, match=r"0\.\.1"):
        label_histogram(y, parts, 2)


def test_npz_text_and_boolean_labels_become_classes(tmp_path: Path) -> None:
    x = np.arange(40, dtype=np.float32).reshape(20, 2)
    path = tmp_path / "text.npz"
    np.savez(path, x=x, y=np.array(["cat", "dog"] * 10))
    split = load_split(str(path), seed=1)
    assert split.classes == 2 and set(np.concatenate([split.y_train, split.y_test])) == {0, 1}
    path = tmp_path / "bool.npz"
    np.savez(path, x=x, y=np.array([True, False] * 10))
    assert load_split(str(path), seed=1).classes == 2
    path = tmp_path / "mixed.npz"
    np.savez(path, x=x, y=np.array(["a", "b"] * 10), x_test=x, y_test=np.array([0, 1] * 10))
    with pytest.raises(DataError, match="both be text labels"):
        load_split(str(path), seed=1)
