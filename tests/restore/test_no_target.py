"""A failed restore leaves no target, and says which stream failed where it is now.

Every restore publishes its target only after every device's stream passed every check
(trailer, CRC, stored SHA-256, authentication tags): a bit flipped near the end of one
stream, where only the stored SHA-256 or the last authentication tag can see it, fails
the restore and leaves neither the target nor a partial file. Errors name the device by
its index and the stream by the location it was read from (a copied backup's copy), not
the set's internal names or the URL recorded in the manifest.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.restore.conftest import (
    backup_database,
    flip_bit,
    flip_bit_at,
    make_database,
    rows_of,
    streams,
)
from vdistream.coordinator import JobStatus
from vdistream.engines.base import StreamFormatError
from vdistream.errors import CorruptStreamError, StorageIntegrityError
from vdistream.operations import KeySource, run_restore, run_verify

pytestmark = pytest.mark.asyncio


async def copied_backup(
    tmp_path: Path, *, compress: str = "none", keys: KeySource | None = None
) -> Path:
    """A backup of a real database, copied elsewhere and the original removed, as a
    user copies a backup to another disk: the manifest's URLs name the old place."""
    database = make_database(tmp_path / "source.db")
    original = tmp_path / "original"
    await backup_database(database, original, compress=compress, keys=keys)
    copy = tmp_path / "copy"
    shutil.copytree(original, copy)
    shutil.rmtree(original)
    return copy


def assert_names_the_copy(message: str, copy: Path, index: int = 1) -> None:
    stream = streams(copy, "b")[index]
    assert f"device {index}" in message
    assert stream.as_uri() in message
    assert "original" not in message  # not the manifest's recorded URL
    assert "vdistream-" not in message  # no internal set or device name


@pytest.mark.parametrize(
    ("compress", "encrypted", "from_end"),
    [
        pytest.param("none", False, 1, id="plain-last-byte"),
        pytest.param("none", False, 100, id="plain-trailer"),
        pytest.param("zstd:3", False, 100, id="compressed"),
        pytest.param("none", True, 5, id="encrypted-tag"),
    ],
)
async def test_a_bit_flipped_near_the_end_leaves_no_sqlite_file(
    tmp_path: Path, key_file: Path, compress: str, encrypted: bool, from_end: int
) -> None:
    keys = KeySource(key_file=str(key_file)) if encrypted else None
    copy = await copied_backup(tmp_path, compress=compress, keys=keys)
    flip_bit(streams(copy, "b")[1], from_end)
    out = tmp_path / "out"
    out.mkdir()
    target = out / "restored.db"

    result = await run_restore(f"{copy}/b", str(target), keys=keys)

    assert result.status is JobStatus.FAILED
    assert isinstance(result.error, StorageIntegrityError | CorruptStreamError), result.error
    assert not target.exists()
    assert list(out.iterdir()) == []  # no partial file either
    assert_names_the_copy(str(result.error), copy)


async def test_the_undamaged_copy_restores(tmp_path: Path) -> None:
    copy = await copied_backup(tmp_path)
    target = tmp_path / "restored.db"
    result = await run_restore(f"{copy}/b", str(target))
    assert result.ok, result.error
    assert rows_of(target) == 3000


async def test_an_engine_error_names_the_device_index_and_the_stream(tmp_path: Path) -> None:
    copy = await copied_backup(tmp_path)
    flip_bit_at(streams(copy, "b")[1], 0)  # the header's magic: the engine's own check
    target = tmp_path / "restored.db"
    result = await run_restore(f"{copy}/b", str(target))
    assert isinstance(result.error, StreamFormatError), result.error
    assert_names_the_copy(str(result.error), copy)
    assert not target.exists()


async def test_verify_names_the_stream_where_it_is_now(tmp_path: Path, key_file: Path) -> None:
    for name, keys in (("plain", None), ("encrypted", KeySource(key_file=str(key_file)))):
        here = tmp_path / name
        here.mkdir()
        copy = await copied_backup(here, keys=keys)
        flip_bit(streams(copy, "b")[1], 100)
        report = await run_verify(f"{copy}/b", keys=keys)
        assert not report.ok
        (bad,) = [c for c in report.checks if not c.ok]
        assert bad.name == "device 1"
        assert_names_the_copy(f"{bad.name}: {bad.detail}", copy)


async def test_verify_reports_stored_and_stream_bytes(tmp_path: Path) -> None:
    copy = await copied_backup(tmp_path, compress="zstd:3")
    report = await run_verify(f"{copy}/b")
    assert report.ok, report.checks
    (restore,) = [c for c in report.checks if c.name == "restore"]
    assert "stored bytes read" in restore.detail
    assert "stream bytes reassembled" in restore.detail
