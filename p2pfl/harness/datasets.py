"""Whole datasets (train and test split) for the harness: digits, diabetes (regression),
Fashion-MNIST, ``.npz``.

Only the harness and tests use this module; peer processes read their own partition files
through ``p2pfl.learning.data``. Files are still treated as untrusted input: every problem
is a ``DataError`` naming the file and the fault, and nothing is ever unpickled.
scikit-learn is imported lazily (only for ``digits`` and ``diabetes``) so that importing
this module stays cheap and scikit-learn stays an optional dependency.
"""

from __future__ import annotations

import gzip
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np

from p2pfl.errors import DataError
from p2pfl.learning.base import Task
from p2pfl.learning.data import read_npz
from p2pfl.learning.prepare import _stratified_holdout, load_diabetes_arrays, load_digits_arrays
from p2pfl.store.npzread import READ_ERRORS

__all__ = [
    "DEFAULT_FASHION_DIR",
    "FASHION_FILES",
    "SplitData",
    "describe",
    "load_split",
    "read_idx",
]

#: Where Debian's ``dataset-fashion-mnist`` package installs the IDX files.
DEFAULT_FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")
#: The four standard file names (each may also be present without the ``.gz``).
FASHION_FILES = {
    "train_images": "train-images-idx3-ubyte.gz",
    "train_labels": "train-labels-idx1-ubyte.gz",
    "test_images": "t10k-images-idx3-ubyte.gz",
    "test_labels": "t10k-labels-idx1-ubyte.gz",
}
_FASHION_HINT = "install it with `apt install dataset-fashion-mnist` or give fashion-mnist:DIR"
_ACCEPTED = (
    "'digits', 'fashion-mnist', 'fashion-mnist:DIR', or a path ending in .npz "
    "(arrays x and y, optionally x_test and y_test)"
)

# IDX element types by their code in the header; multi-byte types are big-endian.
_IDX_DTYPES: dict[int, np.dtype[np.generic]] = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
# A header can claim any size; refuse to allocate more than this for one array.
_IDX_MAX_BYTES = 2**31
_GZIP_MAGIC = b"\x1f\x8b"
# What a damaged file or gzip stream can raise while being read (BadGzipFile is an OSError).
_READ_ERRORS = (OSError, EOFError, zlib.error)
# Float labels beyond this are not exact integers, let alone class labels.
_MAX_FLOAT_LABEL = 2.0**53
_FLOAT32_MAX = float(np.finfo(np.float32).max)


@dataclass(frozen=True)
class SplitData:
    """A dataset with its held-out test set, ready to be partitioned among peers.

    ``x_*`` are C-contiguous float32 of shape ``(n, inputs)``; ``y_*`` are int64 class
    indices in ``0..classes-1`` or, for ``task`` regression, float32 targets of shape
    ``(n,)`` (then ``classes`` is 1, the number of outputs). ``source`` says where the data
    came from (for reports).
    """

    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    classes: int
    inputs: int
    source: str
    task: Task = "classification"

    def __post_init__(self) -> None:
        # Catches a loader bug here rather than as a shape error inside a peer.
        y_type = np.int64 if self.task == "classification" else np.float32
        for xs, ys, part in (
            (self.x_train, self.y_train, "train"),
            (self.x_test, self.y_test, "test"),
        ):
            if xs.dtype != np.float32 or xs.ndim != 2 or xs.shape[1] != self.inputs:
                raise ValueError(f"{self.name}: x_{part} must be float32 (n, {self.inputs})")
            if ys.dtype != y_type or ys.shape != (xs.shape[0],):
                raise ValueError(
                    f"{self.name}: y_{part} must be {np.dtype(y_type)} ({xs.shape[0]},)"
                )


def describe(split: SplitData) -> str:
    """One line for logs: ``digits: 1438 train / 359 test, 64 features, 10 classes``."""
    what = f"{split.classes} classes" if split.task == "classification" else "regression"
    return (
        f"{split.name}: {split.y_train.size} train / {split.y_test.size} test, "
        f"{split.inputs} features, {what}"
    )


#: Datasets whose targets are real numbers (the harness then trains regressors).
REGRESSION_DATASETS = ("diabetes",)


def task_of(spec: str, task: Task | None = None) -> Task:
    """The task ``--dataset spec`` implies: regression for the bundled regression sets, the
    given ``task`` (``--task``) for an ``.npz``, classification otherwise."""
    if spec.strip() in REGRESSION_DATASETS:
        return "regression"
    return task or "classification"


