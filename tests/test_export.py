"""``p2pfl export``: a real checkpoint out to .npz / .onnx / .pt, and read back by the
libraries an operator would use (numpy, onnx's reference evaluator, torch)."""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from p2pfl.cli import main
from p2pfl.config import Config, load_config
from p2pfl.config.local import build_local_config
from p2pfl.errors import P2PFLError
from p2pfl.learning.base import Learner, flatten, unflatten
from p2pfl.learning.factory import build_learner
from p2pfl.learning.models import MLP, SoftmaxRegression
from p2pfl.proto.keys import generate_key_file
from p2pfl.store.checkpoint import Checkpoint, save_checkpoint
from p2pfl.store.export import export_checkpoint, export_model, find_config, output_base

CNN = "p2pfl.learning.examples.torch_models:cnn"
ROUND = 3


@dataclass
class Run:
    """A harness-shaped run: ``root/peers.yaml`` and ``root/state/alice/checkpoint.npz``."""

    root: Path
    config_path: Path
    config: Config
    state: Path
    learner: Learner
    params: np.ndarray


def custom_softmax(*, inputs: int, classes: int, seed: int) -> SoftmaxRegression:
    """A ``kind: custom`` factory (importable as tests.test_export:custom_softmax)."""
    return SoftmaxRegression(inputs, classes, seed)


def write_config(
    root: Path,
    model: dict[str, Any],
    *,
    task: str = "classification",
    outputs: int = 10,
    seed: int = 7,
    input_scale: float | None = None,
    standardize: Any = None,
) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    keys = root / "keys"
    keys.mkdir(exist_ok=True)
    peers = ["alice", "bob"]
    public = {p: generate_key_file(keys / f"{p}.key") for p in peers}
    data = build_local_config(
        peers=peers,
        public_keys=public,
        host="127.0.0.1",
        ports={"alice": 9101, "bob": 9102},  # never bound: no sockets in these tests
        network="export-test",
        seed=seed,
        rounds=5,
        topology={"kind": "full"},
        model=model,
        inputs=64,
        classes=outputs,
        learning_rate=0.1,
        batch_size=32,
        round_timeout=10.0,
        task=task,
    )
    if input_scale is not None:
        data["training"]["input_scale"] = input_scale
    if standardize is not None:
        data["training"]["standardize"] = standardize
    path = root / "peers.yaml"
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    return path


def make_run(root: Path, model: dict[str, Any], **kwargs: Any) -> Run:
    """A config plus a checkpoint whose weights differ from the seeded initial ones (so a
    test can tell the checkpoint was loaded, not the model rebuilt)."""
    config_path = write_config(root, model, **kwargs)
    config = load_config(config_path)
    learner = build_learner(config.training.model.as_mapping(), config.seed, torch_threads=None)
    template = learner.get_weights()
    rng = np.random.default_rng(1)
    params = flatten(template).copy()
    params += rng.normal(0.0, 0.05, params.shape).astype(np.float32)
    learner.set_weights(unflatten(params, template))
    state = root / "state" / "alice"
    state.mkdir(parents=True)
    save_checkpoint(state, Checkpoint(ROUND, params, 17, config.digest))
    return Run(root, config_path, config, state, learner, params)


def features(rows: int = 20, high: float = 1.0) -> np.ndarray:
    return np.random.default_rng(2).uniform(0.0, high, (rows, 64)).astype(np.float32)


def softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return np.asarray(e / e.sum(axis=1, keepdims=True))


def load_npz(path: Path) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    with np.load(path, allow_pickle=False) as data:
        arrays = {name: np.array(data[name]) for name in data.files}
    meta = json.loads(str(arrays.pop("meta")))
    assert all(a.dtype != object for a in arrays.values())
    return arrays, meta


