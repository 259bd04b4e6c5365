"""A real full medium: a 1 MiB tmpfs, or RLIMIT_FSIZE where mounting is not allowed."""

from __future__ import annotations

import errno
import os
import resource
import signal
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from vdistream.errors import StorageError, StorageFullError
from vdistream.storage import FileStorage, Sink

LIMIT = 1 << 20


def _mount_tmpfs(mount_point: Path) -> bool:
    try:
        result = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={LIMIT}", "tmpfs", str(mount_point)],
            capture_output=True,
            check=False,
        )
    except FileNotFoundError:  # no mount binary
        return False
    return result.returncode == 0


@dataclass(frozen=True)
class SmallDisk:
    path: Path
    errno: int  # what the kernel reports when it is full


@pytest.fixture(params=["tmpfs", "rlimit"])
def small_disk(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[SmallDisk]:
    """A directory where writing more than 1 MiB fails: ENOSPC on a tmpfs of that size,
    else (and always for "rlimit") EFBIG from RLIMIT_FSIZE with SIGXFSZ ignored."""
    directory = tmp_path / "small"
    directory.mkdir()
    if request.param == "tmpfs" and _mount_tmpfs(directory):
        try:
            yield SmallDisk(directory, errno.ENOSPC)
        finally:
            subprocess.run(["umount", str(directory)], check=True)
        return
    old_limit = resource.getrlimit(resource.RLIMIT_FSIZE)
    old_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (LIMIT, old_limit[1]))
    try:
        yield SmallDisk(directory, errno.EFBIG)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, old_limit)
        signal.signal(signal.SIGXFSZ, old_handler)


@pytest.mark.asyncio
async def test_full_medium_raises_storage_full_and_leaves_nothing(small_disk: SmallDisk) -> None:
    storage = FileStorage(small_disk.path)
    chunk = memoryview(os.urandom(64 * 1024))
    sinks: list[Sink] = []

    async def back_up_two_mib() -> None:
        async with await storage.open_sink("db1/full.bak", device="dev0") as sink:
            sinks.append(sink)
            for _ in range(2 * LIMIT // len(chunk)):
                await sink.write(chunk)
            await sink.commit()

    with pytest.raises(StorageFullError) as caught:
        await back_up_two_mib()

    message = str(caught.value)
    assert str(small_disk.path / "db1" / "full.bak") in message
    assert "device 'dev0'" in message
    assert caught.value.device == "dev0"
    cause = caught.value.__cause__
    assert isinstance(cause, OSError)
    assert cause.errno == small_disk.errno
    assert 0 < sinks[0].bytes_written < 2 * LIMIT
    assert os.listdir(small_disk.path) == []  # neither the temporary nor the final name
    assert await storage.list() == []

    # the space is back: a small object fits again
    await storage.write_bytes("after", b"ok")
    assert (small_disk.path / "after").read_bytes() == b"ok"


@pytest.mark.asyncio
async def test_failed_sink_accepts_only_abort(small_disk: SmallDisk) -> None:
    storage = FileStorage(small_disk.path)
    sink = await storage.open_sink("big", device="dev1")
    with pytest.raises(StorageFullError):
        await sink.write(memoryview(bytes(2 * LIMIT)))
    with pytest.raises(StorageError, match="the sink is failed"):
        await sink.commit()
    assert os.listdir(small_disk.path) != []  # the temporary is still there until abort
    await sink.abort()
    assert os.listdir(small_disk.path) == []