def load_split(
    spec: str, *, seed: int, test_fraction: float = 0.2, task: Task | None = None
) -> SplitData:
    """Load the dataset named by ``spec`` with its test split.

    ``spec`` is ``digits`` (scikit-learn's 8x8 digits, scaled to [0, 1], stratified
    holdout of ``test_fraction``), ``fashion-mnist`` or ``fashion-mnist:DIR`` (the standard
    IDX files, the standard 60000/10000 split, scaled to [0, 1]), or a path ending in
    ``.npz`` (arrays ``x``, ``y`` and optionally ``x_test``, ``y_test``; not rescaled;
    labels remapped to ``0..C-1``; with ``task`` regression, ``y`` holds real targets), or
    ``diabetes`` (scikit-learn's bundled diabetes regression set: 442 patients, 10
    features, a disease progression score; random ``test_fraction`` holdout).
    ``seed`` only affects the holdout, where there is one.
    """
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be strictly between 0 and 1, got {test_fraction}")
    text = spec.strip()
    if text == "digits":
        return _load_digits(seed, test_fraction)
    if text == "diabetes":
        return _load_diabetes(seed, test_fraction)
    kind, colon, rest = text.partition(":")
    if kind == "fashion-mnist" and (rest or not colon):
        folder = Path(rest).expanduser() if colon else DEFAULT_FASHION_DIR
        return _load_fashion(folder)
    if text.lower().endswith(".npz"):
        if task == "regression":
            return _load_npz_regression(Path(text).expanduser(), seed, test_fraction)
        return _load_npz_split(Path(text).expanduser(), seed, test_fraction)
    raise DataError(f"unknown dataset {spec!r}: use {_ACCEPTED}")


# --------------------------------------------------------------------------------------
# IDX files


def read_idx(path: str | Path) -> np.ndarray:
    """Read one IDX file (gzip-compressed or not) into a native-endian array.

    Compression is detected from the gzip magic bytes, not the file name. The header is
    validated before anything large is read, and the data must be exactly as long as the
    header says.
    """
    path = Path(path)
    compressed = False
    try:
        with path.open("rb") as raw:
            compressed = raw.read(2) == _GZIP_MAGIC
            raw.seek(0)
            if compressed:
                with gzip.GzipFile(fileobj=raw, mode="rb") as fh:
                    return _read_idx_stream(path, fh)
            return _read_idx_stream(path, raw)
    except DataError:
        raise
    except FileNotFoundError as exc:
        raise DataError(f"{path}: IDX file does not exist") from exc
    except IsADirectoryError as exc:
        raise DataError(f"{path}: is a directory, not an IDX file") from exc
    except _READ_ERRORS as exc:
        what = "gzip-compressed IDX file" if compressed else "IDX file"
        raise DataError(f"{path}: cannot read {what}: {exc}") from exc


def _read_idx_stream(path: Path, fh: BinaryIO | gzip.GzipFile) -> np.ndarray:
    magic = fh.read(4)
    if len(magic) < 4:
        raise DataError(f"{path}: truncated IDX header ({len(magic)} bytes)")
    if magic[0] != 0 or magic[1] != 0:
        raise DataError(
            f"{path}: not an IDX file (magic {magic.hex()}; must start with two zero bytes)"
        )
    code, ndim = magic[2], magic[3]
    dtype = _IDX_DTYPES.get(code)
    if dtype is None:
        known = ", ".join(f"0x{c:02X}" for c in _IDX_DTYPES)
        raise DataError(f"{path}: unknown IDX data type 0x{code:02X} (known: {known})")
    if ndim == 0:
        raise DataError(f"{path}: IDX header declares zero dimensions")
    dim_bytes = fh.read(4 * ndim)
    if len(dim_bytes) < 4 * ndim:
        raise DataError(f"{path}: truncated IDX header (needs {ndim} dimension sizes)")
    dims = tuple(int(d) for d in np.frombuffer(dim_bytes, dtype=">u4"))
    nbytes = dtype.itemsize
    for d in dims:  # Python ints: no overflow however absurd the header
        nbytes *= d
    if nbytes > _IDX_MAX_BYTES:
        raise DataError(
            f"{path}: IDX header claims dimensions {dims} ({nbytes} bytes), "
            f"over the {_IDX_MAX_BYTES} byte limit"
        )
    data = fh.read(nbytes)
    if len(data) < nbytes:
        raise DataError(
            f"{path}: truncated IDX data: header {dims} needs {nbytes} bytes, found {len(data)}"
        )
    if fh.read(1):
        raise DataError(f"{path}: extra bytes after the {nbytes} bytes of IDX data for {dims}")
    # astype copies into native byte order: a writable array not tied to the buffer.
    return np.frombuffer(data, dtype=dtype).reshape(dims).astype(dtype.newbyteorder("="))