# --- numpy models ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("model", "names"),
    [
        ({"kind": "mlp", "hidden": [16, 8]}, ["W1", "b1", "W2", "b2", "W3", "b3"]),
        ({"kind": "softmax"}, ["W1", "b1"]),
    ],
)
def test_npz_holds_the_checkpoint_weights(
    tmp_path: Path, model: dict[str, Any], names: list[str]
) -> None:
    run = make_run(tmp_path / "run", model)
    result = export_checkpoint(run.state, run.config_path, tmp_path / "out" / "model")
    assert result.files[0] == tmp_path / "out" / "model.npz"
    arrays, meta = load_npz(result.files[0])
    assert list(arrays) == names
    expected = unflatten(run.params, run.learner.get_weights())
    for name, want in zip(names, expected, strict=True):
        assert arrays[name].dtype == np.float32
        np.testing.assert_array_equal(arrays[name], want)
    assert meta["format"] == "p2pfl-export/1"
    assert meta["kind"] == model["kind"]
    assert meta["task"] == "classification"
    assert (meta["inputs"], meta["outputs"]) == (64, 10)
    assert meta["hidden"] == model.get("hidden", [])
    assert meta["round"] == ROUND == result.next_round
    assert meta["config_digest"] == run.config.digest.hex()
    assert meta["tensors"] == names
    assert meta["parameters"] == run.params.size == result.parameters


def test_mlp_rebuilt_from_npz_predicts_the_same(tmp_path: Path) -> None:
    run = make_run(tmp_path / "run", {"kind": "mlp", "hidden": [16]})
    (npz, *_) = export_model(run.state, run.config_path, tmp_path / "model.npz")
    arrays, meta = load_npz(npz)
    rebuilt = MLP(meta["inputs"], meta["outputs"], meta["hidden"], seed=0)
    rebuilt.set_weights([arrays[name] for name in meta["tensors"]])
    x = features()
    assert isinstance(run.learner, MLP)
    np.testing.assert_array_equal(rebuilt.predict(x), run.learner.predict(x))


