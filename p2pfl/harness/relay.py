"""Delay for simulated hosts: a TCP relay in front of one node's listening port.

This kernel has no ``netem``, so a host's link delay is added here, in user space. The
relay runs inside the host's namespace, listens on the host's address and forwards to the
node, which listens on that namespace's 127.0.0.1. Every byte either way is held for the
one-way delay of the path: the sending host's delay plus the receiving host's (each
host's ``delay_s`` in hosts.json, the dialer known by its source address). Rate and loss
stay in the kernel (tbf, iptables), on the hosts' real links.

What this does not reproduce: the kernel's TCP between dialer and relay sees the bridge's
short round trip, so slow start and window growth over a long-delay path are not
simulated; the delay is that of a path whose windows are already open. Bytes held are
bounded (``MAX_HELD``); above it the relay stops reading, and TCP pushes back.

Usage (the harness starts it): ``python -m p2pfl.harness.relay HOSTS_JSON PEER``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
from collections import deque
from pathlib import Path

#: Bytes one direction of one connection may hold: over the bandwidth-delay product of a
#: 1 gbit/s link with 100 ms (12.5 MB), so the delay never caps the rate.
MAX_HELD = 32 * 2**20
READ_SIZE = 256 * 1024


class DelayLine:
    """One direction of a relayed connection: what is read is written ``delay`` seconds
    later, in order, while reading goes on (a pipe, not a stop-and-wait)."""

    def __init__(self, delay: float, max_held: int = MAX_HELD) -> None:
        self.delay = delay
        self.max_held = max_held
        self.held = 0
        self._queue: deque[tuple[float, bytes]] = deque()
        self._more = asyncio.Event()
        self._room = asyncio.Event()

    async def read_from(self, reader: asyncio.StreamReader) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                data = await reader.read(READ_SIZE)
            except OSError:
                data = b""
            self._queue.append((loop.time() + self.delay, data))
            self._more.set()
            if not data:
                return
            self.held += len(data)
            while self.held > self.max_held:
                self._room.clear()
                await self._room.wait()

    async def write_to(self, writer: asyncio.StreamWriter) -> None:
        loop = asyncio.get_running_loop()
        while True:
            while not self._queue:
                self._more.clear()
                await self._more.wait()
            due, data = self._queue.popleft()
            if due > loop.time():
                await asyncio.sleep(due - loop.time())
            if not data:  # the other side finished sending: pass the half-close on
                with contextlib.suppress(OSError):
                    if writer.can_write_eof():
                        writer.write_eof()
                return
            writer.write(data)
            self.held -= len(data)
            self._room.set()
            await writer.drain()


async def relay_connection(
    client: tuple[asyncio.StreamReader, asyncio.StreamWriter],
    target: tuple[str, int],
    delay: float,
) -> None:
    """Both directions of one connection through delay lines, until both have ended (or
    either side fails: then both are closed)."""
    c_reader, c_writer = client
    try:
        t_reader, t_writer = await asyncio.open_connection(*target)
    except OSError:
        c_writer.close()
        return
    up, down = DelayLine(delay), DelayLine(delay)
    tasks = [
        asyncio.ensure_future(up.read_from(c_reader)),
        asyncio.ensure_future(up.write_to(t_writer)),
        asyncio.ensure_future(down.read_from(t_reader)),
        asyncio.ensure_future(down.write_to(c_writer)),
    ]
    try:
        await asyncio.gather(*tasks)
    except OSError:
        pass
    finally:
        for task in tasks:
            task.cancel()
        for writer in (c_writer, t_writer):
            writer.close()


def delays_by_source(plan: dict[str, dict[str, object]], peer: str) -> dict[str, float]:
    """The one-way delay of a connection from each host's address to ``peer``."""
    own = float(plan[peer]["delay_s"])  # type: ignore[arg-type]
    return {str(h["address"]): own + float(h["delay_s"]) for h in plan.values()}  # type: ignore[arg-type]


async def serve(plan_path: Path, peer: str) -> None:
    plan = json.loads(plan_path.read_text(encoding="utf-8"))
    delays = delays_by_source(plan, peer)
    own = plan[peer]
    address, port = str(own["address"]), int(own["port"])
    own_delay = float(own["delay_s"])

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        source = str(writer.get_extra_info("peername")[0])
        await relay_connection((reader, writer), ("127.0.0.1", port), delays.get(source, own_delay))

    server = await asyncio.start_server(handle, address, port)
    print(f"relay {peer}: {address}:{port} -> 127.0.0.1:{port}", flush=True)
    async with server:
        await server.serve_forever()


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: python -m p2pfl.harness.relay HOSTS_JSON PEER", file=sys.stderr)
        return 2
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve(Path(argv[0]), argv[1]))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
