"""Malformed local files (checkpoint, data, peers.yaml) end in our error, never a traceback.

Each loader gets a valid file of its kind, mutated (bytes flipped, cut, inserted; for YAML
also values replaced by what PyYAML cannot build), and may only succeed or raise a
``P2PFLError`` naming the file: the CLI then exits with code 2 and the operator reads
which file is wrong. The explicit cases are the ones a security review found; each
raised a bare Python exception (MemoryError, OverflowError, ValueError...) before.
"""

from __future__ import annotations

import io
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from numpy.lib import format as npy_format

from p2pfl.cli import main
from p2pfl.config import load_config
from p2pfl.errors import ConfigError, DataError
from p2pfl.learning import load_dataset
from p2pfl.store.checkpoint import CHECKPOINT_NAME, Checkpoint, CheckpointError, load_checkpoint
from p2pfl.store.checkpoint import save_checkpoint as save
from p2pfl.store.npzwrite import write_npz

from .test_config import base

FUZZ = settings(
    max_examples=250,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
SIZE = 50
DIGEST = bytes(range(32))
TIB = 2**40


# --- valid files and their mutations ------------------------------------------------------


def valid_checkpoint(tmp_path: Path) -> bytes:
    """A checkpoint as a node writes it (save_checkpoint), read back as bytes."""
    state = tmp_path / "valid-state"
    state.mkdir(exist_ok=True)
    params = np.linspace(-1.0, 1.0, SIZE, dtype=np.float32)
    save(state, Checkpoint(3, params, 17, DIGEST, dp_releases=4))
    return (state / CHECKPOINT_NAME).read_bytes()


def valid_data(*, compressed: bool) -> bytes:
    """A node's data file as the harness and ``prepare`` write it (np.savez)."""
    rng = np.random.default_rng(0)
    arrays = {
        "x": rng.uniform(0.0, 16.0, (12, 8)),
        "y": np.arange(12) % 3,
        "x_val": rng.uniform(0.0, 16.0, (4, 8)),
        "y_val": np.arange(4) % 3,
    }
    out = io.BytesIO()
    (np.savez_compressed if compressed else np.savez)(out, **arrays)
    return out.getvalue()


def valid_yaml() -> str:
    return yaml.safe_dump(base(), sort_keys=False)


#: (kind, position, payload): position is taken modulo the length, or (kinds "zip" and
#: "npy") picks a ZIP header or .npy header, whose fields are then overwritten.
_EDITS = st.tuples(
    st.sampled_from(["flip", "set", "cut", "insert", "delete", "zip", "npy"]),
    st.integers(min_value=0, max_value=1 << 20),
    st.binary(min_size=1, max_size=8),
)
#: Where the fields worth hitting start: ZIP local and central headers, the end record,
#: and .npy headers (magic, version, header length, the dict with dtype and shape).
_HEADERS = {
    "zip": (b"PK\x03\x04", b"PK\x01\x02", b"PK\x05\x06"),
    "npy": (npy_format.MAGIC_PREFIX,),
}
_HEADER_SPAN = {"zip": 46, "npy": 128}


def header_starts(data: bytes | bytearray, kind: str) -> list[int]:
    starts = []
    for signature in _HEADERS[kind]:
        at = data.find(signature)
        while at >= 0:
            starts.append(at)
            at = data.find(signature, at + 1)
    return sorted(starts)


def mutate(data: bytes, edits: list[tuple[str, int, bytes]]) -> bytes:
    """``data`` after each edit in turn: a bit flipped, a byte set, the tail cut, bytes
    inserted or a few deleted, or bytes of a ZIP or .npy header overwritten."""
    out = bytearray(data)
    for kind, position, payload in edits:
        at = position % (len(out) + 1)
        if kind in _HEADERS:
            starts = header_starts(out, kind)
            if starts:
                at = starts[position % len(starts)] + payload[0] % _HEADER_SPAN[kind]
                text = payload[1:]
                if kind == "npy" and position % 2:  # digits and the like: other shapes
                    text = bytes(b"0123456789(), '<>fiuO"[b % 21] for b in text)
                out[at : at + len(text)] = text
        elif kind == "flip" and at < len(out):
            out[at] ^= 1 << (payload[0] % 8)
        elif kind == "set" and at < len(out):
            out[at] = payload[0]
        elif kind == "cut":
            del out[at:]
        elif kind == "insert":
            out[at:at] = payload
        elif kind == "delete":
            del out[at : at + payload[0] % 16 + 1]
    return bytes(out)


def npy_bomb(shape: tuple[int, ...], dtype: str = "<f4") -> bytes:
    """An .npy member that declares ``shape`` but holds 16 bytes."""
    out = io.BytesIO()
    npy_format.write_array_header_1_0(out, {"descr": dtype, "fortran_order": False, "shape": shape})
    return out.getvalue() + bytes(16)


def bomb_npz(path: Path, names: tuple[str, ...]) -> Path:
    """A few hundred bytes whose first array declares 4 TiB (numpy would allocate it)."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as archive:
        archive.writestr(f"{names[0]}.npy", npy_bomb((TIB,)))
        for name in names[1:]:
            archive.writestr(f"{name}.npy", npy_bomb((1,)))
    return path


# --- the checkpoint -------------------------------------------------------------------------


def load(state: Path) -> Checkpoint | None:
    return load_checkpoint(state, expected_digest=DIGEST, expected_size=SIZE)


def test_a_saved_checkpoint_loads_with_its_privacy_budget(tmp_path: Path) -> None:
    valid_checkpoint(tmp_path)
    loaded = load(tmp_path / "valid-state")
    assert loaded is not None
    assert (loaded.next_round, loaded.lamport, loaded.dp_releases) == (3, 17, 4)
    np.testing.assert_array_equal(loaded.params, np.linspace(-1, 1, SIZE, dtype=np.float32))


def test_a_checkpoint_of_an_earlier_version_loads_with_an_unknown_budget(tmp_path: Path) -> None:
    save(tmp_path, Checkpoint(3, np.zeros(SIZE, np.float32), 17, DIGEST))
    loaded = load(tmp_path)
    assert loaded is not None and loaded.dp_releases is None


@FUZZ
@given(edits=st.lists(_EDITS, min_size=1, max_size=4))
def test_a_mutated_checkpoint_loads_or_is_a_checkpoint_error(
    tmp_path: Path, edits: list[tuple[str, int, bytes]]
) -> None:
    state = tmp_path / "state"
    state.mkdir(exist_ok=True)
    (state / CHECKPOINT_NAME).write_bytes(mutate(valid_checkpoint(tmp_path), edits))
    try:
        loaded = load(state)
    except CheckpointError as exc:
        assert str(state / CHECKPOINT_NAME) in str(exc)
        return
    assert loaded is not None and loaded.params.shape == (SIZE,)
    assert loaded.params.dtype == np.float32 and len(loaded.digest) == 32
    assert loaded.next_round >= 0 and loaded.lamport >= 0


def test_a_tiny_checkpoint_declaring_4_tib_is_refused_before_allocating(tmp_path: Path) -> None:
    path = bomb_npz(tmp_path / CHECKPOINT_NAME, ("params", "next_round", "lamport", "digest"))
    assert path.stat().st_size < 1024
    with pytest.raises(CheckpointError, match="'params' declares shape") as info:
        load(tmp_path)
    assert str(path) in str(info.value)


def checkpoint_with(tmp_path: Path, **changes: Any) -> Path:
    """A checkpoint file whose fields are the valid ones with ``changes`` (None: absent)."""
    arrays: dict[str, Any] = {
        "params": np.zeros(SIZE, np.float32),
        "next_round": np.array(3, np.int64),
        "lamport": np.array(17, np.int64),
        "digest": np.frombuffer(DIGEST, np.uint8),
        "dp_releases": np.array(4, np.int64),
    }
    arrays.update(changes)
    with (tmp_path / CHECKPOINT_NAME).open("wb") as f:
        write_npz(f, {k: v for k, v in arrays.items() if v is not None})
    return tmp_path / CHECKPOINT_NAME


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"params": np.zeros((5, 10), np.float32)}, "params must be a 1-D float array"),
        ({"params": np.zeros(SIZE, np.int32)}, "params must be a 1-D float array"),
        ({"params": np.zeros(SIZE + 1, np.float32)}, "holds 51 parameters, the model has 50"),
        ({"params": np.full(SIZE, 1e300)}, "too large for float32"),
        ({"params": np.full(SIZE, np.nan, np.float32)}, "a NaN or infinite value"),
        ({"params": np.full(SIZE, -np.inf)}, "a NaN or infinite value"),
        ({"next_round": np.array(3.5)}, "next_round must be a single integer"),
        ({"lamport": np.array([1, 2])}, "lamport must be a single integer"),
        ({"lamport": np.array(-1)}, "lamport is -1"),
        ({"next_round": np.array(2**63 - 1)}, "next_round is 9223372036854775807"),
        ({"dp_releases": np.array(-4)}, "dp_releases is -4"),
        ({"dp_releases": np.array("four")}, "dp_releases must be a single integer"),
        ({"digest": np.zeros(31, np.uint8)}, "digest must be 32 bytes"),
        ({"digest": np.zeros(32, np.int64)}, "digest must be 32 bytes"),
        ({"digest": None}, "no field 'digest'"),
        ({"params": None}, "no field 'params'"),
    ],
)
def test_checkpoint_fields_are_checked(
    tmp_path: Path, changes: dict[str, Any], message: str
) -> None:
    path = checkpoint_with(tmp_path, **changes)
    with pytest.raises(CheckpointError, match=message) as info:
        load(tmp_path)
    assert str(path) in str(info.value)


def test_a_non_finite_model_is_refused_with_a_way_out(tmp_path: Path) -> None:
    """One NaN averaged in spreads to every neighbour: the node must not start from it."""
    params = np.zeros(SIZE, np.float32)
    params[7] = np.nan
    path = checkpoint_with(tmp_path, params=params)
    with pytest.raises(CheckpointError) as info:
        load(tmp_path)
    assert str(info.value) == (
        f"{path}: params hold a NaN or infinite value (at index 7); move {path} away to "
        "restart this node from the initial model"
    )


def with_raw_member(path: Path, name: str, data: bytes) -> Path:
    """``path`` with one more member, ``name``, holding ``data`` (no .npy header)."""
    with zipfile.ZipFile(path, "a", zipfile.ZIP_STORED) as archive:
        archive.writestr(name, data)
    return path


@pytest.mark.parametrize("field", ["dp_releases", "next_round"])
def test_a_raw_member_shadowing_a_field_is_refused(tmp_path: Path, field: str) -> None:
    """numpy's ``data[field]`` prefers a raw member ``field`` to the checked ``field.npy``
    and returns its bytes, which int() parses as text: the budget spent could be set to 0."""
    path = with_raw_member(checkpoint_with(tmp_path), field, b"0")
    with pytest.raises(CheckpointError, match=f"'{field}' appears twice") as info:
        load(tmp_path)
    assert str(path) in str(info.value)


@pytest.mark.parametrize(
    ("member", "data"),
    [
        ("next_round", b"3"),  # raw bytes instead of next_round.npy
        ("dp_releases.npy", b"0"),  # an .npy name without an .npy header: bytes to numpy
        ("next_round", None),  # an .npy array, but not under next_round.npy
    ],
    ids=["raw", "raw-under-npy-name", "array-without-npy-name"],
)
def test_a_field_that_is_not_an_npy_member_of_its_name_is_refused(
    tmp_path: Path, member: str, data: bytes | None
) -> None:
    field = member.removesuffix(".npy")
    path = checkpoint_with(tmp_path, **{field: None})
    if data is None:
        out = io.BytesIO()
        np.save(out, np.array(3, np.int64))
        data = out.getvalue()
    with_raw_member(path, member, data)
    with pytest.raises(CheckpointError, match=f"field '{field}' is not an .npy array") as info:
        load(tmp_path)
    assert str(path) in str(info.value)


def test_a_config_mismatch_under_dp_says_the_budget_restarts(tmp_path: Path) -> None:
    """Moving the state directory away is the way out of a digest mismatch; with
    differential privacy it also forgets the budget spent, and the message must say so."""
    checkpoint_with(tmp_path)
    other = bytes(32)
    for dp in (False, True):
        with pytest.raises(CheckpointError, match="move the state directory away") as info:
            load_checkpoint(tmp_path, expected_digest=other, expected_size=SIZE, dp=dp)
        assert ("restarts the privacy budget at 0" in str(info.value)) is dp


def test_a_checkpoint_that_is_no_archive_is_refused(tmp_path: Path) -> None:
    with (tmp_path / CHECKPOINT_NAME).open("wb") as f:
        np.save(f, np.zeros(SIZE, np.float32))
    with pytest.raises(CheckpointError, match=r"not an \.npz archive"):
        load(tmp_path)


# --- the data file --------------------------------------------------------------------------


@FUZZ
@given(
    compressed=st.booleans(),
    edits=st.lists(_EDITS, min_size=1, max_size=4),
)
def test_a_mutated_data_file_loads_or_is_a_data_error(
    tmp_path: Path, compressed: bool, edits: list[tuple[str, int, bytes]]
) -> None:
    path = tmp_path / "data.npz"
    path.write_bytes(mutate(valid_data(compressed=compressed), edits))
    try:
        data = load_dataset(path)
    except DataError as exc:
        assert str(path) in str(exc)
        return
    assert data.x.dtype == np.float32 and data.x.shape[0] == data.y.shape[0]


def test_a_300_byte_data_file_declaring_4_tib_is_refused_before_allocating(
    tmp_path: Path,
) -> None:
    path = bomb_npz(tmp_path / "data.npz", ("x",))
    assert path.stat().st_size <= 300
    with pytest.raises(DataError, match="array 'x' declares shape") as info:
        load_dataset(path)
    assert str(path) in str(info.value)


def test_a_compressed_member_claiming_more_than_deflate_gives_is_refused(tmp_path: Path) -> None:
    """A deflated member whose ZIP entry and .npy header both claim 4 TiB: only the
    compression ratio gives it away."""
    path = tmp_path / "data.npz"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("x.npy", npy_bomb((TIB,)))
    raw = bytearray(path.read_bytes())
    for signature, offset in ((b"PK\x03\x04", 22), (b"PK\x01\x02", 24)):
        at = raw.index(signature) + offset  # the uncompressed size of both headers
        raw[at : at + 4] = (0xFFFFFFF0).to_bytes(4, "little")
    path.write_bytes(bytes(raw))
    with pytest.raises(DataError, match=r"data\.npz.*claims 4294967280 bytes"):
        load_dataset(path)


def test_a_data_file_with_a_raw_member_shadowing_an_array_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "data.npz"
    path.write_bytes(valid_data(compressed=False))
    with_raw_member(path, "y", b"0")
    with pytest.raises(DataError, match="'y' appears twice") as info:
        load_dataset(path)
    assert str(path) in str(info.value)


@pytest.mark.parametrize(
    ("method", "message"),
    [(99, "compression method"), (zipfile.ZIP_STORED, "encrypted")],
    ids=["unknown compression (NotImplementedError)", "encrypted (RuntimeError)"],
)
def test_unreadable_members_are_data_errors(tmp_path: Path, method: int, message: str) -> None:
    path = tmp_path / "data.npz"
    path.write_bytes(valid_data(compressed=False))
    raw = bytearray(path.read_bytes())
    for signature, offset in ((b"PK\x03\x04", 6), (b"PK\x01\x02", 8)):
        at = raw.index(signature) + offset
        if method == zipfile.ZIP_STORED:  # the "encrypted" flag
            raw[at] |= 1
        else:  # the compression method
            raw[at + 2 : at + 4] = method.to_bytes(2, "little")
    path.write_bytes(bytes(raw))
    with pytest.raises(DataError, match=message) as info:
        load_dataset(path)
    assert str(path) in str(info.value)


# --- peers.yaml -----------------------------------------------------------------------------

#: Values PyYAML cannot build, or that no float or JSON can hold.
NASTY = [
    "1" + "0" * 400,
    "1" * 4400,
    "0x" + "f" * 4000,
    "1" + ":59" * 3000,
    "!!int abc",
    "!!float abc",
    "!!bool maybe",
    "!!timestamp x",
    "2024-13-45",
    "!!binary ===",
    "1e400",
    "-.inf",
    ".nan",
    "*nowhere",
    "&a [*a]",
    "!!set {a}",
    "!!omap [a]",
    "[]",
    "{}",
    "~",
    "'text'",
    "[1" + "0" * 400 + "]",
    "{1" + "0" * 400 + ": 1}",
]


def replace_value(text: str, line_index: int, value: str) -> str:
    """``text`` with the value of one ``key: value`` line replaced by ``value``."""
    lines = text.splitlines()
    candidates = [i for i, line in enumerate(lines) if ": " in line]
    i = candidates[line_index % len(candidates)]
    key = lines[i].split(": ", 1)[0]
    lines[i] = f"{key}: {value}"
    return "\n".join(lines) + "\n"


def check_config(path: Path) -> None:
    try:
        load_config(path)
    except ConfigError as exc:
        assert exc.file == str(path) and exc.field and exc.problem
        assert str(path) in str(exc)


@FUZZ
@given(
    replacements=st.lists(
        st.tuples(st.integers(0, 200), st.sampled_from(NASTY) | st.text(max_size=12)),
        min_size=1,
        max_size=3,
    ),
    edits=st.lists(_EDITS, max_size=2),
)
def test_a_mutated_peers_yaml_loads_or_is_a_config_error(
    tmp_path: Path, replacements: list[tuple[int, str]], edits: list[tuple[str, int, bytes]]
) -> None:
    text = valid_yaml()
    for line_index, value in replacements:
        text = replace_value(text, line_index, value)
    path = tmp_path / "peers.yaml"
    path.write_bytes(mutate(text.encode(), edits))
    check_config(path)


def config_with(tmp_path: Path, old: str, new: str) -> Path:
    text = valid_yaml()
    assert old in text
    path = tmp_path / "peers.yaml"
    path.write_text(text.replace(old, new, 1), encoding="utf-8")
    return path


#: A learning rate written with 400 digits (float() of it raises OverflowError).
HUGE_LEARNING_RATE = ("  rounds: 5\n", "  rounds: 5\n  learning_rate: 1" + "0" * 400 + "\n")


def test_a_400_digit_learning_rate_is_a_config_error(tmp_path: Path) -> None:
    path = config_with(tmp_path, *HUGE_LEARNING_RATE)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert (info.value.file, info.value.field) == (str(path), "training.learning_rate")
    assert info.value.problem.endswith("is not a valid YAML int (longer than 100 characters)")


def test_an_integer_of_more_than_4300_digits_is_a_config_error(tmp_path: Path) -> None:
    path = config_with(tmp_path, "seed: 3", "seed: 1" + "0" * 4400)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert (info.value.file, info.value.field) == (str(path), "seed")
    assert info.value.problem.startswith("line 3, column 7: '1000")
    assert info.value.problem.endswith("(longer than 100 characters)")


def test_a_megabyte_base_60_number_is_refused_before_it_is_built(tmp_path: Path) -> None:
    """PyYAML builds a base-60 number in time quadratic in its length: this file took some
    40 s of CPU before it was refused. Now it costs what scanning 1 MiB of YAML does."""
    text = valid_yaml()
    digits = "1" + ":0" * (((1 << 20) - len(text) - 8) // 2)
    path = config_with(tmp_path, "seed: 3", f"seed: {digits}")
    assert (1 << 20) - 64 < path.stat().st_size <= 1 << 20
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert (info.value.file, info.value.field) == (str(path), "seed")
    assert info.value.problem.startswith("line 3, column 7: '1:0:0:0")


@pytest.mark.parametrize(
    ("old", "new", "field"),
    [
        ("classes: 10", "classes: 10\n    hidden: [1:0]", "training.model.hidden[0]"),
        ("rounds: 5", "rounds: 1:05", "training.rounds"),
        ("rounds: 5", "rounds: 5\n  learning_rate: 0:0.5", "training.learning_rate"),
        ("seed: 3", "seed: !!int 1:0", "seed"),
    ],
)
def test_a_base_60_number_is_refused(tmp_path: Path, old: str, new: str, field: str) -> None:
    """YAML 1.1 reads ``1:0`` as 60 and ``1:05`` as 65: a typo must not become a setting."""
    path = config_with(tmp_path, old, new)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert (info.value.file, info.value.field) == (str(path), field)
    assert info.value.problem.endswith("(base-60 numbers are refused: quote it if it is text)")


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        ("!!int abc", "'abc' is not a valid YAML int (invalid literal for int() with base 10: "),
        ("!!timestamp x", "'x' is not a valid YAML timestamp"),
        ("2024-13-45", "'2024-13-45' is not a valid YAML timestamp (month must be in 1..12)"),
    ],
)
def test_a_value_yaml_cannot_build_is_a_config_error(
    tmp_path: Path, value: str, problem: str
) -> None:
    path = config_with(tmp_path, "seed: 3", f"seed: {value}")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert (info.value.file, info.value.field) == (str(path), "seed")
    assert info.value.problem.startswith(f"line 3, column 7: {problem}")


def test_a_huge_integer_with_no_bound_of_its_own_is_refused(tmp_path: Path) -> None:
    """training.rounds has no upper bound of its own; the digest's JSON holds int64."""
    path = config_with(tmp_path, "rounds: 5", "rounds: 0x" + "f" * 90)
    with pytest.raises(ConfigError, match="at most 2\\*\\*63 - 1, got an integer of about"):
        load_config(path)
    largest_seed = config_with(tmp_path, "seed: 3", f"seed: {2**64 - 1}")  # its own bound
    assert load_config(largest_seed).seed == 2**64 - 1


def test_p2pfl_check_of_a_bad_peers_yaml_exits_2_naming_the_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = config_with(tmp_path, *HUGE_LEARNING_RATE)
    assert main(["check", str(path)]) == 2
    err = capsys.readouterr().err
    assert f"{path}: training.learning_rate:" in err and "Traceback" not in err
