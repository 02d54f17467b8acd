"""Loading a node's local data file (``.npz`` or ``.csv``) with strict validation.

Data files may come from anywhere (another hospital's export tool, a colleague's script),
so they are treated as untrusted input: ``.npz`` archives are opened with pickling
disabled, and every problem becomes a ``DataError`` naming the file and the fault, before
the node starts rather than as a numpy traceback halfway through the first round.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, TypeVar

import numpy as np
from numpy.lib import format as npy_format

from p2pfl.errors import DataError
from p2pfl.learning.base import Task
from p2pfl.store.npzread import READ_ERRORS, is_zip, scan_npz

__all__ = ["Dataset", "check_compatible", "load_dataset"]

# Labels are class indices; anything this large is a corrupt or misplaced column.
_MAX_LABEL = 2**31 - 1
# What a damaged or hostile archive can raise while being opened or read.
_READ_ERRORS = READ_ERRORS


@dataclass(frozen=True)
class Dataset:
    """Training arrays plus optional validation arrays (both present or both ``None``).

    ``x`` arrays are float32 of shape ``(n, features)``; ``y`` arrays int64 of shape ``(n,)``
    (class labels) or, for regression, float32 of shape ``(n,)`` or ``(n, outputs)``.
    """

    x: np.ndarray
    y: np.ndarray
    x_val: np.ndarray | None
    y_val: np.ndarray | None
    #: Where the data came from (a file), for error messages.
    source: str = "the data"

    @property
    def features(self) -> int:
        """Number of input features (columns of ``x``)."""
        return int(self.x.shape[1])


def load_dataset(
    path: str | Path,
    *,
    val_path: str | Path | None = None,
    task: Task = "classification",
    label_column: str | None = None,
) -> Dataset:
    """Load and validate a data file; ``val_path`` supplies (or replaces) validation data.

    ``.npz`` files hold arrays ``x`` and ``y`` and optionally ``x_val`` and ``y_val``.
    ``.csv`` files are numeric, with an optional header row: the label column is
    ``label_column`` (a header name, or a 1-based number), else the one named ``label`` or
    ``y``, else the last column.
    A validation file uses the same formats (``x``/``y`` for ``.npz``). For ``task``
    classification ``y`` holds integer class labels (int64); for regression real targets
    (float32, shape ``(n,)`` or, in an ``.npz``, ``(n, outputs)``).
    """
    path = Path(path)
    targets = _labels if task == "classification" else _real_targets
    x, y, x_val, y_val = _load_any(path, allow_val=True, targets=targets, label=label_column)
    if val_path is not None:
        val_path = Path(val_path)
        x_val, y_val, _, _ = _load_any(
            val_path, allow_val=False, targets=targets, label=label_column
        )
        val_source = val_path
    else:
        val_source = path
    if x_val is not None and x_val.shape[1] != x.shape[1]:
        raise DataError(
            f"{val_source}: validation data has {x_val.shape[1]} features "
            f"but the training data in {path} has {x.shape[1]}"
        )
    return Dataset(x=x, y=y, x_val=x_val, y_val=y_val, source=str(path))


def check_compatible(
    ds: Dataset, inputs: int, classes: int, source: str, task: Task = "classification"
) -> None:
    """Raise ``DataError`` unless ``ds`` fits a model with ``inputs`` features and ``classes``
    classes (regression: ``classes`` targets per row). The error names the data file first
    (``ds.source``): the data, not ``source`` (the config), is usually what is off."""
    model = f"the model ({source}: training.model)"
    if ds.x.shape[1] != inputs:
        raise DataError(
            f"{ds.source}: data has {ds.x.shape[1]} features but {model} expects {inputs}"
        )
    if task == "regression":
        for name, ys in (("y", ds.y), ("y_val", ds.y_val)):
            width = 1 if ys is None or ys.ndim == 1 else ys.shape[1]
            if ys is not None and width != classes:
                raise DataError(
                    f"{ds.source}: {name} has {width} target column(s) but {model} has "
                    f"{classes} output(s)"
                )
        return
    for name, labels in (("y", ds.y), ("y_val", ds.y_val)):
        if labels is None or labels.size == 0:
            continue
        lo, hi = int(labels.min()), int(labels.max())
        if lo < 0 or hi >= classes:
            bad = lo if lo < 0 else hi
            raise DataError(
                f"{ds.source}: label {bad} in {name} is outside 0..{classes - 1} "
                f"({model} has {classes} classes)"
            )


_Arrays = tuple[np.ndarray, np.ndarray, np.ndarray | None, np.ndarray | None]


#: Validates the target column(s): (path, name, array, rows, name of x) -> array.
_Targets = Callable[[Path, str, np.ndarray, int, str], np.ndarray]


def _load_any(
    path: Path, *, allow_val: bool, targets: _Targets, label: str | None = None
) -> _Arrays:
    if not path.is_file():
        what = "is not a regular file" if path.exists() else "does not exist"
        raise DataError(f"{path}: data file {what}")
    suffix = path.suffix.lower()
    if suffix == ".npz":
        return _load_npz(path, allow_val=allow_val, targets=targets)
    if suffix == ".csv":
        x, y = _load_csv(path, targets, label)
        return x, y, None, None
    raise DataError(f"{path}: unknown data file extension {path.suffix!r} (use .npz or .csv)")


T = TypeVar("T")


def _load_npz(path: Path, *, allow_val: bool, targets: _Targets) -> _Arrays:
    return read_npz(
        path, lambda archive: _npz_arrays(path, archive, allow_val=allow_val, targets=targets)
    )


def read_npz(path: Path, read: Callable[[np.lib.npyio.NpzFile], T]) -> T:
    """Open an .npz safely (never unpickling, never allocating more than its members
    hold) and hand it to ``read``; a damaged archive becomes a DataError naming the file."""
    try:
        # Opened here rather than by np.load, so the file is closed even when np.load fails
        # halfway (it leaks its own handle on a corrupt archive).
        with path.open("rb") as fh:
            _check_archive(path, fh)
            # allow_pickle=False: NEVER change this. Data files may come from elsewhere, and
            # unpickling an object array runs code chosen by whoever wrote the file.
            archive = np.load(fh, allow_pickle=False)
            if not isinstance(archive, np.lib.npyio.NpzFile):
                raise DataError(f"{path}: is a single .npy array, not an .npz archive with x and y")
            with archive:
                return read(archive)
    except DataError:
        raise
    except _READ_ERRORS as exc:
        raise DataError(f"{path}: cannot read as an .npz archive: {exc}") from exc


def _check_archive(path: Path, fh: BinaryIO) -> None:
    """Refuse, before numpy allocates anything, a lone ``.npy`` and an archive whose
    members declare more data than they hold (a tiny file claiming terabytes)."""
    if fh.read(len(npy_format.MAGIC_PREFIX)) == npy_format.MAGIC_PREFIX:
        raise DataError(f"{path}: is a single .npy array, not an .npz archive with x and y")
    fh.seek(0)
    if is_zip(fh):  # (anything else np.load refuses without reading it: no pickle)
        scan_npz(fh)


def _npz_arrays(
    path: Path, archive: np.lib.npyio.NpzFile, *, allow_val: bool, targets: _Targets
) -> _Arrays:
    keys = set(archive.files)

    def get(key: str) -> np.ndarray:
        try:
            return np.asarray(archive[key])
        except _READ_ERRORS as exc:
            raise DataError(f"{path}: cannot read array {key!r}: {exc}") from exc

    for key in ("x", "y"):
        if key not in keys:
            found = ", ".join(sorted(keys)) or "none"
            raise DataError(f"{path}: missing array {key!r} (arrays found: {found})")
    x = _features(path, "x", get("x"))
    y = targets(path, "y", get("y"), x.shape[0], "x")
    x_val: np.ndarray | None = None
    y_val: np.ndarray | None = None
    has_val = ("x_val" in keys, "y_val" in keys)
    if allow_val and any(has_val):
        if not all(has_val):
            present, absent = ("x_val", "y_val") if has_val[0] else ("y_val", "x_val")
            raise DataError(f"{path}: has {present!r} but not {absent!r}; give both or neither")
        x_val = _features(path, "x_val", get("x_val"))
        y_val = targets(path, "y_val", get("y_val"), x_val.shape[0], "x_val")
        if x_val.shape[1] != x.shape[1]:
            raise DataError(f"{path}: x_val has {x_val.shape[1]} features but x has {x.shape[1]}")
    return x, y, x_val, y_val


def _features(path: Path, name: str, arr: np.ndarray) -> np.ndarray:
    if arr.ndim != 2:
        raise DataError(f"{path}: {name} must be 2-D (rows, features), got shape {arr.shape}")
    if arr.dtype.kind not in "fiu":
        raise DataError(f"{path}: {name} must be numeric, got dtype {arr.dtype}")
    if arr.shape[0] == 0 or arr.shape[1] == 0:
        raise DataError(f"{path}: {name} is empty (shape {arr.shape})")
    if arr.dtype.kind == "f":
        # NaN or inf would turn this node's model, then its neighbours', into NaN.
        bad = ~np.isfinite(arr).all(axis=1)
        if bad.any():
            row = int(np.flatnonzero(bad)[0])
            raise DataError(f"{path}: {name} has a NaN or infinite value (row {row})")
        if arr.dtype.itemsize > 4:
            big = (np.abs(arr) > np.finfo(np.float32).max).any(axis=1)
            if big.any():
                row = int(np.flatnonzero(big)[0])
                raise DataError(f"{path}: {name} has a value too large for float32 (row {row})")
    return np.ascontiguousarray(arr, dtype=np.float32)


def _labels(path: Path, name: str, arr: np.ndarray, rows: int, x_name: str) -> np.ndarray:
    if arr.ndim != 1:
        raise DataError(f"{path}: {name} must be 1-D (one label per row), got shape {arr.shape}")
    if arr.shape[0] != rows:
        raise DataError(f"{path}: {name} has {arr.shape[0]} labels but {x_name} has {rows} rows")
    if arr.dtype.kind == "f":
        bad = ~np.isfinite(arr) | (arr != np.round(arr))
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise DataError(
                f"{path}: {name} must hold integer class labels, "
                f"found {arr[i].item()!r} at index {i}"
            )
    elif arr.dtype.kind not in "iu":
        raise DataError(f"{path}: {name} must hold integer class labels, got dtype {arr.dtype}")
    lo, hi = arr.min().item(), arr.max().item()
    if lo < 0:
        raise DataError(f"{path}: {name} has a negative label ({lo})")
    if hi > _MAX_LABEL:
        raise DataError(f"{path}: {name} has an implausibly large label ({hi})")
    return arr.astype(np.int64)


def _real_targets(path: Path, name: str, arr: np.ndarray, rows: int, x_name: str) -> np.ndarray:
    """Regression targets: finite real numbers, one row per sample (one or more columns)."""
    if arr.ndim not in (1, 2) or (arr.ndim == 2 and arr.shape[1] == 0):
        raise DataError(
            f"{path}: {name} must be 1-D (one target per row) or 2-D (rows, outputs), "
            f"got shape {arr.shape}"
        )
    if arr.shape[0] != rows:
        raise DataError(f"{path}: {name} has {arr.shape[0]} targets but {x_name} has {rows} rows")
    if arr.dtype.kind not in "fiu":
        raise DataError(f"{path}: {name} must hold numeric targets, got dtype {arr.dtype}")
    if arr.dtype.kind == "f":
        bad = ~np.isfinite(arr) if arr.ndim == 1 else ~np.isfinite(arr).all(axis=1)
        if bad.any():
            raise DataError(f"{path}: {name} has a NaN or infinite target (row {np.argmax(bad)})")
    if (np.abs(arr) > np.finfo(np.float32).max).any():
        raise DataError(f"{path}: {name} has a target too large for float32")
    return np.ascontiguousarray(arr, dtype=np.float32)


def _load_csv(path: Path, targets: _Targets, label: str | None) -> tuple[np.ndarray, np.ndarray]:
    try:
        header, skip, has_data = _csv_layout(path)
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: cannot read CSV file: {exc}") from exc
    if not has_data:
        # Checked here because np.loadtxt only warns on an empty file.
        raise DataError(f"{path}: CSV file has no data rows")
    try:
        table = np.loadtxt(
            path, delimiter=",", dtype=np.float64, skiprows=skip, ndmin=2, encoding="utf-8-sig"
        )
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: cannot read CSV file: {exc}") from exc
    except ValueError as exc:  # find the line and column ourselves: numpy's are off by the header
        raise DataError(_csv_fault(path, header, skip) or f"{path}: malformed CSV: {exc}") from exc
    if table.shape[1] < 2:
        raise DataError(f"{path}: CSV needs at least one feature column and a label column")
    if header is not None and len(header) != table.shape[1]:
        raise DataError(
            f"{path}: header has {len(header)} columns but the rows have {table.shape[1]}"
        )
    col = _label_column(path, header, table.shape[1], label)
    x = _features(path, "features", np.delete(table, col, axis=1))
    name = f"label column {header[col]!r}" if header else f"label column {col + 1}"
    y = targets(path, name, table[:, col], x.shape[0], "x")
    return x, y


def _label_column(path: Path, header: list[str] | None, width: int, label: str | None) -> int:
    """Which column holds the labels: ``label`` (a header name or a 1-based number), else
    the one named ``label`` or ``y``, else the last."""
    if label is not None:
        if label.isdigit() and 1 <= int(label) <= width:
            return int(label) - 1
        if header is not None and label.strip().lower() in header:
            return header.index(label.strip().lower())
        names = f"the header's names ({', '.join(header)})" if header else "no header"
        raise DataError(
            f"{path}: --label-column {label!r} is neither a column number 1..{width} nor one "
            f"of {names}"
        )
    if header is None:
        return width - 1
    matches = [i for i, name in enumerate(header) if name in ("label", "y")]
    if len(matches) > 1:
        raise DataError(
            f"{path}: CSV header has more than one label column ('label' / 'y'); choose one "
            "with --label-column"
        )
    return matches[0] if matches else width - 1


def _csv_fault(path: Path, header: list[str] | None, skip: int) -> str | None:
    """The first line that ``np.loadtxt`` cannot read, said with its line number and the
    column's name (None if this reading finds none)."""
    width = len(header) if header is not None else None
    with path.open(encoding="utf-8-sig") as fh:
        for number, raw in enumerate(fh, start=1):
            line = raw.split("#", 1)[0].strip()
            if number <= skip or not line:
                continue
            fields = line.split(",")
            if width is None:
                width = len(fields)
            elif len(fields) != width:
                return f"{path}: line {number} has {len(fields)} fields, the others {width}"
            for i, field in enumerate(fields):
                if not _is_number(field.strip()):
                    column = f"{header[i]!r}" if header is not None else str(i + 1)
                    shown = field.strip()[:40]
                    return f"{path}: line {number}, column {column}: {shown!r} is not a number"
    return None


def _csv_layout(path: Path) -> tuple[list[str] | None, int, bool]:
    """Header column names (``None`` if none), lines to skip, and whether data rows follow.

    A header is a first non-blank, non-comment line with a field that is not a number.
    Reading stops at the first data line, so this costs nothing on large files.
    """
    header: list[str] | None = None
    skip = 0
    with path.open(encoding="utf-8-sig") as fh:
        for number, raw in enumerate(fh, start=1):
            line = raw.split("#", 1)[0].strip()
            if not line:
                continue
            if header is None:
                fields = [f.strip().strip("\"'").strip().lower() for f in line.split(",")]
                if not all(_is_number(f) for f in fields):
                    header, skip = fields, number
                    continue
            return header, skip, True
    return header, skip, False


def _is_number(field: str) -> bool:
    try:
        float(field)
    except ValueError:
        return False
    return True
