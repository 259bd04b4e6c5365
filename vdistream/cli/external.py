"""The engine side of a set in another process: ``vdistream feed`` and ``vdistream drain``.

``vdistream backup external:NAME DEST`` publishes a set named NAME and waits for an
engine to open it; ``vdistream feed NAME`` is such an engine: it opens the set, stripes
and frames its standard input over the set's devices exactly as the built-in ``cmd:``
engine does, and ends the backup at the end of its input. ``vdistream restore BACKUP
external:NAME`` publishes the restore's set; ``vdistream drain NAME`` opens it and
writes the reassembled, verified stream to its standard output. The work is
``vdistream.engines.external``'s ``feed`` and ``drain``.

The contract: stdout carries nothing but ``drain``'s data; stderr one line on a failure
(``vdistream: error: ...``), and with ``-v`` the log events and a summary. Exit codes:
0 the set was served to its end (the other side commits or publishes), 1 it failed
(the set was aborted, so the other side's job fails too), 2 bad usage (an option, a
NAME that is no set name or too long for the runtime directory, a set whose device
count is not ``--devices``, ``feed`` from or ``drain`` to a terminal). ``drain`` whose
reader went away (``| head -c 10``) exits 141 and says nothing, as a command killed by
SIGPIPE does (the restore on the other side fails: it was not read to its end).
An abort by the other side (or its death) ends a ``feed`` waiting for its input or a
``drain`` waiting for its reader at once.
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path
from typing import Any

import click

from vdistream.cli.framework import CommandError, Params, logging_options, options, runs, say
from vdistream.cli.framework import verbose as _verbose
from vdistream.cli.params import BLOCK_SIZE, DEVICES, MAX_TRANSFER_SIZE
from vdistream.errors import VdistreamError

__all__ = ("drain", "feed")

_NAME = click.argument(
    "name", help="The set's name, as the other side published it (external:NAME)."
)
_RUNTIME_DIR = click.option(
    "--runtime-dir",
    metavar="DIR",
    type=click.Path(file_okay=False),
    help="Where the set is published. [default: VDISTREAM_RUNTIME_DIR, else "
    "$XDG_RUNTIME_DIR/vdistream, else /tmp/vdistream-UID; the daemon's: /run/vdistream]",
)


def _block_size(text: str) -> Any:
    return click.option(
        "--block-size", type=BLOCK_SIZE, default="64K", show_default=True, help=text
    )


_FEED_COMMON = options(
    _RUNTIME_DIR,
    _block_size(
        "BLOCKSIZE: a power of two from 512 to 64K (`vdistream drain` of this backup must "
        "be given the same)."
    ),
    click.option(
        "--max-transfer-size",
        type=MAX_TRANSFER_SIZE,
        default="1M",
        show_default=True,
        help="Largest transfer (MAXTRANSFERSIZE): a multiple of 64K from 64K to 4M.",
    ),
)
_DRAIN_COMMON = options(
    _RUNTIME_DIR,
    _block_size(
        "The backup's BLOCKSIZE (its `feed --block-size`, or `backup --block-size`; "
        'its manifest.json: vdi "block_size").'
    ),
    click.option(
        "--max-transfer-size",
        type=MAX_TRANSFER_SIZE,
        default="1M",
        show_default=True,
        help="Largest transfer (MAXTRANSFERSIZE): a multiple of 64K from 64K to 4M.",
    ),
)
#: drain's exit code when its reader went away: a process killed by SIGPIPE's, silently
_BROKEN_PIPE = 128 + 13
_VD_PREFIX = re.compile(r"\b(?:VD_E_[A-Z_]+|HRESULT 0x[0-9A-F]{8}): ")


def _striping(params: Params) -> Any:
    from vdistream.engines.striping import StripingOptions

    return StripingOptions(
        block_size=params["block_size"], max_transfer_size=params["max_transfer_size"]
    )


def _directory(params: Params) -> Path | None:
    given = params["runtime_dir"]
    return Path(given).absolute() if given is not None else None


def _check_name(params: Params) -> None:
    """A NAME that is no set name, or whose socket path is too long for the runtime
    directory, is a usage error (exit 2), told before anything is opened."""
    from vdistream.engines.external import check_socket_path
    from vdistream.errors import ConfigError

    try:
        check_socket_path(params["name"], _directory(params))
    except ConfigError as exc:
        raise click.UsageError(str(exc)) from None


_BLOCK_SIZE = re.compile(r"written with BLOCKSIZE=(?P<size>\d+), this restore uses \d+")
#: a stream shorter than this drain's block size: fed with a smaller --block-size?
_BEFORE_HEADER = re.compile(r"the stream ends after \d+ bytes, before its header block")
#: the core's words for the client's side of an abort, in a feed's or drain's terms
_CLIENT_WORDS = (
    ("the client signalled abort: ", "the {job} that published it aborted it: "),
    ("the client signalled abort", "the {job} that published it aborted it (its output says why)"),
    ("the client stopped serving the set", "the {job} that published it stopped"),
    ("the client process died", "the {job} that published it ended or died"),
    ("the client failed a command", "the {job} that published it failed a command"),
)


def _failed(name: str, exc: VdistreamError, job: str, io: str = "") -> CommandError:
    """The engine's error as one line in the user's terms (no VDI codes); ``job``:
    what published the set (``backup``, ``restore``); ``io``: what failed when the
    cause is the standard stream's ``OSError`` (a full disk, EIO)."""
    cause = exc.__cause__
    if io and isinstance(cause, OSError) and cause.strerror:
        return CommandError(f"{io}: {cause.strerror} (set {name!r}; the {job} was aborted)")
    text = _VD_PREFIX.sub("", " ".join(str(exc).split()))
    for words, ours in _CLIENT_WORDS:
        text = text.replace(words, ours.format(job=job))
    # the BLOCKSIZE is the engine's choice, made before it reads the stream's header
    text = _BLOCK_SIZE.sub(r"\g<0> (give --block-size \g<size>)", text)
    text = _BEFORE_HEADER.sub(r"\g<0> (fed with a smaller --block-size? give drain the same)", text)
    text = text.replace(f" (set {name!r})", "")  # the VDI error and the engine's both add it
    return CommandError(text if repr(name) in text else f"{text} (set {name!r})")


