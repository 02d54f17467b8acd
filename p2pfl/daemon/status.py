"""``p2pfl status``: a running node's round, neighbours and latest evaluation, on request.

The node listens on a unix socket in its state directory (``status.sock``, mode 0600 in a
0700 directory: only the node's own user can ask, and nothing is exposed on the network).
A client connects and reads one JSON object; the node reads nothing from it, so there is
no request to parse and nothing a client can change. The answer is built on the event
loop from what the node already holds, so it comes back while the node trains (training
runs in a worker thread; only jobs shorter than 5 ms run on the loop itself).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from p2pfl.errors import P2PFLError

__all__ = ["SOCKET_NAME", "StatusBoard", "format_status", "open_status_socket", "query_status"]

SOCKET_NAME = "status.sock"
#: A unix socket path longer than this cannot be bound directly (sun_path is 108 bytes).
_MAX_PATH = 100
#: An answer larger than this is not a status (the client stops reading).
MAX_ANSWER_BYTES = 1 << 20


class StatusBoard:
    """What the events say that the node's state does not keep: the latest eval, rounds
    completed, when each neighbour was last connected, suspects. An event-log listener."""

    def __init__(self) -> None:
        self.started = time.time()
        self.rounds_completed = 0
        self.last_eval: dict[str, Any] | None = None
        self.disconnected_at: dict[str, float] = {}
        self.suspects: set[str] = set()

    def observe(self, event: dict[str, Any]) -> None:
        kind = event.get("type")
        if kind == "round_end":
            self.rounds_completed += 1
        elif kind == "eval":
            self.last_eval = {
                k: event[k] for k in ("round", "data", "loss", "accuracy", "r2") if k in event
            }
        elif kind == "disconnect" and isinstance(event.get("peer"), str):
            self.disconnected_at[event["peer"]] = float(event.get("ts", time.time()))
        elif kind == "suspect" and isinstance(event.get("peer"), str):
            self.suspects.add(event["peer"])


def _at_socket_path(state_dir: Path, call: Callable[[str], None]) -> None:
    """``call(path of the socket)`` (bind or connect); a path too long for sun_path (108
    bytes) is reached from inside the directory instead."""
    path = state_dir / SOCKET_NAME
    if len(os.fsencode(path)) <= _MAX_PATH:
        call(os.fspath(path))
        return
    cwd = os.getcwd()
    os.chdir(state_dir)
    try:
        call(SOCKET_NAME)
    finally:
        os.chdir(cwd)


def open_status_socket(state_dir: Path) -> socket.socket:
    """A listening unix socket at ``state_dir/status.sock``, created with mode 0600.

    A leftover socket file from a killed node is replaced. A path too long to bind is bound
    from inside the directory (the node is still single-threaded when this runs).
    """
    path = state_dir / SOCKET_NAME
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old_umask = os.umask(0o177)
    try:
        _at_socket_path(state_dir, sock.bind)
    except OSError:
        sock.close()
        raise
    finally:
        os.umask(old_umask)
    os.chmod(path, 0o600)
    sock.listen(8)
    sock.setblocking(False)
    return sock


async def serve_status(sock: socket.socket, snapshot: Callable[[], dict[str, Any]]) -> None:
    """Answer every connection with ``snapshot()`` as one JSON line, until cancelled."""

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            writer.write(json.dumps(snapshot(), separators=(",", ":")).encode() + b"\n")
            await asyncio.wait_for(writer.drain(), 5.0)
        except (OSError, TimeoutError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(OSError, TimeoutError):
                await asyncio.wait_for(writer.wait_closed(), 5.0)

    server = await asyncio.start_unix_server(answer, sock=sock)
    async with server:
        await server.serve_forever()


def query_status(state_dir: Path, timeout: float = 5.0) -> dict[str, Any]:
    """Ask the node running in ``state_dir``; P2PFLError if none answers."""
    path = state_dir / SOCKET_NAME
    if not path.exists():
        raise P2PFLError(
            f"{path}: no status socket; is a node running with --state-dir {state_dir}?"
        )
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        _at_socket_path(state_dir, sock.connect)
        chunks: list[bytes] = []
        size = 0
        while size <= MAX_ANSWER_BYTES:
            chunk = sock.recv(65536)
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
    except ConnectionRefusedError:
        raise P2PFLError(f"{path}: no node is listening (it stopped or was killed)") from None
    except OSError as exc:
        raise P2PFLError(f"{path}: cannot ask the node: {exc}") from None
    finally:
        sock.close()
    try:
        answer = json.loads(b"".join(chunks))
    except ValueError:
        raise P2PFLError(f"{path}: the node's answer is not a status") from None
    if not isinstance(answer, dict):
        raise P2PFLError(f"{path}: the node's answer is not a status")
    return answer


def _ago(seconds: object) -> str:
    if not isinstance(seconds, int | float):
        return "-"
    return f"{seconds:.1f}s ago" if seconds < 120 else f"{seconds / 60:.0f}m ago"


def format_status(status: dict[str, Any]) -> str:
    """The status as a few lines and a neighbour table."""
    ev = status.get("last_eval") or {}
    metric = "r2" if "r2" in ev else "accuracy"
    score = ev.get(metric)
    lines = [
        f"node {status.get('node')}: round {status.get('round')} of {status.get('rounds')} "
        f"({status.get('phase')}), {status.get('rounds_completed')} completed this run, "
        f"up {status.get('uptime_s', 0):.0f} s",
        f"last eval: {metric} {score if score is not None else '-'}, loss "
        f"{ev.get('loss', '-')} (round {ev.get('round', '-')}, {ev.get('data', '-')} data)",
        "",
        f"{'neighbour':<12} {'state':<12} {'round':>5}  last seen",
    ]
    for n in status.get("neighbours", []):
        state = "connected" if n.get("connected") else "down"
        if n.get("silent"):  # connected, but silent past the failure detector's threshold
            state = f"silent (phi {n.get('phi')})"
        if n.get("suspect"):
            state += " (suspect)"
        seen = "now" if n.get("connected") else _ago(n.get("last_seen_s"))
        lines.append(f"{n.get('peer', '?'):<12} {state:<12} {n.get('round', '-')!s:>5}  {seen}")
    return "\n".join(lines)
