"""The spare-array pool: what is given back is handed out again, within its bound, once."""

from __future__ import annotations

import numpy as np

from p2pfl.daemon.pool import ArrayPool


def test_a_given_array_is_taken_again_instead_of_a_new_one() -> None:
    pool = ArrayPool(1000, keep=2)
    first = pool.take()
    assert first.dtype == np.uint32 and first.shape == (1000,)
    pool.give(first)
    assert np.shares_memory(pool.take(), first)
    assert not np.shares_memory(pool.take(), first)  # empty again: a new one


def test_a_float32_array_comes_back_as_uint32_over_the_same_memory() -> None:
    pool = ArrayPool(10, keep=1)
    received = np.arange(10, dtype=np.float32)
    pool.give(received)
    again = pool.take()
    assert again.dtype == np.uint32 and np.shares_memory(again, received)


def test_at_most_keep_arrays_are_kept() -> None:
    pool = ArrayPool(10, keep=2)
    arrays = [np.empty(10, dtype=np.uint32) for _ in range(3)]
    for array in arrays:
        pool.give(array)
    assert len(pool) == 2
    pool.keep = 1  # (fewer neighbours: the extra spare goes)
    assert len(pool) == 1
    pool.give(np.empty(10, dtype=np.uint32))
    assert len(pool) == 1
    pool.keep = 0
    assert len(pool) == 0
    assert not np.shares_memory(pool.take(), arrays[0])  # (what went is not handed out)


def test_an_array_given_twice_is_kept_once() -> None:
    """Handing one array out twice would let two masks overwrite each other."""
    pool = ArrayPool(10, keep=4)
    array = np.empty(10, dtype=np.uint32)
    pool.give(array)
    pool.give(array)
    pool.give(array.view(np.float32))
    assert len(pool) == 1
    assert not np.shares_memory(pool.take(), pool.take())


def test_arrays_that_cannot_be_reused_are_left_alone() -> None:
    pool = ArrayPool(10, keep=4)
    pool.give(np.empty(11, dtype=np.uint32))  # another size
    pool.give(np.empty(20, dtype=np.uint32)[::2])  # not contiguous
    read_only = np.empty(10, dtype=np.uint32)
    read_only.flags.writeable = False
    pool.give(read_only)
    pool.give(np.frombuffer(bytes(40), dtype=np.uint32))  # not writable either
    pool.give(np.empty(10, dtype=np.float64))  # as many entries, but twice the bytes
    pool.give(np.empty(20, dtype=np.float16))  # as many bytes, other entries
    assert len(pool) == 0
