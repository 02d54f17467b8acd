"""The one exception tree of p2pfl.

Errors say whose fault they are (the h11 habit): a ``RemoteProtocolError`` is the peer's
fault and becomes a logged rejection plus a closed connection, never a crashed node;
a ``ConfigError`` or ``KeyFileError`` is the operator's and stops the node before it starts.
"""

from __future__ import annotations


class P2PFLError(Exception):
    """Base class of every error p2pfl raises on purpose."""


class ConfigError(P2PFLError, ValueError):
    """A configuration file is invalid. The message names the file, the field path and the fault."""

    def __init__(self, file: str, field: str, problem: str) -> None:
        self.file = file
        self.field = field
        self.problem = problem
        super().__init__(f"{file}: {field}: {problem}")


class KeyFileError(P2PFLError, ValueError):
    """A private-key file is missing, malformed, or readable by others."""


class DataError(P2PFLError, ValueError):
    """A node's local data file is missing or malformed."""


class ListenError(P2PFLError, OSError):
    """A node cannot listen where it was told to (a port in use, an address not ours)."""


class RemoteProtocolError(P2PFLError):
    """The remote peer broke the protocol; the connection is closed and the event logged."""


class HandshakeError(RemoteProtocolError):
    """The authenticated key exchange failed (unknown key, bad message, digest mismatch)."""


class DigestMismatch(HandshakeError):
    """Both ends authenticated but their shared configuration differs (in ``fields``, when
    the other end said which)."""

    def __init__(self, ours: str, theirs: str, fields: tuple[str, ...] = ()) -> None:
        self.ours = ours
        self.theirs = theirs
        self.fields = fields
        where = f"; peers.yaml differs in {', '.join(fields)}" if fields else ""
        super().__init__(f"config digest mismatch: ours {ours}, theirs {theirs}{where}")


class RecordError(RemoteProtocolError):
    """A record failed authentication: tampered, replayed, reordered or truncated."""


class MessageError(RemoteProtocolError):
    """A decrypted message is malformed or breaks a limit."""


class SecureAggregationError(P2PFLError, ValueError):
    """A secure-aggregation step cannot go on: a share box that does not open, shares that
    disagree, too few members left to stay private. The round goes on without that step
    (the owner keeps its own model, or the member does not contribute), and the event is
    logged; the connection stays (the fault may lie with a peer two hops away)."""


class LocalProtocolError(P2PFLError, AssertionError):
    """This process misused the protocol API (a bug in p2pfl, not the peer's fault)."""
