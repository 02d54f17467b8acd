"""Simulated hosts: one Linux network namespace per peer, joined by a bridge.

Layout of a run (``P`` is the harness's process id, so runs never collide and a sweep can
tell a dead run's leftovers from a live one's):

- ``p2pfl-P-br``: a namespace holding only the bridge ``br0``;
- ``p2pfl-P-<peer>``: one per peer, with ``eth0`` (a veth whose other end, ``v-<peer>``,
  is a port of the bridge) at 10.77.x.y/16, and its own loopback.

A host's link is shaped where a real uplink would be: ``tc tbf`` on ``eth0`` limits what
it sends, on ``v-<peer>`` what it receives; iptables ``statistic`` drops packets in and out
at random (loss). This kernel has no ``netem``, so delay is added in user space by a relay
(``p2pfl.harness.relay``) in front of each node's listening port. Faults are iptables rules
in the hosts' own ``P2PFL-FAULTS`` chain: a cut host drops everything on ``eth0``; a
partition drops what goes between the groups' addresses. No packet is ever sent from the
root namespace: every process of a run starts inside its host (``wrap``).

Everything lives inside namespaces, so closing a run is deleting them (the veths, qdiscs
and rules go with them); ``close`` always does, and ``sweep_stale`` removes what a killed
harness left behind.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import re
import select
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

from p2pfl.errors import P2PFLError
from p2pfl.harness.links import LinkSpec

PREFIX = "p2pfl-"
_OURS = re.compile(r"^p2pfl-(\d+)-")
SUBNET = ipaddress.IPv4Network("10.77.0.0/16")
#: With ``ipv6``: unique local addresses, one /64 for the whole bridge.
SUBNET6 = ipaddress.IPv6Network("fd77::/64")
FAULT_CHAIN = "P2PFL-FAULTS"
#: tbf's queue, as time at the link's rate: what an uplink's buffer holds (bufferbloat
#: included); TCP fills it, so it adds at most this much to a round trip.
QUEUE_LATENCY = "100ms"
#: tbf's bucket: at least one 64 KiB GSO packet (veth hands tbf whole TSO segments).
MIN_BURST_BYTES = 64 * 1024


class HostsError(P2PFLError):
    """Simulated hosts cannot be made here (the message says what is missing)."""


def check_available(links: Mapping[str, LinkSpec]) -> None:
    """Root, ``ip``, ``tc`` where a rate is set, ``iptables`` (faults and loss): a clear
    error before anything is made."""
    if os.geteuid() != 0:
        raise HostsError(
            "--hosts needs root: it makes a network namespace per peer (ip netns); run the "
            "harness as root, or without --hosts"
        )
    needed = {"ip": "iproute2", "iptables": "iptables", "ip6tables": "iptables"}
    if any(spec.rate_bps is not None for spec in links.values()):
        needed["tc"] = "iproute2"
    for tool, package in needed.items():
        if shutil.which(tool) is None:
            raise HostsError(f"--hosts needs {tool!r} (Debian package {package}); not found")


def unavailable_reason() -> str | None:
    """Why simulated hosts cannot be made on this machine (None: they can): not root, a
    tool missing, or namespaces refused (a container without the capability)."""
    if os.geteuid() != 0:
        return "needs root (ip netns)"
    for tool in ("ip", "iptables", "tc"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed"
    probe = f"{PREFIX}{os.getpid()}-probe"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if made.returncode != 0:
        return f"cannot make a network namespace: {made.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


def _run(*command: str) -> None:
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise HostsError(f"{' '.join(command)} failed: {result.stderr.strip() or result.stdout}")


def address_of(index: int, ipv6: bool = False) -> str:
    """The address of host ``index`` (0, 1, ...): 10.77.0.1, 10.77.0.2, ... (or fd77::1,
    fd77::2, ... with ``ipv6``)."""
    return str((SUBNET6 if ipv6 else SUBNET).network_address + 1 + index)


class HostNetwork:
    """The namespaces, links and fault rules of one run's simulated hosts."""

    def __init__(
        self, links: Mapping[str, LinkSpec], *, owner: int | None = None, ipv6: bool = False
    ) -> None:
        self.links = dict(links)
        self.peers = list(links)
        self.owner = os.getpid() if owner is None else owner
        self.base = f"{PREFIX}{self.owner}-"
        #: IPv6 hosts: their addresses, and ip6tables for their rules.
        self.ipv6 = ipv6
        self.addresses = {peer: address_of(i, ipv6) for i, peer in enumerate(self.peers)}
        self._made: list[str] = []
        self._faults: dict[str, set[str]] = {}  # host -> its rules now (iptables args)
        self._relays: list[subprocess.Popen[bytes]] = []

    @property
    def relayed(self) -> bool:
        """Whether some host has a delay: then every node listens behind a relay."""
        return any(spec.delay_s > 0 for spec in self.links.values())

    # --- names ---------------------------------------------------------------------------

    @property
    def bridge_ns(self) -> str:
        return self.base + "br"

    def namespace(self, peer: str) -> str:
        return self.base + peer

    def wrap(self, peer: str, command: Sequence[str]) -> list[str]:
        """``command`` run inside ``peer``'s host (``ip netns exec`` execs it: same pid)."""
        return ["ip", "netns", "exec", self.namespace(peer), *command]

    # --- making and removing -------------------------------------------------------------

    def create(self) -> None:
        """Every namespace, veth, address, qdisc and loss rule; on a failure what was made
        is removed again before the error goes up."""
        try:
            self._add_namespace(self.bridge_ns)
            br = self.bridge_ns
            _run("ip", "-n", br, "link", "add", "br0", "type", "bridge")
            _run("ip", "-n", br, "link", "set", "br0", "up")
            for peer in self.peers:
                self._add_host(peer)
        except BaseException:
            self.close()
            raise

    def _add_namespace(self, name: str) -> None:
        _run("ip", "netns", "add", name)
        self._made.append(name)
        _run("ip", "-n", name, "link", "set", "lo", "up")

    def _add_host(self, peer: str) -> None:
        ns, br, port = self.namespace(peer), self.bridge_ns, f"v-{peer}"[:15]
        self._add_namespace(ns)
        _run(
            "ip", "-n", br, "link", "add", port, "type", "veth", "peer", "name", "eth0", "netns", ns
        )
        _run("ip", "-n", br, "link", "set", port, "master", "br0", "up")
        prefix = (SUBNET6 if self.ipv6 else SUBNET).prefixlen
        # (IPv6: no duplicate address detection, which would hold the address a second)
        nodad = ["nodad"] if self.ipv6 else []
        _run(
            "ip", "-n", ns, "addr", "add", f"{self.addresses[peer]}/{prefix}", "dev", "eth0", *nodad
        )
        _run("ip", "-n", ns, "link", "set", "eth0", "up")
        spec = self.links[peer]
        if spec.rate_bps is not None:  # what the host sends, and what it receives
            _shape(ns, "eth0", spec.rate_bps)
            _shape(br, port, spec.rate_bps)
        self._iptables(peer, "-N", FAULT_CHAIN)
        self._iptables(peer, "-A", "INPUT", "-i", "eth0", "-j", FAULT_CHAIN)
        self._iptables(peer, "-A", "OUTPUT", "-o", "eth0", "-j", FAULT_CHAIN)
        if spec.loss > 0:
            for chain, side in (("INPUT", "-i"), ("OUTPUT", "-o")):
                self._iptables(
                    peer,
                    "-A",
                    chain,
                    side,
                    "eth0",
                    "-m",
                    "statistic",
                    "--mode",
                    "random",
                    "--probability",
                    f"{spec.loss:g}",
                    "-j",
                    "DROP",
                )

    def _iptables(self, peer: str, *args: str) -> None:
        tool = "ip6tables" if self.ipv6 else "iptables"
        _run("ip", "netns", "exec", self.namespace(peer), tool, "-w", *args)

    def start_relays(self, plan: Path, env: Mapping[str, str], timeout: float = 20.0) -> None:
        """One delay relay per host (``p2pfl.harness.relay``), each listening on its host's
        address before this returns."""
        for peer in self.peers:
            command = [sys.executable, "-m", "p2pfl.harness.relay", str(plan), peer]
            self._relays.append(
                subprocess.Popen(
                    self.wrap(peer, command),
                    stdout=subprocess.PIPE,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                    env=dict(env),
                )
            )
        deadline = time.monotonic() + timeout
        for peer, relay in zip(self.peers, self._relays, strict=True):
            assert relay.stdout is not None
            ready, _, _ = select.select([relay.stdout], [], [], deadline - time.monotonic())
            line = relay.stdout.readline().decode(errors="replace").strip() if ready else ""
            if not line.startswith("relay "):
                raise HostsError(f"the delay relay of {peer} did not start: {line or 'no answer'}")

    def close(self) -> None:
        """Remove every namespace of this run (processes still inside are killed first)."""
        for relay in self._relays:
            if relay.poll() is None:
                relay.kill()
            relay.wait()
            if relay.stdout is not None:
                relay.stdout.close()
        self._relays.clear()
        for name in reversed(self._made):
            _delete_namespace(name)
        self._made.clear()

    # --- faults ----------------------------------------------------------------------------

    def set_faults(self, rules: Mapping[str, Iterable[str]]) -> None:
        """Each host's fault rules now: ``{"p03": ["cut"], "p00": ["drop 10.77.0.4"]}``;
        hosts not named have none. Only hosts whose rules change are touched, each with
        one ``iptables-restore`` of its whole fault chain, all hosts at once: a partition
        of eight hosts takes effect within milliseconds, not rule by rule over a second."""
        wanted = {peer: set(rules.get(peer, ())) for peer in self.peers}
        changed = {p: now for p, now in wanted.items() if now != self._faults.get(p, set())}
        started = []
        for peer, now in changed.items():
            lines = ["*filter", f":{FAULT_CHAIN} - [0:0]"]  # (declaring it flushes it)
            for rule in sorted(now):
                if rule == "cut":
                    lines.append(f"-A {FAULT_CHAIN} -j DROP")
                else:
                    other = rule.removeprefix("drop ")
                    lines += [f"-A {FAULT_CHAIN} -s {other} -j DROP"]
                    lines += [f"-A {FAULT_CHAIN} -d {other} -j DROP"]
            restore = subprocess.Popen(
                [
                    "ip",
                    "netns",
                    "exec",
                    self.namespace(peer),
                    "ip6tables-restore" if self.ipv6 else "iptables-restore",
                    "-w",
                    "--noflush",
                ],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
            assert restore.stdin is not None
            restore.stdin.write("\n".join([*lines, "COMMIT", ""]))
            restore.stdin.close()
            started.append((peer, restore))
        for peer, restore in started:
            assert restore.stdout is not None
            with restore.stdout:
                output = restore.stdout.read()
            if restore.wait() != 0:
                raise HostsError(f"iptables-restore in {peer}'s host failed: {output.strip()}")
            self._faults[peer] = changed[peer]

    def write_plan(self, path: Path, listen_ports: Mapping[str, int]) -> None:
        """hosts.json: each host's address, link and port (the relays read it; a reader of
        the run folder sees what the hosts were)."""
        plan = {
            peer: {
                "namespace": self.namespace(peer),
                "address": self.addresses[peer],
                "port": listen_ports[peer],
                "link": str(self.links[peer]),
                "delay_s": self.links[peer].delay_s,
            }
            for peer in self.peers
        }
        path.write_text(json.dumps(plan, indent=2), encoding="utf-8")


def _shape(namespace: str, device: str, rate_bps: int) -> None:
    burst = max(rate_bps // 8 // 100, MIN_BURST_BYTES)  # 10 ms at the rate, or one GSO packet
    _run(
        "tc",
        "-n",
        namespace,
        "qdisc",
        "add",
        "dev",
        device,
        "root",
        "tbf",
        "rate",
        f"{rate_bps}bit",
        "burst",
        str(burst),
        "latency",
        QUEUE_LATENCY,
    )


def _namespace_pids(name: str) -> list[int]:
    result = subprocess.run(
        ["ip", "netns", "pids", name], capture_output=True, text=True, check=False
    )
    return [int(p) for p in result.stdout.split() if p.isdigit()]


def _delete_namespace(name: str) -> None:
    """Kill what still runs inside (only our own runs' processes live in our namespaces),
    then delete it; a namespace already gone is fine."""
    for pid in _namespace_pids(name):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)
    subprocess.run(["ip", "netns", "del", name], capture_output=True, check=False)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def sweep_stale() -> list[str]:
    """Delete the namespaces of runs whose harness is gone (killed before it could clean
    up); returns their names. A live run's namespaces are left alone."""
    if shutil.which("ip") is None:
        return []
    listing = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=False)
    stale = []
    for line in listing.stdout.splitlines():
        name = line.split(" ", 1)[0]
        match = _OURS.match(name)
        if match is not None and not _alive(int(match[1])):
            stale.append(name)
    # Hosts before their bridge: a host's veth pair goes with either end.
    for name in sorted(stale, key=lambda n: n.endswith("-br")):
        _delete_namespace(name)
    return stale


def our_namespaces(owner: int) -> list[str]:
    """The namespaces a run of harness process ``owner`` has now (for tests)."""
    listing = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=False)
    names = [line.split(" ", 1)[0] for line in listing.stdout.splitlines()]
    return [n for n in names if n.startswith(f"{PREFIX}{owner}-")]
