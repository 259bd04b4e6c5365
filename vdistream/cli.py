"""The ``vdistream`` command line.

Only the version for now; backup, restore, verify, list and serve arrive with the
coordinator, the engines and the daemon. Parsing lives here; the work lives in the
library, so that everything the CLI does can also be done by an embedding program.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from vdistream import __version__

__all__ = ["main"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vdistream",
        description="Stream database backups through virtual devices, the way SQL Server's "
        "VDI does.",
    )
    parser.add_argument("--version", action="version", version=f"vdistream {__version__}")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    build_parser().parse_args(argv)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
