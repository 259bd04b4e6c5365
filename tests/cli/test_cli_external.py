"""The command line of ``external:NAME``, ``feed`` and ``drain``: bad usage exits 2 with
one line naming the option, before anything is published; ``--help`` describes them;
the daemon's client sends ``external:NAME`` targets unchanged."""

from __future__ import annotations

import os
import pty
import subprocess
import sys
from pathlib import Path

import pytest

from tests.cli.test_cli import vdistream
from vdistream.cli.daemon import absolute_target


@pytest.mark.parametrize(
    ("args", "line"),
    [
        (
            ("backup", "cmd:true", "DEST", "--wait", "5"),
            "vdistream: error: --wait goes with an external:NAME source or target",
        ),
        (
            ("backup", "sqlite:///x.db", "DEST", "--runtime-dir", "/tmp", "--wait", "5"),
            "vdistream: error: --runtime-dir, --wait go with an external:NAME source or target",
        ),
        (
            ("backup", "external:x", "DEST", "--wait", "0"),
            "vdistream: error: --wait 0: must be a number of seconds above 0",
        ),
        (
            ("backup", "external:", "DEST"),
            "vdistream: error: 'external:' names no virtual device set: write external:NAME "
            "(NAME: the set's name, as the engine opens it, e.g. `vdistream feed NAME`)",
        ),
        (
            ("backup", "external:x", "--daemon", "--wait", "5"),
            "vdistream: error: --wait cannot be used with --daemon: the daemon takes them "
            "from its settings ([databases.NAME])",
        ),
        (
            ("feed", "x", "--devices", "65"),
            "vdistream: error: --devices 65: must be a whole number from 1 to 64",
        ),
        (
            ("drain", "x", "--block-size", "3000"),
            "vdistream: error: --block-size 3000: must be a power of two from 512 to 65536",
        ),
        (("feed",), "vdistream: error: Missing argument 'NAME'."),
    ],
)
def test_bad_usage_exits_2_with_one_line(tmp_path: Path, args: tuple[str, ...], line: str) -> None:
    args = tuple(str(tmp_path / "dest") if a == "DEST" else a for a in args)
    done = vdistream(*args, check=2)
    assert done.stdout == ""
    assert done.stderr.splitlines() == [line]
    assert not (tmp_path / "dest").exists()


def test_drain_refuses_a_terminal(tmp_path: Path) -> None:
    leader, follower = pty.openpty()
    try:
        done = subprocess.run(
            [sys.executable, "-m", "vdistream", "drain", "x", "--runtime-dir", str(tmp_path)],
            stdout=follower,
            stderr=subprocess.PIPE,
            text=True,
            timeout=30,
        )
    finally:
        os.close(follower)
        os.close(leader)
    assert done.returncode == 2
    assert done.stderr.splitlines() == [
        "vdistream: error: standard output is a terminal: redirect it "
        "(vdistream drain NAME > FILE, or | COMMAND)"
    ]


def test_help_describes_feed_drain_and_the_external_options() -> None:
    for command in ("feed", "drain"):
        text = vdistream(command, "--help").stdout
        assert "--runtime-dir" in text
        assert "external:NAME" in text
    assert "--devices" in vdistream("feed", "--help").stdout
    listing = vdistream("--help").stdout
    assert "feed" in listing
    assert "drain" in listing
    for command in ("backup", "restore"):
        text = vdistream(command, "--help").stdout
        assert "--wait" in text
        assert "external:NAME" in text


def test_the_daemons_client_sends_external_targets_unchanged() -> None:
    assert absolute_target("external:nightly") == "external:nightly"
