"""``p2pfl harness --nodes-per-process K``: the harness's side of a process that runs
several nodes (``harness/multinode.py`` is the process's side).

A ``NodeGroup`` owns one such process: it starts it, sends it ``start``/``kill``/``stop``
commands on stdin and reads which nodes ended from its status pipe. Each peer gets a
``GroupMember`` handle that does for the monitor what ``runner.PeerProcess`` does for a
process of its own. What differs, and why:

- ``--kill`` cancels the node inside its process (no final checkpoint, sockets closed);
  the process and its other nodes go on.
- ``--restart`` starts a new node in the same process (milliseconds, not the ~0.4 s of a
  new interpreter). The other processes are paused until it is up, as for a local
  restart; its own process is not (its mates wait for the paused others anyway).
- A member's memory is its process's divided among the nodes running in it.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from p2pfl.daemon.procinfo import cpu_seconds, resident_mb

#: How long a kill waits for the node's end (its file work in flight finishes first), and
#: the end of the run for the process's.
KILL_WAIT_S = 10.0


def group_name(members: Sequence[str]) -> str:
    """p00-p07 (the log file's name)."""
    return members[0] if len(members) == 1 else f"{members[0]}-{members[-1]}"


def groups_of(peers: Sequence[str], size: int) -> list[list[str]]:
    """Consecutive peers, at most ``size`` to a process, in as few processes as that takes
    and as even as they can be (256 by 50: six of 42-43, not five of 50 and one of 6)."""
    count = -(-len(peers) // size)
    base, extra = divmod(len(peers), count) if count else (0, 0)
    groups, start = [], 0
    for index in range(count):
        end = start + base + (1 if index < extra else 0)
        groups.append(list(peers[start:end]))
        start = end
    return groups


@dataclass
class NodeGroup:
    """One process running ``members``' nodes; ``specs`` are their ``python -m`` arguments."""

    members: list[str]
    specs: dict[str, list[str]]
    log_path: Path
    proc: subprocess.Popen[bytes] | None = None
    #: Members whose node runs now (as far as the status pipe has told).
    running: set[str] = field(default_factory=set)
    #: Each member's last exit code.
    codes: dict[str, int] = field(default_factory=dict)
    #: How often each member's node was started.
    starts: dict[str, int] = field(default_factory=dict)
    #: Where it runs (None: here): a Ray actor's folder, with relative paths in ``specs``.
    cwd: Path | None = None
    _log: IO[bytes] | None = None
    _status: int | None = None
    _pending: bytes = b""
    #: How many ``exit`` lines each member has had (a kill waits for the next one).
    _exits: dict[str, int] = field(default_factory=dict)

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def launch(self, peers: Sequence[str], env: Mapping[str, str]) -> None:
        """Start the process with ``peers``' nodes running."""
        self.close_log()
        self._read_status()
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed in close_log
        read_end, write_end = os.pipe()
        command = [
            *(sys.executable, "-m", "p2pfl.harness.multinode"),
            *("--status-fd", str(write_end), "--start", ",".join(peers)),
            json.dumps([self.specs[peer] for peer in self.members]),
        ]
        try:
            self.proc = subprocess.Popen(
                command,
                stdin=subprocess.PIPE,
                stdout=self._log,
                stderr=subprocess.STDOUT,
                env=dict(env),
                pass_fds=(write_end,),
                cwd=self.cwd,
            )
        except BaseException:
            os.close(read_end)
            raise
        finally:
            os.close(write_end)
        os.set_blocking(read_end, False)
        if self._status is not None:
            os.close(self._status)
        self._status = read_end
        for peer in peers:
            self._started(peer)

    def start(self, peer: str, env: Mapping[str, str]) -> None:
        """``peer``'s node: in the running process, or the process anew. The first start
        starts every member's node at once."""
        if self.alive:
            if peer not in self.running:
                self.send(f"start {peer}")
                self._started(peer)
        elif self.proc is None:
            self.launch(self.members, env)
        else:
            self.launch([peer], env)

    def _started(self, peer: str) -> None:
        self.running.add(peer)
        self.codes.pop(peer, None)
        self.starts[peer] = self.starts.get(peer, 0) + 1

    def kill(self, peer: str, timeout: float = KILL_WAIT_S) -> None:
        """Cancel ``peer``'s node and wait for its ``exit`` line, as a SIGKILLed process is
        waited for: a restart right after must not take that late line for its own end."""
        seen = self._exits.get(peer, 0)
        self.send(f"kill {peer}")
        deadline = time.monotonic() + timeout
        while self._exits.get(peer, 0) == seen and self.alive and self._status is not None:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            select.select([self._status], [], [], remaining)
            self._read_status()
        self.running.discard(peer)
        self.codes[peer] = -9

    def close(self, timeout: float = KILL_WAIT_S) -> None:
        """The end of the run: stdin closed (the process ends once its nodes have), waited
        for, SIGKILLed if it will not, and its pipe and log let go."""
        if self.proc is not None:
            if self.proc.stdin is not None:
                with contextlib.suppress(OSError):
                    self.proc.stdin.close()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.poll()
        if self._status is not None:
            os.close(self._status)
            self._status = None
        self.close_log()

    def send(self, line: str) -> None:
        """One command to the process (lost if it has ended: nothing runs there then)."""
        if self.alive:
            assert self.proc is not None and self.proc.stdin is not None
            with contextlib.suppress(BrokenPipeError, OSError):
                self.proc.stdin.write(line.encode() + b"\n")
                self.proc.stdin.flush()

    def poll(self) -> None:
        """Fold in what the status pipe says; once the process is gone, every member that
        did not report has ended with the process's code."""
        self._read_status()
        if self.proc is not None and self.proc.poll() is not None:
            self._read_status()
            for peer in self.running:
                self.codes[peer] = self.proc.returncode
            self.running.clear()

    def _read_status(self) -> None:
        if self._status is None:
            return
        while True:
            try:
                chunk = os.read(self._status, 65536)
            except BlockingIOError:
                break
            if not chunk:
                os.close(self._status)
                self._status = None
                break
            self._pending += chunk
        *lines, self._pending = self._pending.split(b"\n")
        for line in lines:
            verb, peer, code = line.decode("utf-8", "replace").split(" ")
            if verb == "exit" and peer in self.specs:
                self.running.discard(peer)
                self.codes[peer] = int(code)
                self._exits[peer] = self._exits.get(peer, 0) + 1

    def signal(self, signum: int) -> None:
        if self.alive:
            assert self.proc is not None
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signum)

    def rss_mb(self) -> float:
        return resident_mb(self.proc.pid) if self.alive and self.proc is not None else 0.0

    def close_log(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None


@dataclass
class GroupMember:
    """The monitor's handle on one node of a ``NodeGroup``."""

    peer: str
    group: NodeGroup
    killed_by_harness: bool = False
    stopped_by_harness: bool = False
    peak_rss_mb: float = 0.0

    @property
    def starts(self) -> int:
        return self.group.starts.get(self.peer, 0)

    def start(self, env: Mapping[str, str]) -> None:
        self.group.start(self.peer, env)
        self.killed_by_harness = False

    @property
    def running(self) -> bool:
        self.group.poll()
        return self.peer in self.group.running

    def exit_code(self) -> int | None:
        return None if self.running else self.group.codes.get(self.peer)

    def terminate(self) -> None:
        self.group.signal(signal.SIGTERM)
        self.group.signal(signal.SIGCONT)

    def wait(self, timeout: float) -> None:
        proc = self.group.proc
        if proc is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(max(0.0, timeout))
        self.group.poll()

    def stop(self) -> None:
        if self.running:
            self.stopped_by_harness = True
            self.group.send(f"stop {self.peer}")

    def pause(self, sparing: str) -> bool:
        """SIGSTOP to its process while ``sparing`` restarts, unless that process is the
        one ``sparing`` restarts in (its mates then wait for the paused others)."""
        if sparing in self.group.members or not self.running:
            return False
        self.group.signal(signal.SIGSTOP)
        return True

    def resume(self) -> None:
        self.group.signal(signal.SIGCONT)

    def kill(self, *, by_harness: bool = True) -> None:
        """A fault: the node is cancelled in its process. On the way out (stragglers):
        SIGKILL to the whole process."""
        if not self.running:
            return
        if by_harness:
            self.killed_by_harness = True
            self.group.kill(self.peer)
        else:
            self.group.signal(signal.SIGKILL)
            if self.group.proc is not None:
                self.group.proc.wait()
            self.group.poll()

    def rss_mb(self) -> float:
        """This node's share of its process's memory."""
        running = len(self.group.running)
        if not self.running or not running:
            return 0.0
        mb = self.group.rss_mb() / running
        self.peak_rss_mb = max(self.peak_rss_mb, mb)
        return mb

    def cpu_sample(self) -> tuple[str, float] | None:
        """Its process's CPU (the monitor counts each process once)."""
        proc = self.group.proc
        used = None if proc is None or not self.group.alive else cpu_seconds(proc.pid)
        return None if used is None or proc is None else (str(proc.pid), used)

    def close_log(self) -> None:
        """(``stop_all`` calls it once everything is stopped: the process is done.)"""
        self.group.close()
