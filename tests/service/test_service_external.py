"""The daemon's ``external:NAME`` database: a backup job publishes its set in the
configured runtime directory and waits for the engine (``feed``) that opens it, then
verifies what it stored; a restore job to ``external:NAME`` serves ``drain``."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import anyio
import pytest

from vdistream.engines.external import drain, feed
from vdistream.service import JobState, Service, load_settings

pytestmark = [pytest.mark.asyncio, pytest.mark.timeout(60)]


async def published(path: Path, within: float = 10.0) -> None:
    with anyio.fail_after(within):
        while not await anyio.Path(path).exists():  # noqa: ASYNC110 - another process' file
            await anyio.sleep(0.01)


async def test_a_daemon_backs_up_and_restores_through_an_external_engine(tmp_path: Path) -> None:
    rt = tmp_path / "rt"
    config = tmp_path / "vdistream.toml"
    config.write_text(
        f"""
[service]
state_dir = "{tmp_path / "state"}"
runtime_dir = "{rt}"
timezone = "UTC"

[destinations.local]
url = "{tmp_path / "backups"}"

[databases.fed]
url = "external:nightly"
destination = "local"
devices = 3
connect_timeout = 10
"""
    )
    settings = load_settings(config, env={})
    data = os.urandom(2 * 1024 * 1024 + 99)
    source = tmp_path / "input.bin"
    source.write_bytes(data)
    out = tmp_path / "out.bin"
    async with Service(settings, api=False) as service:
        record = await service.submit("backup", "fed")
        await published(rt / "nightly.sock")
        with source.open("rb") as f:
            fed = await feed("nightly", f.fileno(), devices=3, directory=rt)
        assert fed.logical_bytes == len(data)
        done = await service.wait(record.id)
        assert done.state is JobState.SUCCEEDED, done.error
        assert done.result is not None
        assert done.result["devices"][0]["name"] == "nightly"
        # verify_after_backup: the streams' sizes and SHA-256 (the format is the engine's)
        (check,) = await service.jobs(kind="verify")
        verified = await service.wait(check.id)
        assert verified.state is JobState.SUCCEEDED, verified.error

        record = await service.submit(
            "restore", "fed", backup_id=done.backup_id, target="external:back"
        )
        await published(rt / "back.sock")
        with out.open("wb") as f:
            drained = await drain("back", f.fileno(), directory=rt)
        assert drained.logical_bytes == len(data)
        restored = await service.wait(record.id)
        assert restored.state is JobState.SUCCEEDED, restored.error
    assert hashlib.sha256(out.read_bytes()).digest() == hashlib.sha256(data).digest()
    assert sorted(os.listdir(rt)) == []  # every set unpublished
