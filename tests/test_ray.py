"""``p2pfl harness --ray`` on a local Ray instance: the same run as a local one (table,
summary.json, accuracy), kills and restarts, and nothing on any address but loopback."""

from __future__ import annotations

import importlib.util
import ipaddress
import itertools
import json
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from p2pfl.harness.ray_host import PeerHost

from .conftest import TIMEOUT

# (not imported here: a local instance must be started by a process that sets Ray's
# environment before its first import of Ray, as the harness does)
pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("ray") is None,
    reason="the ray extra is not installed (pip install '.[ray]')",
)

RUN = ("--peers", "4", "--rounds", "3", "--seed", "5", "--no-snapshots")
LISTEN, ESTABLISHED, SYN_SENT = "0A", "01", "02"


def harness(out: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "p2pfl", "harness", "--out", str(out), *args],
        capture_output=True,
        text=True,
        timeout=240 * TIMEOUT,
        check=False,
    )


def _address(hex_address: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    """/proc/net/tcp{,6}'s hex address (32-bit words in host, little-endian, order)."""
    raw = bytes.fromhex(hex_address)
    words = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
    return ipaddress.ip_address(words)


def _sockets() -> set[tuple[str, str, str]]:
    """Every TCP socket listening, connecting or connected now: (state, local, remote)."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as f:
            for line in f.readlines()[1:]:
                fields = line.split()
                state = fields[3]
                if state in (LISTEN, ESTABLISHED, SYN_SENT):
                    found.add((state, fields[1], fields[2]))
    return found


def _loopback(hex_address: str) -> bool:
    address = _address(hex_address.split(":")[0])
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return address.is_loopback


def _outside(state: str, local: str, remote: str) -> bool:
    """A socket that listens on, or talks to, an address that is not loopback."""
    if state == LISTEN:
        return not _loopback(local)
    return not (_loopback(local) and _loopback(remote))


@pytest.fixture
def network_watch() -> Iterator[set[tuple[str, str, str]]]:
    """Every socket on a non-loopback address that appears while the test runs."""
    before = _sockets()
    seen: set[tuple[str, str, str]] = set()
    stop = threading.Event()

    def watch() -> None:
        while not stop.wait(0.02):
            seen.update(s for s in _sockets() - before if _outside(*s))

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    yield seen
    stop.set()
    thread.join()


def _table(stdout: str) -> list[list[str]]:
    """The per-peer table's rows without the timing and memory columns."""
    lines = stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("peer "))
    rows = []
    for line in lines[start : start + 5]:
        cells = line.split()
        rows.append(cells[:5])
    return rows


def test_a_ray_run_matches_a_local_run_and_stays_on_loopback(
    tmp_path: Path, network_watch: set[tuple[str, str, str]]
) -> None:
    ray_run = harness(tmp_path / "ray", *RUN, "--ray")
    assert ray_run.returncode == 0, ray_run.stdout + ray_run.stderr
    local_run = harness(tmp_path / "local", *RUN)
    assert local_run.returncode == 0, local_run.stdout + local_run.stderr
    assert not network_watch, f"sockets off loopback: {network_watch}"

    assert "a local Ray instance on 127.0.0.1" in ray_run.stdout
    assert _table(ray_run.stdout) == _table(local_run.stdout)
    on_ray = json.loads((tmp_path / "ray" / "summary.json").read_text())
    local = json.loads((tmp_path / "local" / "summary.json").read_text())
    assert set(on_ray) == set(local)
    assert set(on_ray["peers_detail"][0]) == set(local["peers_detail"][0])
    for peer in ("p00", "p01", "p02", "p03"):
        assert on_ray["accuracy"]["per_peer"][peer] == pytest.approx(
            local["accuracy"]["per_peer"][peer], abs=1e-6
        )
    ray_info = on_ray["ray"]
    assert ray_info["address"] == "local"
    assert set(ray_info["hosts"].values()) == {"127.0.0.1"}
    assert local["ray"] is None
    # what came back into the run folder: logs, checkpoints, the report; no private key
    folder = tmp_path / "ray"
    assert (folder / "report.png").stat().st_size > 0
    for peer in ("p00", "p01", "p02", "p03"):
        assert (folder / "state" / peer / "checkpoint.npz").is_file()
        assert (folder / "state" / peer / "events.jsonl").read_text().count('"round_end"') == 3
        assert (folder / "logs" / f"{peer}.log").is_file()
    assert not (folder / "keys").exists()


