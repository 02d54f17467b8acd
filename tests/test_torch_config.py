"""The ``training.model`` section for torch models and regression: what parses, what is
refused (naming the field), and that classification configs keep their digests.

No PyTorch needed, except in the tests marked by an ``importorskip`` inside them.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from p2pfl.config import Config, ModelConfig, load_config, parse_config
from p2pfl.errors import ConfigError
from p2pfl.proto.keys import public_key_b64

SOURCE = "peers.yaml"
CNN = "p2pfl.learning.examples.torch_models:cnn"
MLP = "p2pfl.learning.examples.torch_models:mlp"


def key(i: int) -> str:
    """A fixed, valid public key per index (reproducible digests)."""
    return public_key_b64(X25519PrivateKey.from_private_bytes(bytes([i + 1]) * 32))


def config_with(model: dict[str, Any]) -> dict[str, Any]:
    return {
        "version": 1,
        "network": "test-net",
        "seed": 3,
        "peers": {
            peer: {"address": f"ws://127.0.0.1:{7071 + i}", "public_key": key(i)}
            for i, peer in enumerate(("alice", "bob", "carol"))
        },
        "training": {"rounds": 5, "model": model},
    }


def parse(model: dict[str, Any]) -> Config:
    return parse_config(config_with(copy.deepcopy(model)), SOURCE)


def model_of(model: dict[str, Any]) -> ModelConfig:
    return parse(model).training.model


def torch_model(**fields: Any) -> dict[str, Any]:
    return {"kind": "torch", "inputs": 64, "classes": 10, "factory": CNN, **fields}


# --------------------------------------------------------------------------------------
# valid sections


def test_torch_section_with_sgd_momentum_parses() -> None:
    model = model_of(
        torch_model(
            options={"channels": [8, 16], "hidden": 32},
            optimizer={"kind": "sgd", "momentum": 0.9, "weight_decay": 0.0001},
        )
    )
    assert model.kind == "torch" and model.task == "classification"
    assert model.inputs == 64 and model.outputs == model.classes == 10
    assert model.factory == CNN and model.hidden == ()
    assert dict(model.options) == {"channels": [8, 16], "hidden": 32}
    assert dict(model.optimizer) == {"kind": "sgd", "momentum": 0.9, "weight_decay": 0.0001}


def test_torch_section_with_adam_and_defaults() -> None:
    adam = model_of(torch_model(optimizer={"kind": "adam"}))
    assert dict(adam.optimizer) == {"kind": "adam", "momentum": 0.0, "weight_decay": 0.0}
    for missing in (torch_model(), torch_model(optimizer=None), torch_model(optimizer={})):
        plain = model_of(missing)
        assert dict(plain.optimizer) == {"kind": "sgd", "momentum": 0.0, "weight_decay": 0.0}
        assert dict(plain.options) == {}
    # integers are accepted and stored as floats (one spelling per value for the digest)
    decayed = model_of(torch_model(optimizer={"momentum": 0, "weight_decay": 0}))
    assert isinstance(decayed.optimizer["momentum"], float)
    assert isinstance(decayed.optimizer["weight_decay"], float)


def test_torch_regression_section_parses() -> None:
    model = model_of(
        {"kind": "torch", "task": "regression", "inputs": 10, "outputs": 2, "factory": MLP}
    )
    assert model.task == "regression" and model.outputs == 2
    default = model_of({"kind": "torch", "task": "regression", "inputs": 10, "factory": MLP})
    assert default.outputs == 1


def test_numpy_mlp_regression_parses() -> None:
    model = model_of({"kind": "mlp", "task": "regression", "inputs": 10, "hidden": [16]})
    assert model.kind == "mlp" and model.task == "regression" and model.outputs == 1
    assert model.hidden == (16,) and dict(model.optimizer) == {}


def test_torch_section_from_a_yaml_file(tmp_path: Path) -> None:
    path = tmp_path / "peers.yaml"
    path.write_text(
        yaml.safe_dump(
            config_with(
                torch_model(
                    options={"channels": [8, 16], "hidden": 32},
                    optimizer={"kind": "sgd", "momentum": 0.9},
                )
            )
        ),
        encoding="utf-8",
    )
    model = load_config(path).training.model
    assert model.kind == "torch" and model.optimizer["momentum"] == 0.9


# --------------------------------------------------------------------------------------
# refusals: (model section, exact field, a fragment of the problem)

REFUSED: list[tuple[str, dict[str, Any], str, str]] = [
    (
        "optimizer-on-mlp",
        {"kind": "mlp", "inputs": 64, "classes": 10, "optimizer": {"kind": "adam"}},
        "training.model.optimizer",
        "only used with kind torch (kind is 'mlp')",
    ),
    (
        "optimizer-on-softmax",
        {"kind": "softmax", "inputs": 64, "classes": 10, "optimizer": {"kind": "sgd"}},
        "training.model.optimizer",
        "only used with kind torch (kind is 'softmax')",
    ),
    (
        "optimizer-on-custom",
        {"kind": "custom", "inputs": 4, "classes": 2, "factory": "a.b:c", "optimizer": {}},
        "training.model.optimizer",
        "only used with kind torch (kind is 'custom')",
    ),
    (
        "momentum-with-adam",
        torch_model(optimizer={"kind": "adam", "momentum": 0.9}),
        "training.model.optimizer.momentum",
        "only used with kind sgd (kind is 'adam')",
    ),
    (
        "momentum-one",
        torch_model(optimizer={"kind": "sgd", "momentum": 1.0}),
        "training.model.optimizer.momentum",
        "expected a number >= 0 and < 1, got 1.0",
    ),
    (
        "momentum-above-one",
        torch_model(optimizer={"momentum": 1.5}),
        "training.model.optimizer.momentum",
        "expected a number >= 0 and < 1",
    ),
    (
        "momentum-negative",
        torch_model(optimizer={"momentum": -0.1}),
        "training.model.optimizer.momentum",
        "expected a number >= 0 and < 1",
    ),
    (
        "momentum-boolean",
        torch_model(optimizer={"momentum": True}),
        "training.model.optimizer.momentum",
        "true (a boolean)",
    ),
    (
        "weight-decay-text",
        torch_model(optimizer={"weight_decay": "1e-4"}),
        "training.model.optimizer.weight_decay",
        "expected a number >= 0 and < 1",
    ),
    (
        "unknown-optimizer",
        torch_model(optimizer={"kind": "rmsprop"}),
        "training.model.optimizer.kind",
        "expected one of: sgd, adam; got 'rmsprop'",
    ),
    (
        "unknown-optimizer-key",
        torch_model(optimizer={"kind": "sgd", "lr": 0.1}),
        "training.model.optimizer.lr",
        "unknown key",
    ),
    (
        "optimizer-not-a-mapping",
        torch_model(optimizer="adam"),
        "training.model.optimizer",
        "expected a mapping, got 'adam'",
    ),
    (
        "torch-without-factory",
        {"kind": "torch", "inputs": 64, "classes": 10},
        "training.model.factory",
        "required for kind torch",
    ),
    (
        "torch-factory-malformed",
        torch_model(factory="p2pfl.learning.examples.torch_models.cnn"),
        "training.model.factory",
        'expected "module:function"',
    ),
    (
        "torch-with-hidden",
        torch_model(hidden=[32]),
        "training.model.hidden",
        "only used with kind mlp (kind is 'torch')",
    ),
    (
        "torch-options-not-a-mapping",
        torch_model(options=[8, 16]),
        "training.model.options",
        "expected a mapping",
    ),
    (
        "regression-with-classes",
        {"kind": "mlp", "task": "regression", "inputs": 10, "classes": 3},
        "training.model.classes",
        "only used with task classification",
    ),
    (
        "torch-regression-with-classes",
        {"kind": "torch", "task": "regression", "inputs": 10, "classes": 3, "factory": MLP},
        "training.model.classes",
        "only used with task classification",
    ),
    (
        "classification-with-outputs",
        {"kind": "mlp", "inputs": 64, "classes": 10, "outputs": 10},
        "training.model.outputs",
        "only used with task regression",
    ),
    (
        "explicit-classification-with-outputs",
        torch_model(task="classification", outputs=10),
        "training.model.outputs",
        "only used with task regression",
    ),
    (
        "classification-without-classes",
        {"kind": "torch", "inputs": 64, "factory": CNN},
        "training.model.classes",
        "required field is missing (for classification)",
    ),
    (
        "softmax-regression",
        {"kind": "softmax", "task": "regression", "inputs": 10},
        "training.model.kind",
        "softmax is a classifier",
    ),
    (
        "unknown-task",
        {"kind": "mlp", "task": "ranking", "inputs": 10, "classes": 2},
        "training.model.task",
        "expected one of: classification, regression; got 'ranking'",
    ),
    (
        "regression-zero-outputs",
        {"kind": "mlp", "task": "regression", "inputs": 10, "outputs": 0},
        "training.model.outputs",
        "expected an integer >= 1, got 0",
    ),
]


@pytest.mark.parametrize(
    ("model", "field", "problem"),
    [case[1:] for case in REFUSED],
    ids=[case[0] for case in REFUSED],
)
def test_refusals_name_the_field(model: dict[str, Any], field: str, problem: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse(model)
    err = caught.value
    assert err.file == SOURCE
    assert err.field == field, str(err)
    assert problem in err.problem, str(err)
    assert str(err) == f"{SOURCE}: {field}: {err.problem}"


# --------------------------------------------------------------------------------------
# the mapping and the digest


def test_classification_mapping_is_what_it_was_before_torch_and_regression() -> None:
    """A classifier's mapping has exactly the keys it had before this work, so existing
    configs keep their digests (and nodes their checkpoints)."""
    old_keys = {"kind", "inputs", "classes", "hidden", "factory", "options"}
    mlp = model_of({"kind": "mlp", "inputs": 64, "classes": 10, "hidden": [32]})
    assert mlp.as_mapping() == {
        "kind": "mlp",
        "inputs": 64,
        "classes": 10,
        "hidden": [32],
        "factory": None,
        "options": {},
    }
    softmax = model_of({"kind": "softmax", "inputs": 64, "classes": 10})
    assert softmax.as_mapping() == {
        "kind": "softmax",
        "inputs": 64,
        "classes": 10,
        "hidden": [],
        "factory": None,
        "options": {},
    }
    custom = model_of(
        {"kind": "custom", "inputs": 4, "classes": 2, "factory": "a.b:c", "options": {"k": 1}}
    )
    assert set(custom.as_mapping()) == old_keys
    assert custom.as_mapping()["options"] == {"k": 1}
    # writing the default task out changes nothing either
    explicit = model_of(
        {"kind": "mlp", "task": "classification", "inputs": 64, "classes": 10, "hidden": [32]}
    )
    assert explicit.as_mapping() == mlp.as_mapping()
    default_task = parse({"kind": "mlp", "inputs": 64, "classes": 10, "hidden": [32]})
    explicit_task = parse(
        {"kind": "mlp", "task": "classification", "inputs": 64, "classes": 10, "hidden": [32]}
    )
    assert default_task.digest == explicit_task.digest


def test_regression_and_torch_add_their_keys() -> None:
    regression = model_of({"kind": "mlp", "task": "regression", "inputs": 10, "outputs": 2})
    assert regression.as_mapping() == {
        "kind": "mlp",
        "inputs": 10,
        "task": "regression",
        "outputs": 2,
        "hidden": [64],
        "factory": None,
        "options": {},
    }
    torch_cls = model_of(torch_model(optimizer={"kind": "sgd", "momentum": 0.9}))
    assert torch_cls.as_mapping() == {
        "kind": "torch",
        "inputs": 64,
        "classes": 10,
        "hidden": [],
        "factory": CNN,
        "options": {},
        "optimizer": {"kind": "sgd", "momentum": 0.9, "weight_decay": 0.0},
    }
    torch_reg = model_of(
        {"kind": "torch", "task": "regression", "inputs": 10, "factory": MLP, "options": {}}
    )
    mapping = torch_reg.as_mapping()
    assert set(mapping) == {
        "kind",
        "inputs",
        "task",
        "outputs",
        "hidden",
        "factory",
        "options",
        "optimizer",
    }
    assert mapping["task"] == "regression" and mapping["outputs"] == 1
    json.dumps(mapping, allow_nan=False)  # JSON-compatible (the digest is canonical JSON)


def test_mapping_is_a_copy() -> None:
    model = model_of(torch_model(options={"channels": [8, 16]}))
    mapping = model.as_mapping()
    mapping["options"]["channels"].append(32)
    mapping["optimizer"]["kind"] = "adam"
    assert model.options["channels"] == [8, 16]
    assert model.optimizer["kind"] == "sgd"


def test_digest_covers_the_task_and_the_optimizer() -> None:
    digests = {
        parse(model).digest
        for model in (
            torch_model(),
            torch_model(optimizer={"kind": "adam"}),
            torch_model(optimizer={"kind": "sgd", "momentum": 0.9}),
            torch_model(optimizer={"kind": "sgd", "momentum": 0.9, "weight_decay": 0.001}),
            torch_model(options={"hidden": 32}),
            {"kind": "mlp", "inputs": 64, "classes": 10},
            {"kind": "mlp", "task": "regression", "inputs": 64, "outputs": 10},
        )
    }
    assert len(digests) == 7
    # the optimizer's defaults are filled in: spelled out or left out, the same digest
    assert (
        parse(torch_model()).digest
        == parse(torch_model(optimizer={"kind": "sgd", "momentum": 0.0})).digest
    )


def test_parsed_torch_section_builds_its_learner() -> None:
    pytest.importorskip("torch", reason="PyTorch is an optional extra: pip install '.[torch]'")
    from p2pfl.learning import build_learner
    from p2pfl.learning.torch_learner import OptimizerSpec, TorchLearner

    model = model_of(
        torch_model(
            options={"channels": [4], "hidden": 8},
            optimizer={"kind": "sgd", "momentum": 0.9, "weight_decay": 0.001},
        )
    )
    learner = build_learner(model.as_mapping(), 3, torch_threads=None)
    assert isinstance(learner, TorchLearner) and learner.task == "classification"
    assert learner.optimizer_spec == OptimizerSpec("sgd", 0.9, 0.001)
    regression = model_of({"kind": "torch", "task": "regression", "inputs": 10, "factory": MLP})
    regressor = build_learner(regression.as_mapping(), 3, torch_threads=None)
    assert isinstance(regressor, TorchLearner)
    assert regressor.task == "regression" and regressor.outputs == 1
