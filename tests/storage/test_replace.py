"""``Storage.replace_bytes``: an atomic replacement of a committed small object (what
``vdistream key rotate`` rewrites manifests with), on file and memory storage; S3's is
tested against moto in tests/s3/test_replace.py."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from vdistream.errors import StorageError, StorageNotFoundError
from vdistream.storage import FileStorage, MemoryStores, Storage
from vdistream.storage.null import NullStorage


@pytest.mark.asyncio
async def test_file_replace_swaps_the_bytes_keeps_the_mode_and_leaves_no_temporary(
    tmp_path: Path,
) -> None:
    storage = FileStorage(tmp_path)
    await storage.write_bytes("b1/manifest.json", b"old")
    path = tmp_path / "b1" / "manifest.json"
    path.chmod(0o640)
    inode = path.stat().st_ino
    await storage.replace_bytes("b1/manifest.json", b"new and longer")
    assert path.read_bytes() == b"new and longer"
    assert path.stat().st_mode & 0o777 == 0o640
    assert path.stat().st_ino != inode  # a rename, not a rewrite in place
    assert sorted(os.listdir(tmp_path / "b1")) == ["manifest.json"]
    assert await storage.list() == ["b1/manifest.json"]


@pytest.mark.asyncio
async def test_file_replace_of_a_missing_object_is_not_found_and_creates_nothing(
    tmp_path: Path,
) -> None:
    storage = FileStorage(tmp_path)
    (tmp_path / "b1").mkdir()
    with pytest.raises(StorageNotFoundError):
        await storage.replace_bytes("b1/manifest.json", b"new")
    assert os.listdir(tmp_path / "b1") == []


@pytest.mark.asyncio
async def test_file_replace_that_fails_keeps_the_old_bytes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    storage = FileStorage(tmp_path)
    await storage.write_bytes("b1/manifest.json", b"old")

    def failing_fsync(fd: int) -> None:
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr("vdistream.storage.file.os.fsync", failing_fsync)
    with pytest.raises(StorageError, match="Input/output error"):
        await storage.replace_bytes("b1/manifest.json", b"new")
    monkeypatch.undo()
    assert (tmp_path / "b1" / "manifest.json").read_bytes() == b"old"
    assert os.listdir(tmp_path / "b1") == ["manifest.json"]  # the temporary is gone


@pytest.mark.asyncio
async def test_memory_replace() -> None:
    storage = MemoryStores().open_storage("memory://r/p")
    await storage.write_bytes("k", b"old")
    await storage.replace_bytes("k", b"new")
    assert await storage.read_bytes("k") == b"new"
    with pytest.raises(StorageNotFoundError):
        await storage.replace_bytes("missing", b"x")


@pytest.mark.asyncio
async def test_a_storage_that_cannot_replace_atomically_refuses() -> None:
    storage: Storage = NullStorage.from_url("null://")
    with pytest.raises(StorageError, match="cannot replace an object atomically"):
        await storage.replace_bytes("k", b"new")
