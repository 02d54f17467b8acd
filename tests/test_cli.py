"""The command line: keygen, pubkey, init, check, and run's start-up errors."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from p2pfl.cli import main
from p2pfl.config import load_config


def test_keygen_then_pubkey(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    key = tmp_path / "node.key"
    assert main(["keygen", str(key)]) == 0
    public = capsys.readouterr().out.strip()
    assert len(public) == 44
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert main(["pubkey", str(key)]) == 0
    assert capsys.readouterr().out.strip() == public


def test_keygen_refuses_to_overwrite(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    key = tmp_path / "node.key"
    main(["keygen", str(key)])
    before = key.read_bytes()
    assert main(["keygen", str(key)]) == 2
    assert str(key) in capsys.readouterr().err
    assert key.read_bytes() == before


def test_pubkey_refuses_a_readable_key(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    key = tmp_path / "node.key"
    main(["keygen", str(key)])
    key.chmod(0o644)
    assert main(["pubkey", str(key)]) == 2
    assert "chmod 600" in capsys.readouterr().err


def test_init_writes_a_valid_config_and_keys(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "net"
    args = ["init", "--peers", "a,b,c,d", "--base-port", "7100", "--out", str(out)]
    assert main([*args, "--topology", "ring"]) == 0
    config = load_config(out / "peers.yaml")
    assert config.peer_ids == ("a", "b", "c", "d")
    assert config.peers["d"].address == "ws://127.0.0.1:7103"
    for peer in "abcd":
        assert stat.S_IMODE((out / "keys" / f"{peer}.key").stat().st_mode) == 0o600
    capsys.readouterr()
    assert main(["check", str(out / "peers.yaml")]) == 0
    printed = capsys.readouterr().out
    assert config.digest.hex() in printed
    assert "topology: ring" in printed
    rows = {line.split()[0]: line for line in printed.splitlines() if line.startswith(("a ", "b "))}
    assert rows["a"].endswith("b, d")  # ring neighbours
    assert main([*args]) == 2  # refuses to overwrite an existing network


def test_check_names_file_and_field(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "peers.yaml"
    bad.write_text("version: 1\nnetwork: x\nseed: 1\npeers: {}\ntraining: {rounds: 1}\n")
    assert main(["check", str(bad)]) == 2
    err = capsys.readouterr().err
    assert str(bad) in err and "peers" in err


def test_run_refuses_a_key_that_is_not_the_peers(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "net"
    main(["init", "--peers", "a,b", "--out", str(out)])
    common = ["--data", "x.npz", "--state-dir", str(tmp_path / "s")]
    config = str(out / "peers.yaml")
    capsys.readouterr()
    assert main(["run", config, "--id", "a", "--key", str(out / "keys" / "b.key"), *common]) == 2
    assert "peers.a.public_key" in capsys.readouterr().err
    assert main(["run", config, "--id", "zed", "--key", str(out / "keys" / "a.key"), *common]) == 2
    assert "no peer 'zed'" in capsys.readouterr().err
    assert main(["run", config, "--id", "a", "--key", str(out / "keys" / "a.key"), *common]) == 2
    assert "x.npz" in capsys.readouterr().err


def test_harness_model_names() -> None:
    import argparse

    from p2pfl.cli.args import model_text as _model_text
    from p2pfl.cli.args import parse_model as _parse_model

    cnn = _parse_model("torch:cnn")
    assert cnn == {"kind": "torch", "factory": "p2pfl.learning.examples.torch_models:cnn"}
    assert _model_text(cnn) == "torch:cnn"
    own = _parse_model("torch:mypkg.models:build")
    assert own["factory"] == "mypkg.models:build" and _model_text(own) == "torch:mypkg.models:build"
    assert _parse_model("mlp:32,16") == {"kind": "mlp", "hidden": [32, 16]}
    for bad in ("torch:resnet", "mlp:big", "tree"):
        with pytest.raises(argparse.ArgumentTypeError):
            _parse_model(bad)


def test_harness_refuses_an_optimizer_for_numpy_models(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run"
    code = main(["harness", "--model", "mlp", "--optimizer", "adam", "--out", str(out)])
    assert code == 2
    assert "--optimizer/--momentum apply to torch models" in capsys.readouterr().err
    assert not out.exists()


def test_keygen_makes_missing_folders_owner_only(tmp_path: Path) -> None:
    key = tmp_path / "etc" / "p2pfl" / "node.key"
    assert main(["keygen", str(key)]) == 0
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    for folder in (tmp_path / "etc", key.parent):
        assert stat.S_IMODE(folder.stat().st_mode) == 0o700


def test_init_writes_an_ipv6_host_in_brackets(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "net"
    assert main(["init", "--peers", "a,b", "--host", "::1", "--out", str(out)]) == 0
    assert load_config(out / "peers.yaml").peers["a"].address == "ws://[::1]:7070"
    assert main(["check", str(out / "peers.yaml")]) == 0


@pytest.mark.parametrize("listen", [False, True])
def test_a_port_in_use_is_an_error_naming_where_it_was_set(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], digits_dir: Path, listen: bool
) -> None:
    import socket

    out = tmp_path / "net"
    main(["init", "--peers", "a,b", "--out", str(out), "--base-port", "7170"])
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen()
    port = holder.getsockname()[1]
    config = out / "peers.yaml"
    if not listen:  # the port in peers.yaml is taken
        config.write_text(config.read_text().replace(":7170", f":{port}"))
    capsys.readouterr()
    try:
        args = ["run", str(config), "--id", "a", "--key", str(out / "keys" / "a.key")]
        args += ["--data", str(digits_dir / "alice.npz"), "--state-dir", str(tmp_path / "s")]
        if listen:
            args += ["--listen", f"127.0.0.1:{port}"]
        assert main(args) == 2
    finally:
        holder.close()
    err = capsys.readouterr().err
    assert f"cannot listen on 127.0.0.1:{port}" in err and "Traceback" not in err
    assert ("see --listen" if listen else "peers.a.address") in err


def test_a_data_error_names_the_data_file_first(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "net"
    main(["init", "--peers", "a,b", "--out", str(out)])
    data = tmp_path / "alice.csv"
    data.write_text("radius,texture,diagnosis\n1.5,2,1\n2.5,3,0\n")
    capsys.readouterr()
    args = ["run", str(out / "peers.yaml"), "--id", "a", "--key", str(out / "keys" / "a.key")]
    assert main([*args, "--data", str(data), "--state-dir", str(tmp_path / "s")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"p2pfl: error: {data}: data has 2 features but the model (")
    assert "training.model) expects 64" in err


def test_every_option_has_help_and_says_its_default() -> None:
    import argparse

    from p2pfl.cli.parser import make_parser

    missing = []

    def walk(parser: argparse.ArgumentParser, where: str) -> None:
        for action in parser._actions:  # (argparse has no public walk)
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    walk(sub, f"{where} {name}")
                continue
            if isinstance(action, argparse._HelpAction | argparse._VersionAction):
                continue
            if action.help == argparse.SUPPRESS:
                continue
            default = action.default
            stated = default in (None, False, []) or action.required
            if not action.help or not (stated or "default" in action.help):
                missing.append(f"{where} {'/'.join(action.option_strings) or action.dest}")

    walk(make_parser(), "p2pfl")
    assert missing == []


def test_check_privacy_audits_every_graph_of_a_secure_network(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "net"
    peers = ",".join(f"p{i:02d}" for i in range(8))
    assert main(["init", "--peers", peers, "--out", str(out), "--topology", "k-regular:4"]) == 0
    config = out / "peers.yaml"
    capsys.readouterr()
    assert main(["check", str(config), "--privacy"]) == 0
    assert "aggregation.secure is false: every neighbour receives each model" in (
        capsys.readouterr().out
    )
    text = config.read_text().replace("secure: false", "secure: true")
    config.write_text(text.replace("  degree: 4\n", "  degree: 4\n  resample_every: 10\n"))
    assert main(["check", str(config), "--privacy", "--max-coalition", "3"]) == 0
    printed = capsys.readouterr().out
    assert "coalitions of up to 3 peers" in printed
    # 20 rounds resampled every 10: two graphs, each audited
    assert "rounds 0-9:" in printed and "rounds 10-19:" in printed
    lying = [line for line in printed.splitlines() if "owners lying about dropouts:" in line]
    assert len(lying) == 2 and all(" names only " in line for line in lying)
    assert main(["check", str(config), "--privacy", "--max-coalition", "0"]) == 2
    assert "--max-coalition: expected 1 or more" in capsys.readouterr().err
