"""Helpers for job tests: data, a directory with an older backup in it, cleanliness."""

from __future__ import annotations

import asyncio
import hashlib
import os
from pathlib import Path

import pytest
import pytest_asyncio

from vdistream.coordinator import Job, JobOptions, backup
from vdistream.engines import StripedBackup, StripingOptions

SMALL = StripingOptions(block_size=4096, max_transfer_size=65536, buffer_count=None)


def tree(root: Path) -> dict[str, str]:
    """Every file below ``root`` (hidden ones too) with its SHA-256."""
    out = {}
    for path in sorted(root.rglob("*")):
        if path.is_file():
            out[str(path.relative_to(root))] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


@pytest.fixture
def data() -> bytes:
    return os.urandom(3 * 1024 * 1024 + 12345)


@pytest_asyncio.fixture
async def older(tmp_path: Path) -> dict[str, str]:
    """A complete backup already in ``tmp_path``; returns its files and checksums."""
    result = await backup(
        StripedBackup(b"older backup" * 10000, SMALL),
        str(tmp_path),
        backup_id="older",
        options=JobOptions(devices=2),
    )
    assert result.ok, result.error
    files = tree(tmp_path)
    assert len(files) == 2
    return files


def assert_clean(job: Job, root: Path, older: dict[str, str]) -> None:
    """Nothing of the job is visible, its set is closed, no task of it runs."""
    assert tree(root) == older  # no file of the aborted backup, the older one untouched
    assert job._vds.state.name == "DNE"
    assert job.registry.names() == []
    current = asyncio.current_task()
    assert [t for t in asyncio.all_tasks() if t is not current] == []
