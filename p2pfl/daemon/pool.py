"""Model-sized arrays kept for reuse across rounds.

A fresh 40 MB array is cheap to allocate and expensive to touch: the kernel zeroes each page
on its first write. Secure aggregation fills a few model-sized masks every round; measured
with ``perf`` on the secure benchmark (10M parameters, degree 4), zeroing the pages of fresh
masks took more CPU than everything but the AES keystreams. Arrays whose contents are no
longer needed (received models, sent vectors, summed contributions) come back here and are
refilled instead.

Rules for users: give an array only when nothing will read or write it again (no stream
still sending it, no thread still summing it), and treat a taken array as garbage: every
user overwrites all of it (a whole received stream, a whole mask, a whole sum) before it is
read or sent, so nothing of a previous round can leak through it.
"""

from __future__ import annotations

import threading

import numpy as np


class ArrayPool:
    """A bounded, thread-safe stack of spare uint32 arrays of one size."""

    def __init__(self, size: int, keep: int) -> None:
        self.size = size
        self._keep = keep
        self._spare: list[np.ndarray] = []
        self._addresses: set[int] = set()  # (an array given twice is kept once)
        self._lock = threading.Lock()

    @property
    def keep(self) -> int:
        """How many spare arrays are kept at most (lowering it lets the extra ones go)."""
        return self._keep

    @keep.setter
    def keep(self, keep: int) -> None:
        with self._lock:
            self._keep = keep
            for array in self._spare[keep:]:
                self._addresses.discard(_address(array))
            del self._spare[keep:]

    def take(self) -> np.ndarray:
        """A spare array (contents undefined), or a new one."""
        with self._lock:
            if self._spare:
                array = self._spare.pop()
                self._addresses.discard(_address(array))
                return array
        return np.empty(self.size, dtype=np.uint32)

    def give(self, array: np.ndarray) -> None:
        """Keep ``array`` for reuse. The caller hands it over: nothing may read or write it
        afterwards. Arrays of another shape, read-only or not contiguous are left to the
        garbage collector, and so are arrays beyond ``keep``."""
        if (
            array.nbytes != 4 * self.size
            or array.itemsize != 4
            or not array.flags.c_contiguous
            or not array.flags.writeable
        ):
            return
        flat = array.reshape(-1).view(np.uint32)
        address = _address(flat)
        with self._lock:
            if len(self._spare) < self._keep and address not in self._addresses:
                self._spare.append(flat)
                self._addresses.add(address)

    def __len__(self) -> int:
        with self._lock:
            return len(self._spare)


def _address(array: np.ndarray) -> int:
    return int(array.__array_interface__["data"][0])
