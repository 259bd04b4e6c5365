"""The file data plane: positional writes and reads in one thread call, streaming
writeback (``sync_file_range``) and dropping what was written or read from the page
cache (``posix_fadvise(DONTNEED)``), checked on real files."""

from __future__ import annotations

import ctypes
import errno
import hashlib
import mmap
import os
from pathlib import Path

import pytest

from vdistream import threads
from vdistream.engines import FileConsumer
from vdistream.errors import StorageError
from vdistream.pipeline import HashingSink, HashingSource
from vdistream.storage import FileStorage, NullStorage

MIB = 1 << 20

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = (
    ctypes.c_void_p,
    ctypes.c_size_t,
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_long,
)
_libc.munmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t)
_libc.mincore.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p)


def resident_pages(path: Path) -> int:
    """How many of ``path``'s pages are in the page cache (``mmap`` + ``mincore``)."""
    size = path.stat().st_size
    if not size:
        return 0
    fd = os.open(path, os.O_RDONLY)
    try:
        address = _libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
        if address in (None, ctypes.c_void_p(-1).value):
            pytest.skip(f"mmap failed: {os.strerror(ctypes.get_errno())}")
        try:
            pages = (size + mmap.PAGESIZE - 1) // mmap.PAGESIZE
            vector = (ctypes.c_ubyte * pages)()
            if _libc.mincore(address, size, vector) != 0:
                pytest.skip(f"mincore failed: {os.strerror(ctypes.get_errno())}")
            return sum(byte & 1 for byte in vector)
        finally:
            _libc.munmap(address, size)
    finally:
        os.close(fd)


