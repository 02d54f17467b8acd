"""Prometheus metrics of one node (``p2pfl run --metrics HOST:PORT``), fed by its events.

The event log is the one source of truth: ``NodeMetrics.observe`` is an event-log listener
that turns each event into counter, gauge and histogram updates, so the metrics say exactly
what the log says. The registry is the node's own (not the process-global one), so several
nodes in one process (the tests) do not mix their numbers. ``prometheus-client`` serves it
from a daemon thread; off by default, and on loopback unless told otherwise.
"""

from __future__ import annotations

import ipaddress
import logging
import re
import threading
from collections.abc import Callable, Iterable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from p2pfl.errors import P2PFLError

log = logging.getLogger("p2pfl.daemon.metrics")

__all__ = ["MAX_REASONS", "NodeMetrics", "reason_label"]

#: Distinct rejection reasons kept as labels; later new ones count as "other" (a hostile
#: peer must not be able to grow the metric set without bound).
MAX_REASONS = 32
_DURATIONS = (0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0, 30.0, 100.0)
_NUMBER = re.compile(r"-?\d+(?:\.\d+)?(?:e[-+]?\d+)?")


def reason_label(text: str) -> str:
    """A rejection reason as a low-cardinality label: numbers become N, at most 64 chars
    ("round 7 is 3 ahead" and "round 9 is 2 ahead" are one reason)."""
    return _NUMBER.sub("N", text.strip().lower())[:64] or "unknown"


