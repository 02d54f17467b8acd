"""The bare prototype of a round: the floor a real node's round is measured against.

One process per peer of a harness run, each doing only what a round cannot do without:
train the run's model on its own share (the node's own ``LocalModel``, so the same MLP,
data scaling, batch size and seed), seal the parameters with AES-GCM under a key per pair,
send them to its neighbours as one websocket message each (loopback), wait for all of
theirs, and take the Metropolis average. Rounds run in lockstep. Nothing else: no
handshake, event log, checkpoint, evaluation, status messages, deadlines or limits. This
is the "bare prototype" of DESIGN.md section 6 and of issue 13 (2 / 3 / 11 ms at 4 / 8 /
32 peers there, with a larger batch than the harness's digits recipe).

    python scripts/bare_rounds.py RUN --rounds 30   # RUN: a `p2pfl harness` output folder

prints the median round over every peer's rounds, in milliseconds.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import numpy as np
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from websockets.asyncio.client import connect
from websockets.asyncio.connection import Connection
from websockets.asyncio.server import ServerConnection, serve

from p2pfl.config import load_config
from p2pfl.core.aggregate import metropolis_average
from p2pfl.core.topology import graph_for_round, metropolis_weights
from p2pfl.learning import load_dataset
from p2pfl.learning.trainer import LocalModel

#: Bound on every wait of a child (a hung benchmark fails instead of waiting forever).
TIMEOUT_S = 120.0


def pair_key(seed: int, a: str, b: str) -> bytes:
    low, high = sorted((a, b))
    return hashlib.sha256(f"bare:{seed}:{low}:{high}".encode()).digest()


def nonce(sender: str, receiver: str, round_index: int) -> bytes:
    """Unique per key: the direction and the round (each pair sends once per round each way)."""
    return (b"\x00" * 4 if sender < receiver else b"\x01" * 4) + round_index.to_bytes(8, "little")


async def run_peer(run: Path, peer_id: str, rounds: int) -> list[float]:
    """One peer's lockstep rounds; returns each round's seconds."""
    config = load_config(run / "peers.yaml")
    if config.topology.kind == "k-regular" and config.topology.resample_every > 0:
        raise SystemExit("bare_rounds: resampled topologies are not supported")
    graph = graph_for_round(config.topology, config.peer_ids, config.seed, 0)
    neighbours = sorted(graph[peer_id])
    weights = metropolis_weights(graph, peer_id)
    aead = {p: AESGCM(pair_key(config.seed, peer_id, p)) for p in neighbours}
    local = LocalModel(config, peer_id, load_dataset(run / "data" / f"{peer_id}.npz"), 0)
    params = local.initial_params().copy()
    max_size = params.nbytes + 64

    links: dict[str, Connection] = {}
    inbox: dict[int, dict[str, bytes]] = {}
    news = asyncio.Event()

    async def read(peer: str, ws: Connection) -> None:
        async for message in ws:
            assert isinstance(message, bytes)
            inbox.setdefault(int.from_bytes(message[:8], "little"), {})[peer] = message
            news.set()

    async def until(condition: Callable[[], bool]) -> None:
        while not condition():
            news.clear()
            await asyncio.wait_for(news.wait(), TIMEOUT_S)

    async def accept(ws: ServerConnection) -> None:
        peer = str(await ws.recv())
        links[peer] = ws
        news.set()
        await read(peer, ws)

    loop = asyncio.get_running_loop()
    async with serve(accept, "127.0.0.1", 0, max_size=max_size, compression=None) as server:
        port = next(iter(server.sockets)).getsockname()[1]
        print(f"port {port}", flush=True)
        ports = json.loads(await loop.run_in_executor(None, sys.stdin.readline))
        tasks = []
        for peer in neighbours:
            if peer > peer_id:  # the smaller id dials
                ws = await connect(
                    f"ws://127.0.0.1:{ports[peer]}", max_size=max_size, compression=None
                )
                await ws.send(peer_id)
                links[peer] = ws
                tasks.append(asyncio.ensure_future(read(peer, ws)))
        await until(lambda: len(links) == len(neighbours))
        print("ready", flush=True)
        await loop.run_in_executor(None, sys.stdin.readline)  # "go": all peers are linked

        durations = []
        for r in range(rounds):
            began = time.perf_counter()
            trained = local.train(params, r).params
            header = r.to_bytes(8, "little")
            plain = trained.data.cast("B")
            for peer in neighbours:
                sealed = aead[peer].encrypt(nonce(peer_id, peer, r), plain, header)
                await links[peer].send(header + sealed)
            await until(lambda: len(inbox.get(r, ())) == len(neighbours))  # noqa: B023
            received = {
                peer: np.frombuffer(
                    aead[peer].decrypt(nonce(peer, peer_id, r), m[8:], m[:8]), np.float32
                ).copy()
                for peer, m in inbox.pop(r).items()
            }
            params, _ = metropolis_average(peer_id, trained.copy(), received, weights)
            durations.append(time.perf_counter() - began)
        # Lockstep: a neighbour may still wait for our last message; let it drain.
        await asyncio.sleep(0)
        for task in tasks:
            task.cancel()
    return durations


def bare_round_time(run: Path, rounds: int) -> float:
    """Median seconds of a bare lockstep round, all peers of ``run`` as processes."""
    ids = load_config(run / "peers.yaml").peer_ids
    env = {**os.environ, "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"}
    children = [
        subprocess.Popen(
            [sys.executable, __file__, str(run), "--rounds", str(rounds), "--peer", peer],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )
        for peer in ids
    ]
    try:
        ports = {peer: int(_line(c).split()[1]) for peer, c in zip(ids, children, strict=True)}
        for child in children:
            _write(child, json.dumps(ports))
        for child in children:
            if _line(child) != "ready":
                raise RuntimeError("bare_rounds: a peer did not link up")
        for child in children:
            _write(child, "go")
        durations: list[float] = [d for c in children for d in json.loads(_line(c))]
        for child in children:
            child.wait(TIMEOUT_S)
    finally:
        for child in children:
            if child.poll() is None:
                child.kill()
                child.wait()
    return statistics.median(durations)


def _line(child: subprocess.Popen[str]) -> str:
    assert child.stdout is not None
    line = child.stdout.readline()
    if not line:
        raise RuntimeError(f"bare_rounds: a peer exited early (status {child.wait()})")
    return line.strip()


def _write(child: subprocess.Popen[str], text: str) -> None:
    assert child.stdin is not None
    child.stdin.write(text + "\n")
    child.stdin.flush()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", type=Path, help="a `p2pfl harness` output folder")
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--peer", help=argparse.SUPPRESS)  # a child: run this one peer
    args = parser.parse_args()
    if args.peer is not None:
        durations = asyncio.run(run_peer(args.run, args.peer, args.rounds))
        print(json.dumps(durations), flush=True)
        return 0
    print(f"{bare_round_time(args.run, args.rounds) * 1000:.1f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
