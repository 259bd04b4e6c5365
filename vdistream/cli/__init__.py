"""The ``vdistream`` command line (entry point ``vdistream.cli:main``); its contract is
in :mod:`vdistream.cli.app`."""

from vdistream.cli.app import build_parser, main

__all__ = ("build_parser", "main")