class NodeMetrics:
    """The metrics of one node, in their own registry."""

    def __init__(self, node_id: str, peers: Iterable[str], connected: Callable[[], int]) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self._peers = frozenset(peers)
        self._reasons: set[str] = set()
        self._lock = threading.Lock()  # observe runs on the loop, scrapes on a thread
        r = self.registry
        self.info = Gauge("p2pfl_node_info", "This node (value 1)", ["node"], registry=r)
        self.info.labels(node=node_id).set(1)
        self.round = Gauge("p2pfl_round", "The round the node is in", registry=r)
        self.rounds = Counter("p2pfl_rounds_completed", "Rounds completed", registry=r)
        self.round_seconds = Histogram(
            "p2pfl_round_duration_seconds", "Duration of a round", buckets=_DURATIONS, registry=r
        )
        self.train_seconds = Histogram(
            "p2pfl_train_duration_seconds",
            "Local training time per round",
            buckets=_DURATIONS,
            registry=r,
        )
        self.sent_bytes = Counter(
            "p2pfl_sent_bytes", "Parameter bytes sent, per neighbour", ["peer"], registry=r
        )
        self.compression = Gauge(
            "p2pfl_compression_info",
            "What the node sends (aggregation.compression; value 1)",
            ["compression"],
            registry=r,
        )
        self.keyframes = Counter(
            "p2pfl_keyframes_sent",
            "Compressed streams sent as whole copies (the neighbour's copy was not in step)",
            registry=r,
        )
        self.received_bytes = Counter(
            "p2pfl_received_bytes", "Parameter bytes received, per neighbour", ["peer"], registry=r
        )
        self.sent_messages = Counter(
            "p2pfl_sent_messages", "Parameter streams sent, per neighbour", ["peer"], registry=r
        )
        self.received_messages = Counter(
            "p2pfl_received_messages",
            "Parameter streams received, per neighbour",
            ["peer"],
            registry=r,
        )
        self.rejections = Counter(
            "p2pfl_rejections", "Messages and connections rejected", ["reason"], registry=r
        )
        self.handshake_failures = Counter(
            "p2pfl_handshake_failures", "Failed handshakes", registry=r
        )
        self.suspects = Counter(
            "p2pfl_suspect_events", "Suspect events, per neighbour", ["peer"], registry=r
        )
        self.silences = Counter(
            "p2pfl_link_suspicions",
            "Neighbours suspected by the failure detector (connected but silent), per neighbour",
            ["peer"],
            registry=r,
        )
        self.silent_phi = Gauge(
            "p2pfl_link_suspicion_phi",
            "The failure detector's level when it last suspected the neighbour",
            ["peer"],
            registry=r,
        )
        self.neighbours = Gauge(
            "p2pfl_connected_neighbours", "Neighbours with an open connection", registry=r
        )
        self.neighbours.set_function(lambda: float(connected()))
        self.accuracy = Gauge("p2pfl_validation_accuracy", "Latest eval accuracy", registry=r)
        self.r2 = Gauge("p2pfl_validation_r2", "Latest eval R^2 (regression)", registry=r)
        self.loss = Gauge("p2pfl_validation_loss", "Latest eval loss", registry=r)
        self.epsilon = Gauge("p2pfl_dp_epsilon", "Differential privacy spent so far", registry=r)
        self._server: Any = None

    def observe(self, event: dict[str, Any]) -> None:
        """Event-log listener: update the metrics from one event record."""
        kind = event.get("type")
        with self._lock:
            if kind == "round_start" and isinstance(event.get("round"), int):
                self.round.set(event["round"])
            elif kind == "node_start" and isinstance(event.get("compression"), str):
                self.compression.labels(compression=event["compression"]).set(1)
            elif kind == "round_end":
                self.rounds.inc()
                self._observe(self.round_seconds, event.get("duration_s"))
            elif kind == "train":
                self._observe(self.train_seconds, event.get("duration_s"))
                self._set(self.epsilon, event.get("dp_epsilon"))
            elif kind in ("send", "recv"):
                peer = self._peer(event.get("peer"))
                size = event.get("bytes")
                (self.sent_messages if kind == "send" else self.received_messages).labels(
                    peer=peer
                ).inc()
                if isinstance(size, int | float) and size >= 0:
                    (self.sent_bytes if kind == "send" else self.received_bytes).labels(
                        peer=peer
                    ).inc(size)
                if kind == "send" and event.get("keyframe") is True:
                    self.keyframes.inc()
            elif kind == "reject":
                self.rejections.labels(reason=self._reason(str(event.get("reason", "")))).inc()
            elif kind == "handshake_fail":
                self.handshake_failures.inc()
            elif kind == "suspect":
                self.suspects.labels(peer=self._peer(event.get("peer"))).inc()
            elif kind == "suspect_link":
                peer = self._peer(event.get("peer"))
                self.silences.labels(peer=peer).inc()
                self._set(self.silent_phi.labels(peer=peer), event.get("phi"))
            elif kind == "eval":
                self._set(self.accuracy, event.get("accuracy"))
                self._set(self.r2, event.get("r2"))
                self._set(self.loss, event.get("loss"))

    def serve(self, host: str, port: int) -> tuple[str, int]:
        """Serve ``/metrics`` from a daemon thread; returns the bound address. P2PFLError
        if it cannot listen there (the operator asked for metrics: say so, do not go on)."""
        try:
            server, _thread = start_http_server(port, addr=host, registry=self.registry)
        except OSError as exc:
            raise P2PFLError(
                f"--metrics {host}:{port}: cannot listen: {exc.strerror or exc}"
            ) from None
        if not _is_loopback(host):
            log.warning(
                "metrics on %s:%d are open to anyone who can reach that address (no "
                "authentication): they show rounds, traffic per peer and accuracy",
                host,
                port,
            )
        self._server = server
        bound = server.server_address
        return str(bound[0]), int(bound[1])

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def _peer(self, value: object) -> str:
        return value if isinstance(value, str) and value in self._peers else "unknown"

    def _reason(self, text: str) -> str:
        label = reason_label(text)
        if label not in self._reasons:
            if len(self._reasons) >= MAX_REASONS:
                return "other"
            self._reasons.add(label)
        return label

    @staticmethod
    def _observe(histogram: Histogram, value: object) -> None:
        if isinstance(value, int | float) and not isinstance(value, bool) and value >= 0:
            histogram.observe(value)

    @staticmethod
    def _set(gauge: Gauge, value: object) -> None:
        if isinstance(value, int | float) and not isinstance(value, bool):
            gauge.set(value)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False
