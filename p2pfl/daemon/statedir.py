"""The state directory: what a node keeps between runs, private to the node's user.

The event log, the checkpoint, the secure-aggregation journal and the snapshots say
things about the local data (accuracies, losses, the model itself), so the directory is
0700 and these files 0600. A node creates them so; one that finds them looser (a directory
made by hand, files copied in with a umask of 022) tightens them at start-up and says so,
instead of training on with its data readable by every local user.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from p2pfl.errors import P2PFLError

#: The files a node writes in its state directory (the status socket is made 0600 itself).
NODE_FILES = (
    "events.jsonl",
    "checkpoint.npz",
    "checkpoint.npz.tmp",
    "secagg.log",
    "snapshots.f32",
)
DIR_MODE = 0o700
FILE_MODE = 0o600


def prepare_state_dir(path: Path) -> list[str]:
    """Create ``path`` private, or make it and the node's files in it private.

    Returns one line per permission tightened (the node logs them). Raises P2PFLError
    naming the path when the directory cannot be made or tightened (e.g. another user's).
    """
    try:
        path.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
    except OSError as exc:
        raise P2PFLError(f"{path}: cannot create the state directory: {exc}") from exc
    if not path.is_dir():
        raise P2PFLError(f"{path}: the state directory is not a directory")
    tightened = []
    for target, mode in [(path, DIR_MODE), *((path / name, FILE_MODE) for name in NODE_FILES)]:
        try:
            current = stat.S_IMODE(os.stat(target).st_mode)
        except FileNotFoundError:
            continue
        except OSError as exc:
            raise P2PFLError(f"{target}: cannot check its permissions: {exc}") from exc
        if current & 0o077:
            try:
                os.chmod(target, current & ~0o077)
            except OSError as exc:
                raise P2PFLError(
                    f"{target}: mode {current:04o} lets other users read it, and it cannot "
                    f"be changed ({exc}); make it {mode:04o} or choose another --state-dir"
                ) from exc
            tightened.append(f"{target}: {current:04o} -> {current & ~0o077:04o}")
    return tightened


#: The lock file: held (``flock``) by the node that uses the directory, naming its pid.
LOCK_NAME = "lock"


class StateLock:
    """One node per state directory: two would interleave one event log and overwrite
    each other's checkpoints. The lock is the kernel's (``flock``), so it ends with the
    process that holds it, however that ends; the file names that process's pid."""

    def __init__(self, path: Path) -> None:
        import fcntl

        self._fd: int | None = None
        lock_path = path / LOCK_NAME
        try:
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), FILE_MODE)
        except OSError as exc:
            raise P2PFLError(f"{lock_path}: cannot open the state directory's lock: {exc}") from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.read(fd, 32).decode("ascii", "replace").strip()
            holder = holder if holder.isdigit() else "unknown"
            os.close(fd)
            raise P2PFLError(
                f"{path}: the state directory is in use by another p2pfl node (pid {holder}); "
                "stop that node first, or give this one another --state-dir"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode("ascii"))  # (a full disk: no pid shown)
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # (closing the file releases the lock)
            self._fd = None

    def __del__(self) -> None:
        self.release()
