"""file:// storage: the conformance suite, plus what only a real file system shows."""

from __future__ import annotations

import gc
import os
import re
import stat
import sys
from collections.abc import Callable
from pathlib import Path

import anyio
import pytest

from vdistream.errors import (
    StorageError,
    StorageExistsError,
    StorageIntegrityError,
    StorageNotFoundError,
    StorageURLError,
)
from vdistream.storage import FileSink, FileStorage, Source, Storage, open_storage
from vdistream.testing import CANCEL_DELAYS, StorageConformance, cancel_during


def files_under(root: Path) -> list[str]:
    """Every regular file below ``root`` (hidden temporaries included), as keys."""
    return sorted(
        Path(directory, name).relative_to(root).as_posix()
        for directory, _, names in os.walk(root)
        for name in names
    )


class TestFileConformance(StorageConformance):
    @pytest.fixture
    def storage(self, tmp_path: Path) -> Storage:
        return FileStorage(tmp_path / "store")

    def residue(self, storage: Storage) -> list[str]:
        assert isinstance(storage, FileStorage)
        return files_under(storage.path)


@pytest.fixture
def storage(tmp_path: Path) -> FileStorage:
    return FileStorage(tmp_path / "store")


@pytest.mark.asyncio
async def test_data_lives_in_a_hidden_temporary_until_commit(storage: FileStorage) -> None:
    sink = await storage.open_sink("db/full.bak", device="dev0")
    assert isinstance(sink, FileSink)
    await sink.write(memoryview(b"payload"))
    await sink.flush()
    temp = sink.temp_path
    assert temp.parent == storage.path / "db"  # beside its key (and a backup's lock)
    assert re.fullmatch(r"\.full\.bak\.[0-9a-f]{16}\.tmp", temp.name)
    assert files_under(storage.path) == [f"db/{temp.name}"]
    assert temp.read_bytes() == b"payload"
    assert await storage.list() == []

    await sink.commit()

    assert not temp.exists()
    assert files_under(storage.path) == ["db/full.bak"]
    assert (storage.path / "db" / "full.bak").read_bytes() == b"payload"
    assert sink.url == (storage.path / "db" / "full.bak").as_uri()


@pytest.mark.asyncio
async def test_committed_file_is_never_replaced_or_truncated(storage: FileStorage) -> None:
    await storage.write_bytes("dev0.bak", b"first backup")
    final = storage.path / "dev0.bak"
    before = os.stat(final)

    async with await storage.open_sink("dev0.bak") as second:
        await second.write(memoryview(b"second, longer backup"))
        with pytest.raises(StorageExistsError) as caught:
            await second.commit()

    assert str(final.as_uri()) in str(caught.value)
    after = os.stat(final)
    assert (after.st_ino, after.st_size, after.st_mtime_ns) == (
        before.st_ino,
        before.st_size,
        before.st_mtime_ns,
    )
    assert final.read_bytes() == b"first backup"
    assert files_under(storage.path) == ["dev0.bak"]


@pytest.mark.asyncio
async def test_commit_fsyncs_the_file_and_its_new_directories(
    storage: FileStorage, monkeypatch: pytest.MonkeyPatch
) -> None:
    synced: list[str] = []
    real_fsync = os.fsync

    def spy(fd: int) -> None:
        mode = os.fstat(fd).st_mode
        synced.append("dir" if stat.S_ISDIR(mode) else "file")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", spy)
    sink = await storage.open_sink("a/b/key")
    await sink.write(memoryview(b"x" * 10))
    await sink.flush()
    assert synced == ["file"]
    await sink.commit()
    # flush, the commit's own file fsync, then a/b, a and the root directory
    assert synced == ["file", "file", "dir", "dir", "dir"]


@pytest.mark.asyncio
async def test_commit_checks_the_byte_count_on_disk(storage: FileStorage) -> None:
    sink = await storage.open_sink("short", device="dev2")
    assert isinstance(sink, FileSink)
    await sink.write(memoryview(b"0123456789"))
    os.truncate(sink.temp_path, 4)  # something else damaged the file

    with pytest.raises(StorageIntegrityError, match="holds 4 bytes, the sink wrote 10"):
        await sink.commit()

    assert files_under(storage.path) == [sink.temp_path.name]  # kept until abort
    with pytest.raises(StorageError, match="failed"):
        await sink.commit()
    await sink.abort()
    assert files_under(storage.path) == []


