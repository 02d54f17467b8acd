"""Tests for p2pfl.proto.keys: key files, public-key encoding, pairwise secrets."""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import stat
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from hypothesis import given, settings
from hypothesis import strategies as st

from p2pfl.errors import KeyFileError
from p2pfl.proto.keys import (
    PAIRWISE_SALT,
    decode_public_key,
    generate_key_file,
    load_private_key,
    pairwise_secret,
    public_key_b64,
)

# -------------------------------------------------------------------------- key files


def test_generated_key_file_is_owner_only_and_loads(tmp_path: Path) -> None:
    path = tmp_path / "alice.key"
    public = generate_key_file(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    content = path.read_bytes()
    assert content.endswith(b"\n")
    assert len(base64.b64decode(content.strip(), validate=True)) == 32
    key = load_private_key(path)
    assert public_key_b64(key) == public
    assert len(decode_public_key(public)) == 32


def test_mode_is_set_at_creation_even_with_permissive_umask(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        path = tmp_path / "k"
        generate_key_file(str(path))
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_each_generated_key_is_new(tmp_path: Path) -> None:
    first = generate_key_file(tmp_path / "a")
    second = generate_key_file(tmp_path / "b")
    assert first != second


def test_overwrite_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "alice.key"
    public = generate_key_file(path)
    before = path.read_bytes()
    with pytest.raises(KeyFileError, match="already exists") as caught:
        generate_key_file(path)
    assert str(path) in str(caught.value)
    assert path.read_bytes() == before
    assert public_key_b64(load_private_key(path)) == public


def test_generate_into_a_missing_folder_makes_it(tmp_path: Path) -> None:
    path = tmp_path / "missing" / "k"
    generate_key_file(path)
    assert path.exists() and (path.parent.stat().st_mode & 0o777) == 0o700


def test_generate_under_a_file_is_a_key_file_error(tmp_path: Path) -> None:
    (tmp_path / "plain").write_text("not a folder")
    with pytest.raises(KeyFileError, match="cannot create the folder of key file"):
        generate_key_file(tmp_path / "plain" / "sub" / "k")


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o620, 0o602, 0o644, 0o660, 0o666, 0o700 | 0o007])
def test_group_or_world_access_is_refused(tmp_path: Path, mode: int) -> None:
    path = tmp_path / "alice.key"
    generate_key_file(path)
    path.chmod(mode)
    with pytest.raises(KeyFileError) as caught:
        load_private_key(path)
    message = str(caught.value)
    assert str(path) in message
    assert f"mode {mode:04o}" in message
    assert f"chmod 600 {path}" in message


def test_owner_only_modes_load(tmp_path: Path) -> None:
    path = tmp_path / "alice.key"
    generate_key_file(path)
    path.chmod(0o400)
    load_private_key(path)


def test_missing_key_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.key"
    with pytest.raises(KeyFileError, match="does not exist") as caught:
        load_private_key(path)
    assert str(path) in str(caught.value)
    assert "p2pfl keygen" in str(caught.value)


def write_secret(path: Path, content: bytes) -> Path:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(content)
    return path


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        (b"", "expected 32 bytes of key, got 0"),
        (b"not base64 at all!\n", "expected one line of base64"),
        (base64.b64encode(bytes(16)) + b"\n", "expected 32 bytes of key, got 16"),
        (base64.b64encode(bytes(33)), "expected 32 bytes of key, got 33"),
        (b"\xff\xfe\n", "expected one line of base64"),
        (b"A" * 5000, "too large"),
    ],
)
def test_malformed_key_file(tmp_path: Path, content: bytes, problem: str) -> None:
    path = write_secret(tmp_path / "bad.key", content)
    with pytest.raises(KeyFileError, match=r"malformed|too large") as caught:
        load_private_key(path)
    assert problem in str(caught.value)
    assert str(path) in str(caught.value)


def test_key_file_without_trailing_newline_loads(tmp_path: Path) -> None:
    key = X25519PrivateKey.generate()
    path = write_secret(tmp_path / "k", base64.b64encode(key.private_bytes_raw()))
    assert public_key_b64(load_private_key(path)) == public_key_b64(key)


def test_directory_is_not_a_key_file(tmp_path: Path) -> None:
    directory = tmp_path / "dir"
    directory.mkdir(mode=0o700)
    with pytest.raises(KeyFileError, match="not a regular file"):
        load_private_key(directory)


# ----------------------------------------------------------------------- public keys


def test_public_key_b64_accepts_private_or_public() -> None:
    key = X25519PrivateKey.generate()
    assert public_key_b64(key) == public_key_b64(key.public_key())
    assert base64.b64decode(public_key_b64(key)) == key.public_key().public_bytes_raw()
    assert len(public_key_b64(key)) == 44


def test_decode_public_key_round_trip() -> None:
    key = X25519PrivateKey.generate().public_key()
    assert decode_public_key(public_key_b64(key)) == key.public_bytes_raw()


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("", "decodes to 0 bytes"),
        ("!!!!", "not valid base64"),
        ("AAAA AAAA", "not valid base64"),
        ("é" * 44, "not valid base64"),
        (base64.b64encode(bytes(31)).decode(), "decodes to 31 bytes, expected 32"),
        (base64.b64encode(bytes(32)).decode() + "\n", "not valid base64"),
        (base64.b64encode(bytes(32)).decode().rstrip("="), "not valid base64"),
        # Same bytes as "AAA...A=" but with the two spare bits set: not canonical.
        ("A" * 42 + "B=", "canonical"),
    ],
)
def test_decode_public_key_rejects(text: str, problem: str) -> None:
    with pytest.raises(ValueError, match=problem):
        decode_public_key(text)


