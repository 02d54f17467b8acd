"""The record layer: AES-256-GCM records with implicit per-direction counters, sans I/O.

Each record is a Noise transport message (nonce = 32 zero bits + 64-bit big-endian counter,
empty associated data) keyed by the handshake's split keys. The counter is never sent: the
receiver uses the next number it expects, so a replayed, reordered, dropped or tampered record
fails authentication. After one failure the channel refuses all further use.

One deviation from Noise: records may be larger than 65535 bytes (parameters travel as
256 KiB chunks: ~2 GB/s on loopback); the limit is ``max_record`` and is checked before decryption.
"""

from __future__ import annotations

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from p2pfl.errors import LocalProtocolError, RecordError
from p2pfl.proto.handshake import TAGLEN, SessionKeys, noise_nonce

#: Noise reserves 2**64 - 1; we stop well before.
MAX_COUNTER = 2**64 - 2


class Channel:
    """Encrypts outgoing and decrypts incoming records for one connection."""

    def __init__(self, keys: SessionKeys, *, max_plaintext: int) -> None:
        self._send = AESGCM(keys.send_key)
        self._recv = AESGCM(keys.recv_key)
        self._send_n = 0
        self._recv_n = 0
        self.max_plaintext = max_plaintext
        self.max_record = max_plaintext + TAGLEN
        self._broken = False

    def seal(self, plaintext: bytes | bytearray | memoryview) -> bytes:
        """Encrypt one record."""
        if len(plaintext) > self.max_plaintext:
            raise LocalProtocolError(
                f"record of {len(plaintext)} bytes exceeds {self.max_plaintext}"
            )
        if self._send_n > MAX_COUNTER:
            raise LocalProtocolError("send counter exhausted; reconnect")
        out = self._send.encrypt(noise_nonce(self._send_n), plaintext, None)
        self._send_n += 1
        return out

    def open(self, record: bytes | bytearray | memoryview) -> bytes:
        """Decrypt the next record, or raise RecordError (and refuse all later records)."""
        if self._broken:
            raise RecordError("channel already failed")
        if len(record) > self.max_record:
            self._broken = True
            raise RecordError(f"record of {len(record)} bytes exceeds limit {self.max_record}")
        if len(record) < TAGLEN:
            self._broken = True
            raise RecordError(f"record of {len(record)} bytes is shorter than its tag")
        if self._recv_n > MAX_COUNTER:
            self._broken = True
            raise RecordError("receive counter exhausted")
        try:
            out = self._recv.decrypt(noise_nonce(self._recv_n), record, None)
        except InvalidTag:
            self._broken = True
            raise RecordError(
                f"record {self._recv_n} failed authentication (tampered, replayed or reordered)"
            ) from None
        self._recv_n += 1
        return out