@click.command(
    "feed",
    short_help="Be the engine of a published backup: stripe stdin over its devices.",
    epilog="Reads standard input to its end (a file or a pipe; not a terminal: exit 2). "
    "Prints nothing on stdout; with -v a summary on stderr. Exit 0 when the set took the "
    "whole input and was closed (the backup on the other side then commits); 1 when the "
    "set was aborted (by either side) or its backup failed.",
)
@_NAME
@click.option(
    "--devices",
    type=DEVICES,
    help="The number of devices the set must have (its backup's --devices); a set with "
    "another count is refused (exit 2). [default: whatever the set has]",
)
@_FEED_COMMON
@logging_options
@runs("the set was aborted; the backup on the other side fails")
async def feed(params: Params) -> int:
    """Open the set NAME (published by `vdistream backup external:NAME DEST`) and back up
    standard input into it, striped and framed over its devices as the cmd: engine does."""
    from vdistream.engines.base import EngineError
    from vdistream.engines.external import feed as run_feed

    name = params["name"]
    _check_name(params)
    if os.isatty(sys.stdin.fileno()):
        raise click.UsageError(
            "standard input is a terminal: feed backs up what it reads there; redirect "
            "it (vdistream feed NAME < FILE, or COMMAND | vdistream feed NAME)"
        )
    try:
        summary = await run_feed(
            name,
            sys.stdin.fileno(),
            devices=params["devices"],
            directory=_directory(params),
            options=_striping(params),
        )
    except EngineError as exc:
        raise _failed(name, exc, "backup", "cannot read standard input") from exc
    if _verbose():
        say(
            f"fed {summary.logical_bytes:,} bytes into set {name!r} over "
            f"{summary.devices} devices in {summary.seconds:.1f} s",
            err=True,
        )
    return 0


@click.command(
    "drain",
    short_help="Be the engine of a published restore: its stream on stdout.",
    epilog="Writes the stream on stdout (redirect it: not a terminal, exit 2); with -v a "
    "summary on stderr. The bytes leave as they are reassembled and verified: on a "
    "failure (exit 1) what was written is not a complete stream. A reader that goes away "
    "(| head -c 10) ends it silently with exit 141, as SIGPIPE would; the restore on the "
    "other side then fails.",
)
@_NAME
@_DRAIN_COMMON
@logging_options
@runs("the set was aborted; the restore on the other side fails")
async def drain(params: Params) -> int:
    """Open the set NAME (published by `vdistream restore BACKUP external:NAME`) and
    write the backup's stream to standard output."""
    from vdistream.engines.base import EngineError
    from vdistream.engines.external import drain as run_drain

    name = params["name"]
    _check_name(params)
    out = sys.stdout.fileno()
    if os.isatty(out):
        raise click.UsageError(
            "standard output is a terminal: redirect it (vdistream drain NAME > FILE, or | COMMAND)"
        )
    sys.stdout.flush()
    try:
        summary = await run_drain(
            name, out, directory=_directory(params), options=_striping(params)
        )
    except EngineError as exc:
        if isinstance(exc.__cause__, BrokenPipeError):
            # the reader went away (`| head -c 10`): quiet, as `cat` killed by SIGPIPE
            return _BROKEN_PIPE
        raise _failed(name, exc, "restore", "cannot write to standard output") from exc
    if _verbose():
        say(
            f"drained set {name!r}: {summary.logical_bytes:,} bytes from "
            f"{summary.devices} devices in {summary.seconds:.1f} s",
            err=True,
        )
    return 0
