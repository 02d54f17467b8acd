"""The ``p2pfl`` command line."""

from p2pfl.cli.commands import main

__all__ = ["main"]
