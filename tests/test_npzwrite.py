"""write_npz produces what numpy.load reads back exactly (no pickle), ZIP64 included."""

from __future__ import annotations

import io
import zipfile

import numpy as np
import pytest

import p2pfl.store.npzwrite as npzwrite
from p2pfl.store.npzwrite import write_npz


def round_trip(arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    out = io.BytesIO()
    write_npz(out, arrays)
    out.seek(0)
    assert zipfile.ZipFile(out).testzip() is None  # every member's CRC is right
    out.seek(0)
    with np.load(out, allow_pickle=False) as data:
        return {name: data[name] for name in data.files}


def test_arrays_of_every_kind_come_back_exactly() -> None:
    rng = np.random.default_rng(0)
    arrays = {
        "params": rng.standard_normal(4810).astype(np.float32),
        "next_round": np.array(3, dtype=np.int64),  # 0-d stays 0-d
        "digest": np.frombuffer(bytes(range(32)), dtype=np.uint8),
        "matrix": rng.standard_normal((3, 5)),
        "strided": np.arange(20, dtype=np.int32)[::3],  # not contiguous
        "empty": np.zeros(0, dtype=np.float32),
        "big_endian": np.arange(4, dtype=">u4"),
    }
    back = round_trip(arrays)
    assert list(back) == list(arrays)
    for name, array in arrays.items():
        assert back[name].dtype == array.dtype and back[name].shape == array.shape, name
        np.testing.assert_array_equal(back[name], array)
    assert int(back["next_round"]) == 3


def test_numpy_savez_and_write_npz_agree() -> None:
    arrays = {"a": np.arange(10, dtype=np.float32), "b": np.array(5, dtype=np.int64)}
    ours = round_trip(arrays)
    theirs = io.BytesIO()
    np.savez(theirs, **arrays)
    theirs.seek(0)
    with np.load(theirs, allow_pickle=False) as data:
        for name in arrays:
            np.testing.assert_array_equal(ours[name], data[name])


def test_zip64_members_and_offsets(monkeypatch: pytest.MonkeyPatch) -> None:
    """The ZIP64 path (members or offsets of 4 GiB and more), exercised on small arrays by
    lowering the limit."""
    monkeypatch.setattr(npzwrite, "_LIMIT", 100)
    arrays = {"small": np.arange(3, dtype=np.uint8), "large": np.arange(500, dtype=np.float32)}
    back = round_trip(arrays)
    np.testing.assert_array_equal(back["large"], arrays["large"])
    np.testing.assert_array_equal(back["small"], arrays["small"])


def test_object_arrays_are_refused() -> None:
    with pytest.raises(ValueError, match="pickle"):
        write_npz(io.BytesIO(), {"x": np.array([object()], dtype=object)})
