"""The ``p2pfl`` command line: ``parser`` (the arguments), ``commands`` (their handlers and
``main``), ``launch`` (what ``run`` starts), ``harness_cmd``, ``args`` (argument types)."""

from __future__ import annotations


def main(argv: list[str] | None = None) -> int:
    """``p2pfl ...`` (imported lazily: ``p2pfl.cli.parser`` and ``launch`` stay usable
    without loading every command)."""
    from p2pfl.cli.commands import main as run_main

    return run_main(argv)


__all__ = ["main"]
