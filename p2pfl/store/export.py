"""``p2pfl export``: a node's trained model, out of the daemon, in standard file formats.

A checkpoint is one flat float32 vector that only p2pfl can make sense of (the shapes come
from the config). The export rebuilds the model from the shared ``peers.yaml``, loads the
checkpoint into it (the config digest must match) and writes:

* ``BASE.npz`` always: one array per tensor under a readable name (numpy models ``W1, b1,
  W2, b2, ...`` with ``W`` of shape ``(fan_in, fan_out)``; torch models the state_dict keys;
  custom learners ``weight_0, weight_1, ...``) and ``meta``, a 0-d string array holding
  JSON (model section, round, config digest, input scale). No object arrays, so it loads
  with ``np.load(path, allow_pickle=False)``;
* ``BASE.pt`` for torch models: ``torch.save`` of the state_dict (``weights_only`` loadable);
* ``BASE.onnx`` for the numpy softmax/mlp models when ``onnx`` is importable: the network,
  with the node's input scaling baked in, so it takes raw features.

``BASE`` is ``--out`` without a ``.npz``/``.pt``/``.onnx`` suffix (``--out model`` and
``--out model.npz`` both give ``model.npz`` and its siblings; ``--out run.v2`` gives
``run.v2.npz``); an existing directory means ``DIR/model``. Every file is written to a
temporary name and renamed into place, so a failed export never leaves a torn file.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import zipfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import numpy as np

from p2pfl.config import Config, ModelConfig, load_config
from p2pfl.errors import P2PFLError
from p2pfl.learning.base import Learner, flatten, unflatten
from p2pfl.learning.factory import build_learner
from p2pfl.learning.models import MLP, SoftmaxRegression
from p2pfl.store.checkpoint import CHECKPOINT_NAME, Checkpoint, load_checkpoint
from p2pfl.store.standardization import standardization_for

if TYPE_CHECKING:
    import onnx

    from p2pfl.learning.torch_learner import TorchLearner

__all__ = [
    "EXPORT_FORMAT",
    "ONNX_OPSET",
    "Export",
    "build_onnx",
    "export_checkpoint",
    "export_model",
    "find_config",
    "output_base",
    "register",
]

#: ``meta["format"]``: lets a reader tell a p2pfl export from any other .npz.
EXPORT_FORMAT = "p2pfl-export/1"
#: Supported by onnx's ReferenceEvaluator and by every onnxruntime of recent years.
ONNX_OPSET = 17
#: The IR version that goes with opset 17 (onnx would otherwise stamp its newest one, which
#: older runtimes refuse).
ONNX_IR_VERSION = 8
ONNX_HINT = "pip install 'p2pfl[onnx]'"
_SUFFIXES = (".npz", ".pt", ".onnx")
_EVENTS_NAME = "events.jsonl"


@dataclass
class Export:
    """What an export wrote, and what the operator should know about it."""

    files: list[Path]
    parameters: int
    next_round: int
    rounds: int
    tensors: list[str]
    input_scale: float
    node: str | None
    notes: list[str] = field(default_factory=list)


# --- locating the inputs -----------------------------------------------------------------


def find_config(state_dir: Path) -> Path:
    """The ``peers.yaml`` of a state dir, when it is where the harness puts it.

    The harness writes ``OUT/peers.yaml`` and ``OUT/state/<peer>/``; an operator may keep a
    copy in the state dir itself. A node's state dir does not record its config otherwise.
    """
    candidates = [state_dir / ".." / ".." / "peers.yaml", state_dir / "peers.yaml"]
    for candidate in candidates:
        if candidate.is_file():
            return Path(os.path.normpath(candidate))
    looked = ", ".join(os.path.normpath(c) for c in candidates)
    raise P2PFLError(
        f"{state_dir}: cannot find the run's peers.yaml (looked for {looked}); "
        "pass it with --config peers.yaml"
    )


def output_base(out: Path) -> Path:
    """``--out`` without its format suffix: every format is written next to the others."""
    if out.is_dir():
        return out / "model"
    if out.suffix.lower() in _SUFFIXES:
        return out.with_suffix("")
    return out


def _resolve_state_dir(state_dir: Path) -> Path:
    """Accept the checkpoint file itself as well as its directory."""
    if state_dir.is_file() and state_dir.name == CHECKPOINT_NAME:
        return state_dir.parent
    if not state_dir.exists():
        raise P2PFLError(f"{state_dir}: no such state directory")
    if not state_dir.is_dir():
        raise P2PFLError(f"{state_dir}: not a directory (expected a node's --state-dir)")
    return state_dir


def _logged_start(state_dir: Path, config: Config) -> tuple[float | None, str | None]:
    """Input scale and node id from the node's last ``node_start`` under this config.

    With ``input_scale: auto`` each node picks its divisor from its own data and logs it;
    the exported model is only right if it gets the same divisor. A bad line is skipped:
    the log is only consulted, never required.
    """
    path = state_dir / _EVENTS_NAME
    scale: float | None = None
    node: str | None = None
    try:
        with open(path, encoding="utf-8", errors="replace") as handle:
            for line in handle:
                if '"node_start"' not in line:
                    continue
                try:
                    event = json.loads(line)
                except ValueError:
                    continue
                if (
                    not isinstance(event, dict)
                    or event.get("type") != "node_start"
                    or event.get("config_digest") != config.digest_hex
                ):
                    continue
                value = event.get("input_scale")
                if isinstance(value, int | float) and not isinstance(value, bool) and value > 0:
                    scale = float(value)
                if isinstance(event.get("node"), str):
                    node = event["node"]
    except OSError:
        return None, None
    return scale, node


# --- the export --------------------------------------------------------------------------


def export_model(
    state_dir: Path,
    config_path: Path | None,
    out: Path,
    *,
    input_scale: float | None = None,
    with_onnx: bool = True,
) -> list[Path]:
    """Export the model in ``state_dir``; the files written (see :func:`export_checkpoint`)."""
    return export_checkpoint(
        state_dir, config_path, out, input_scale=input_scale, with_onnx=with_onnx
    ).files


def export_checkpoint(
    state_dir: Path,
    config_path: Path | None,
    out: Path,
    *,
    input_scale: float | None = None,
    with_onnx: bool = True,
) -> Export:
    """Rebuild the model from the config, load the checkpoint and write the export files.

    ``config_path`` None means :func:`find_config`. ``input_scale`` overrides the divisor the
    node applied to its features (else the config's, else the one the node logged, else 1).
    ``with_onnx`` False skips the ONNX file. Raises ``P2PFLError`` (or its subclasses
    ``ConfigError``, ``CheckpointError``) for anything the operator can fix.
    """
    state_dir = _resolve_state_dir(Path(state_dir))
    config_file = find_config(state_dir) if config_path is None else Path(config_path)
    config = load_config(config_file)
    model = config.training.model
    learner, checkpoint, size = _restored_learner(state_dir, config, config_file)

    logged_scale, node = _logged_start(state_dir, config)
    scale, scale_note = _chosen_input_scale(input_scale, config, logged_scale, state_dir)
    notes = [] if scale_note is None else [scale_note]

    torch_state = _torch_learner(learner).state_dict() if model.kind == "torch" else None
    tensors = _named_tensors(learner, model, torch_state)
    meta = _meta(config, model, checkpoint.next_round, size, scale, node, list(tensors))
    standardization = standardization_for(state_dir, config)
    if config.training.standardize is not None and standardization is None:
        raise P2PFLError(
            f"{state_dir}: the node never finished its federated standardisation (no "
            "standardize.json): the model's inputs are unknown"
        )
    if standardization is not None:
        meta["standardize"] = {
            "mean": standardization[0].tolist(),
            "std": standardization[1].tolist(),
        }
    base = _output_base_made(Path(out))
    files = [_write(base.with_name(base.name + ".npz"), lambda f: _write_npz(f, tensors, meta))]
    more_files, more_notes = _write_format_files(
        base, learner, model, torch_state, scale=scale, meta=meta, with_onnx=with_onnx
    )
    return Export(
        files=files + more_files,
        parameters=size,
        next_round=checkpoint.next_round,
        rounds=config.training.rounds,
        tensors=list(tensors),
        input_scale=scale,
        node=node,
        notes=notes + more_notes,
    )


def _restored_learner(
    state_dir: Path, config: Config, config_file: Path
) -> tuple[Learner, Checkpoint, int]:
    """The config's model with the checkpoint's parameters in it, the checkpoint and the
    parameter count: the checkpoint is a flat vector that only the model gives shapes to."""
    model = config.training.model
    learner = build_learner(
        model.as_mapping(), config.seed, source=str(config_file), torch_threads=None
    )
    template = learner.get_weights()
    size = int(flatten(template).size)
    checkpoint = load_checkpoint(
        state_dir,
        expected_digest=config.digest,
        expected_size=size,
        digest_with_rounds=config.digest_with_rounds,
    )
    if checkpoint is None:
        raise P2PFLError(
            f"{state_dir / CHECKPOINT_NAME}: no checkpoint (a node writes one after every "
            "round; is this a node's --state-dir, and has it finished a round?)"
        )
    learner.set_weights(unflatten(checkpoint.params, template))
    return learner, checkpoint, size


def _chosen_input_scale(
    input_scale: float | None, config: Config, logged_scale: float | None, state_dir: Path
) -> tuple[float, str | None]:
    """The divisor the node applied to its features, and a note when it had to be assumed:
    the exported model is only right for inputs scaled as the node's were."""
    if input_scale is not None:
        if not (math.isfinite(input_scale) and input_scale > 0):
            raise P2PFLError(f"--input-scale must be a number > 0, got {input_scale!r}")
        return float(input_scale), None
    if config.training.input_scale is not None:
        return config.training.input_scale, None
    if logged_scale is not None:
        return logged_scale, None
    return 1.0, (
        f"input_scale is auto and {state_dir / _EVENTS_NAME} has no node_start under this "
        "config: assuming 1 (features not divided); pass --input-scale if the node's "
        "data went beyond [-1, 1]"
    )


def _output_base_made(out: Path) -> Path:
    """:func:`output_base` of ``out``, with its directory created (an operator's error if
    that fails, not a traceback)."""
    base = output_base(out)
    try:
        base.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise P2PFLError(f"{base.parent}: cannot create the output directory: {exc}") from exc
    return base


def _write_format_files(
    base: Path,
    learner: Learner,
    model: ModelConfig,
    torch_state: Mapping[str, Any] | None,
    *,
    scale: float,
    meta: Mapping[str, Any],
    with_onnx: bool,
) -> tuple[list[Path], list[str]]:
    """The files beside the .npz (``.pt`` for torch, ``.onnx`` for the numpy models when
    onnx is installed) and notes on what was not written and why."""
    if torch_state is not None:
        state = torch_state
        path = _write(base.with_name(base.name + ".pt"), lambda f: _torch_save(state, f))
        return [path], [
            "torch model: no ONNX file (torch.onnx.export needs more packages); rebuild the "
            f"module with {model.factory} and load_state_dict the .pt"
        ]
    if model.kind == "custom":
        return [], ["custom learner: only the .npz (its arrays in get_weights() order)"]
    if not with_onnx:
        return [], []
    try:
        import onnx as _onnx  # noqa: F401  (an optional extra)
    except ImportError:
        return [], [f"onnx not installed: no ONNX file ({ONNX_HINT})"]
    standardize = meta.get("standardize")
    graph = build_onnx(
        learner,
        model,
        input_scale=scale,
        meta=meta,
        standardize=None
        if standardize is None
        else (np.array(standardize["mean"]), np.array(standardize["std"])),
    )
    data = graph.SerializeToString()
    return [_write(base.with_name(base.name + ".onnx"), lambda f: f.write(data))], []


def _torch_learner(learner: Learner) -> TorchLearner:
    from p2pfl.learning.torch_learner import TorchLearner

    if not isinstance(learner, TorchLearner):  # build_learner guarantees it for kind torch
        raise TypeError(f"expected a TorchLearner, got {type(learner).__name__}")
    return learner


def _torch_save(state: Mapping[str, Any], handle: IO[bytes]) -> None:
    import torch

    torch.save(dict(state), handle)


def _named_tensors(
    learner: Learner, model: ModelConfig, torch_state: Mapping[str, Any] | None
) -> dict[str, np.ndarray]:
    """Each tensor under the name a reader expects (copies, detached from the model)."""
    if torch_state is not None:
        named = {name: tensor.numpy() for name, tensor in torch_state.items()}
    elif model.kind in ("softmax", "mlp"):
        weights = learner.get_weights()
        named = {}
        for i in range(0, len(weights), 2):
            named[f"W{i // 2 + 1}"] = np.array(weights[i])
            named[f"b{i // 2 + 1}"] = np.array(weights[i + 1])
    else:
        named = {f"weight_{i}": np.array(w) for i, w in enumerate(learner.get_weights())}
    if "meta" in named:
        raise P2PFLError("the model has a tensor named 'meta', which the export reserves")
    return named


def _meta(
    config: Config,
    model: ModelConfig,
    next_round: int,
    parameters: int,
    input_scale: float,
    node: str | None,
    tensors: list[str],
) -> dict[str, Any]:
    """What a reader needs to use the arrays: the model section, where training stood, and
    the divisor the features need (``x / input_scale`` is what the model saw)."""
    return {
        "format": EXPORT_FORMAT,
        "kind": model.kind,
        "task": model.task,
        "inputs": model.inputs,
        "outputs": model.outputs,
        "hidden": list(model.hidden),
        "factory": model.factory,
        "options": dict(model.options),
        "optimizer": dict(model.optimizer),
        "round": next_round,
        "rounds": config.training.rounds,
        "parameters": parameters,
        "input_scale": input_scale,
        "network": config.network,
        "seed": config.seed,
        "node": node,
        "config_digest": config.digest.hex(),
        "tensors": tensors,
    }


def _write(path: Path, fill: Callable[[IO[bytes]], object]) -> Path:
    """Write through a temporary file renamed into place (no torn file on failure)."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as handle:
            fill(handle)
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise P2PFLError(f"{path}: cannot write: {exc.strerror or exc}") from exc
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def _write_npz(handle: IO[bytes], tensors: Mapping[str, np.ndarray], meta: Any) -> None:
    """The ``np.savez`` layout, written by hand: any tensor name works (savez's keywords
    would clash with a key named ``file``) and pickling is off for every array."""
    arrays = {**tensors, "meta": np.array(json.dumps(meta, sort_keys=True))}
    with zipfile.ZipFile(handle, "w", zipfile.ZIP_STORED, allowZip64=True) as archive:
        for name, array in arrays.items():
            with archive.open(name + ".npy", "w", force_zip64=True) as member:
                np.lib.format.write_array(member, np.asarray(array), allow_pickle=False)


# --- ONNX --------------------------------------------------------------------------------


def _input_nodes(
    input_scale: float, standardize: tuple[np.ndarray, np.ndarray] | None
) -> tuple[list[Any], list[Any], str]:
    """The graph's first nodes: the features as the node saw them (standardised, or
    divided by the input scale). Returns (initializers, nodes, the tensor they end in)."""
    from onnx import helper, numpy_helper

    initializers: list[Any] = []
    nodes: list[Any] = []
    current = "x"
    if standardize is not None:
        mean, std = (np.asarray(a, dtype=np.float32) for a in standardize)
        initializers.append(numpy_helper.from_array(mean, "mean"))
        initializers.append(numpy_helper.from_array(std, "std"))
        nodes.append(helper.make_node("Sub", ["x", "mean"], ["x_centred"], name="centre"))
        nodes.append(helper.make_node("Div", ["x_centred", "std"], ["x_std"], name="standardize"))
        current = "x_std"
    elif input_scale != 1.0:
        initializers.append(
            numpy_helper.from_array(np.array(1.0 / input_scale, dtype=np.float32), "inv_scale")
        )
        nodes.append(helper.make_node("Mul", ["x", "inv_scale"], ["x_scaled"], name="scale"))
        current = "x_scaled"
    return initializers, nodes, current


def build_onnx(
    learner: Learner,
    model: ModelConfig,
    *,
    input_scale: float = 1.0,
    meta: Mapping[str, Any] | None = None,
    standardize: tuple[np.ndarray, np.ndarray] | None = None,
) -> onnx.ModelProto:
    """The dense network as an ONNX graph (opset :data:`ONNX_OPSET`), checked.

    Input ``x`` float32 ``[N, inputs]`` of raw features (divided by ``input_scale``, or
    standardised with ``standardize``'s mean and deviation, inside the graph, as the node
    did). A Gemm per layer, Relu between; a classifier outputs
    ``probabilities`` (Softmax) and ``logits``, a regressor ``y``.
    """
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    if not isinstance(learner, MLP | SoftmaxRegression):
        raise TypeError(f"ONNX export needs a numpy softmax/mlp model, got {type(learner)}")
    weights = [np.asarray(w, dtype=np.float32) for w in learner.get_weights()]
    layers = len(weights) // 2
    initializers, nodes, current = _input_nodes(input_scale, standardize)
    classification = model.task == "classification"
    for layer in range(layers):
        w_name, b_name = f"W{layer + 1}", f"b{layer + 1}"
        initializers.append(numpy_helper.from_array(weights[2 * layer], w_name))
        initializers.append(numpy_helper.from_array(weights[2 * layer + 1], b_name))
        last = layer == layers - 1
        out = ("logits" if classification else "y") if last else f"h{layer + 1}_pre"
        nodes.append(
            helper.make_node("Gemm", [current, w_name, b_name], [out], name=f"dense{layer + 1}")
        )
        if not last:
            nodes.append(
                helper.make_node("Relu", [out], [f"h{layer + 1}"], name=f"relu{layer + 1}")
            )
            current = f"h{layer + 1}"
        else:
            current = out
    n_out = model.outputs
    outputs = []
    if classification:
        nodes.append(
            helper.make_node("Softmax", ["logits"], ["probabilities"], axis=1, name="softmax")
        )
        outputs.append(
            helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["N", n_out])
        )
        outputs.append(helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", n_out]))
    else:
        outputs.append(helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", n_out]))
    graph = helper.make_graph(
        nodes,
        f"p2pfl_{model.kind}",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", model.inputs])],
        outputs,
        initializer=initializers,
    )
    from p2pfl import __version__

    proto = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", ONNX_OPSET)],
        producer_name="p2pfl",
        producer_version=__version__,
        doc_string=f"p2pfl {model.kind} {model.task} model; x: raw features "
        f"(divided by {input_scale:g} inside the graph)",
    )
    proto.ir_version = ONNX_IR_VERSION
    if meta is not None:
        helper.set_model_props(proto, {"p2pfl": json.dumps(meta, sort_keys=True)})
    onnx.checker.check_model(proto, full_check=True)
    return proto


# --- command line ------------------------------------------------------------------------


def _size(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def cmd_export(args: argparse.Namespace) -> int:
    """Print what was written: the files and their sizes, the parameters, the round."""
    result = export_checkpoint(
        Path(args.state_dir),
        None if args.config is None else Path(args.config),
        Path(args.out),
        input_scale=args.input_scale,
        with_onnx=not args.no_onnx,
    )
    who = f"{result.node}'s model" if result.node else "model"
    print(
        f"exported {who} after round {result.next_round} of {result.rounds}: "
        f"{result.parameters} parameters in {len(result.tensors)} tensors"
    )
    for path in result.files:
        print(f"  wrote {path} ({_size(path.stat().st_size)})")
    if result.input_scale != 1.0:
        print(
            f"  inputs: the model expects features divided by {result.input_scale:g} "
            "(done inside the ONNX graph; meta['input_scale'] in the .npz)"
        )
    for note in result.notes:
        print(f"  note: {note}")
    return 0


def register(
    subparsers: argparse._SubParsersAction[argparse.ArgumentParser],
) -> argparse.ArgumentParser:
    """Add ``export``; it sets ``func`` to a handler returning an exit code."""
    p = subparsers.add_parser(
        "export",
        help="write a node's trained model as .npz (+ .onnx for numpy models, .pt for torch)",
        description="Load the checkpoint in a node's state directory and write the model in "
        "standard formats: BASE.npz always (named arrays and a JSON 'meta'), BASE.onnx for "
        "softmax/mlp models (if onnx is installed), BASE.pt for torch models.",
        epilog="BASE is --out without a .npz/.pt/.onnx suffix ('--out model' writes "
        "model.npz and its siblings; an existing directory means DIR/model). Without "
        "--config, STATE_DIR/../../peers.yaml (a harness run) or STATE_DIR/peers.yaml.",
    )
    p.add_argument("state_dir", metavar="STATE_DIR", help="the node's --state-dir")
    p.add_argument(
        "--config", metavar="PEERS_YAML", help="the run's peers.yaml (found if next to a run)"
    )
    p.add_argument("--out", "-o", required=True, metavar="FILE", help="output file base name")
    p.add_argument(
        "--input-scale",
        type=float,
        metavar="S",
        help="the divisor the node applied to its features (default: from the config, else "
        "from the node's events.jsonl, else 1)",
    )
    p.add_argument("--no-onnx", action="store_true", help="do not write the ONNX file")
    p.set_defaults(func=cmd_export)
    return p
