"""A peer's process as the harness handles it: ``PeerHandle`` is what the monitor does with
a peer (start, stop, kill, pause, watch), ``PeerProcess`` does it for a local ``p2pfl run``
process of its own, ``stop_all`` stops a run's peers. Shared by the runner and the Ray
actors, which drive their processes with these same handles on their machines."""

from __future__ import annotations

import contextlib
import signal
import subprocess
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Protocol

from p2pfl.daemon.procinfo import cpu_seconds, resident_mb

#: How long stopped peers get to write their final checkpoint before SIGKILL.
STOP_GRACE_S = 10.0


class PeerHandle(Protocol):
    """What the monitor does with a peer: a local process (``PeerProcess``) or one that a
    Ray actor owns (``ray_cluster.RayPeer``)."""

    peer: str
    killed_by_harness: bool
    stopped_by_harness: bool
    peak_rss_mb: float

    @property
    def starts(self) -> int: ...
    def start(self, env: Mapping[str, str]) -> None: ...
    @property
    def running(self) -> bool: ...
    def exit_code(self) -> int | None: ...
    def terminate(self) -> None: ...
    def wait(self, timeout: float) -> None: ...
    def stop(self) -> None: ...
    def pause(self, sparing: str) -> bool: ...
    def resume(self) -> None: ...
    def kill(self, *, by_harness: bool = True) -> None: ...
    def rss_mb(self) -> float: ...
    def cpu_sample(self) -> tuple[str, float] | None: ...
    def close_log(self) -> None: ...


@dataclass
class PeerProcess:
    peer: str
    command: list[str]
    log_path: Path
    proc: subprocess.Popen[bytes] | None = None
    log_file: IO[bytes] | None = None
    killed_by_harness: bool = False
    stopped_by_harness: bool = False
    starts: int = 0
    peak_rss_mb: float = 0.0
    #: Where it runs (None: here): a Ray actor's folder, with relative paths in ``command``.
    cwd: Path | None = None

    def start(self, env: Mapping[str, str]) -> None:
        self.close_log()
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self.log_file = open(self.log_path, "ab")  # noqa: SIM115 - closed in close_log
        self.proc = subprocess.Popen(
            self.command,
            cwd=self.cwd,
            stdout=self.log_file,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=dict(env),
        )
        self.killed_by_harness = False
        self.starts += 1

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def exit_code(self) -> int | None:
        return None if self.proc is None else self.proc.poll()

    def terminate(self) -> None:
        """SIGTERM, and SIGCONT: a paused peer handles SIGTERM only once woken."""
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGTERM)
                self.proc.send_signal(signal.SIGCONT)

    def wait(self, timeout: float) -> None:
        if self.proc is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(max(0.0, timeout))

    def stop(self) -> None:
        """SIGTERM: the node writes its final checkpoint and exits 0."""
        if self.proc is not None and self.proc.poll() is None:
            self.stopped_by_harness = True  # before its signal handler is set, -15 is fine
            self.proc.send_signal(signal.SIGTERM)

    def pause(self, sparing: str) -> bool:
        """SIGSTOP while ``sparing`` (another peer) restarts (True if it was running)."""
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGSTOP)
                return True
        return False

    def resume(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGCONT)

    def kill(self, *, by_harness: bool = True) -> None:
        """SIGKILL; ``by_harness``: a fault the harness injects (not a straggler's end)."""
        if self.proc is not None and self.proc.poll() is None:
            self.killed_by_harness = by_harness or self.killed_by_harness
            self.proc.kill()
            self.proc.wait()

    def cpu_sample(self) -> tuple[str, float] | None:
        """(Which process, its CPU seconds so far), while it runs."""
        if not self.running:
            return None
        assert self.proc is not None
        used = cpu_seconds(self.proc.pid)
        return None if used is None else (str(self.proc.pid), used)

    def rss_mb(self) -> float:
        """Resident memory now, from /proc (0 if gone or not on Linux)."""
        if not self.running:
            return 0.0
        assert self.proc is not None
        mb = resident_mb(self.proc.pid)
        self.peak_rss_mb = max(self.peak_rss_mb, mb)
        return mb

    def close_log(self) -> None:
        if self.log_file is not None:
            self.log_file.close()
            self.log_file = None


def stop_all(processes: Mapping[str, PeerHandle], grace: float = STOP_GRACE_S) -> None:
    """SIGTERM every running peer (they write a final checkpoint), SIGKILL stragglers.
    A second Ctrl-C while waiting skips the grace: everything left is SIGKILLed."""
    running = [p for p in processes.values() if p.running]
    for p in running:
        p.terminate()
    deadline = time.monotonic() + grace
    try:
        for p in running:
            p.wait(deadline - time.monotonic())
    finally:
        for p in running:
            p.kill(by_harness=False)
        for p in processes.values():
            p.close_log()
