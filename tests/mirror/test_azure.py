"""Mirrored backups between moto's S3 server and Azurite (both real servers on
127.0.0.1): one pass, the same ciphertext in both, each restorable and verifiable
alone; Azure refusing blocks midway leaves nothing in either (no object, no multipart
upload, no blob, no uncommitted block)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import anyio
import pytest

from tests.azure.azurite import Azurite, azurite  # noqa: F401  (the session fixture)
from tests.azure.conftest import FAST
from tests.s3.conftest import MotoServer
from tests.s3.proxy import FaultProxy
from vdistream.coordinator import AbortCause, JobStatus
from vdistream.errors import StorageError
from vdistream.operations import BackupSettings, KeySource, run_backup, run_restore, run_verify
from vdistream.pipeline.keys import generate_key_file
from vdistream.storage.azure import AzureStorage

pytestmark = pytest.mark.asyncio

SMALL = {"block_size": 4096, "max_transfer_size": 65536}
#: a stage-block request (PUT ...?comp=block&blockid=...), as tests/azure/test_blocks.py
STAGE = r"^PUT \S+\?(\S*&)?comp=block(&|$)"


async def restored_from(ref: str, out: Path, keys: KeySource) -> bytes:
    result = await run_restore(ref, f"cmd:sh -c 'cat > {out}'", keys=keys)
    assert result.ok, result.error
    return await anyio.Path(out).read_bytes()


async def test_s3_and_azure_each_restore_and_verify_alone(
    tmp_path: Path,
    moto_server: MotoServer,
    bucket: str,
    azurite: Azurite,  # noqa: F811
) -> None:
    data = os.urandom(600_000) + bytes(600_000)
    source = tmp_path / "source.bin"
    source.write_bytes(data)
    key = tmp_path / "backup.key"
    generate_key_file(key)
    keys = KeySource(key_file=str(key))
    container = azurite.new_container()
    s3 = f"s3://{bucket}/db1?endpoint_url={moto_server.endpoint}"
    azure = azurite.url(container, "db1")
    outcome = await run_backup(
        f"cmd:cat {source}",
        s3,
        BackupSettings(devices=2, backup_id="b", encryption=keys, mirror=azure, **SMALL),
    )
    assert outcome.ok, outcome.result.error
    assert outcome.manifest_url == f"s3://{bucket}/db1/b/manifest.json"
    base = f"azure://{azurite.account}/{container}"
    assert outcome.mirror_manifest_url == f"{base}/db1/b/manifest.json"

    streams = [f"db1/b/stream-{i:02d}-of-02.vdi" for i in range(2)]
    assert sorted(moto_server.keys(bucket)) == ["db1/b/manifest.json", *streams]
    assert azurite.blobs(container) == ["db1/b/manifest.json", *streams]
    assert azurite.blobs(container, uncommitted=True) == []
    for name in streams:  # encrypted once, teed
        assert azurite.get(container, name) == moto_server.get(bucket, name)
    remote = json.loads(azurite.get(container, "db1/b/manifest.json"))
    assert [d["url"] for d in remote["devices"]] == [f"{base}/{name}" for name in streams]

    azure_ref = azurite.url(container, "db1/b")
    for name in streams:  # S3's copy cannot help
        moto_server.client.delete_object(Bucket=bucket, Key=name)
    assert await restored_from(azure_ref, tmp_path / "from-azure", keys) == data
    report = await run_verify(azure_ref, keys=keys)
    assert report.ok, report.checks


async def test_azure_failing_midway_leaves_nothing_in_either(
    tmp_path: Path,
    moto_server: MotoServer,
    bucket: str,
    azurite: Azurite,  # noqa: F811
) -> None:
    proxy = FaultProxy(azurite.port)
    await proxy.start()
    container = azurite.new_container()
    mirror = AzureStorage(
        azurite.account,
        container,
        "db1",
        **{**FAST, "endpoint": proxy.endpoint.rstrip("/") + f"/{azurite.account}"},
        max_attempts=2,
    )
    try:
        proxy.add("error", STAGE, count=10**6, status=503, code="ServerBusy")
        s3 = f"s3://{bucket}/db1?endpoint_url={moto_server.endpoint}"
        outcome = await run_backup(
            "cmd:head -c 2000000 /dev/urandom",
            s3,
            BackupSettings(devices=2, backup_id="b", mirror=mirror, **SMALL),
        )
    finally:
        await mirror.aclose()
        await proxy.stop()
    assert not outcome.ok
    result = outcome.result
    assert result.status is JobStatus.FAILED
    assert result.aborted_by is AbortCause.SINK
    assert isinstance(result.error, StorageError)
    assert container in str(result.error)
    assert moto_server.keys(bucket) == []
    assert moto_server.uploads(bucket) == []
    assert azurite.blobs(container) == []
    assert azurite.blobs(container, uncommitted=True) == []