def test_kill_and_restart_on_ray(tmp_path: Path) -> None:
    run = harness(
        tmp_path / "run",
        *("--peers", "4", "--rounds", "8", "--no-snapshots", "--no-baseline"),
        *("--ray", "--cpus-per-peer", "0.25", "--kill", "p01@2", "--restart", "p01@4"),
    )
    assert run.returncode == 0, run.stdout + run.stderr
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    faults = {f["fault"]: f for f in summary["faults"]}
    assert faults["kill p01@2"]["round"] == 2
    assert faults["restart p01@4"]["rejoined_round"] is not None
    assert summary["ray"]["cpus_per_peer"] == 0.25
    starts = (tmp_path / "run" / "state" / "p01" / "events.jsonl").read_text()
    assert starts.count('"node_start"') == 2
    assert summary["accuracy"]["min"] > 0.8


def test_more_cpus_than_the_cluster_has_is_a_clear_error(tmp_path: Path) -> None:
    run = harness(
        tmp_path / "run", *("--peers", "4", "--rounds", "2", "--ray", "--cpus-per-peer", "64")
    )
    assert run.returncode != 0
    assert "256 CPUs, but the Ray cluster has" in run.stderr
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--cpus-per-peer", "1"), "--cpus-per-peer needs --ray"),
        (("--memory-per-peer", "100"), "--memory-per-peer needs --ray"),
        (("--ray", "--hosts"), "--ray and --hosts do not go together"),
        (("--ray", "--cpus-per-peer", "0"), "expected a number above 0"),
    ],
)
def test_bad_ray_flags_are_refused(tmp_path: Path, args: tuple[str, ...], message: str) -> None:
    run = harness(tmp_path / "run", *args)
    assert run.returncode != 0
    assert message in run.stderr


def test_a_peer_host_keeps_its_key_and_hands_back_its_logs(tmp_path: Path) -> None:
    """The actor's class as a plain object: a key made in its folder (only the public key
    leaves), data written, logs read incrementally, state files without the event log."""
    host = PeerHost(["p00"], root=str(tmp_path))
    [(address, port, public)] = host.place((20000, 29999), "127.0.0.1")
    assert (address, len(public)) == ("127.0.0.1", 44) and 20000 <= port <= 29999
    assert (host.workdir / "keys" / "p00.key").stat().st_mode & 0o077 == 0
    share = (np.zeros((3, 2), np.float32), np.arange(3))
    host.install("version: 1\n", {"p00": share}, share)
    assert (host.workdir / "data" / "p00.npz").is_file()
    state = host.workdir / "state" / "p00"
    state.mkdir(parents=True)
    (state / "events.jsonl").write_bytes(b'{"a": 1}\n')
    (state / "checkpoint.npz").write_bytes(b"x")
    assert host.status()[1] == {"p00": b'{"a": 1}\n'}
    with open(state / "events.jsonl", "ab") as f:
        f.write(b'{"b": 2}\n')
    assert host.status()[1] == {"p00": b'{"b": 2}\n'}
    assert host.status()[1] == {"p00": b""}
    assert host.files() == {"p00": {"checkpoint.npz": b"x"}}
    with pytest.raises(ValueError, match="not a peer handle's call"):
        host.call("p00", "__init__")
    host.cleanup()
    assert not host.workdir.exists()


def test_the_loopback_watch_sees_a_socket_on_every_address() -> None:
    """(So that the check above can fail.)"""
    import socket

    with socket.socket() as wide, socket.socket() as narrow:
        wide.bind(("0.0.0.0", 0))
        wide.listen()
        narrow.bind(("127.0.0.1", 0))
        narrow.listen()
        ports = {wide.getsockname()[1]: True, narrow.getsockname()[1]: False}
        found = {
            int(local.split(":")[1], 16): _outside(state, local, remote)
            for state, local, remote in _sockets()
            if int(local.split(":")[1], 16) in ports
        }
    assert found == ports


LOST_ACTOR = """
import sys
from pathlib import Path
from p2pfl.harness.ray_cluster import LOST, RayOptions, connected
from p2pfl.harness.layout import Layout

layout = Layout(Path(sys.argv[1]), ["p00", "p01"])
with connected(RayOptions(cpus_per_peer=0.5)) as cluster:
    import ray

    cluster.place(layout.peers)
    handles = cluster.handles({"p00": ["python", "-c", "pass"], "p01": ["python", "-c", "pass"]})
    ray.kill(cluster._actors["p01"][0])
    cluster.sync(layout)
    cluster.collect(layout)
    print(handles["p01"].exit_code() == LOST, handles["p00"].exit_code() is None)
"""


