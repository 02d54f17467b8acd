"""Parameter streams: cut a flat float32 vector into chunks, and reassemble one, sans I/O.

The receiver knows the exact size of the model (every peer builds the same model from the
shared config), so a stream announcing any other size is refused before anything is
allocated, and memory per connection is bounded by one model.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np

from p2pfl.errors import MessageError


def iter_chunks(
    flat: np.ndarray | StreamSource, chunk_bytes: int
) -> Iterator[tuple[int, memoryview]]:
    """Yield (byte offset, view) pieces of a contiguous vector (float32 parameters,
    uint32 masked contributions, or a compressed payload's bytes), without copying. From a
    ``StreamSource``, each piece is cut from the array it holds at that moment."""
    source = flat if isinstance(flat, StreamSource) else StreamSource(flat)
    total = source.array.nbytes
    for offset in range(0, total, chunk_bytes):
        raw = _bytes_view(source.array)
        yield offset, raw[offset : offset + chunk_bytes]


class StreamSource:
    """The array a parameter stream reads, chunk by chunk. A stream that must outlive the
    array's contents (a silent neighbour's, while the model is averaged in place) gets a
    copy of it mid-stream (``detach``): the rest of the stream is the same bytes."""

    def __init__(self, array: np.ndarray) -> None:
        if array.dtype not in (np.float32, np.uint32, np.uint8):
            array = array.astype(np.float32)  # never a reinterpretation of other types
        self.array = np.ascontiguousarray(array)
        self.detached = False

    def detach(self, copies: dict[int, np.ndarray]) -> None:
        """Read from a copy from now on; ``copies`` shares one copy per original array
        among the streams detached together."""
        if not self.detached:
            key = id(self.array)
            if key not in copies:
                copies[key] = self.array.copy()
            self.array = copies[key]
            self.detached = True


def _bytes_view(array: np.ndarray) -> memoryview:
    """A writable byte view of a contiguous array (numpy arrays are buffers at run time)."""
    return memoryview(array.data).cast("B")


@dataclass(frozen=True)
class Completed:
    """A finished stream. ``params`` is None when the stream was received only to be dropped."""

    round: int
    params: np.ndarray | None


class StreamReceiver:
    """Reassembles the parameter streams arriving on one connection, one at a time.

    A stream is ``expected_bytes`` long, the model's size; with ``variable`` (compressed
    payloads) any length from 1 to ``expected_bytes`` (the largest payload), received
    into bytes of its own."""

    def __init__(
        self,
        expected_bytes: int,
        allocate: Callable[[], np.ndarray] | None = None,
        *,
        variable: bool = False,
    ) -> None:
        self.expected_bytes = expected_bytes
        self.variable = variable
        #: The length of the stream in progress.
        self._total = expected_bytes
        #: Where kept streams go: a new float32 array, or a spare one (``pool``).
        self._allocate = allocate or (lambda: np.empty(expected_bytes // 4, dtype=np.float32))
        self._round: int | None = None
        self._buffer: np.ndarray | None = None
        self._received = 0
        self._keep = False

    @property
    def in_progress(self) -> bool:
        return self._round is not None

    def begin(self, round_index: int, total_bytes: int, *, keep: bool) -> None:
        """Start a stream; ``keep=False`` validates and discards it (e.g. a past round)."""
        if self._round is not None:
            raise MessageError(
                f"new stream for round {round_index} before round {self._round} ended"
            )
        if self.variable:
            if not 0 < total_bytes <= self.expected_bytes:
                raise MessageError(
                    f"compressed stream of {total_bytes} bytes, the limit is "
                    f"{self.expected_bytes} (a keyframe of this model)"
                )
        elif total_bytes != self.expected_bytes:
            raise MessageError(
                f"stream of {total_bytes} bytes, but the model has {self.expected_bytes}"
            )
        self._round = round_index
        self._received = 0
        self._keep = keep
        self._total = total_bytes
        if not keep:
            self._buffer = None
        elif self.variable:
            self._buffer = np.empty(total_bytes, dtype=np.uint8)
        else:
            self._buffer = self._allocate()

    def chunk(self, round_index: int, offset: int, data: memoryview) -> Completed | None:
        """Add the next chunk; returns the completed stream after its last chunk."""
        if self._round is None:
            raise MessageError("chunk without a stream")
        if round_index != self._round:
            raise MessageError(f"chunk for round {round_index} inside a round {self._round} stream")
        if offset != self._received:
            raise MessageError(f"chunk at offset {offset}, expected {self._received}")
        end = offset + len(data)
        if end > self._total:
            raise MessageError(f"chunk runs past the end of the stream ({end} bytes)")
        if self._buffer is not None:
            _bytes_view(self._buffer)[offset:end] = data
        self._received = end
        if end < self._total:
            return None
        done = Completed(self._round, self._buffer)
        self.abort()
        return done

    def abort(self) -> None:
        """Forget the stream in progress (connection lost)."""
        self._round = None
        self._buffer = None
        self._received = 0
        self._keep = False
