"""``python -m p2pfl.harness.multinode``: several nodes in one process
(``p2pfl harness --nodes-per-process K``).

Each node keeps its own keys, state folder, event log, listening socket and connections,
and talks to every other node (in this process or not) over real encrypted websockets;
only the interpreter is shared: one event loop, one default thread pool, one GIL. That
changes isolation (one node's crash of the interpreter takes its process mates with it;
one node's CPU-bound step delays the others' messages) and timing (the nodes of a process
take turns on one core), not what any node computes or sends. For studies that is fine:
the peers of a 2-core machine share the cores anyway, and a process per peer costs
~55 MB of interpreter each, which caps one machine near 400 peers.

The harness drives the process through its stdin, one command per line:

- ``kill PEER``: the node's task is cancelled, and with it its rounds and heartbeat, once
  the file work in flight has finished (a crash as far as the others can tell: no final
  checkpoint, its connections close; unlike a SIGKILLed process it still logs
  ``node_stop``);
- ``start PEER``: a new node for PEER from the same arguments (it resumes from its
  checkpoint, as a restarted process does);
- ``stop PEER``: as SIGTERM to one node (final checkpoint, then it ends).

and reads, on the file descriptor ``--status-fd``, one line per node that ends:
``exit PEER CODE`` (-9 for a kill). SIGTERM or SIGINT stops every node as SIGTERM stops
one; the process ends once every node has ended and stdin is closed or a signal came.

Arguments: ``--status-fd N``, ``--start p00,p01`` (the nodes to start at once) and a JSON
list of each node's ``python -m`` arguments, exactly as for a process of its own:
``["p2pfl", "run", CONFIG, "--id", ...]`` or ``["p2pfl.harness.byzantine", KIND, "run",
...]``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import resource
import signal
import sys
from collections.abc import Sequence
from typing import IO, Any

from p2pfl.errors import P2PFLError

log = logging.getLogger("p2pfl.multinode")

#: The exit code reported for a node the harness killed.
KILLED = -9


def build(spec: Sequence[str]) -> Any:
    """The node one spec describes (signals stay with this process), with its attack if
    the spec names ``p2pfl.harness.byzantine``."""
    from p2pfl.cli.launch import build_node
    from p2pfl.cli.parser import make_parser

    module, *rest = spec
    attack = None
    if module == "p2pfl.harness.byzantine":
        attack, *rest = rest
    elif module != "p2pfl":
        raise ValueError(f"not a node's arguments: {list(spec)!r}")
    node = build_node(make_parser().parse_args(rest), handle_signals=False)
    if attack is not None:
        from p2pfl.harness.byzantine import install_attack

        install_attack(node, attack)
    return node


def peer_of(spec: Sequence[str]) -> str:
    return str(spec[list(spec).index("--id") + 1])


class Group:
    """The nodes of this process, by peer id, and the tasks that run them."""

    def __init__(self, specs: Sequence[Sequence[str]], status: IO[str]) -> None:
        self.specs = {peer_of(spec): list(spec) for spec in specs}
        self.status = status
        self.nodes: dict[str, Any] = {}
        self.tasks: dict[str, asyncio.Task[int]] = {}
        self.killed: set[str] = set()
        self.closing = False
        self.stdin_closed = False
        self.done = asyncio.Event()

    def _report(self, peer: str, code: int) -> None:
        self.status.write(f"exit {peer} {code}\n")
        self.status.flush()

    def start(self, peer: str) -> None:
        try:
            node = build(self.specs[peer])
        except (Exception, SystemExit) as exc:  # (argparse exits): that node's end only
            log.error("%s: cannot start: %s", peer, exc)
            self._report(peer, 2)
            self.check()
            return
        self.nodes[peer] = node
        task = asyncio.ensure_future(node.run())
        self.tasks[peer] = task
        task.add_done_callback(lambda done: self._ended(peer, done))

    def _ended(self, peer: str, task: asyncio.Task[int]) -> None:
        if self.tasks.get(peer) is not task:
            return
        del self.tasks[peer]
        if peer in self.killed:
            self.killed.discard(peer)
            code = KILLED
        elif task.cancelled():
            code = KILLED
        elif isinstance(task.exception(), P2PFLError):  # (as `p2pfl run` ends on one)
            log.error("%s: %s", peer, task.exception())
            code = 2
        elif task.exception() is not None:
            log.error("%s: failed", peer, exc_info=task.exception())
            code = 1
        else:
            code = int(task.result())
        self._report(peer, code)
        self.check()

    async def command(self, line: str) -> None:
        verb, _, peer = line.strip().partition(" ")
        if peer not in self.specs or verb not in ("kill", "stop", "start"):
            log.error("unknown command %r", line.strip())
            return
        task = self.tasks.get(peer)
        if verb == "kill" and task is not None:
            self.killed.add(peer)
            await asyncio.sleep(0)  # (a task not yet begun would never let go of its files)
            task.cancel()
            # Its sockets and state lock are let go before any restart; whatever it ended
            # with is its own (``_ended`` reports it), not the reader's.
            await asyncio.wait({task})
        elif verb == "stop" and task is not None:
            self.nodes[peer].request_stop()
        elif verb == "start" and task is None:
            self.start(peer)

    def stop_all(self) -> None:
        """SIGTERM or SIGINT: every node stops as on its own SIGTERM."""
        self.closing = True
        for peer in self.tasks:
            self.nodes[peer].request_stop()
        self.check()

    def check(self) -> None:
        """The process is done once no node runs and no command can start one."""
        if not self.tasks and (self.closing or self.stdin_closed):
            self.done.set()


async def _read_commands(group: Group) -> None:
    """Commands from stdin until it closes."""
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    while line := (await reader.readline()).decode("utf-8", "replace"):
        await group.command(line)
    group.stdin_closed = True
    group.check()


async def run_group(specs: Sequence[Sequence[str]], start: Sequence[str], status: IO[str]) -> int:
    """Start ``start``, follow the commands, end when every node has ended for good."""
    group = Group(specs, status)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, group.stop_all)
    for peer in start:
        group.start(peer)
    commands = asyncio.ensure_future(_read_commands(group))
    await group.done.wait()
    commands.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await commands
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    from p2pfl.cli.launch import setup_logging

    parser = argparse.ArgumentParser(prog="python -m p2pfl.harness.multinode")
    parser.add_argument("--status-fd", type=int, required=True)
    parser.add_argument("--start", default="", help="comma-separated peers to start at once")
    parser.add_argument("-q", "--quiet", action="store_true")
    parser.add_argument("-v", "--verbose", action="store_true")
    parser.add_argument("specs", help="JSON: a list of each node's `python -m` arguments")
    args = parser.parse_args(argv)
    setup_logging(args)
    # Every node holds a listening socket, its connections and its files open.
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    specs = json.loads(args.specs)
    start = [peer for peer in args.start.split(",") if peer]
    with os.fdopen(args.status_fd, "w", encoding="utf-8") as status:
        return asyncio.run(run_group(specs, start, status))


if __name__ == "__main__":
    sys.exit(main())