@pytest.mark.asyncio
async def test_a_file_in_the_way_of_a_key_directory(storage: FileStorage) -> None:
    await storage.write_bytes("a", b"file")
    # The temporary lives in the key's directory, so the file in the way is found when
    # the sink opens (it used to be found at commit).
    with pytest.raises(StorageError, match="a file is in the way") as caught:
        await storage.open_sink("a/b")
    assert not isinstance(caught.value, StorageExistsError)
    assert files_under(storage.path) == ["a"]


@pytest.mark.asyncio
async def test_a_file_in_the_way_of_the_storage_directory(tmp_path: Path) -> None:
    (tmp_path / "store").write_bytes(b"not a directory")
    storage = FileStorage(tmp_path / "store")
    with pytest.raises(StorageError, match="a file is in the way") as caught:
        await storage.open_sink("key", device="dev4")
    assert not isinstance(caught.value, StorageExistsError)
    assert caught.value.device == "dev4"
    assert (tmp_path / "store").read_bytes() == b"not a directory"


@pytest.mark.asyncio
async def test_directories_and_temporaries_are_not_objects(storage: FileStorage) -> None:
    await storage.write_bytes("dir/key", b"1")
    with pytest.raises(StorageNotFoundError):
        await storage.stat("dir")
    with pytest.raises(StorageNotFoundError):
        await storage.open_source("dir")
    with pytest.raises(StorageURLError, match="reserved temporary name"):
        await storage.open_sink(".x.0123456789abcdef.tmp")
    # a stale temporary from a crashed process is never listed
    (storage.path / ".old.0123456789abcdef.tmp").write_bytes(b"junk")
    assert await storage.list() == ["dir/key"]


@pytest.mark.asyncio
async def test_missing_directory_is_empty_and_created_on_first_sink(tmp_path: Path) -> None:
    root = tmp_path / "not" / "yet"
    storage = open_storage(root)
    assert not root.exists()  # opening a storage does no I/O
    assert await storage.list() == []
    with pytest.raises(StorageNotFoundError):
        await storage.stat("x")
    await storage.write_bytes("x", b"1")
    assert (root / "x").read_bytes() == b"1"


@pytest.mark.parametrize(
    ("make_url", "relative"),
    [
        (lambda root: str(root), "."),
        (lambda root: root.as_uri(), "."),
        (lambda root: "file://localhost" + str(root), "."),
        (lambda root: "sub dir", "sub dir"),
        (lambda root: "file://" + str(root / "sub%20dir"), "sub dir"),
    ],
)
def test_file_urls_and_plain_paths(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    make_url: Callable[[Path], str],
    relative: str,
) -> None:
    monkeypatch.chdir(tmp_path)
    storage = open_storage(make_url(tmp_path))
    assert isinstance(storage, FileStorage)
    assert storage.path == (tmp_path / relative).absolute()
    assert storage.url == storage.path.as_uri()


@pytest.mark.parametrize("url", ["file://elsewhere/x", "file:relative", "file:///x?y=1"])
def test_malformed_file_urls(url: str) -> None:
    with pytest.raises(StorageURLError) as caught:
        open_storage(url)
    assert url in str(caught.value)
    assert caught.value.url == url


@pytest.mark.asyncio
async def test_cancelled_open_source_leaks_no_descriptor(
    storage: FileStorage, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An open abandoned by cancellation would leave a file object that only the
    garbage collector closes, with a ResourceWarning; shielded, none is lost."""
    await storage.write_bytes("key", b"data")
    unraisable: list[sys.UnraisableHookArgs] = []
    monkeypatch.setattr(sys, "unraisablehook", unraisable.append)
    target = str(storage.path / "key")

    def open_on_key() -> int:
        # Only descriptors on this file count: other tests' leftovers may come and go.
        count = 0
        for fd in os.listdir("/proc/self/fd"):
            try:
                count += os.readlink(f"/proc/self/fd/{fd}") == target
            except OSError:
                pass
        return count

    opened: list[Source] = []

    async def open_one() -> None:
        opened.append(await storage.open_source("key"))

    for delay in CANCEL_DELAYS:
        await cancel_during(open_one, delay)
        while opened:
            await opened.pop().close()
        await anyio.sleep(0.01)  # let an abandoned worker thread finish
        gc.collect()
        assert open_on_key() == 0, f"delay {delay}"
    assert [str(args.exc_value) for args in unraisable] == []
