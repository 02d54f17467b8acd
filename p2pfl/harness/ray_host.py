"""The worker side of ``p2pfl harness --ray``: one ``PeerHost`` actor per peer, owning one
real ``p2pfl run`` process on whatever machine Ray placed it.

Why an actor that owns a process, and not a node running inside the actor: the peer stays
exactly the daemon an operator runs (its own interpreter, event loop, signal handling and
final checkpoint on SIGTERM), ``--kill`` is a SIGKILL of that process and nothing else, and
its memory is its own to measure. A node inside Ray's worker process would share it with
Ray's threads and could only be "killed" by killing the actor.

Why the private key is made here: it never leaves the machine that runs the peer, as in a
deployment; only the public key goes back to the harness for peers.yaml.

Nothing here imports Ray: the class is made an actor by ``ray_cluster`` (so it also runs,
and is tested, as a plain object).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import IO

import numpy as np

from p2pfl.daemon.procinfo import cpu_seconds

#: Most bytes of a log handed back per ``status`` call (the rest comes at the next one).
MAX_CHUNK = 8 << 20
#: The BLAS thread pools a peer's threads setting caps.
THREAD_VARS = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")


class PeerHost:
    """One peer's files and process on a Ray worker. Its working folder mirrors the run
    folder's layout (peers.yaml, keys/, data/, state/, logs/), so the harness's own
    ``peer_command`` with relative paths runs here unchanged."""

    def __init__(self, peer: str, root: str | None = None) -> None:
        self.peer = peer
        self.workdir = Path(tempfile.mkdtemp(prefix=f"p2pfl-{peer}-", dir=root))
        self.proc: subprocess.Popen[bytes] | None = None
        self._output: IO[bytes] | None = None
        #: How far the harness has read the event log and the output.
        self._sent = {"events": 0, "output": 0}

    # ------------------------------------------------------------------ set-up

    def place(self, host: str | None = None) -> tuple[str, int, str]:
        """This machine's address (as Ray knows it), a port free on it a moment ago, and the
        public key of a private key made here."""
        from p2pfl.harness.layout import free_ports
        from p2pfl.proto.keys import generate_key_file

        if host is None:
            import ray

            host = str(ray.util.get_node_ip_address())
        public = generate_key_file(self.workdir / "keys" / f"{self.peer}.key")
        return host, free_ports(1, host)[0], public

    def install(
        self,
        config_text: str,
        share: tuple[np.ndarray, np.ndarray],
        test: tuple[np.ndarray, np.ndarray],
    ) -> None:
        """peers.yaml, this peer's data share and the shared test set, as files."""
        (self.workdir / "data").mkdir(exist_ok=True)
        (self.workdir / "peers.yaml").write_text(config_text, encoding="utf-8")
        np.savez(self.workdir / "data" / f"{self.peer}.npz", x=share[0], y=share[1])
        np.savez(self.workdir / "data" / "test.npz", x=test[0], y=test[1])

    # ------------------------------------------------------------------ the process

    def start(self, command: list[str], threads: int) -> None:
        """Run ``command`` (relative paths, from this folder) with this machine's Python and
        p2pfl, ``threads`` threads for BLAS and torch."""
        from p2pfl.harness.layout import python_env

        self.close_output()
        env = python_env()
        for var in THREAD_VARS:
            env[var] = str(threads)
        log = self.workdir / "logs" / f"{self.peer}.log"
        log.parent.mkdir(exist_ok=True)
        self._output = open(log, "ab")  # noqa: SIM115 - closed in close_output
        self.proc = subprocess.Popen(
            [sys.executable, *command[1:], "--threads", str(threads)],
            cwd=self.workdir,
            stdout=self._output,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
        )

    def signal(self, signum: int) -> None:
        """SIGTERM, SIGSTOP, SIGCONT or SIGKILL to the process, if it runs."""
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signum)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def wait(self, timeout: float) -> int | None:
        """The exit code, waiting up to ``timeout`` seconds (None: still running)."""
        if self.proc is None:
            return None
        with contextlib.suppress(subprocess.TimeoutExpired):
            return self.proc.wait(max(0.0, timeout))
        return None

    def status(self) -> tuple[bool, int | None, float, float | None, bytes, bytes]:
        """(running, exit code, resident MB, CPU seconds (None: not running), new event-log
        bytes, new output bytes)."""
        code = None if self.proc is None else self.proc.poll()
        running = self.proc is not None and code is None
        events = self.workdir / "state" / self.peer / "events.jsonl"
        output = self.workdir / "logs" / f"{self.peer}.log"
        rss = self._rss_mb() if running else 0.0
        cpu = cpu_seconds(self.proc.pid) if running and self.proc is not None else None
        return (
            running,
            code,
            rss,
            cpu,
            self._read("events", events),
            self._read("output", output),
        )

    def _read(self, name: str, path: Path) -> bytes:
        try:
            with open(path, "rb") as f:
                f.seek(self._sent[name])
                chunk = f.read(MAX_CHUNK)
        except OSError:
            return b""
        self._sent[name] += len(chunk)
        return chunk

    def _rss_mb(self) -> float:
        assert self.proc is not None
        try:
            with open(f"/proc/{self.proc.pid}/statm") as f:
                pages = int(f.read().split()[1])
        except (OSError, ValueError, IndexError):
            return 0.0
        return pages * os.sysconf("SC_PAGE_SIZE") / 2**20

    # ------------------------------------------------------------------ the end

    def files(self) -> dict[str, bytes]:
        """Every file of the peer's state folder but its event log (which ``status`` has
        handed over already): checkpoints, snapshots, the final model. Keyed by path
        relative to the state folder."""
        state = self.workdir / "state" / self.peer
        found: dict[str, bytes] = {}
        for path in sorted(state.rglob("*")) if state.is_dir() else []:
            relative = path.relative_to(state).as_posix()
            if path.is_file() and not path.is_symlink() and relative != "events.jsonl":
                found[relative] = path.read_bytes()
        return found

    def close_output(self) -> None:
        if self._output is not None:
            self._output.close()
            self._output = None

    def cleanup(self) -> None:
        """Stop the process (SIGKILL: the harness has stopped it properly already) and
        remove this peer's folder, its private key with it."""
        self.kill()
        self.close_output()
        shutil.rmtree(self.workdir, ignore_errors=True)
