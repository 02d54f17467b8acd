"""A node's crash state on disk, round by round: the checkpoint (and, for analysis, the
per-round snapshots).

Each round's checkpoint file is written on the round path and committed (fsync, rename)
in the background: the next round does not wait for the disk. Until the commit, the
previous checkpoint stands (a restart then redoes one round). A commit still in flight
is always waited for before the next file is written or the node exits: nobody may write
a checkpoint file while a commit still renames the last one.
"""

from __future__ import annotations

import asyncio
import logging
import os
from pathlib import Path

import numpy as np

from p2pfl.daemon.worker import Worker
from p2pfl.store.checkpoint import (
    SNAPSHOTS_NAME,
    Checkpoint,
    commit_checkpoint,
    save_checkpoint,
    write_checkpoint,
)

log = logging.getLogger("p2pfl.daemon.node")


class RoundSaver:
    """Checkpoints (and ``--snapshots``) of one node's state directory."""

    def __init__(
        self, state_dir: Path, digest: bytes, *, snapshots: bool, worker: Worker, node_id: str
    ) -> None:
        self.state_dir = state_dir
        self.digest = digest
        self.snapshots = snapshots
        self.worker = worker
        self.node_id = node_id
        #: The background commit of the last checkpoint written.
        self._commit: asyncio.Future[Path] | None = None
        self._snapshots_fd: int | None = None

    async def save_round(
        self,
        round_index: int,
        next_round: int,
        params: np.ndarray,
        lamport: int,
        dp_releases: int | None = None,
    ) -> bool:
        """Write round ``round_index``'s checkpoint (resume at ``next_round``; the privacy
        accountant at ``dp_releases``) and start its commit. False if it could not be
        written (e.g. a full disk: the previous checkpoint stands)."""
        await self.committed()
        checkpoint = Checkpoint(next_round, params, lamport, self.digest, dp_releases)
        try:
            tmp = await self.worker.run(
                "checkpoint", self._write_round_files, round_index, checkpoint
            )
        except OSError as exc:
            log.error("%s: round %d checkpoint not written: %s", self.node_id, round_index, exc)
            return False
        self._commit = asyncio.ensure_future(
            asyncio.to_thread(commit_checkpoint, self.state_dir, tmp, sync_dir=False)
        )
        return True

    async def committed(self) -> None:
        """Wait for the checkpoint commit in flight, if any. It stays tracked until it has
        finished, even if this wait is cancelled (a stop)."""
        commit = self._commit
        if commit is None:
            return
        try:
            await asyncio.shield(commit)
        except OSError as exc:
            log.error("%s: checkpoint commit failed: %s", self.node_id, exc)
        finally:
            if commit.done() and self._commit is commit:
                self._commit = None

    async def save_final(
        self, next_round: int, params: np.ndarray, lamport: int, dp_releases: int | None = None
    ) -> None:
        """Write and commit at once (a stop): what the model is, to resume at
        ``next_round``."""
        await self.committed()
        checkpoint = Checkpoint(next_round, params, lamport, self.digest, dp_releases)
        await asyncio.to_thread(save_checkpoint, self.state_dir, checkpoint)

    def close(self) -> None:
        if self._snapshots_fd is not None:
            os.close(self._snapshots_fd)
            self._snapshots_fd = None

    def _write_round_files(self, round_index: int, checkpoint: Checkpoint) -> Path:
        if self.snapshots:
            try:
                self._write_snapshot(round_index, checkpoint.params)
            except OSError as exc:  # analysis only: never worth stopping a node for
                log.error("%s: round %d snapshot not written: %s", self.node_id, round_index, exc)
        return write_checkpoint(self.state_dir, checkpoint)

    def _write_snapshot(self, round_index: int, params: np.ndarray) -> None:
        """Round ``round_index``'s model at record ``round_index`` of state_dir/snapshots.f32
        (raw float32, one record per round), for offline analysis: the harness measures how
        far apart the peers' models are. Not fsynced: it is not crash state."""
        if self._snapshots_fd is None:
            self._snapshots_fd = os.open(
                self.state_dir / SNAPSHOTS_NAME, os.O_WRONLY | os.O_CREAT, 0o600
            )
        data = np.ascontiguousarray(params, dtype="<f4")
        os.pwrite(self._snapshots_fd, data.data.cast("B"), round_index * data.nbytes)
