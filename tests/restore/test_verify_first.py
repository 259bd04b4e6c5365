"""A ``cmd:`` consumer cannot be undone: ``verify_first`` checks every stream completely
before the consumer sees a byte."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.restore.conftest import SMALL, flip_bit, streams
from vdistream.catalog import CatalogError
from vdistream.operations import BackupSettings, run_backup, run_restore

pytestmark = pytest.mark.asyncio

# More than a pipe holds (process.PIPE_SIZE): the command must be running, its output
# file open, before the restore can fail at the end of the damaged stream.
DATA = os.urandom(3_000_000)


async def command_backup(tmp_path: Path) -> Path:
    source = tmp_path / "source.bin"
    source.write_bytes(DATA)
    dest = tmp_path / "dest"
    outcome = await run_backup(
        f"cmd:cat {source}", str(dest), BackupSettings(devices=2, backup_id="b", **SMALL)
    )
    assert outcome.ok, outcome.result.error
    return dest


async def test_without_verify_first_the_command_has_seen_the_bytes(tmp_path: Path) -> None:
    dest = await command_backup(tmp_path)
    flip_bit(streams(dest, "b")[1], 100)
    out = tmp_path / "out.bin"
    result = await run_restore(f"{dest}/b", f"cmd:dd of={out} status=none")
    assert not result.ok
    assert out.exists()  # what the command did with the bytes stays: documented


async def test_verify_first_feeds_the_command_nothing_from_a_damaged_backup(
    tmp_path: Path,
) -> None:
    dest = await command_backup(tmp_path)
    flip_bit(streams(dest, "b")[1], 100)
    out = tmp_path / "out.bin"
    with pytest.raises(CatalogError, match=r"nothing was restored.*device 1") as raised:
        await run_restore(f"{dest}/b", f"cmd:dd of={out} status=none", verify_first=True)
    assert streams(dest, "b")[1].as_uri() in str(raised.value)
    assert not out.exists()  # the command never started


async def test_verify_first_then_restores_a_sound_backup(tmp_path: Path) -> None:
    dest = await command_backup(tmp_path)
    out = tmp_path / "out.bin"
    result = await run_restore(f"{dest}/b", f"cmd:dd of={out} status=none", verify_first=True)
    assert result.ok, result.error
    assert out.read_bytes() == DATA
