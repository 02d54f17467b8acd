"""How far one machine goes: many peers, one or several nodes per process, locally or on a
local Ray instance (issue 27).

For each configuration, a real ``p2pfl harness`` run (Fashion-MNIST, MLP 64, iid, the
peers evaluating on 200 test samples per round, no baseline, no snapshots) and:

- start-up: from the first node's start to the moment every node has begun round 0
  (processes, imports, data, listening, connecting, handshakes);
- the median round time (summary.json);
- peak memory all together (sampled every 0.5 s), and per peer (that over the peers); and
  the machine's memory in use at its peak, less before the run (Ray's own processes too);
- CPU per peer and round beyond training: every peer process's CPU seconds (sampled every
  0.5 s), less the training's (every peer's local epoch timed here, one thread), over
  peers x rounds done (start-up's CPU included: imports, keys, handshakes).

A configuration that cannot fit is skipped with the reason (a process per peer costs
~60 MB: 1000 of them do not fit in 24 GB).

    python scripts/bench_scale.py --peers 128,256,1000 --nodes-per-process 1,50 \\
        [--rounds 30] [--where local,ray] [--dataset fashion-mnist]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_var] = "1"  # (the training measured here runs as in a peer: one thread)
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

#: Resident memory of one peer process (measured: 56-63 MB with numpy, websockets and
#: cryptography loaded); a Ray actor's own worker process (~90 MB) comes on top.
PROCESS_MB = 60
RAY_WORKER_MB = 100

parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
parser.add_argument("--peers", default="128,256,1000")
parser.add_argument("--nodes-per-process", default="1,50")
parser.add_argument("--rounds", type=int, default=30)
parser.add_argument("--dataset", default="fashion-mnist")
parser.add_argument("--eval-samples", type=int, default=200)
parser.add_argument(
    "--where", default="local", help="local, ray (a local Ray instance) or local,ray"
)
parser.add_argument("--timeout", type=float, default=3600, help="seconds per run at most")


def meminfo_mb() -> dict[str, float]:
    """/proc/meminfo's figures, in MB."""
    with open("/proc/meminfo") as f:
        return {
            name: int(value.split()[0]) / 1024 for name, value in (line.split(":", 1) for line in f)
        }


def memory_used_mb() -> float:
    """The machine's memory in use (total less available), everything included."""
    fields = meminfo_mb()
    return fields["MemTotal"] - fields["MemAvailable"]


