"""Every option is checked where it is parsed: a bad value exits 2 with one line that
names the option in the user's terms, before anything touches DEST; help, completion
and the parser's own errors come from click."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import click
import pytest

from tests.cli.test_cli import vdistream
from vdistream.cli import build_parser

#: (option, value, words the message must contain)
BAD_VALUES = [
    ("--devices", "0", "from 1 to 64"),
    ("--devices", "65", "from 1 to 64"),
    ("--devices", "-1", "from 1 to 64"),
    ("--devices", "four", "whole number"),
    ("--max-transfer-size", "8M", "multiple of 64K from 64K to 4M"),
    ("--max-transfer-size", "1G", "multiple of 64K from 64K to 4M"),
    ("--max-transfer-size", "100K", "multiple of 64K from 64K to 4M"),
    ("--max-transfer-size", "0", "multiple of 64K from 64K to 4M"),
    ("--max-transfer-size", "lots", "not a size"),
    ("--block-size", "3000", "power of two from 512 to 65536"),
    ("--block-size", "128K", "power of two from 512 to 65536"),
    ("--block-size", "-512", "not a size"),
    ("--buffer-count", "0", "from 1 to 4096"),
    ("--buffer-count", "-3", "from 1 to 4096"),
    ("--stall-timeout", "-5", "above 0"),
    ("--stall-timeout", "0", "above 0"),
    ("--stall-timeout", "nan", "above 0"),
    ("--compress", "zstd:99", "1..19"),
    ("--compress", "gzip", "unknown algorithm"),
    ("--mode", "physical", "basebackup"),
]


@pytest.mark.parametrize(("option", "value", "words"), BAD_VALUES)
def test_bad_backup_option_is_one_usage_line(
    tmp_path: Path, option: str, value: str, words: str
) -> None:
    dest = tmp_path / "dest"
    done = vdistream("backup", "cmd:echo hello", str(dest), option, value, check=2)
    lines = done.stderr.splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith(f"vdistream: error: {option}"), lines[0]
    assert words in lines[0]
    assert "Traceback" not in done.stderr
    assert "_size" not in done.stderr
    assert "VD_E_" not in done.stderr
    assert done.stdout == ""
    assert not dest.exists()


@pytest.mark.parametrize(
    ("argv", "option"),
    [
        (["storage", "audit", "{dest}", "--min-age", "soon"], "--min-age"),
        (["storage", "audit", "{dest}", "--min-age", "5"], "--min-age"),
        (["prune", "{dest}", "--keep-within", "-3d"], "--keep-within"),
        (["prune", "{dest}", "--keep-within", "14"], "--keep-within"),
        (["prune", "{dest}", "--keep-last", "0"], "--keep-last"),
        (["jobs", "--limit", "0"], "--limit"),
        (["jobs", "--limit", "²"], "--limit"),
    ],
)
def test_bad_values_of_other_commands(tmp_path: Path, argv: list[str], option: str) -> None:
    dest = tmp_path / "dest"
    done = vdistream(*(a.format(dest=dest) for a in argv), check=2)
    lines = done.stderr.splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith(f"vdistream: error: {option}"), lines[0]
    assert "Traceback" not in done.stderr
    assert not dest.exists()


@pytest.mark.parametrize(
    "argv",
    [
        ["backup"],
        ["backup", "cmd:true", "/nowhere", "--devics", "3"],
        ["bakup", "x", "y"],
        [],
        ["storage"],
        ["restore", "only-one"],
    ],
)
def test_usage_errors_are_one_line(argv: list[str]) -> None:
    done = vdistream(*argv, check=2)
    lines = done.stderr.splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("vdistream: error: ")
    assert "Traceback" not in done.stderr


def test_sizes_in_every_spelling_are_taken(tmp_path: Path) -> None:
    """``64K``, ``4MiB``, ``1048576``, ``512`` are sizes; the backup records them."""
    import json

    dest = tmp_path / "dest"
    done = vdistream(
        "backup",
        "cmd:head -c 300000 /dev/urandom",
        str(dest),
        "--max-transfer-size",
        "256KiB",
        "--block-size",
        "512",
        "--buffer-count",
        "3",
        "--devices",
        "2",
        "--stall-timeout",
        "2m",
    )
    manifest = json.loads((dest / done.stdout.strip() / "manifest.json").read_text())
    assert manifest["vdi"]["max_transfer_size"] == 256 * 1024
    assert manifest["vdi"]["block_size"] == 512
    assert manifest["vdi"]["buffer_count"] == 3
    done = vdistream(
        "backup", "cmd:head -c 1000 /dev/zero", str(dest), "--max-transfer-size", "1048576"
    )
    manifest = json.loads((dest / done.stdout.strip() / "manifest.json").read_text())
    assert manifest["vdi"]["max_transfer_size"] == 1048576


def _walk(command: click.Command, path: str) -> list[tuple[str, click.Command]]:
    found = [(path, command)]
    if isinstance(command, click.Group):
        for name, sub in command.commands.items():
            found += _walk(sub, f"{path} {name}")
    return found


def test_every_option_and_positional_has_help() -> None:
    missing = []
    for path, command in _walk(build_parser(), "vdistream"):
        assert command.help or command.short_help, path
        for param in command.params:
            if not getattr(param, "help", None):
                missing.append(f"{path} {param.name}")
    assert missing == []


def test_help_and_version() -> None:
    done = vdistream("backup", "--help")
    assert "--max-transfer-size" in done.stdout
    assert "SOURCE" in done.stdout
    assert "What to back up" in done.stdout
    assert done.stderr == ""
    assert vdistream("--version").stdout.startswith("vdistream ")


def test_shell_completion_comes_from_click() -> None:
    env = {**os.environ, "_VDISTREAM_COMPLETE": "bash_source"}
    script = subprocess.run(
        [sys.executable, "-m", "vdistream"], env=env, capture_output=True, text=True, timeout=60
    )
    assert script.returncode == 0
    assert "_VDISTREAM_COMPLETE=bash_complete" in script.stdout
    env = {
        **os.environ,
        "_VDISTREAM_COMPLETE": "bash_complete",
        "COMP_WORDS": "vdistream backup x y --max-tr",
        "COMP_CWORD": "4",
    }
    words = subprocess.run(
        [sys.executable, "-m", "vdistream"], env=env, capture_output=True, text=True, timeout=60
    )
    assert "--max-transfer-size" in words.stdout
