"""The state directory is private to the node's user, also when it was made loose."""

from __future__ import annotations

import os
import stat
from collections.abc import Callable
from pathlib import Path

import pytest

from p2pfl.daemon.secure_exchange import JOURNAL
from p2pfl.daemon.statedir import NODE_FILES, prepare_state_dir
from p2pfl.errors import P2PFLError
from p2pfl.store.checkpoint import CHECKPOINT_NAME, SNAPSHOTS_NAME

from .conftest import LocalNetwork
from .test_node import make_node


def mode(path: Path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_a_new_state_directory_is_created_private(tmp_path: Path) -> None:
    state = tmp_path / "a" / "state"
    assert prepare_state_dir(state) == []
    assert mode(state) == 0o700


def test_a_loose_directory_and_the_nodes_files_are_tightened(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir(mode=0o755)
    os.chmod(state, 0o755)
    for name in ("events.jsonl", "checkpoint.npz"):
        (state / name).write_text("x")
        os.chmod(state / name, 0o644)
    (state / "notes.txt").write_text("the operator's own file")
    os.chmod(state / "notes.txt", 0o644)
    tightened = prepare_state_dir(state)
    assert mode(state) == 0o700
    assert mode(state / "events.jsonl") == mode(state / "checkpoint.npz") == 0o600
    assert mode(state / "notes.txt") == 0o644  # not the node's
    assert len(tightened) == 3 and "0755 -> 0700" in tightened[0]
    assert prepare_state_dir(state) == []  # nothing left to do


def test_a_state_directory_that_cannot_exist_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    with pytest.raises(P2PFLError, match="file"):
        prepare_state_dir(tmp_path / "file")
    with pytest.raises(P2PFLError, match="cannot create"):
        prepare_state_dir(tmp_path / "file" / "state")


def test_the_list_names_every_file_the_node_writes() -> None:
    for name in (
        "events.jsonl",
        CHECKPOINT_NAME,
        CHECKPOINT_NAME + ".tmp",
        SNAPSHOTS_NAME,
        JOURNAL,
    ):
        assert name in NODE_FILES


def test_a_node_tightens_its_state_directory(make_network: Callable[..., LocalNetwork]) -> None:
    net = make_network(("alice", "bob"))
    state = net.state("alice")
    state.mkdir(parents=True)
    os.chmod(state, 0o755)
    (state / "events.jsonl").write_text("")
    os.chmod(state / "events.jsonl", 0o644)
    node = make_node(net, "alice")
    node.events.close()
    assert mode(state) == 0o700 and mode(state / "events.jsonl") == 0o600
    assert len(node.tightened) == 2


def test_a_second_node_on_a_state_directory_is_refused_naming_the_first(tmp_path: Path) -> None:
    import os
    import subprocess
    import sys

    from p2pfl.daemon.statedir import StateLock

    state = tmp_path / "state"
    prepare_state_dir(state)
    first = StateLock(state)
    with pytest.raises(P2PFLError, match=rf"in use by another p2pfl node \(pid {os.getpid()}\)"):
        StateLock(state)
    # another process is refused too (the kernel's lock, not a flag in this process)
    code = "import sys; from pathlib import Path; from p2pfl.daemon.statedir import StateLock\n"
    code += "try:\n    StateLock(Path(sys.argv[1]))\nexcept Exception as e:\n    print(e)"
    out = subprocess.run([sys.executable, "-c", code, str(state)], capture_output=True, text=True)
    assert f"pid {os.getpid()}" in out.stdout
    first.release()
    StateLock(state).release()  # free again
