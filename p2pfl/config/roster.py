"""The ``peers`` and ``topology`` sections: who takes part, where they listen, their keys,
and a graph that is connected in every round it will be resampled for."""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Mapping
from typing import cast, get_args

from p2pfl.config.fields import FieldReader, join_path, shown
from p2pfl.config.schema import PeerInfo, TrainingConfig
from p2pfl.core.topology import TopologyConfig, TopologyKind, graph_for_round, is_connected
from p2pfl.proto.keys import decode_public_key

_TOPOLOGY_KINDS: tuple[str, ...] = get_args(TopologyKind)
_ADDRESS_RE = re.compile(r"ws://(?P<host>\[[^\]]*\]|[^\[\]/:@?#\s]+):(?P<port>[0-9]{1,5})")
_HOSTNAME_RE = re.compile(
    r"(?=.{1,253}\Z)[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
    r"(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*"
)


class RosterReader(FieldReader):
    """The peers and the topology."""

    def peers(self, value: object) -> dict[str, PeerInfo]:
        expected = "a mapping of peer id to {address, public_key}"
        if not isinstance(value, Mapping):
            self.fail("peers", f"expected {expected}, got {shown(value)}")
        found: dict[str, PeerInfo] = {}
        for raw_id in value:
            peer_id = self.name(raw_id, join_path("peers", raw_id), "a peer id")
            path = join_path("peers", peer_id)
            entry = self.section(
                value[raw_id],
                path,
                ("address", "public_key"),
                ("address", "public_key"),
                expected="a mapping {address: ws://HOST:PORT, public_key: BASE64}",
            )
            host, port, address = self.address(entry["address"], join_path(path, "address"))
            key = self.public_key(entry["public_key"], join_path(path, "public_key"))
            found[peer_id] = PeerInfo(peer_id, address, key, host, port)
        if len(found) < 2:
            self.fail("peers", f"expected at least 2 peers, got {len(found)}")
        ordered = {peer_id: found[peer_id] for peer_id in sorted(found)}
        by_address: dict[str, str] = {}
        by_key: dict[bytes, str] = {}
        for peer_id, peer in ordered.items():
            path = join_path("peers", peer_id)
            if peer.address in by_address:
                self.fail(
                    join_path(path, "address"),
                    f"{peer.address} is already the address of peer {by_address[peer.address]!r};"
                    " every peer needs its own address",
                )
            if peer.public_key in by_key:
                self.fail(
                    join_path(path, "public_key"),
                    f"same public key as peer {by_key[peer.public_key]!r};"
                    " every peer needs its own key pair (`p2pfl keygen`)",
                )
            by_address[peer.address] = peer_id
            by_key[peer.public_key] = peer_id
        return ordered

    def address(self, value: object, path: str) -> tuple[str, int, str]:
        """(host, port, normalised address) from ``ws://HOST:PORT``."""
        expected = "an address of the form ws://HOST:PORT (for example ws://10.1.0.11:7070)"
        if not isinstance(value, str):
            self.fail(path, f"expected {expected}, got {shown(value)}")
        match = _ADDRESS_RE.fullmatch(value)
        if match is None:
            self.fail(path, f"expected {expected}, got {shown(value)}")
        host_text, port = match["host"], int(match["port"])
        if not 1 <= port <= 65535:
            self.fail(path, f"port must be between 1 and 65535, got {port}")
        if host_text.startswith("["):
            try:
                host = ipaddress.IPv6Address(host_text[1:-1]).compressed
            except ValueError:
                self.fail(path, f"{host_text} is not a valid IPv6 address")
            return host, port, f"ws://[{host}]:{port}"
        if re.fullmatch(r"[0-9.]+", host_text):
            try:
                host = str(ipaddress.IPv4Address(host_text))
            except ValueError:
                self.fail(path, f"{host_text!r} is not a valid IPv4 address")
        elif _HOSTNAME_RE.fullmatch(host_text):
            host = host_text.lower()
        else:
            self.fail(path, f"{host_text!r} is not a valid host name or IP address")
        return host, port, f"ws://{host}:{port}"

    def public_key(self, value: object, path: str) -> bytes:
        expected = "the base64 X25519 public key printed by `p2pfl keygen` (44 characters)"
        if not isinstance(value, str):
            self.fail(path, f"expected {expected}, got {shown(value)}")
        try:
            return decode_public_key(value)
        except ValueError as exc:
            self.fail(path, f"expected {expected}, got {shown(value)}: {exc}")

    def topology(self, value: object, ids: tuple[str, ...]) -> TopologyConfig:
        section = self.section(
            value, "topology", ("kind", "degree", "edges", "resample_every"), ("kind",)
        )
        kind = cast(TopologyKind, self.choice(section["kind"], "topology.kind", _TOPOLOGY_KINDS))
        n = len(ids)
        degree: int | None = None
        edges: tuple[tuple[str, str], ...] = ()
        if "degree" in section and kind != "k-regular":
            self.fail("topology.degree", f"only used with kind k-regular (kind is {kind!r})")
        if "edges" in section and kind != "explicit":
            self.fail("topology.edges", f"only used with kind explicit (kind is {kind!r})")
        if kind == "k-regular":
            if "degree" not in section:
                self.fail("topology.degree", "required for kind k-regular")
            degree = self.integer(section["degree"], "topology.degree", 1, n - 1)
            if (n * degree) % 2:
                self.fail(
                    "topology.degree",
                    f"no {degree}-regular graph on {n} peers exists:"
                    f" peers x degree must be even, got {n} x {degree}",
                )
        if kind == "explicit":
            if "edges" not in section:
                self.fail("topology.edges", "required for kind explicit")
            edges = self.edges(section["edges"], ids)
        resample_every = self.integer(
            section.get("resample_every", 0), "topology.resample_every", 0
        )
        if resample_every and kind != "k-regular":
            self.fail(
                "topology.resample_every",
                f"resampling only applies to kind k-regular (kind is {kind!r}); use 0 or remove it",
            )
        return TopologyConfig(kind, degree, edges, resample_every)

    def edges(self, value: object, ids: tuple[str, ...]) -> tuple[tuple[str, str], ...]:
        if not isinstance(value, list):
            self.fail(
                "topology.edges", f"expected a list of [peer, peer] pairs, got {shown(value)}"
            )
        known = set(ids)
        first_seen: dict[tuple[str, str], int] = {}
        for index, pair in enumerate(value):
            path = f"topology.edges[{index}]"
            if not isinstance(pair, list) or len(pair) != 2:
                self.fail(path, f"expected a pair [peer, peer], got {shown(pair)}")
            for end, peer in enumerate(pair):
                if not isinstance(peer, str) or peer not in known:
                    self.fail(
                        f"{path}[{end}]",
                        f"expected a peer id from peers ({', '.join(ids)}), got {shown(peer)}",
                    )
            a, b = sorted(cast(list[str], pair))
            if a == b:
                self.fail(path, f"self loop {a!r} -> {b!r}; an edge joins two different peers")
            if (a, b) in first_seen:
                self.fail(path, f"duplicate of topology.edges[{first_seen[(a, b)]}]")
            first_seen[(a, b)] = index
        return tuple(sorted(first_seen))

    def check_min_neighbours(
        self, topology: TopologyConfig, ids: tuple[str, ...], seed: int, training: TrainingConfig
    ) -> None:
        """``training.min_neighbours`` must be reachable: every peer has at least that many
        neighbours in every round's graph (or that peer could never start a round)."""
        wanted = training.min_neighbours
        for r in range(training.rounds) if topology.resample_every else range(1):
            graph = graph_for_round(topology, ids, seed, r)
            peer = min(sorted(graph), key=lambda p: len(graph[p]))
            if len(graph[peer]) < wanted:
                self.fail(
                    "training.min_neighbours",
                    f"is {wanted}, but {peer} has only {len(graph[peer])} neighbour(s) in "
                    f"round {r}; lower it, or use a topology of higher degree",
                )

    def check_graph(self, topology: TopologyConfig, ids: tuple[str, ...], seed: int) -> None:
        """The graph must be connected, or the model could never reach consensus."""
        try:
            graph = graph_for_round(topology, ids, seed, 0)
        except ValueError as exc:
            self.fail("topology", str(exc))
        if not is_connected(graph):
            start = ids[0]
            reach = {start}
            frontier = [start]
            while frontier:
                for other in graph[frontier.pop()]:
                    if other not in reach:
                        reach.add(other)
                        frontier.append(other)
            cut_off = sorted(set(ids) - reach)
            self.fail(
                "topology",
                f"the graph is not connected: {', '.join(cut_off)} cannot reach"
                f" {', '.join(sorted(reach))}; add edges so every peer can reach every other",
            )