# --------------------------------------------------------------------------------------
# the datasets


def _load_digits(seed: int, test_fraction: float) -> SplitData:
    x, y = load_digits_arrays()
    # Same holdout stream as prepare.write_partitions, so both agree on the test set.
    test_idx = _stratified_holdout(y, test_fraction, np.random.default_rng([seed, 1]))
    train = np.ones(y.size, dtype=bool)
    train[test_idx] = False
    return SplitData(
        name="digits",
        x_train=np.ascontiguousarray(x[train]),
        y_train=y[train],
        x_test=np.ascontiguousarray(x[test_idx]),
        y_test=y[test_idx],
        classes=int(np.unique(y).size),
        inputs=int(x.shape[1]),
        source=(f"scikit-learn load_digits, stratified {test_fraction:g} holdout (seed {seed})"),
    )


def _load_diabetes(seed: int, test_fraction: float) -> SplitData:
    x, y = load_diabetes_arrays()
    return _regression_split("diabetes", x, y, seed, test_fraction, "scikit-learn load_diabetes")


def _regression_split(
    name: str, x: np.ndarray, y: np.ndarray, seed: int, test_fraction: float, source: str
) -> SplitData:
    """A random (seeded) ``test_fraction`` holdout of real-valued data."""
    n = y.size
    take = max(1, min(n - 1, round(test_fraction * n)))
    test_idx = np.sort(np.random.default_rng([seed, 1]).permutation(n)[:take])
    train = np.ones(n, dtype=bool)
    train[test_idx] = False
    return SplitData(
        name=name,
        x_train=np.ascontiguousarray(x[train], dtype=np.float32),
        y_train=np.ascontiguousarray(y[train], dtype=np.float32),
        x_test=np.ascontiguousarray(x[test_idx], dtype=np.float32),
        y_test=np.ascontiguousarray(y[test_idx], dtype=np.float32),
        classes=1,
        inputs=int(x.shape[1]),
        source=f"{source}, random {test_fraction:g} holdout (seed {seed})",
        task="regression",
    )


def _fashion_file(folder: Path, gz_name: str) -> Path:
    """The file ``gz_name`` in ``folder``, or its uncompressed twin; DataError if neither."""
    for name in (gz_name, gz_name.removesuffix(".gz")):
        candidate = folder / name
        if candidate.is_file():
            return candidate
    plain = gz_name.removesuffix(".gz")
    raise DataError(
        f"{folder / gz_name}: Fashion-MNIST file missing (nor is there {plain}); {_FASHION_HINT}"
    )


def _load_fashion(folder: Path) -> SplitData:
    if not folder.is_dir():
        what = "is not a directory" if folder.exists() else "does not exist"
        raise DataError(f"{folder}: Fashion-MNIST folder {what}; {_FASHION_HINT}")
    files = {key: _fashion_file(folder, name) for key, name in FASHION_FILES.items()}
    x_train, y_train = _idx_pair(files["train_images"], files["train_labels"])
    x_test, y_test = _idx_pair(files["test_images"], files["test_labels"])
    if x_test.shape[1] != x_train.shape[1]:
        raise DataError(
            f"{files['test_images']}: images have {x_test.shape[1]} pixels but the training "
            f"images in {files['train_images']} have {x_train.shape[1]}"
        )
    classes = int(max(y_train.max(), y_test.max())) + 1
    return SplitData(
        name="fashion-mnist",
        x_train=x_train,
        y_train=y_train,
        x_test=x_test,
        y_test=y_test,
        classes=classes,
        inputs=int(x_train.shape[1]),
        source=f"IDX files in {folder}",
    )