def test_onnx_classifier_gives_the_model_probabilities(tmp_path: Path) -> None:
    onnx = pytest.importorskip("onnx", reason="the ONNX export needs onnx (p2pfl[onnx])")
    from onnx.reference import ReferenceEvaluator

    run = make_run(tmp_path / "run", {"kind": "mlp", "hidden": [16, 8]}, input_scale=16.0)
    files = export_model(run.state, run.config_path, tmp_path / "model")
    assert [f.name for f in files] == ["model.npz", "model.onnx"]
    proto = onnx.load(str(files[1]))
    onnx.checker.check_model(proto, full_check=True)
    assert [o.name for o in proto.graph.output] == ["probabilities", "logits"]
    assert json.loads(proto.metadata_props[0].value)["input_scale"] == 16.0
    raw = features(high=16.0)  # the graph divides by the input scale, as the node did
    probabilities, logits = ReferenceEvaluator(proto).run(None, {"x": raw})
    assert isinstance(run.learner, MLP)
    want = run.learner.logits(raw / np.float32(16.0))
    np.testing.assert_allclose(logits, want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(probabilities, softmax(want), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(
        probabilities.argmax(axis=1), run.learner.predict(raw / np.float32(16.0))
    )


def test_onnx_softmax_regression(tmp_path: Path) -> None:
    pytest.importorskip("onnx", reason="the ONNX export needs onnx (p2pfl[onnx])")
    from onnx.reference import ReferenceEvaluator

    run = make_run(tmp_path / "run", {"kind": "softmax"})
    files = export_model(run.state, run.config_path, tmp_path / "model")
    (probabilities, _) = ReferenceEvaluator(str(files[1])).run(None, {"x": features()})
    assert isinstance(run.learner, SoftmaxRegression)
    want = softmax(run.learner.logits(features()))
    np.testing.assert_allclose(probabilities, want, rtol=1e-5, atol=1e-6)


def test_onnx_regressor_gives_the_model_outputs(tmp_path: Path) -> None:
    onnx = pytest.importorskip("onnx", reason="the ONNX export needs onnx (p2pfl[onnx])")
    from onnx.reference import ReferenceEvaluator

    run = make_run(tmp_path / "run", {"kind": "mlp", "hidden": [8]}, task="regression", outputs=1)
    files = export_model(run.state, run.config_path, tmp_path / "model")
    proto = onnx.load(str(files[1]))
    onnx.checker.check_model(proto)
    assert [o.name for o in proto.graph.output] == ["y"]
    (y,) = ReferenceEvaluator(proto).run(None, {"x": features()})
    assert isinstance(run.learner, MLP)
    assert y.shape == (20, 1)
    np.testing.assert_allclose(y, run.learner.predict(features()), rtol=1e-5, atol=1e-5)
    _, meta = load_npz(files[0])
    assert (meta["task"], meta["outputs"]) == ("regression", 1)


def test_without_onnx_the_export_goes_on(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    run = make_run(tmp_path / "run", {"kind": "mlp", "hidden": [8]})
    monkeypatch.setitem(sys.modules, "onnx", None)  # import onnx now raises ImportError
    result = export_checkpoint(run.state, run.config_path, tmp_path / "model")
    assert [f.name for f in result.files] == ["model.npz"]
    assert any("onnx not installed" in note and "p2pfl[onnx]" in note for note in result.notes)


def test_custom_learner_exports_numbered_weights(tmp_path: Path) -> None:
    model = {"kind": "custom", "factory": "tests.test_export:custom_softmax"}
    run = make_run(tmp_path / "run", model)
    result = export_checkpoint(run.state, run.config_path, tmp_path / "model")
    assert [f.name for f in result.files] == ["model.npz"]
    arrays, meta = load_npz(result.files[0])
    assert list(arrays) == ["weight_0", "weight_1"]
    np.testing.assert_array_equal(arrays["weight_0"], run.learner.get_weights()[0])
    assert meta["factory"] == "tests.test_export:custom_softmax"


def test_input_scale_comes_from_the_node_log(tmp_path: Path) -> None:
    run = make_run(tmp_path / "run", {"kind": "softmax"})
    other = {"type": "node_start", "node": "alice", "config_digest": "0" * 16, "input_scale": 2}
    start = {
        "type": "node_start",
        "node": "alice",
        "config_digest": run.config.digest_hex,
        "input_scale": 16.0,
    }
    lines = [json.dumps(other), "not json", json.dumps(start)]
    (run.state / "events.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    result = export_checkpoint(run.state, None, tmp_path / "model", with_onnx=False)
    assert (result.input_scale, result.node) == (16.0, "alice")
    _, meta = load_npz(result.files[0])
    assert (meta["input_scale"], meta["node"]) == (16.0, "alice")
    # Without a log the scale is assumed to be 1, and the operator is told.
    (run.state / "events.jsonl").unlink()
    result = export_checkpoint(run.state, None, tmp_path / "model", with_onnx=False)
    assert result.input_scale == 1.0
    assert any("--input-scale" in note for note in result.notes)


# --- torch -------------------------------------------------------------------------------


def test_torch_model_exports_a_loadable_state_dict(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch", reason="torch models need PyTorch (p2pfl[torch])")
    from p2pfl.learning.examples.torch_models import cnn
    from p2pfl.learning.torch_learner import TorchLearner

    run = make_run(tmp_path / "run", {"kind": "torch", "factory": CNN})
    result = export_checkpoint(run.state, run.config_path, tmp_path / "model")
    assert [f.name for f in result.files] == ["model.npz", "model.pt"]
    assert any("no ONNX" in note for note in result.notes)
    assert isinstance(run.learner, TorchLearner)

    state = torch.load(result.files[1], weights_only=True)
    fresh = cnn(inputs=64, outputs=10)
    fresh.load_state_dict(state)
    fresh.eval()
    run.learner.module.eval()
    x = torch.from_numpy(features())
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), run.learner.module(x), rtol=0, atol=0)

    arrays, meta = load_npz(result.files[0])
    assert list(arrays) == list(state) == meta["tensors"]
    assert "1.weight" in arrays
    for name, tensor in state.items():
        np.testing.assert_array_equal(arrays[name], tensor.numpy())
    np.testing.assert_array_equal(flatten([arrays[n] for n in arrays]), run.params)
    assert (meta["kind"], meta["factory"]) == ("torch", CNN)


# --- paths and the command line ----------------------------------------------------------


def test_output_base_and_config_discovery(tmp_path: Path) -> None:
    assert output_base(tmp_path / "model") == tmp_path / "model"
    assert output_base(tmp_path / "model.npz") == tmp_path / "model"
    assert output_base(tmp_path / "model.ONNX") == tmp_path / "model"
    assert output_base(tmp_path / "run.v2") == tmp_path / "run.v2"
    assert output_base(tmp_path) == tmp_path / "model"
    state = tmp_path / "out" / "state" / "alice"
    state.mkdir(parents=True)
    with pytest.raises(P2PFLError, match="pass it with --config"):
        find_config(state)
    (state / "peers.yaml").write_text("x", encoding="utf-8")
    assert find_config(state) == state / "peers.yaml"
    (tmp_path / "out" / "peers.yaml").write_text("x", encoding="utf-8")
    assert find_config(state) == tmp_path / "out" / "peers.yaml"


def test_cli_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = make_run(tmp_path / "run", {"kind": "mlp", "hidden": [8]})
    out = tmp_path / "exports" / "alice.onnx"
    assert main(["export", str(run.state), "--out", str(out)]) == 0  # config found
    printed = capsys.readouterr().out
    assert f"after round {ROUND} of 5" in printed
    assert f"{run.params.size} parameters" in printed
    assert f"wrote {tmp_path / 'exports' / 'alice.npz'}" in printed
    assert (tmp_path / "exports" / "alice.npz").is_file()
    # The checkpoint file itself, and an explicit --config, work too.
    args = ["export", str(run.state / "checkpoint.npz"), "--config", str(run.config_path)]
    assert main([*args, "-o", str(tmp_path / "again"), "--no-onnx"]) == 0
    assert (tmp_path / "again.npz").is_file()
    assert not (tmp_path / "again.onnx").exists()
    assert not list(tmp_path.rglob("*.tmp"))


def test_cli_missing_checkpoint(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = write_config(tmp_path / "run", {"kind": "softmax"})
    state = tmp_path / "run" / "state" / "alice"
    state.mkdir(parents=True)
    assert main(["export", str(state), "--out", str(tmp_path / "m")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("p2pfl: error: ")
    assert "no checkpoint" in err and "checkpoint.npz" in err
    assert main(["export", str(tmp_path / "nowhere"), "--config", str(config), "-o", "m"]) == 2
    assert "no such state directory" in capsys.readouterr().err
    assert not (tmp_path / "m.npz").exists()


def test_cli_config_digest_mismatch(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = make_run(tmp_path / "run", {"kind": "softmax"})
    other = write_config(tmp_path / "other", {"kind": "softmax"}, seed=8)
    args = ["export", str(run.state), "--config", str(other), "--out", str(tmp_path / "m")]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "made with config digest" in err and run.config.digest_hex in err
    assert not (tmp_path / "m.npz").exists()


def test_cli_config_not_found(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = make_run(tmp_path / "run", {"kind": "softmax"})
    elsewhere = tmp_path / "copied"
    elsewhere.mkdir()
    (elsewhere / "checkpoint.npz").write_bytes((run.state / "checkpoint.npz").read_bytes())
    assert main(["export", str(elsewhere), "--out", str(tmp_path / "m")]) == 2
    err = capsys.readouterr().err
    assert "cannot find the run's peers.yaml" in err and "--config" in err
    missing = tmp_path / "missing.yaml"
    assert main(["export", str(elsewhere), "--config", str(missing), "-o", "m"]) == 2
    assert "file not found" in capsys.readouterr().err


def test_a_standardised_model_exports_its_mean_and_deviation(tmp_path: Path) -> None:
    """The model saw (x - mean) / std: the .npz meta says so, and the ONNX graph does it."""
    mean = np.linspace(0.0, 0.5, 64).tolist()
    std = np.linspace(1.0, 3.0, 64).tolist()
    run = make_run(
        tmp_path / "run", {"kind": "mlp", "hidden": [8]}, standardize={"mean": mean, "std": std}
    )
    files = export_model(run.state, run.config_path, tmp_path / "model")
    _, meta = load_npz(files[0])
    assert meta["standardize"] == {"mean": mean, "std": std}
    onnx = pytest.importorskip("onnx", reason="the ONNX export needs onnx (p2pfl[onnx])")
    from onnx.reference import ReferenceEvaluator

    onnx.checker.check_model(onnx.load(str(files[1])), full_check=True)
    raw = features(high=4.0)
    _, logits = ReferenceEvaluator(str(files[1])).run(None, {"x": raw})
    want = run.learner.logits((raw - np.float32(mean)) / np.float32(std))
    np.testing.assert_allclose(logits, want, rtol=1e-5, atol=1e-5)


def test_a_federated_standardisation_that_never_finished_cannot_be_exported(
    tmp_path: Path,
) -> None:
    run = make_run(tmp_path / "run", {"kind": "softmax"}, standardize="federated")
    with pytest.raises(P2PFLError, match="never finished its federated standardisation"):
        export_model(run.state, run.config_path, tmp_path / "model")
