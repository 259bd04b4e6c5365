"""The daemon's commands on the command line: ``serve``, ``jobs``, ``job``, ``abort``,
``prune``. (Filled in with the daemon.)"""

from __future__ import annotations

import argparse

__all__ = ["register_commands"]


def register_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the daemon's subcommands to the ``vdistream`` parser."""