@pytest.fixture
def dropping(tmp_path: Path) -> Path:
    """A directory whose file system drops clean pages on DONTNEED (tmpfs does not)."""
    probe = tmp_path / "probe"
    probe.write_bytes(os.urandom(4 * mmap.PAGESIZE))
    fd = os.open(probe, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
    if resident_pages(probe):
        pytest.skip("this file system keeps pages after POSIX_FADV_DONTNEED")
    probe.unlink()
    return tmp_path


class Recorder:
    """Stands in for libc's sync_file_range: records the calls, fails with ``errno``."""

    def __init__(self, fail: int = 0) -> None:
        self.calls: list[tuple[int, int, int]] = []
        self.fail = fail

    def __call__(self, fd: int, offset: int, count: int, flags: int) -> int:
        self.calls.append((offset, count, flags))
        return self.fail


def test_writeback_starts_each_window_and_settles_the_one_before(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    recorder = Recorder()
    monkeypatch.setattr(threads, "_libc_sync_file_range", lambda: recorder)
    dropped: list[tuple[int, int]] = []
    monkeypatch.setattr(threads, "_drop", lambda fd, offset, count: dropped.append((offset, count)))
    writeback = threads.Writeback(3, window=100)
    writeback.wrote(99)  # not a whole window yet
    assert recorder.calls == []
    writeback.wrote(250)  # windows [0,100) and [100,200) complete
    write, settle = 2, 1 | 2 | 4
    assert recorder.calls == [(0, 100, write), (100, 100, write), (0, 100, settle)]
    assert dropped == [(0, 100)]
    writeback.wrote(240)  # going back (a rewrite) changes nothing
    writeback.finish()
    assert dropped == [(0, 100), (100, 0)]  # after the fsync: the rest of the file


def test_writeback_turns_itself_off_where_unsupported_and_raises_io_errors(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(threads, "_libc_sync_file_range", lambda: Recorder(errno.ESPIPE))
    off = threads.Writeback(3, window=10)
    off.wrote(100)
    assert not off.enabled
    monkeypatch.setattr(threads, "_libc_sync_file_range", lambda: Recorder(errno.EIO))
    with pytest.raises(OSError) as caught:
        threads.Writeback(3, window=10).wrote(100)
    assert caught.value.errno == errno.EIO


def test_writeback_on_a_pipe_is_a_no_op() -> None:
    read, write = os.pipe()
    try:
        writeback = threads.Writeback(write, window=mmap.PAGESIZE)
        os.write(write, b"x" * 3 * mmap.PAGESIZE)
        writeback.wrote(3 * mmap.PAGESIZE)  # ESPIPE: off, no error
        writeback.finish()
        assert not writeback.enabled or threads._libc_sync_file_range() is None
    finally:
        os.close(read)
        os.close(write)


@pytest.mark.asyncio
async def test_a_committed_backup_stream_leaves_no_pages_in_the_cache(dropping: Path) -> None:
    storage = FileStorage(dropping / "store")
    data = os.urandom(3 * threads.WRITEBACK_WINDOW + 12345)
    sink = HashingSink(await storage.open_sink("b/stream", device="d0"))
    assert sink.blocking_writes
    with memoryview(data) as view:
        for offset in range(0, len(data), MIB):
            await sink.write(view[offset : offset + MIB])
    await sink.commit()
    path = dropping / "store" / "b" / "stream"
    assert path.read_bytes() == data
    assert sink.sha256 == hashlib.sha256(data).hexdigest()
    # read_bytes above cached it again: drop it, then read it through a source
    fd = os.open(path, os.O_RDONLY)
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    os.close(fd)
    await _check_source_drops(storage, path, data)


async def _check_source_drops(storage: FileStorage, path: Path, data: bytes) -> None:
    source = HashingSource(await storage.open_source("b/stream"))
    assert source.blocking_reads
    buffer = bytearray(MIB)
    got = bytearray()
    with memoryview(buffer) as view:
        while count := await source.readinto(view):
            got += view[:count]
    await source.close()
    assert bytes(got) == data
    assert source.sha256 == hashlib.sha256(data).hexdigest()
    assert resident_pages(path) == 0


@pytest.mark.asyncio
async def test_a_committed_stream_without_drops_is_complete(tmp_path: Path) -> None:
    """The same bytes land whatever the file system does with the advice."""
    storage = FileStorage(tmp_path / "store")
    data = os.urandom(threads.WRITEBACK_WINDOW * 2 + 77)
    sink = await storage.open_sink("k")
    with memoryview(data) as view:
        await sink.write(view[:1000])
        await sink.write(view[1000:])
    await sink.flush()
    await sink.commit()
    assert (tmp_path / "store" / "k").read_bytes() == data


@pytest.mark.asyncio
async def test_positional_writes_and_reads_in_one_thread_call(tmp_path: Path) -> None:
    storage = FileStorage(tmp_path)
    sink = await storage.open_sink("p")
    await sink.write(memoryview(b"world"), position=6)
    sink.write_blocking(memoryview(b"hello "), position=0)  # the blocking twin
    assert sink.size == 11
    assert sink.bytes_written == 11
    await sink.commit()
    source = await storage.open_source("p")
    buffer = bytearray(5)
    assert source.readinto_blocking(memoryview(buffer), position=6) == 5
    assert bytes(buffer) == b"world"
    assert await source.readinto(memoryview(buffer), position=0) == 5
    assert bytes(buffer) == b"hello"
    await source.close()
    with pytest.raises(StorageError, match="closed"):
        source.readinto_blocking(memoryview(buffer))


@pytest.mark.asyncio
async def test_blocking_writes_keep_the_sink_rules(tmp_path: Path) -> None:
    storage = FileStorage(tmp_path)
    sink = await storage.open_sink("k", device="d1")
    await sink.abort()
    with pytest.raises(StorageError, match="aborted"):
        sink.write_blocking(memoryview(b"late"))
    null = await NullStorage().open_sink("n")
    assert null.blocking_writes
    null.write_blocking(memoryview(b"abc"))
    assert null.size == 3
    await null.commit()


@pytest.mark.asyncio
async def test_a_restored_file_is_streamed_to_disk_and_not_cached(dropping: Path) -> None:
    data = os.urandom(2 * threads.WRITEBACK_WINDOW + 4321)
    target = FileConsumer(dropping / "restored")
    with memoryview(data) as view:
        for offset in range(0, len(data), 3 * MIB):
            await target.write(view[offset : offset + 3 * MIB])
    await target.finish()
    path = dropping / "restored"
    assert resident_pages(path) == 0
    assert path.read_bytes() == data
