"""The ``limits`` and ``net`` sections: a node's resource bounds (buffered rounds, chunk
size, connections, handshake time) and the timers of its links (heartbeats, reconnect
backoff, how long a vanished neighbour is waited for, the failure detector)."""

from __future__ import annotations

from p2pfl.config.fields import FieldReader
from p2pfl.config.schema import LimitsConfig, NetConfig

_MIN_CHUNK, _MAX_CHUNK = 4096, 4 * 1024 * 1024
_MAX_BUFFERED_ROUNDS = 16
_MAX_CONNECTIONS = 65535
#: phi beyond 15 is past double precision (a chance of 1e-15 per silence).
_MAX_PHI = 15.0


class LimitsReader(FieldReader):
    """The limits and net sections."""

    def limits(self, value: object) -> LimitsConfig:
        d = LimitsConfig()
        section = self.section(
            value,
            "limits",
            ("max_buffered_rounds", "chunk_bytes", "max_connections", "handshake_timeout"),
        )
        return LimitsConfig(
            max_buffered_rounds=self.integer(
                section.get("max_buffered_rounds", d.max_buffered_rounds),
                "limits.max_buffered_rounds",
                0,
                _MAX_BUFFERED_ROUNDS,
            ),
            chunk_bytes=self.integer(
                section.get("chunk_bytes", d.chunk_bytes),
                "limits.chunk_bytes",
                _MIN_CHUNK,
                _MAX_CHUNK,
            ),
            max_connections=self.integer(
                section.get("max_connections", d.max_connections),
                "limits.max_connections",
                0,
                _MAX_CONNECTIONS,
            ),
            handshake_timeout=self.seconds(
                section.get("handshake_timeout", d.handshake_timeout), "limits.handshake_timeout"
            ),
        )

    def net(self, value: object) -> NetConfig:
        d = NetConfig()
        section = self.section(
            value,
            "net",
            (
                "heartbeat_interval",
                "heartbeat_timeout",
                "reconnect_min",
                "reconnect_max",
                "down_grace",
                "keepalive",
                "suspect_phi",
                "suspect_pause",
            ),
        )

        def get(key: str, default: float) -> float:
            return self.seconds(section.get(key, default), f"net.{key}")

        result = NetConfig(
            heartbeat_interval=get("heartbeat_interval", d.heartbeat_interval),
            heartbeat_timeout=get("heartbeat_timeout", d.heartbeat_timeout),
            reconnect_min=get("reconnect_min", d.reconnect_min),
            reconnect_max=get("reconnect_max", d.reconnect_max),
            down_grace=get("down_grace", d.down_grace),
            keepalive=get("keepalive", d.keepalive),
            suspect_phi=self.positive(
                section.get("suspect_phi", d.suspect_phi), "net.suspect_phi", _MAX_PHI
            ),
            suspect_pause=get("suspect_pause", d.suspect_pause),
        )
        if result.keepalive >= result.heartbeat_timeout:
            self.fail(
                "net.keepalive",
                f"must be below heartbeat_timeout ({result.heartbeat_timeout:g}),"
                f" got {result.keepalive:g}",
            )
        if result.heartbeat_timeout <= result.heartbeat_interval:
            self.fail(
                "net.heartbeat_timeout",
                f"must be greater than heartbeat_interval ({result.heartbeat_interval:g}),"
                f" got {result.heartbeat_timeout:g}",
            )
        if result.reconnect_min > result.reconnect_max:
            self.fail(
                "net.reconnect_max",
                f"must be >= reconnect_min ({result.reconnect_min:g}),"
                f" got {result.reconnect_max:g}",
            )
        return result