def _idx_pair(images_path: Path, labels_path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Flattened images scaled to [0, 1] and int64 labels, checked against each other."""
    images = read_idx(images_path)
    labels = read_idx(labels_path)
    if images.dtype != np.uint8 or images.ndim < 2:
        raise DataError(
            f"{images_path}: expected unsigned-byte images (n, rows, cols), "
            f"got {images.dtype} {images.shape}"
        )
    if labels.dtype.kind not in "iu" or labels.ndim != 1:
        raise DataError(
            f"{labels_path}: expected a 1-D integer label vector, got {labels.dtype} {labels.shape}"
        )
    if images.shape[0] != labels.shape[0]:
        raise DataError(
            f"{labels_path}: {labels.shape[0]} labels but {images_path} has "
            f"{images.shape[0]} images"
        )
    if images.shape[0] == 0 or images[0].size == 0:
        raise DataError(f"{images_path}: no image data (shape {images.shape})")
    if labels.min() < 0:
        raise DataError(f"{labels_path}: negative label {int(labels.min())}")
    x = images.reshape(images.shape[0], -1).astype(np.float32)
    x /= np.float32(255.0)
    return x, labels.astype(np.int64)


# --------------------------------------------------------------------------------------
# .npz


def _load_npz_regression(path: Path, seed: int, test_fraction: float) -> SplitData:
    """An ``.npz`` of real targets (``y``, optionally ``x_test``/``y_test``), one output."""
    if not path.is_file():
        what = "is not a regular file" if path.exists() else "does not exist"
        raise DataError(f"{path}: data file {what}")
    arrays = read_npz(path, lambda archive: _npz_arrays(path, archive))
    x = _npz_features(path, "x", arrays["x"])
    y = _npz_targets(path, "y", arrays["y"], x.shape[0])
    if "x_test" not in arrays:
        return _regression_split(path.stem, x, y, seed, test_fraction, str(path))
    x_test = _npz_features(path, "x_test", arrays["x_test"])
    y_test = _npz_targets(path, "y_test", arrays["y_test"], x_test.shape[0])
    if x_test.shape[1] != x.shape[1]:
        raise DataError(f"{path}: x_test has {x_test.shape[1]} features but x has {x.shape[1]}")
    return SplitData(
        name=path.stem,
        x_train=x,
        y_train=y,
        x_test=x_test,
        y_test=y_test,
        classes=1,
        inputs=int(x.shape[1]),
        source=f"{path} (x_test/y_test)",
        task="regression",
    )


def _npz_targets(path: Path, name: str, arr: np.ndarray, rows: int) -> np.ndarray:
    if arr.ndim != 1 or arr.shape[0] != rows:
        raise DataError(f"{path}: {name} must hold one target per row ({rows}), got {arr.shape}")
    if arr.dtype.kind not in "fiu":
        raise DataError(f"{path}: {name} must hold numeric targets, got dtype {arr.dtype}")
    values = arr.astype(np.float64)
    if not np.isfinite(values).all() or (np.abs(values) > _FLOAT32_MAX).any():
        raise DataError(f"{path}: {name} has a NaN, infinite or too large target")
    return values.astype(np.float32)


def _load_npz_split(path: Path, seed: int, test_fraction: float) -> SplitData:
    if not path.is_file():
        what = "is not a regular file" if path.exists() else "does not exist"
        raise DataError(f"{path}: data file {what}")
    arrays = read_npz(path, lambda archive: _npz_arrays(path, archive))

    x = _npz_features(path, "x", arrays["x"])
    y = _npz_labels(path, "y", arrays["y"], x.shape[0], "x")
    if "x_test" in arrays:
        x_test = _npz_features(path, "x_test", arrays["x_test"])
        y_test = _npz_labels(path, "y_test", arrays["y_test"], x_test.shape[0], "x_test")
        if x_test.shape[1] != x.shape[1]:
            raise DataError(f"{path}: x_test has {x_test.shape[1]} features but x has {x.shape[1]}")
        how = "x_test/y_test"
    else:
        try:
            test_idx = _stratified_holdout(y, test_fraction, np.random.default_rng([seed, 1]))
        except ValueError as exc:
            raise DataError(f"{path}: {exc}") from exc
        train = np.ones(y.size, dtype=bool)
        train[test_idx] = False
        x, x_test = x[train], x[test_idx]
        y, y_test = y[train], y[test_idx]
        how = f"stratified {test_fraction:g} holdout (seed {seed})"
    if (y.dtype.kind == "U") != (y_test.dtype.kind == "U"):
        raise DataError(f"{path}: y and y_test must both be text labels or both numbers")
    # Arbitrary labels become 0..C-1 by sorted value, over train and test together.
    values, index = np.unique(np.concatenate([y, y_test]), return_inverse=True)
    if values.size < 2:
        raise DataError(f"{path}: all labels are {values[0]}; a classifier needs two classes")
    index = index.astype(np.int64).reshape(-1)
    return SplitData(
        name=path.stem,
        x_train=np.ascontiguousarray(x),
        y_train=index[: y.size],
        x_test=np.ascontiguousarray(x_test),
        y_test=index[y.size :],
        classes=int(values.size),
        inputs=int(x.shape[1]),
        source=f"{path} ({how})",
    )


def _npz_arrays(path: Path, archive: np.lib.npyio.NpzFile) -> dict[str, np.ndarray]:
    keys = set(archive.files)
    for key in ("x", "y"):
        if key not in keys:
            found = ", ".join(sorted(keys)) or "none"
            raise DataError(f"{path}: missing array {key!r} (arrays found: {found})")
    has_test = ("x_test" in keys, "y_test" in keys)
    if any(has_test) and not all(has_test):
        present, absent = ("x_test", "y_test") if has_test[0] else ("y_test", "x_test")
        raise DataError(f"{path}: has {present!r} but not {absent!r}; give both or neither")
    wanted = ["x", "y", "x_test", "y_test"] if all(has_test) else ["x", "y"]
    out: dict[str, np.ndarray] = {}
    for key in wanted:
        try:
            out[key] = np.asarray(archive[key])
        except ValueError as exc:
            if "allow_pickle" in str(exc):
                raise DataError(
                    f"{path}: array {key!r} holds Python objects (pickled); refused for safety"
                ) from exc
            raise DataError(f"{path}: cannot read array {key!r}: {exc}") from exc
        except READ_ERRORS as exc:
            raise DataError(f"{path}: cannot read array {key!r}: {exc}") from exc
    return out


def _npz_features(path: Path, name: str, arr: np.ndarray) -> np.ndarray:
    """``arr`` as float32 ``(n, features)``: higher dimensions flattened, 1-D is one feature."""
    if arr.dtype.kind not in "fiu":
        raise DataError(f"{path}: {name} must be numeric, got dtype {arr.dtype}")
    if arr.ndim == 0:
        raise DataError(f"{path}: {name} is a scalar, not an array of samples")
    features = int(np.prod(arr.shape[1:], dtype=np.int64))
    if arr.shape[0] == 0 or features == 0:
        raise DataError(f"{path}: {name} is empty (shape {arr.shape})")
    flat = arr.reshape(arr.shape[0], features)
    if flat.dtype.kind == "f":
        # NaN or inf would turn this peer's model, then its neighbours', into NaN; and a
        # float64 beyond float32's range would become inf in the conversion below.
        bad = ~np.isfinite(flat).all(axis=1)
        if flat.dtype.itemsize > 4:
            bad |= (np.abs(flat) > _FLOAT32_MAX).any(axis=1)
        if bad.any():
            row = int(np.flatnonzero(bad)[0])
            raise DataError(
                f"{path}: {name} has a NaN, infinite or too large (for float32) value (row {row})"
            )
    return np.ascontiguousarray(flat, dtype=np.float32)


def _npz_labels(path: Path, name: str, arr: np.ndarray, rows: int, x_name: str) -> np.ndarray:
    """Labels, one per row of ``x_name``, not yet remapped: integer-valued numbers as int64,
    booleans as 0/1, text labels (``"cat"``) as str. They become 0..C-1 later."""
    if arr.ndim != 1:
        raise DataError(f"{path}: {name} must be 1-D (one label per row), got shape {arr.shape}")
    if arr.shape[0] != rows:
        raise DataError(f"{path}: {name} has {arr.shape[0]} labels but {x_name} has {rows} rows")
    if arr.dtype.kind == "f":
        bad = ~np.isfinite(arr) | (arr != np.round(arr)) | (np.abs(arr) > _MAX_FLOAT_LABEL)
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise DataError(
                f"{path}: {name} must hold integer class labels, found {arr[i].item()!r} "
                f"at index {i}"
            )
    elif arr.dtype.kind == "u" and arr.size and arr.max() > np.iinfo(np.int64).max:
        raise DataError(f"{path}: {name} has an implausibly large label ({arr.max()})")
    elif arr.dtype.kind in "US":
        return arr.astype(str)
    elif arr.dtype.kind not in "iub":
        raise DataError(
            f"{path}: {name} must hold class labels (integers, booleans or text), "
            f"got dtype {arr.dtype}"
        )
    return arr.astype(np.int64)
