"""Review of the restore's file consumer (``FileConsumer``): the restored file's new
name is made durable (its directory is fsynced after the rename, as the file sink does
for a backup's streams), and a ``finish`` cancelled before its thread call started
leaves the file to ``discard``, which closes it and removes the partial file; a write
(or streaming writeback) error names the file."""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

import anyio
import pytest

from tests.storage.test_plane_writeback import Recorder
from vdistream import threads
from vdistream.engines import FileConsumer

pytestmark = pytest.mark.asyncio


def _open_fds_on(path: Path) -> list[int]:
    found = []
    for name in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{name}") == str(path):
                found.append(int(name))
        except OSError:
            continue
    return found


async def test_the_restored_name_is_made_durable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    synced: list[tuple[str, bool]] = []
    real_fsync = os.fsync

    def fsync(fd: int) -> None:  # records what is made durable, then does it
        synced.append((os.readlink(f"/proc/self/fd/{fd}"), stat.S_ISDIR(os.fstat(fd).st_mode)))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    target = FileConsumer(tmp_path / "restored.img")
    await target.write(memoryview(b"x" * 100_000))
    await target.finish()
    assert (tmp_path / "restored.img").read_bytes() == b"x" * 100_000
    assert synced[0] == (str(tmp_path / "restored.img.partial"), False)  # the data
    assert (str(tmp_path), True) in synced[1:]  # then the directory holding the new name


async def test_a_finish_cancelled_before_it_ran_leaves_the_file_to_discard(
    tmp_path: Path,
) -> None:
    target = FileConsumer(tmp_path / "restored.img")
    await target.write(memoryview(b"y" * 4096))
    partial = tmp_path / "restored.img.partial"
    assert _open_fds_on(partial)
    # every token of the pool is taken: finish waits for one and is cancelled there,
    # before its thread call started
    tokens = threads._tokens()
    holders = [object() for _ in range(int(tokens.total_tokens))]
    for holder in holders:
        await tokens.acquire_on_behalf_of(holder)
    try:
        with anyio.CancelScope() as scope:
            scope.cancel()
            await target.finish()
    finally:
        for holder in holders:
            tokens.release_on_behalf_of(holder)
    assert not (tmp_path / "restored.img").exists()
    await target.discard()
    assert not partial.exists()
    assert not _open_fds_on(partial)


async def test_a_write_or_writeback_error_names_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(threads, "_libc_sync_file_range", lambda: Recorder(errno.EIO))
    target = FileConsumer(tmp_path / "restored.img")
    with pytest.raises(OSError) as caught:
        await target.write(memoryview(bytes(threads.WRITEBACK_WINDOW)))
    assert caught.value.errno == errno.EIO
    assert caught.value.filename == str(tmp_path / "restored.img.partial")
    assert "restored.img.partial" in str(caught.value)
    await target.discard()
    assert not (tmp_path / "restored.img.partial").exists()
