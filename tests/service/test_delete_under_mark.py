"""``delete_backup`` (retention, ``vdistream prune``) holds the backup's owner mark, so
it never interleaves with a ``vdistream key`` rewrap of the same manifest."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from vdistream.service.backups import delete_backup
from vdistream.storage import FileStorage

_HOLDER = textwrap.dedent(
    """
    import sys, anyio
    from vdistream.storage import FileStorage

    async def main(dest):
        async with FileStorage(dest).in_progress("b1"):
            print("held", flush=True)
            await anyio.sleep(60)

    anyio.run(main, sys.argv[1])
    """
)


@pytest.fixture
def held(tmp_path: Path) -> Iterator[subprocess.Popen[str]]:
    """A process holding backup b1's owner mark in ``tmp_path`` until it is killed."""
    holder = subprocess.Popen(
        [sys.executable, "-c", _HOLDER, str(tmp_path)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout is not None
        assert holder.stdout.readline() == "held\n"
        yield holder
    finally:
        holder.kill()
        holder.wait(timeout=10)
        if holder.stdout is not None:
            holder.stdout.close()


@pytest.mark.asyncio
async def test_a_backup_whose_mark_another_process_holds_is_kept(
    tmp_path: Path, held: subprocess.Popen[str]
) -> None:
    storage = FileStorage(tmp_path)
    await storage.write_bytes("b1/stream-01-of-01.vdi", b"stream")
    await storage.write_bytes("b1/manifest.json", b"{}")
    kept = await delete_backup(storage, "b1")
    assert kept.error is not None
    assert "in use by another process, kept" in kept.error
    assert sorted(await storage.list("b1/")) == ["b1/manifest.json", "b1/stream-01-of-01.vdi"]
    held.kill()
    held.wait(timeout=10)
    done = await delete_backup(storage, "b1")
    assert done.error is None
    assert sorted(done.removed) == ["b1/manifest.json", "b1/stream-01-of-01.vdi"]
    assert not (tmp_path / "b1").exists()