def test_a_lost_actor_is_a_peer_that_is_gone(tmp_path: Path) -> None:
    """A machine (or Ray worker) that dies: its peer reads as lost, the others go on."""
    done = subprocess.run(
        [sys.executable, "-c", LOST_ACTOR, str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120 * TIMEOUT,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["True", "True"]


@pytest.mark.skipif(shutil.which("strace") is None, reason="needs strace (Debian's strace)")
def test_no_process_of_a_ray_run_dials_off_loopback(tmp_path: Path) -> None:
    """Every connect(2) of the harness, Ray's processes and the peers: loopback or a
    local socket. (Ray's dashboard once asked 169.254.169.254 which cloud it runs on, and the
    DNS server for metadata.google.internal; the socket watch above can miss a refused
    attempt, the system call cannot be missed.)"""
    trace = tmp_path / "connects.txt"
    done = subprocess.run(
        [
            *("strace", "-f", "-qq", "-e", "trace=connect", "-o", str(trace)),
            *(sys.executable, "-m", "p2pfl", "-q", "harness", "--out", str(tmp_path / "run")),
            *("--ray", "--peers", "2", "--rounds", "2", "--no-baseline", "--no-snapshots"),
        ],
        capture_output=True,
        text=True,
        timeout=240 * TIMEOUT,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    calls = [line for line in trace.read_text().splitlines() if "connect(" in line]
    assert any("127.0.0.1" in line for line in calls)  # (the trace did see the peers)
    outside = [
        line
        for line in calls
        if not any(local in line for local in ("AF_UNIX", "AF_UNSPEC", "AF_NETLINK"))
        and not any(loop in line for loop in ('"127.', '"::1"', '"::ffff:127.'))
    ]
    assert not outside


def test_several_nodes_per_process_on_ray(tmp_path: Path) -> None:
    """An actor per process of two nodes: a kill and a restart inside the process, the
    output in logs/p00-p01.log, the same table fields as ever."""
    run = harness(
        tmp_path / "run",
        *("--peers", "4", "--rounds", "8", "--no-snapshots", "--no-baseline", "--ray"),
        *("--nodes-per-process", "2", "--kill", "p01@2", "--restart", "p01@4"),
    )
    assert run.returncode == 0, run.stdout + run.stderr
    folder = tmp_path / "run"
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["nodes_per_process"] == 2
    assert summary["ray"]["threads_per_process"] == 1
    faults = {f["fault"]: f for f in summary["faults"]}
    assert faults["restart p01@4"]["rejoined_round"] is not None
    starts = [
        json.loads(line)
        for peer in ("p00", "p01")
        for line in (folder / "state" / peer / "events.jsonl").read_text().splitlines()
        if '"node_start"' in line
    ]
    assert len(starts) == 3 and len({e["pid"] for e in starts}) == 1
    assert sorted(p.name for p in (folder / "logs").iterdir()) == ["p00-p01.log", "p02-p03.log"]
    assert summary["accuracy"]["min"] > 0.8


def test_actors_that_drew_the_same_port_are_found() -> None:
    """Each actor draws its own ports: a second actor on the same host with a port already
    taken must draw again (the first keeps it); the same port on another host is fine."""
    from p2pfl.harness.ray_cluster import Placement, _clashing_actors

    placements = {
        "p0": Placement("10.0.0.1", 7000, "k"),
        "p1": Placement("10.0.0.1", 7001, "k"),
        "p2": Placement("10.0.0.1", 7000, "k"),
        "p3": Placement("10.0.0.2", 7000, "k"),
        "p4": Placement("10.0.0.1", 7001, "k"),
    }
    actors = {"a": (None, ["p0", "p1"]), "b": (None, ["p2"]), "c": (None, ["p3", "p4"])}
    assert _clashing_actors(placements, actors) == ["b", "c"]
    placements["p2"] = Placement("10.0.0.1", 7002, "k")
    placements["p4"] = Placement("10.0.0.1", 7003, "k")
    assert _clashing_actors(placements, actors) == []


def test_actors_draw_ports_from_slices_of_their_own() -> None:
    from p2pfl.harness.ray_cluster import RayError, port_slices

    slices = port_slices(20)
    assert slices[0] == (20000, 20499) and slices[-1] == (29500, 29999)
    assert all(a[1] < b[0] for a, b in itertools.pairwise(slices))
    assert port_slices(10000)[-1] == (29999, 29999)
    with pytest.raises(RayError, match="more than the 10000 peer ports"):
        port_slices(10001)
