"""A backup whose manifest cannot be written is no backup: its streams go again."""

from __future__ import annotations

from pathlib import Path

import pytest

from vdistream.catalog import MANIFEST_NAME
from vdistream.coordinator import AbortCause, JobStatus
from vdistream.errors import StorageError
from vdistream.operations import BackupSettings, run_backup
from vdistream.storage import FileStorage

pytestmark = pytest.mark.asyncio


class ManifestRefusingStorage(FileStorage):
    """A real directory whose manifest write fails (as a full or read-only disk would)."""

    async def write_bytes(
        self,
        key: str,
        data: bytes | bytearray | memoryview,
        *,
        overwrite: bool = False,
        device: str | None = None,
    ) -> None:
        if key.endswith(MANIFEST_NAME):
            raise StorageError("injected manifest write failure", url=self.url)
        await super().write_bytes(key, data, overwrite=overwrite, device=device)


async def test_a_failed_manifest_write_leaves_no_stream_behind(tmp_path: Path) -> None:
    storage = ManifestRefusingStorage(tmp_path / "dest")
    settings = BackupSettings(devices=3, backup_id="b", block_size=4096, max_transfer_size=65536)
    outcome = await run_backup("cmd:head -c 300000 /dev/urandom", storage, settings)
    assert not outcome.ok
    assert outcome.manifest is None
    result = outcome.result
    assert len(result.devices) == 3  # every stream was committed before the manifest
    assert result.status is JobStatus.FAILED
    assert result.aborted_by is AbortCause.SINK
    assert isinstance(result.error, StorageError)
    assert "injected manifest write failure" in str(result.error)
    assert outcome.summary()["error"] == str(result.error)
    assert await storage.list("b/") == []
    assert [p for p in (tmp_path / "dest").rglob("stream-*")] == []
