"""``python -m tests.keys._main ARGS``: the command line with the ``key`` group registered
even before ``vdistream.cli.app`` lists it (then it is exactly ``python -m vdistream``)."""

from __future__ import annotations

import sys

from vdistream.cli import app
from vdistream.cli.keys import key

__all__ = ()

if "key" not in app._COMMANDS:
    app.cli.add_command(key)
sys.exit(app.main(sys.argv[1:]))
