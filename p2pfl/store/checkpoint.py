"""Atomic checkpoints: the model and the next round, so a killed node resumes where it was.

Written to a temporary file, fsynced, renamed over the old one and the directory fsynced:
a crash at any moment leaves either the old or the new checkpoint, never a torn one. A node
writes each round's file on the round path and commits it (the fsync) in the background.
A round's commit skips the directory fsync (~0.25 ms of CPU, a fifth of a small round's
non-training work on a crowded machine): a power cut may then bring back an earlier
round's checkpoint, never a torn one, and the node rejoins where its neighbours are. The
final checkpoint of a stopping node fsyncs the directory too.
Loaded with ``allow_pickle=False`` (never change that: a checkpoint is a file like any other),
and only after every field's declared shape and type are checked: a damaged or hostile
checkpoint is a ``CheckpointError`` naming the file, never a traceback or a huge allocation.
Each field must be an ``.npy`` member under its own name and is read by that name (numpy
would otherwise prefer a raw member ``next_round`` to the checked ``next_round.npy``), and
the model must be finite (one NaN averaged in spreads to every neighbour).
The checkpoint also keeps the differential-privacy accountant's state (``dp_releases``):
the budget spent must survive a deleted or rotated event log.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from numpy.lib.npyio import NpzFile

from p2pfl.errors import P2PFLError
from p2pfl.store.npzread import READ_ERRORS, Array, Member, is_zip, scan_npz
from p2pfl.store.npzwrite import write_npz

CHECKPOINT_NAME = "checkpoint.npz"
#: Optional per-round models for analysis (``p2pfl run --snapshots``): raw little-endian
#: float32, the model after round r at byte offset r * model bytes.
SNAPSHOTS_NAME = "snapshots.f32"


class CheckpointError(P2PFLError, ValueError):
    """A checkpoint exists but cannot be used (corrupt, or made with another config)."""


#: The fields every checkpoint has, and the counters among them.
_FIELDS = ("params", "next_round", "lamport", "digest")
_COUNTERS = ("next_round", "lamport")
#: The privacy accountant's state; absent from checkpoints of earlier versions.
_DP_RELEASES = "dp_releases"
#: How a field's member is named in the archive (what numpy.savez and write_npz write).
_NPY = ".npy"
#: Counters stay where JSON (the event log, the wire's Lamport times) holds them exactly.
_MAX_COUNTER = 2**53 - 1


@dataclass(frozen=True)
class Checkpoint:
    next_round: int
    params: np.ndarray
    lamport: int
    digest: bytes
    #: Updates released with differential privacy so far (the accountant's state: the
    #: budget spent). None: unknown (a checkpoint from before it was kept).
    dp_releases: int | None = None


def save_checkpoint(state_dir: Path, checkpoint: Checkpoint) -> Path:
    """Write and commit in one go (write, fsync, rename, fsync the directory)."""
    return commit_checkpoint(state_dir, write_checkpoint(state_dir, checkpoint))


def write_checkpoint(state_dir: Path, checkpoint: Checkpoint) -> Path:
    """Write the checkpoint to a temporary file (page cache only) and return its path.

    Split from :func:`commit_checkpoint` so that a node can go on with its next round while
    the fsync runs in the background: once written, the file no longer needs the model.
    """
    tmp = state_dir / (CHECKPOINT_NAME + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        write_npz(f, _arrays(checkpoint))
    return tmp


def _arrays(checkpoint: Checkpoint) -> dict[str, np.ndarray]:
    arrays = {
        "params": checkpoint.params,
        "next_round": np.array(checkpoint.next_round, dtype=np.int64),
        "lamport": np.array(checkpoint.lamport, dtype=np.int64),
        "digest": np.frombuffer(checkpoint.digest, dtype=np.uint8),
    }
    if checkpoint.dp_releases is not None:
        arrays[_DP_RELEASES] = np.array(checkpoint.dp_releases, dtype=np.int64)
    return arrays


def commit_checkpoint(state_dir: Path, tmp: Path, *, sync_dir: bool = True) -> Path:
    """Make a written checkpoint durable, then put it in place atomically (and, with
    ``sync_dir``, make the rename itself durable)."""
    path = state_dir / CHECKPOINT_NAME
    fd = os.open(tmp, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    if not sync_dir:
        return path
    dir_fd = os.open(state_dir, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    return path


def load_checkpoint(
    state_dir: Path,
    *,
    expected_digest: bytes,
    expected_size: int,
    dp: bool = False,
    digest_with_rounds: Callable[[int], bytes] | None = None,
) -> Checkpoint | None:
    """Return the checkpoint in ``state_dir``, None if there is none, or raise CheckpointError.

    Every field's shape and type is checked from the archive's headers before numpy
    allocates anything: a damaged or hostile file is refused, whatever it declares.
    ``dp``: differential privacy is on, so an error that suggests starting afresh says what
    that does to the privacy budget. ``digest_with_rounds(n)``: the config's digest with
    ``training.rounds`` = n; a finished run's checkpoint (next round n) made under it is
    accepted: the config only raised the round count, to train longer.
    """
    path = state_dir / CHECKPOINT_NAME
    if not path.exists():
        return None
    try:
        with path.open("rb") as fh:
            if not is_zip(fh):
                raise CheckpointError(f"{path}: unreadable checkpoint: not an .npz archive")
            arrays = _check_fields(path, scan_npz(fh), expected_size)
            with np.load(fh, allow_pickle=False) as data:
                checkpoint = _read_fields(path, data, arrays)
    except CheckpointError:
        raise
    except READ_ERRORS as exc:
        raise CheckpointError(f"{path}: unreadable checkpoint: {exc}") from exc
    if checkpoint.digest != expected_digest and not (
        digest_with_rounds is not None
        and digest_with_rounds(checkpoint.next_round) == checkpoint.digest
    ):
        raise CheckpointError(_digest_mismatch(path, checkpoint.digest, expected_digest, dp=dp))
    return checkpoint


def _digest_mismatch(path: Path, found: bytes, expected: bytes, *, dp: bool) -> str:
    """Why the checkpoint does not fit the config, and the way out (with DP, at what cost:
    a fresh state directory has spent no budget, so the node's earlier releases go
    uncounted)."""
    message = (
        f"{path}: made with config digest {found.hex()[:16]}, but the config now has "
        f"{expected.hex()[:16]} (a finished run may only raise training.rounds); move the "
        "state directory away to start afresh"
    )
    if dp:
        message += (
            " (differential privacy is on: that restarts the privacy budget at 0, acceptable "
            "only if this node's earlier updates need not count)"
        )
    return message


def _field_arrays(path: Path, members: dict[str, Member]) -> dict[str, Array]:
    """Each field's declared array: the field must be an ``.npy`` member by its own name
    (a raw member, which numpy returns as bytes, is never read as a field)."""
    arrays: dict[str, Array] = {}
    for name in (*_FIELDS, _DP_RELEASES):
        member = members.get(name)
        if member is None:
            if name in _FIELDS:
                raise CheckpointError(f"{path}: not a p2pfl checkpoint: no field {name!r}")
            continue
        if member.array is None or not member.is_npy:
            raise CheckpointError(
                f"{path}: field {name!r} is not an .npy array named {name + _NPY!r} "
                f"(found member {member.filename!r})"
            )
        arrays[name] = member.array
    return arrays


def _check_fields(path: Path, members: dict[str, Member], expected_size: int) -> dict[str, Array]:
    """Each field is there, of the shape and type the writer gives it (and params of the
    model's size): known before anything is read. Returns the fields' declared arrays."""
    arrays = _field_arrays(path, members)
    params = arrays["params"]
    if len(params.shape) != 1 or params.dtype.kind != "f":
        raise CheckpointError(
            f"{path}: params must be a 1-D float array, got shape {params.shape} of {params.dtype}"
        )
    if params.shape != (expected_size,):
        raise CheckpointError(
            f"{path}: holds {params.shape[0]} parameters, the model has {expected_size}"
        )
    for name in (*_COUNTERS, _DP_RELEASES):
        field = arrays.get(name)
        if field is not None and (field.shape != () or field.dtype.kind not in "iu"):
            raise CheckpointError(
                f"{path}: {name} must be a single integer, got shape {field.shape} of {field.dtype}"
            )
    digest = arrays["digest"]
    if digest.shape != (32,) or digest.dtype != np.uint8:
        raise CheckpointError(
            f"{path}: digest must be 32 bytes, got shape {digest.shape} of {digest.dtype}"
        )
    return arrays


def _read_fields(path: Path, data: NpzFile, arrays: dict[str, Array]) -> Checkpoint:
    """The checked fields' values, each read by its member's own name (never a raw member
    that shadows it), each counter in its range, the model finite."""

    def read(name: str) -> np.ndarray:
        return np.asarray(data[name + _NPY])

    counters = {name: _counter(path, name, read(name)) for name in _COUNTERS}
    dp_releases = (
        _counter(path, _DP_RELEASES, read(_DP_RELEASES)) if _DP_RELEASES in arrays else None
    )
    return Checkpoint(
        counters["next_round"],
        _params(path, read("params")),
        counters["lamport"],
        bytes(read("digest")),
        dp_releases=dp_releases,
    )


def _params(path: Path, value: np.ndarray) -> np.ndarray:
    """The model as float32, refused if it holds a value float32 cannot (too large) or a
    NaN or infinity: averaged in, one would turn the neighbours' models into NaN too."""
    try:
        with np.errstate(over="raise"):
            params = np.array(value, dtype=np.float32)
    except FloatingPointError as exc:
        raise CheckpointError(f"{path}: params hold values too large for float32") from exc
    finite = np.isfinite(params)
    if not finite.all():
        index = int(np.flatnonzero(~finite)[0])
        raise CheckpointError(
            f"{path}: params hold a NaN or infinite value (at index {index}); move {path} "
            "away to restart this node from the initial model"
        )
    return params


def _counter(path: Path, name: str, value: np.ndarray) -> int:
    number = int(value)
    if not 0 <= number <= _MAX_COUNTER:
        raise CheckpointError(f"{path}: {name} is {number}, expected 0..{_MAX_COUNTER}")
    return number
