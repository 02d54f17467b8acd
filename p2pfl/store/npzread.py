"""Checking an ``.npz`` archive before ``numpy.load`` reads it: what each member declares.

``numpy.load`` allocates the array a member's ``.npy`` header declares before it reads a
byte of data, so a 300-byte file that declares a 4 TiB array ends in a ``MemoryError``
(or, with overcommit, gigabytes of memory). This reads every member's header and sizes
from the ZIP directory first and refuses a member that claims more than it can hold: a
stored member holds what it stores, a compressed one at most what deflate can expand to.
Raw members (no ``.npy`` header, which ``numpy.load`` returns as bytes) are listed too, and
an archive where one name stands for two members (``k`` and ``k.npy``) is refused:
``numpy.load`` would hand out the raw one for ``k``, shadowing the checked array.
Callers turn the ``NpzError`` (and the rest of :data:`READ_ERRORS`) into their own error
naming the file.
"""

from __future__ import annotations

import math
import os
import struct
import zipfile
import zlib
from dataclasses import dataclass
from typing import BinaryIO

import numpy as np
from numpy.lib import format as npy_format

#: What a damaged or hostile archive can raise while it is opened or read (zipfile raises
#: NotImplementedError for an unknown compression method and RuntimeError for an
#: encrypted member; numpy raises MemoryError for a header we could not bound).
READ_ERRORS: tuple[type[BaseException], ...] = (
    OSError,
    ValueError,
    EOFError,
    KeyError,
    TypeError,
    zipfile.BadZipFile,
    zlib.error,
    struct.error,
    NotImplementedError,
    RuntimeError,
    MemoryError,
    OverflowError,
)
#: How the first bytes of a ZIP archive look (a local header, or an empty archive).
ZIP_MAGIC = (b"PK\x03\x04", b"PK\x05\x06")
#: Deflate expands at most ~1032 times (zlib's technical details); a little above that.
_MAX_RATIO = 1100
_NPY_SUFFIX = ".npy"


class NpzError(ValueError):
    """A member of the archive declares more than it can hold, or is not what it claims."""


@dataclass(frozen=True)
class Array:
    """What one ``.npy`` member declares: its array's shape and dtype, and its data size."""

    shape: tuple[int, ...]
    dtype: np.dtype[np.generic]
    nbytes: int


@dataclass(frozen=True)
class Member:
    """One member of the archive: its name in the ZIP directory and, if it starts with an
    ``.npy`` header, the array it declares (None: raw bytes to ``numpy.load``)."""

    filename: str
    array: Array | None

    @property
    def is_npy(self) -> bool:
        """An ``.npy`` array under an ``.npy`` name: what ``numpy.savez`` writes."""
        return self.array is not None and self.filename.endswith(_NPY_SUFFIX)


def is_zip(fh: BinaryIO) -> bool:
    """Whether ``fh`` starts as a ZIP archive does (what ``numpy.load`` looks at)."""
    start = fh.tell()
    head = fh.read(4)
    fh.seek(start)
    return head in ZIP_MAGIC


def scan_npz(fh: BinaryIO) -> dict[str, Member]:
    """Every member of the archive in ``fh`` by its ``numpy.load`` name (the file name less
    ``.npy``), each ``.npy`` header checked against the data the member holds. Raises
    NpzError or one of READ_ERRORS."""
    size = fh.seek(0, os.SEEK_END)
    fh.seek(0)
    members: dict[str, Member] = {}
    with zipfile.ZipFile(fh) as archive:
        for info in archive.infolist():
            _check_sizes(info, size)
            name = info.filename.removesuffix(_NPY_SUFFIX)
            if name in members:
                raise NpzError(
                    f"array {name!r} appears twice in the archive (as "
                    f"{members[name].filename!r} and {info.filename!r})"
                )
            members[name] = Member(info.filename, _read_header(archive, info, name))
    fh.seek(0)
    return members


def _check_sizes(info: zipfile.ZipInfo, archive_size: int) -> None:
    """A member cannot store more than the file, nor expand beyond what its method can."""
    if info.compress_size > archive_size:
        raise NpzError(
            f"member {info.filename!r} claims {info.compress_size} stored bytes, "
            f"more than the whole file ({archive_size})"
        )
    limit = info.compress_size if info.compress_type == zipfile.ZIP_STORED else None
    if limit is None:
        limit = info.compress_size * _MAX_RATIO + 64
    if info.file_size > limit:
        raise NpzError(
            f"member {info.filename!r} claims {info.file_size} bytes from "
            f"{info.compress_size} stored bytes"
        )


def _read_header(archive: zipfile.ZipFile, info: zipfile.ZipInfo, name: str) -> Array | None:
    """The member's declared array, or None if it is not an ``.npy`` file (numpy reads
    such a member as raw bytes, already bounded by its size)."""
    with archive.open(info) as f:
        head = f.read(npy_format.MAGIC_LEN)
        if not head.startswith(npy_format.MAGIC_PREFIX) or len(head) < npy_format.MAGIC_LEN:
            return None
        version = (head[-2], head[-1])
        if version == (1, 0):
            shape, _, dtype = npy_format.read_array_header_1_0(f)
        elif version in ((2, 0), (3, 0)):
            shape, _, dtype = npy_format.read_array_header_2_0(f)
        else:
            raise NpzError(f"array {name!r}: unknown .npy format version {version}")
        held = info.file_size - f.tell()
    # (Elements of zero bytes count as one: a header must not declare 2**60 of them.)
    nbytes = math.prod(shape) * max(dtype.itemsize, 1)
    # An object array is refused by numpy.load (no pickle) before it allocates anything.
    if not dtype.hasobject and nbytes > held:
        raise NpzError(
            f"array {name!r} declares shape {shape} of {dtype} ({nbytes} bytes) "
            f"but holds {max(held, 0)} bytes of data"
        )
    return Array(tuple(shape), dtype, nbytes)
