"""Data preparation for the harness, scripts and tests; never imported by a peer process.

scikit-learn is imported lazily inside the function that needs it: importing it costs
about 0.6 s, which peer processes must not pay, and it is only an optional dependency.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

__all__ = ["load_diabetes_arrays", "load_digits_arrays", "split_iid", "write_partitions"]


def load_digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's 8x8 digits: x float32 scaled to [0, 1], y int64 in 0..9."""
    from sklearn.datasets import load_digits  # lazy: see module docstring

    digits = load_digits()
    x = (np.asarray(digits.data, dtype=np.float32) / np.float32(16.0)).astype(np.float32)
    y = np.asarray(digits.target, dtype=np.int64)
    return x, y


def load_diabetes_arrays() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's diabetes regression set: x float32 (442, 10), as scikit-learn scales
    it (each column centred, unit norm), y float32 (a disease progression score, 25-346)."""
    from sklearn.datasets import load_diabetes  # lazy: see module docstring

    diabetes = load_diabetes()
    x = np.asarray(diabetes.data, dtype=np.float32)
    y = np.asarray(diabetes.target, dtype=np.float32)
    return x, y


def split_iid(n_samples: int, n_parts: int, seed: int) -> list[np.ndarray]:
    """Seeded random partition of ``range(n_samples)`` into ``n_parts`` near-equal parts.

    Each part is a sorted int64 index array; together they cover every index exactly once.
    """
    if n_parts < 1:
        raise ValueError(f"n_parts must be at least 1, got {n_parts}")
    if n_samples < n_parts:
        raise ValueError(f"cannot split {n_samples} samples into {n_parts} non-empty parts")
    order = np.random.default_rng(seed).permutation(n_samples).astype(np.int64)
    return [np.sort(part) for part in np.array_split(order, n_parts)]


def write_partitions(
    x: np.ndarray,
    y: np.ndarray,
    n_parts: int,
    out_dir: str | Path,
    *,
    seed: int,
    test_fraction: float = 0.2,
    names: Sequence[str],
) -> Path:
    """Hold out a per-class test split, split the rest IID, and write one file per peer.

    Writes ``out_dir/<name>.npz`` (``x``, ``y``, and ``x_val``/``y_val`` = the held-out set,
    identical for every peer so their validation numbers are comparable) and
    ``out_dir/test.npz`` (``x``, ``y``: the same held-out set). Returns ``out_dir``.
    """
    x = np.asarray(x)
    y = np.asarray(y)
    if x.ndim != 2 or y.ndim != 1 or x.shape[0] != y.shape[0]:
        raise ValueError(f"need x of shape (n, features) and y of shape (n,): {x.shape}, {y.shape}")
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be strictly between 0 and 1, got {test_fraction}")
    if len(names) != n_parts:
        raise ValueError(f"need {n_parts} names, got {len(names)}")
    if len(set(names)) != len(names):
        raise ValueError(f"names must be unique: {list(names)}")
    for name in names:
        if not name or name == "test" or Path(name).name != name or name.startswith("."):
            raise ValueError(f"{name!r} cannot be used as a partition file name")

    test_idx = _stratified_holdout(y, test_fraction, np.random.default_rng([seed, 1]))
    train_mask = np.ones(y.shape[0], dtype=bool)
    train_mask[test_idx] = False
    train_idx = np.flatnonzero(train_mask)
    x_test, y_test = x[test_idx], y[test_idx]

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for name, part in zip(names, split_iid(train_idx.size, n_parts, seed), strict=True):
        rows = train_idx[part]
        np.savez(out / f"{name}.npz", x=x[rows], y=y[rows], x_val=x_test, y_val=y_test)
    np.savez(out / "test.npz", x=x_test, y=y_test)
    return out


def _stratified_holdout(y: np.ndarray, fraction: float, rng: np.random.Generator) -> np.ndarray:
    """Sorted indices of about ``fraction`` of each class (at least one row of each stays)."""
    picked: list[np.ndarray] = []
    for label in np.unique(y):
        members = np.flatnonzero(y == label)
        take = min(round(fraction * members.size), members.size - 1)
        picked.append(rng.permutation(members)[:take])
    held = np.sort(np.concatenate(picked)) if picked else np.empty(0, dtype=np.int64)
    if held.size == 0:
        raise ValueError(
            "the held-out test split would be empty; use more data or a larger fraction"
        )
    return held.astype(np.int64)
