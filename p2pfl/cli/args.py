"""Argument types of the command line: what ``--listen``, ``--topology``, ``--model`` and
``--metrics`` accept, each an ``argparse`` type that refuses bad text with a clear message."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any


def parse_listen(text: str) -> tuple[str, int]:
    host, _, port_text = text.rpartition(":")
    if not host or not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise argparse.ArgumentTypeError(f"expected HOST:PORT (e.g. 0.0.0.0:7070), got {text!r}")
    return host.strip("[]"), int(port_text)


def parse_metrics(text: str) -> tuple[str, int]:
    """``--metrics PORT`` or ``HOST:PORT`` (a bare port listens on loopback only)."""
    if text.isdigit():
        text = f"127.0.0.1:{text}"
    return parse_listen(text)


def parse_topology(text: str) -> dict[str, Any]:
    if text in ("full", "ring"):
        return {"kind": text}
    if text.startswith("k-regular:") and text.split(":", 1)[1].isdigit():
        return {"kind": "k-regular", "degree": int(text.split(":", 1)[1])}
    raise argparse.ArgumentTypeError(f"unknown topology {text!r} (full, ring, k-regular:D)")


def parse_harness_topology(text: str) -> dict[str, Any]:
    """As for init, or a file of explicit edges."""
    if text in ("full", "ring") or text.startswith("k-regular:"):
        return parse_topology(text)
    if Path(text).is_file():
        return {"kind": "explicit-file", "path": text}
    raise argparse.ArgumentTypeError(
        f"unknown topology {text!r} (full, ring, k-regular:D, or a YAML file with edges:)"
    )


#: The harness's SGD momentum for torch models when --momentum is not given.
TORCH_MOMENTUM = 0.9


#: ``--model torch:NAME`` for the shipped examples (p2pfl/learning/examples/torch_models.py).
TORCH_EXAMPLES = {
    "cnn": "p2pfl.learning.examples.torch_models:cnn",
    "mlp": "p2pfl.learning.examples.torch_models:mlp",
}


def parse_model(text: str) -> dict[str, Any]:
    if text == "softmax":
        return {"kind": "softmax"}
    if text == "mlp" or text.startswith("mlp:"):
        try:
            hidden = [int(h) for h in text.split(":", 1)[1].split(",")] if ":" in text else [64]
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"bad layer sizes in {text!r} (e.g. mlp:64,32)"
            ) from None
        return {"kind": "mlp", "hidden": hidden}
    if text.startswith("torch:"):
        name = text.split(":", 1)[1]
        factory = TORCH_EXAMPLES.get(name, name)
        if ":" not in factory:
            raise argparse.ArgumentTypeError(
                f"unknown torch model {name!r}: {', '.join(TORCH_EXAMPLES)} or MODULE:FUNCTION"
            )
        return {"kind": "torch", "factory": factory}
    raise argparse.ArgumentTypeError(
        f"unknown model {text!r} (softmax, mlp, mlp:H1,H2, torch:cnn, torch:mlp, "
        "torch:MODULE:FUNCTION)"
    )


def model_text(model: dict[str, Any]) -> str:
    """How the harness names a model in its report (``mlp:64``, ``torch:cnn``)."""
    if model["kind"] == "mlp":
        return f"mlp:{','.join(map(str, model['hidden']))}"
    if model["kind"] == "torch":
        short = {v: k for k, v in TORCH_EXAMPLES.items()}
        return f"torch:{short.get(model['factory'], model['factory'])}"
    return str(model["kind"])


def parse_seeds(text: str) -> list[int]:
    try:
        seeds = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected seeds like 1,2,3, got {text!r}") from None
    if not seeds or len(set(seeds)) != len(seeds) or min(seeds) < 0:
        raise argparse.ArgumentTypeError(f"expected distinct seeds >= 0 like 1,2,3, got {text!r}")
    return seeds


def positive_int(text: str) -> int:
    """A count of at least 1 (``--threads``, ``--nodes-per-process``)."""
    if not text.strip().isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}")
    return int(text)


def positive_float(text: str) -> float:
    """A finite amount above 0 (``--cpus-per-peer``, ``--memory-per-peer``)."""
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"expected a number above 0, got {text!r}")
    return value
