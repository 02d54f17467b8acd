"""The shared peers.yaml content for a set of peers on one host.

Used by ``p2pfl init`` (a local try-out), the harness, the benchmarks and the tests: each
writes what an operator would write by hand. A module of its own so that none of them has
to import the command line (``p2pfl.cli``) to get it.
"""

from __future__ import annotations

from typing import Any

__all__ = ["build_local_config"]


def url_host(host: str) -> str:
    """``host`` as a URL writes it: an IPv6 address in brackets (``[::1]``)."""
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


def build_local_config(
    *,
    peers: list[str],
    public_keys: dict[str, str],
    host: str,
    ports: dict[str, int],
    network: str,
    seed: int,
    rounds: int,
    topology: dict[str, Any],
    model: dict[str, Any],
    inputs: int,
    classes: int,
    learning_rate: float,
    batch_size: int,
    round_timeout: float,
    task: str = "classification",
    hosts: dict[str, str] | None = None,
) -> dict[str, Any]:
    """The shared peers.yaml content for a set of peers on one host (for ``task``
    regression, ``classes`` is the number of outputs); ``hosts`` gives some or all peers
    a host of their own instead."""
    hosts = hosts or {}
    size = {"classes": classes} if task == "classification" else {"task": task, "outputs": classes}
    return {
        "version": 1,
        "network": network,
        "seed": seed,
        "peers": {
            p: {
                "address": f"ws://{url_host(hosts.get(p, host))}:{ports[p]}",
                "public_key": public_keys[p],
            }
            for p in peers
        },
        "topology": topology,
        "training": {
            "rounds": rounds,
            "local_epochs": 1,
            "batch_size": batch_size,
            "learning_rate": learning_rate,
            "round_timeout": round_timeout,
            "model": {**model, "inputs": inputs, **size},
        },
        "aggregation": {"rule": "metropolis", "secure": False},
    }