class MachineMemory:
    """The peak of ``memory_used_mb`` while a run goes on (sampled every 0.5 s): Ray's own
    processes (its servers, an actor's worker) included, which the harness does not see."""

    def __enter__(self) -> MachineMemory:
        self.peak_mb = memory_used_mb()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()
        return self

    def _watch(self) -> None:
        while not self._stop.wait(0.5):
            self.peak_mb = max(self.peak_mb, memory_used_mb())

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def fits(peers: int, per_process: int, ray: bool) -> str | None:
    """Why the configuration cannot fit in this machine's memory (None: it may)."""
    processes = -(-peers // per_process)
    need = processes * (PROCESS_MB + (RAY_WORKER_MB if ray else 0))
    have = 0.8 * meminfo_mb()["MemTotal"]
    if need > have:
        each = need // processes
        return f"{processes} processes x ~{each} MB = {need / 1024:.0f} GB > {have / 1024:.0f} GB"
    return None


def startup_s(folder: Path) -> float | None:
    """First node_start to the last node's first round_start."""
    first_start, first_round = [], {}
    for log in (folder / "state").glob("*/events.jsonl"):
        for line in log.read_text().splitlines():
            event = json.loads(line)
            if event["type"] == "node_start":
                first_start.append(event["ts"])
            elif event["type"] == "round_start" and event["node"] not in first_round:
                first_round[event["node"]] = event["ts"]
    if not first_start or not first_round:
        return None
    return max(first_round.values()) - min(first_start)


def training_cpu_s(folder: Path) -> float:
    """One local epoch of every peer, back to back in this process (one thread, as a peer):
    the CPU that training takes per round, measured here because the peers' own training
    times are wall times on a crowded machine."""
    import numpy as np

    from p2pfl.config import load_config
    from p2pfl.learning.factory import build_learner

    config = load_config(folder / "peers.yaml")
    training = config.training
    learner = build_learner(training.model.as_mapping(), config.seed, source="bench")
    rng = np.random.default_rng(0)
    used = 0.0
    for peer in config.peer_ids:
        with np.load(folder / "data" / f"{peer}.npz") as data:
            x, y = data["x"].astype(np.float32), data["y"]
        began = time.process_time()
        learner.fit(
            x,
            y,
            epochs=1,
            batch_size=training.batch_size,
            learning_rate=training.learning_rate,
            rng=rng,
        )
        used += time.process_time() - began
    return used


def run(out: Path, args: argparse.Namespace, peers: int, per_process: int, ray: bool) -> dict:  # type: ignore[type-arg]
    command = [
        *(sys.executable, "-m", "p2pfl", "-q", "harness", "--out", str(out)),
        *("--dataset", args.dataset, "--model", "mlp:64", "--partition", "iid"),
        *("--peers", str(peers), "--rounds", str(args.rounds), "--seed", "1"),
        *("--eval-samples", str(args.eval_samples), "--no-baseline", "--no-snapshots"),
        *(("--nodes-per-process", str(per_process)) if per_process > 1 else ()),
        *(("--ray",) if ray else ()),
    ]
    began = time.monotonic()
    baseline = memory_used_mb()
    with MachineMemory() as machine:
        done = subprocess.run(
            command, capture_output=True, text=True, timeout=args.timeout, check=False
        )
    wall = time.monotonic() - began
    if not (out / "summary.json").exists():
        return {"error": (done.stderr or done.stdout).strip().splitlines()[-1:]}
    summary = json.loads((out / "summary.json").read_text())
    rounds_done = (
        statistics.fmean(p["rounds_done"] for p in summary["peers_detail"])
        if summary["peers_detail"]
        else 0
    )
    training = training_cpu_s(out) * rounds_done
    beyond = (summary["peers_cpu_s"] - training) / max(1.0, peers * rounds_done)
    return {
        "exit": done.returncode,
        "wall_s": round(wall, 1),
        "startup_s": startup_s(out),
        "round_ms": 1000 * (summary.get("round_time_s") or float("nan")),
        "rounds_done": rounds_done,
        "accuracy": summary["accuracy"]["mean"],
        "rss_per_peer_mb": summary["peak_rss_mb"]["total_sampled"] / peers,
        "rss_total_mb": summary["peak_rss_mb"]["total_sampled"],
        "cpu_beyond_training_ms": 1000 * beyond,
        "machine_mb": machine.peak_mb - baseline,
    }


def main() -> int:
    args = parser.parse_args()
    places = [where == "ray" for where in args.where.split(",")]
    print(
        f"{args.dataset}, MLP 64, iid, {args.rounds} rounds, peers evaluate on "
        f"{args.eval_samples} test samples\n"
    )
    header = (
        f"{'where':6s} {'peers':>5s} {'per proc':>8s} {'start s':>8s} {'round ms':>9s} "
        f"{'MB/peer':>8s} {'MB total':>9s} {'machine MB':>10s} {'CPU ms/peer-round':>18s} "
        f"{'accuracy':>9s} {'wall s':>7s}"
    )
    print(header, flush=True)
    for ray in places:
        for peers in [int(p) for p in args.peers.split(",")]:
            for per_process in [int(k) for k in args.nodes_per_process.split(",")]:
                where = "ray" if ray else "local"
                reason = fits(peers, per_process, ray)
                if reason:
                    print(f"{where:6s} {peers:5d} {per_process:8d}  skipped: {reason}", flush=True)
                    continue
                with tempfile.TemporaryDirectory(prefix="p2pfl-scale-") as tmp:
                    r = run(Path(tmp) / "run", args, peers, per_process, ray)
                if "error" in r:
                    print(
                        f"{where:6s} {peers:5d} {per_process:8d}  failed: {r['error']}", flush=True
                    )
                    continue
                print(
                    f"{where:6s} {peers:5d} {per_process:8d} {r['startup_s']:8.1f} "
                    f"{r['round_ms']:9.0f} {r['rss_per_peer_mb']:8.1f} {r['rss_total_mb']:9.0f} "
                    f"{r['machine_mb']:10.0f} {r['cpu_beyond_training_ms']:18.1f} "
                    f"{r['accuracy']:9.4f} {r['wall_s']:7.0f}"
                    + ("" if r["exit"] == 0 else f"  (exit {r['exit']})"),
                    flush=True,
                )
    return 0


if __name__ == "__main__":
    sys.exit(main())
