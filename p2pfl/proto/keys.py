"""Identity keys: private-key files, public-key encoding, and pairwise secrets.

The WireGuard model: every peer has one static X25519 key pair, the public half is listed
in ``peers.yaml`` (the roster is the access list), and the private half lives in a file
only its owner can read. Any two peers can derive a shared secret without a round trip:
secure aggregation's share boxes and view tags are keyed from it (``pairwise_secret``).
Channel keys come from the Noise IK handshake instead (``handshake``), and the masks from
per-round ephemeral keys (``secure.group``).
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import hmac
import os
import stat
from pathlib import Path

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from p2pfl.errors import KeyFileError

__all__ = [
    "KEY_BYTES",
    "PAIRWISE_SALT",
    "decode_public_key",
    "generate_key_file",
    "load_private_key",
    "pairwise_secret",
    "public_key_b64",
]

KEY_BYTES = 32
PAIRWISE_SALT = b"p2pfl/v1 pairwise"
# A key file holds 44 base64 characters and a newline; anything much bigger is not one.
_MAX_KEY_FILE_BYTES = 1024


def generate_key_file(path: str | os.PathLike[str]) -> str:
    """Create a new private-key file readable only by its owner (and any missing folders
    above it, 0700); return the public key (base64).

    The mode is set by ``os.open`` itself, so the key is never on disk with looser
    permissions (no chmod race), and ``O_EXCL`` refuses to overwrite an existing file: losing
    an identity key means editing ``peers.yaml`` on every peer.
    """
    shown = os.fspath(path)
    missing = [p for p in Path(path).parents if not p.exists()]
    try:  # (missing folders are made owner-only, as the key itself: outermost first)
        for folder in reversed(missing):
            folder.mkdir(mode=0o700, exist_ok=True)
    except OSError as exc:
        raise KeyFileError(f"cannot create the folder of key file {shown}: {exc.strerror}") from exc
    key = X25519PrivateKey.generate()
    content = base64.b64encode(key.private_bytes_raw()) + b"\n"
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags, 0o600)
    except FileExistsError:
        raise KeyFileError(
            f"{shown} already exists; refusing to overwrite a key file"
            " (move it away first if you really want a new identity)"
        ) from None
    except OSError as exc:
        raise KeyFileError(f"cannot create key file {shown}: {exc.strerror}") from exc
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(content)
            handle.flush()
            os.fsync(handle.fileno())
    except OSError as exc:
        # Never leave a half-written key behind: a later run would fail on it confusingly.
        with contextlib.suppress(OSError):
            os.unlink(path)
        raise KeyFileError(f"cannot write key file {shown}: {exc.strerror}") from exc
    return public_key_b64(key)


def load_private_key(path: str | os.PathLike[str]) -> X25519PrivateKey:
    """Read a private-key file, refusing one that group or others can read or write.

    Permissions are checked on the opened descriptor (``fstat``), so the file checked is
    the file read.
    """
    shown = os.fspath(path)
    try:
        # O_NONBLOCK: a FIFO planted at the path must not hang the node (checked below).
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise KeyFileError(
            f"private key file {shown} does not exist (create one with `p2pfl keygen`)"
        ) from None
    except OSError as exc:
        raise KeyFileError(f"cannot open private key file {shown}: {exc.strerror}") from exc
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise KeyFileError(f"private key file {shown} is not a regular file")
        if info.st_uid != os.geteuid():
            raise KeyFileError(
                f"private key file {shown} belongs to uid {info.st_uid}, not to this user"
                f" (uid {os.geteuid()}); the key's owner must run the node"
            )
        if info.st_mode & 0o077:
            raise KeyFileError(
                f"private key file {shown} is accessible by group or others"
                f" (mode {stat.S_IMODE(info.st_mode):04o}); run `chmod 600 {shown}`"
            )
        raw = _read_up_to(fd, _MAX_KEY_FILE_BYTES + 1)
    except OSError as exc:
        raise KeyFileError(f"cannot read private key file {shown}: {exc.strerror}") from exc
    finally:
        os.close(fd)
    if len(raw) > _MAX_KEY_FILE_BYTES:
        raise KeyFileError(f"private key file {shown} is too large to be a key file")
    try:
        secret = base64.b64decode(raw.strip(), validate=True)
    except (binascii.Error, ValueError):
        raise KeyFileError(
            f"private key file {shown} is malformed: expected one line of base64"
        ) from None
    if len(secret) != KEY_BYTES:
        raise KeyFileError(
            f"private key file {shown} is malformed: expected {KEY_BYTES} bytes of key,"
            f" got {len(secret)}"
        )
    return X25519PrivateKey.from_private_bytes(secret)


def public_key_b64(key: X25519PrivateKey | X25519PublicKey) -> str:
    """The standard base64 of the 32 raw public-key bytes, as written in ``peers.yaml``."""
    public = key.public_key() if isinstance(key, X25519PrivateKey) else key
    raw = public.public_bytes(Encoding.Raw, PublicFormat.Raw)
    return base64.b64encode(raw).decode("ascii")


def decode_public_key(text: str) -> bytes:
    """Raw 32 public-key bytes from base64; ValueError on bad base64 or wrong length.

    Only the canonical encoding is accepted, so one key has exactly one spelling.
    """
    if not isinstance(text, str):
        raise ValueError(f"expected a base64 string, got {type(text).__name__}")
    try:
        raw = base64.b64decode(text.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError):
        raise ValueError("not valid base64") from None
    if len(raw) != KEY_BYTES:
        raise ValueError(f"decodes to {len(raw)} bytes, expected {KEY_BYTES}")
    if base64.b64encode(raw).decode("ascii") != text:
        raise ValueError("not the canonical base64 spelling of the key")
    return raw


def pairwise_secret(
    own: X25519PrivateKey,
    their_public: bytes,
    *,
    network: str,
    own_id: str,
    their_id: str,
    purpose: bytes,
) -> bytes:
    """A 32-byte secret only ``own_id`` and ``their_id`` can derive, bound to a purpose.

    X25519, then HKDF-SHA256 (salt ``PAIRWISE_SALT``) with info = purpose, network and both
    ids in sorted order, each length-prefixed so no two different inputs share an encoding.
    Both sides get the same bytes; a different purpose or network gives an unrelated key, so
    a channel key can never double as a mask key or be reused in another consortium.
    """
    if len(their_public) != KEY_BYTES:
        raise ValueError(f"public key must be {KEY_BYTES} bytes, got {len(their_public)}")
    if not purpose:
        raise ValueError("purpose must not be empty")
    if own_id == their_id:
        raise ValueError(f"a pairwise secret needs two different peers, got {own_id!r} twice")
    try:
        shared = own.exchange(X25519PublicKey.from_public_bytes(their_public))
    except ValueError:
        # OpenSSL refuses the all-zero result itself; report it the same way as below.
        raise ValueError("peer public key is a low-order point (all-zero shared secret)") from None
    if hmac.compare_digest(shared, bytes(KEY_BYTES)):
        raise ValueError("peer public key is a low-order point (all-zero shared secret)")
    low, high = sorted((own_id, their_id))
    info = b"".join(
        _length_prefixed(part)
        for part in (purpose, network.encode("utf-8"), low.encode("utf-8"), high.encode("utf-8"))
    )
    kdf = HKDF(algorithm=hashes.SHA256(), length=KEY_BYTES, salt=PAIRWISE_SALT, info=info)
    return kdf.derive(shared)


def _read_up_to(fd: int, limit: int) -> bytes:
    chunks: list[bytes] = []
    size = 0
    while size < limit:
        chunk = os.read(fd, limit - size)
        if not chunk:
            break
        chunks.append(chunk)
        size += len(chunk)
    return b"".join(chunks)


def _length_prefixed(part: bytes) -> bytes:
    return len(part).to_bytes(4, "big") + part