# ------------------------------------------------------------------ pairwise secrets


def secret(
    own: X25519PrivateKey,
    their: X25519PrivateKey,
    *,
    network: str = "net",
    own_id: str = "alice",
    their_id: str = "bob",
    purpose: bytes = b"channel",
) -> bytes:
    return pairwise_secret(
        own,
        their.public_key().public_bytes_raw(),
        network=network,
        own_id=own_id,
        their_id=their_id,
        purpose=purpose,
    )


def test_pairwise_secret_is_symmetric() -> None:
    a, b = X25519PrivateKey.generate(), X25519PrivateKey.generate()
    ab = secret(a, b, own_id="alice", their_id="bob")
    ba = secret(b, a, own_id="bob", their_id="alice")
    assert ab == ba
    assert len(ab) == 32


@settings(max_examples=25, deadline=None)
@given(
    network=st.text(min_size=1, max_size=20),
    ids=st.lists(st.text(min_size=1, max_size=10), min_size=2, max_size=2, unique=True),
    purpose=st.binary(min_size=1, max_size=16),
)
def test_pairwise_secret_symmetric_property(network: str, ids: list[str], purpose: bytes) -> None:
    a, b = X25519PrivateKey.generate(), X25519PrivateKey.generate()
    one = secret(a, b, network=network, own_id=ids[0], their_id=ids[1], purpose=purpose)
    two = secret(b, a, network=network, own_id=ids[1], their_id=ids[0], purpose=purpose)
    assert one == two


def test_purposes_networks_and_pairs_are_separated() -> None:
    a, b, c = (X25519PrivateKey.generate() for _ in range(3))
    reference = secret(a, b)
    assert secret(a, b, purpose=b"masks") != reference
    assert secret(a, b, network="other") != reference
    assert secret(a, b, own_id="alice", their_id="bobby") != reference
    assert secret(a, c) != reference


def test_length_prefixes_make_fields_unambiguous() -> None:
    a, b = X25519PrivateKey.generate(), X25519PrivateKey.generate()
    # Without length prefixes both would hash the info bytes b"abcalicebob".
    first = secret(a, b, purpose=b"ab", network="c")
    second = secret(a, b, purpose=b"a", network="bc")
    assert first != second
    third = secret(a, b, network="n", own_id="ab", their_id="c")
    fourth = secret(a, b, network="n", own_id="a", their_id="bc")
    assert third != fourth


def hkdf_sha256(ikm: bytes, salt: bytes, info: bytes) -> bytes:
    """RFC 5869 written out with hmac, as an independent check of the derivation."""
    prk = hmac.new(salt, ikm, hashlib.sha256).digest()
    return hmac.new(prk, info + b"\x01", hashlib.sha256).digest()


def test_derivation_matches_documented_construction() -> None:
    a, b = X25519PrivateKey.generate(), X25519PrivateKey.generate()
    shared = a.exchange(b.public_key())

    def field(data: bytes) -> bytes:
        return len(data).to_bytes(4, "big") + data

    info = field(b"channel") + field(b"net") + field(b"alice") + field(b"bob")
    expected = hkdf_sha256(shared, b"p2pfl/v1 pairwise", info)
    assert PAIRWISE_SALT == b"p2pfl/v1 pairwise"
    assert secret(a, b, own_id="bob", their_id="alice") == expected
    assert expected != shared


@pytest.mark.parametrize(
    "low_order",
    [
        bytes(32),
        (1).to_bytes(32, "little"),
        bytes.fromhex("e0eb7a7c3b41b8ae1656e3faf19fc46ada098deb9c32b1fd866205165f49b800"),
    ],
)
def test_low_order_public_key_is_rejected(low_order: bytes) -> None:
    with pytest.raises(ValueError, match="low-order"):
        pairwise_secret(
            X25519PrivateKey.generate(),
            low_order,
            network="n",
            own_id="a",
            their_id="b",
            purpose=b"channel",
        )


def test_bad_arguments_are_rejected() -> None:
    a = X25519PrivateKey.generate()
    public = X25519PrivateKey.generate().public_key().public_bytes_raw()
    with pytest.raises(ValueError, match="32 bytes"):
        pairwise_secret(a, public[:31], network="n", own_id="a", their_id="b", purpose=b"p")
    with pytest.raises(ValueError, match="two different peers"):
        pairwise_secret(a, public, network="n", own_id="a", their_id="a", purpose=b"p")
    with pytest.raises(ValueError, match="purpose"):
        pairwise_secret(a, public, network="n", own_id="a", their_id="b", purpose=b"")


def test_public_key_object_round_trip() -> None:
    raw = X25519PrivateKey.generate().public_key().public_bytes_raw()
    key = X25519PublicKey.from_public_bytes(decode_public_key(base64.b64encode(raw).decode()))
    assert key.public_bytes_raw() == raw


def test_key_file_of_another_owner_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "other.key"
    generate_key_file(path)
    if os.geteuid() != 0:
        pytest.skip("changing a file's owner needs root")
    os.chown(path, 65534, 65534)
    with pytest.raises(KeyFileError, match="belongs to uid 65534"):
        load_private_key(path)


def test_fifo_at_the_key_path_does_not_hang(tmp_path: Path) -> None:
    path = tmp_path / "fifo.key"
    os.mkfifo(path, 0o600)
    with pytest.raises(KeyFileError, match="not a regular file"):
        load_private_key(path)
