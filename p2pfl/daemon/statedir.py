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
