"""Noise IK handshake (Noise_IK_25519_AESGCM_SHA256), sans I/O.

Why IK: the initiator knows the responder's static key from ``peers.yaml`` and sends its own
static key encrypted in the first message, so an eavesdropper learns neither identity and the
responder can name an unknown key precisely. Both ephemeral and static keys are mixed in, so
every connection gets fresh session keys (forward secrecy, no cross-session replay).

This follows revision 34 of the Noise specification literally (names like ``mix_key`` are the
spec's). It is checked against the independent ``noiseprotocol`` package in the tests.

    IK:
      <- s
      ...
      -> e, es, s, ss
      <- e, ee, se

The handshake object only turns bytes into bytes; ``p2pfl.daemon.net`` moves them.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass, field

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from p2pfl.errors import HandshakeError, LocalProtocolError

PROTOCOL_NAME = b"Noise_IK_25519_AESGCM_SHA256"
DHLEN = 32
HASHLEN = 32
TAGLEN = 16
#: Largest first handshake message a responder accepts (from anyone: it is read before
#: the sender is known); ours are far smaller. Checked before any crypto.
MAX_HANDSHAKE_MESSAGE = 1024
#: Largest second message an initiator accepts (from the address it dialled): a REPLY
#: that names the fields of a config that differs (``wire.MAX_REPLY_PAYLOAD``) fits.
MAX_REPLY_MESSAGE = 8192


def _public_bytes(key: X25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)


def _dh(private: X25519PrivateKey, public: bytes) -> bytes:
    try:
        return private.exchange(X25519PublicKey.from_public_bytes(public))
    except ValueError as exc:  # low-order point: all-zero shared secret
        raise HandshakeError("invalid public key in handshake") from exc


def _hmac(key: bytes, data: bytes) -> bytes:
    return hmac.new(key, data, hashlib.sha256).digest()


def _hkdf2(chaining_key: bytes, ikm: bytes) -> tuple[bytes, bytes]:
    temp_key = _hmac(chaining_key, ikm)
    out1 = _hmac(temp_key, b"\x01")
    out2 = _hmac(temp_key, out1 + b"\x02")
    return out1, out2


def noise_nonce(n: int) -> bytes:
    """The Noise AESGCM nonce: 32 zero bits then the 64-bit counter, big-endian."""
    return b"\x00\x00\x00\x00" + n.to_bytes(8, "big")


class _CipherState:
    def __init__(self) -> None:
        self.key: bytes | None = None
        self.aead: AESGCM | None = None
        self.n = 0

    def initialize_key(self, key: bytes) -> None:
        self.key = key
        self.aead = AESGCM(key)
        self.n = 0

    def encrypt_with_ad(self, ad: bytes, plaintext: bytes) -> bytes:
        if self.aead is None:
            return plaintext
        out = self.aead.encrypt(noise_nonce(self.n), plaintext, ad)
        self.n += 1
        return out

    def decrypt_with_ad(self, ad: bytes, ciphertext: bytes) -> bytes:
        if self.aead is None:
            return ciphertext
        try:
            out = self.aead.decrypt(noise_nonce(self.n), ciphertext, ad)
        except InvalidTag as exc:
            raise HandshakeError("handshake message failed authentication") from exc
        self.n += 1
        return out


class _SymmetricState:
    def __init__(self, protocol_name: bytes) -> None:
        if len(protocol_name) <= HASHLEN:
            self.h = protocol_name.ljust(HASHLEN, b"\x00")
        else:
            self.h = hashlib.sha256(protocol_name).digest()
        self.ck = self.h
        self.cipher = _CipherState()

    def mix_key(self, ikm: bytes) -> None:
        self.ck, temp_k = _hkdf2(self.ck, ikm)
        self.cipher.initialize_key(temp_k)

    def mix_hash(self, data: bytes) -> None:
        self.h = hashlib.sha256(self.h + data).digest()

    def encrypt_and_hash(self, plaintext: bytes) -> bytes:
        ciphertext = self.cipher.encrypt_with_ad(self.h, plaintext)
        self.mix_hash(ciphertext)
        return ciphertext

    def decrypt_and_hash(self, ciphertext: bytes) -> bytes:
        plaintext = self.cipher.decrypt_with_ad(self.h, ciphertext)
        self.mix_hash(ciphertext)
        return plaintext

    def split(self) -> tuple[bytes, bytes]:
        return _hkdf2(self.ck, b"")


@dataclass(frozen=True)
class SessionKeys:
    """Keys for the record layer: one per direction, plus the handshake hash (channel binding)."""

    send_key: bytes = field(repr=False)
    recv_key: bytes = field(repr=False)
    handshake_hash: bytes


class IKHandshake:
    """One side of a Noise IK handshake. Two messages: initiator writes, responder writes."""

    def __init__(
        self,
        *,
        initiator: bool,
        static: X25519PrivateKey,
        prologue: bytes,
        remote_static: bytes | None = None,
        ephemeral: X25519PrivateKey | None = None,
    ) -> None:
        if initiator and remote_static is None:
            raise LocalProtocolError("an IK initiator must know the responder's static key")
        self.initiator = initiator
        self._s = static
        self._e = ephemeral
        self._rs = remote_static
        self._re: bytes | None = None
        self._ss = _SymmetricState(PROTOCOL_NAME)
        self._ss.mix_hash(prologue)
        # Pre-message pattern "<- s": both sides hash the responder's static key.
        responder_static = remote_static if remote_static is not None and initiator else None
        self._ss.mix_hash(responder_static or _public_bytes(static))
        self._step = 0
        self._keys: SessionKeys | None = None

    @property
    def remote_static(self) -> bytes:
        """The peer's static public key (known after the first message on the responder)."""
        if self._rs is None:
            raise LocalProtocolError("remote static key not known yet")
        return self._rs

    @property
    def complete(self) -> bool:
        return self._keys is not None

    def session_keys(self) -> SessionKeys:
        if self._keys is None:
            raise LocalProtocolError("handshake not complete")
        return self._keys

    def _new_ephemeral(self) -> bytes:
        if self._e is None:
            self._e = X25519PrivateKey.generate()
        e_pub = _public_bytes(self._e)
        self._ss.mix_hash(e_pub)
        return e_pub

    def write_message(self, payload: bytes) -> bytes:
        """Produce the next handshake message carrying ``payload``."""
        ss = self._ss
        if self.initiator and self._step == 0:
            assert self._rs is not None
            e_pub = self._new_ephemeral()
            assert self._e is not None
            ss.mix_key(_dh(self._e, self._rs))  # es
            enc_s = ss.encrypt_and_hash(_public_bytes(self._s))  # s
            ss.mix_key(_dh(self._s, self._rs))  # ss
            out = e_pub + enc_s + ss.encrypt_and_hash(payload)
            self._step = 1
            return out
        if not self.initiator and self._step == 1:
            assert self._re is not None and self._rs is not None
            e_pub = self._new_ephemeral()
            assert self._e is not None
            ss.mix_key(_dh(self._e, self._re))  # ee
            ss.mix_key(_dh(self._e, self._rs))  # se
            out = e_pub + ss.encrypt_and_hash(payload)
            self._finish()
            return out
        raise LocalProtocolError("write_message called out of turn")

    def read_message(self, message: bytes | bytearray | memoryview) -> bytes:
        """Consume the peer's next handshake message; return its payload.

        Raises HandshakeError on anything malformed or unauthenticated.
        """
        limit = MAX_REPLY_MESSAGE if self.initiator else MAX_HANDSHAKE_MESSAGE
        if len(message) > limit:
            raise HandshakeError(f"handshake message too large ({len(message)} bytes)")
        message = bytes(message)  # accept any bytes-like input
        ss = self._ss
        if not self.initiator and self._step == 0:
            if len(message) < DHLEN + DHLEN + TAGLEN + TAGLEN:
                raise HandshakeError(f"handshake message too short ({len(message)} bytes)")
            self._re = message[:DHLEN]
            ss.mix_hash(self._re)
            ss.mix_key(_dh(self._s, self._re))  # es
            self._rs = ss.decrypt_and_hash(message[DHLEN : DHLEN * 2 + TAGLEN])  # s
            ss.mix_key(_dh(self._s, self._rs))  # ss
            payload = ss.decrypt_and_hash(message[DHLEN * 2 + TAGLEN :])
            self._step = 1
            return payload
        if self.initiator and self._step == 1:
            if len(message) < DHLEN + TAGLEN:
                raise HandshakeError(f"handshake message too short ({len(message)} bytes)")
            assert self._e is not None
            self._re = message[:DHLEN]
            ss.mix_hash(self._re)
            ss.mix_key(_dh(self._e, self._re))  # ee
            ss.mix_key(_dh(self._s, self._re))  # se
            payload = ss.decrypt_and_hash(message[DHLEN:])
            self._finish()
            return payload
        raise LocalProtocolError("read_message called out of turn")

    def _finish(self) -> None:
        k1, k2 = self._ss.split()  # k1: initiator -> responder
        send, recv = (k1, k2) if self.initiator else (k2, k1)
        self._keys = SessionKeys(send_key=send, recv_key=recv, handshake_hash=self._ss.h)
        self._step = 2
        # Handshake secrets are no longer needed.
        self._e = None
