"""Azure debris against Azurite: owner marks, the sweep of dead owners' debris (staged
blocks included), ``storage audit`` of abandoned blocks, ``probe`` and clear errors."""

from __future__ import annotations

import asyncio
import datetime
import json
import logging
import os
import re
import subprocess
import sys

import anyio
import pytest
from azure.storage.blob import ContainerSasPermissions, generate_container_sas

from tests.azure.azurite import Azurite
from tests.azure.conftest import StorageFactory
from tests.s3.proxy import FaultProxy
from vdistream.catalog.audit import audit
from vdistream.errors import StorageError
from vdistream.ownership import owner_record
from vdistream.storage import BackupInProgressError, StorageProbeError
from vdistream.storage.azure import MARK_NAME, AzureStorage
from vdistream.storage.base import OrphanUploadsError

pytestmark = pytest.mark.asyncio

BLOCK = 64 << 10


def dead_owner() -> dict[str, object]:
    """The owner record of a process of this host that has ended."""
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        record = owner_record(child.pid)
    finally:
        child.kill()
        child.wait()
    return record


def put_mark(azurite: Azurite, container: str, backup_id: str, record: dict[str, object]) -> None:
    body = json.dumps({**record, "backup_id": backup_id, "started": "2026-01-01T00:00:00+00:00"})
    blob = azurite.service.get_blob_client(container, f"backups/{backup_id}/{MARK_NAME}")
    blob.upload_blob(body.encode())


async def abandoned_sink(storage: AzureStorage, key: str) -> None:
    """Staged blocks of a sink whose process died: never committed nor aborted."""
    sink = await storage.open_sink(key)
    await sink.write(memoryview(os.urandom(2 * BLOCK)))
    await sink.flush()


async def test_a_dead_owners_debris_is_swept(
    make_storage: StorageFactory, azurite: Azurite, container: str
) -> None:
    storage = make_storage()
    put_mark(azurite, container, "dead", dead_owner())
    await storage.write_bytes("dead/stream-01-of-02.vdi", b"a stream without a manifest")
    await abandoned_sink(storage, "dead/stream-02-of-02.vdi")
    put_mark(azurite, container, "done", dead_owner())
    await storage.write_bytes("done/stream-01-of-01.vdi", b"stream")
    await storage.write_bytes("done/manifest.json", b"{}")

    removed = await storage.sweep()

    assert sorted(removed) == sorted(
        [
            "upload dead/stream-02-of-02.vdi uncommitted-blocks",
            "dead/stream-01-of-02.vdi",
            f"dead/{MARK_NAME}",
            f"done/{MARK_NAME}",
        ]
    )
    assert azurite.blobs(container) == [
        "backups/done/manifest.json",
        "backups/done/stream-01-of-01.vdi",
    ]
    assert azurite.blobs(container, uncommitted=True) == []


async def test_live_and_foreign_marks_are_kept(
    make_storage: StorageFactory, azurite: Azurite, container: str
) -> None:
    storage = make_storage()
    put_mark(azurite, container, "foreign", {**owner_record(), "host": "elsewhere.example"})
    with pytest.raises(BackupInProgressError, match=r"elsewhere\.example"):
        async with storage.in_progress("foreign"):
            pass
    assert await storage.sweep() == []  # another host's: kept
    async with storage.in_progress("live"):
        mark = json.loads(azurite.get(container, f"backups/live/{MARK_NAME}"))
        assert mark["pid"] == owner_record()["pid"]
        await abandoned_sink(storage, "live/stream-01-of-01.vdi")
        assert await storage.sweep() == []
        assert await storage.list() == []  # marks and staged blocks are no objects
        report = await audit(storage, clean=True, min_age=datetime.timedelta(hours=1))
        assert report.in_progress == ("foreign", "live")
        assert report.aborted_uploads == ()
        assert azurite.blobs(container, uncommitted=True) == ["backups/live/stream-01-of-01.vdi"]
        with pytest.raises(BackupInProgressError, match=r"backup live is being written"):
            async with make_storage().in_progress("live"):
                pass
    assert f"backups/live/{MARK_NAME}" not in azurite.blobs(container)


async def test_the_audit_finds_and_cleans_abandoned_blocks(
    make_storage: StorageFactory, azurite: Azurite, container: str
) -> None:
    storage = make_storage()
    await storage.write_bytes("b1/dev0.bak", b"an orphan stream")
    await abandoned_sink(storage, "b1/dev1.bak")
    other = make_storage("other")  # outside the prefix: none of this audit's business
    await abandoned_sink(other, "x/dev0.bak")

    report = await audit(storage)
    assert report.orphan_objects == ("b1/dev0.bak",)
    assert [(u.key, u.upload_id) for u in report.orphan_uploads] == [
        ("b1/dev1.bak", "uncommitted-blocks")
    ]
    assert report.orphan_uploads[0].initiated is not None
    assert report.debris_left

    cleaned = await audit(storage, clean=True)
    assert [u.key for u in cleaned.aborted_uploads] == ["b1/dev1.bak"]
    assert cleaned.removed_objects == ("b1/dev0.bak",)
    assert cleaned.clean
    assert azurite.blobs(container, "backups/") == []
    assert azurite.blobs(container, "backups/", uncommitted=True) == []
    assert azurite.blobs(container, uncommitted=True) == ["other/x/dev0.bak"]
    assert (await audit(storage)).clean


async def test_probe(make_storage: StorageFactory, azurite: Azurite, container: str) -> None:
    await make_storage("some/prefix").probe()
    assert azurite.blobs(container) == []
    with pytest.raises(StorageProbeError) as caught:
        await make_storage("p", container="no-such-container").probe()
    assert str(caught.value) == "azure://devstoreaccount1/no-such-container/p: no such container"


async def test_bad_credentials_and_no_server_are_one_line_errors(
    make_storage: StorageFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    wrong = make_storage(credential={"account_name": "devstoreaccount1", "account_key": "a" * 88})
    with pytest.raises(StorageProbeError) as caught:
        await wrong.probe()
    assert str(caught.value) == (
        "azure://devstoreaccount1/" + wrong.container + "/backups: access denied: the account "
        "key, SAS or connection string is not accepted"
    )
    with pytest.raises(StorageError) as failed:
        await wrong.list()
    assert "\n" not in str(failed.value)
    assert "AuthorizationFailure (HTTP 403)" in str(failed.value)

    nowhere = make_storage(endpoint="http://127.0.0.1:9/devstoreaccount1", max_attempts=1)
    with pytest.raises(StorageProbeError, match=r"^azure://\S+: cannot connect to http://127"):
        await nowhere.probe()
    with pytest.raises(StorageError) as refused:  # never sent: nothing to take back
        await nowhere.write_bytes("k", b"v")
    assert not isinstance(refused.value, OrphanUploadsError), refused.value
    assert str(refused.value).startswith("commit (put blob) failed: ServiceRequestError")

    monkeypatch.delenv("AZURE_STORAGE_KEY")
    with pytest.raises(StorageError, match=r"^no Azure credentials: set AZURE_STORAGE_CONN"):
        await make_storage().list()


async def test_credentials_from_a_connection_string(
    azurite: Azurite, container: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``AZURE_STORAGE_CONNECTION_STRING`` alone (its BlobEndpoint), and with the
    endpoint in the URL (its key, the URL's endpoint); the account key variable unset."""
    monkeypatch.delenv("AZURE_STORAGE_KEY")
    monkeypatch.setenv("AZURE_STORAGE_CONNECTION_STRING", azurite.connection_string)
    for storage in (
        AzureStorage.from_url(f"azure://devstoreaccount1/{container}/cs"),
        AzureStorage.from_url(azurite.url(container, "cs")),
    ):
        async with storage:
            await storage.write_bytes(f"k{id(storage)}", b"v")
            assert await storage.read_bytes(f"k{id(storage)}") == b"v"
    assert len(azurite.blobs(container, "cs/")) == 2


async def test_credentials_from_a_sas_token(
    azurite: Azurite, container: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    permission = ContainerSasPermissions(
        read=True, add=True, create=True, write=True, delete=True, list=True
    )
    sas = generate_container_sas(
        azurite.account,
        container,
        account_key=azurite.key,
        permission=permission,
        expiry=datetime.datetime.now(datetime.UTC) + datetime.timedelta(hours=1),
    )
    monkeypatch.delenv("AZURE_STORAGE_KEY")
    monkeypatch.setenv("AZURE_STORAGE_SAS_TOKEN", "?" + sas)
    async with AzureStorage.from_url(azurite.url(container, "sas")) as storage:
        await storage.probe()  # what every backup does first: a container SAS passes
        async with await storage.open_sink("s.vdi") as sink:
            await sink.write(memoryview(os.urandom(3 << 20)))  # < one 8 MiB block, > 1 MiB
            await sink.commit()
        assert await storage.list() == ["s.vdi"]
        report = await audit(storage)  # lists uncommitted blobs and block lists too
        assert (report.orphan_objects, report.orphan_uploads) == (("s.vdi",), ())
    blob = azurite.service.get_blob_client(container, "sas/s.vdi")
    assert len(blob.get_block_list()[0]) == 1  # sent as one staged block, not a 3 MiB put


async def test_a_sas_never_shows_in_errors_or_logs(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """An endpoint that answers no HTTP (a wrong port, a middlebox): aiohttp's error names
    the request's whole URL, whose query holds the SAS. Neither the one-line errors nor
    the retry log may carry its signature."""
    secret = "c2VjcmV0LXNpZ25hdHVyZQ%3D%3D"

    async def not_http(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"SSH-2.0-OpenSSH_9.2\r\n\r\n")
        await writer.drain()
        writer.close()

    for name in ("KEY", "CONNECTION_STRING", "ENDPOINT"):
        monkeypatch.delenv(f"AZURE_STORAGE_{name}", raising=False)
    monkeypatch.setenv("AZURE_STORAGE_SAS_TOKEN", f"sv=2022-11-02&sp=rwdl&sig={secret}")
    server = await asyncio.start_server(not_http, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    storage = AzureStorage(
        "devstoreaccount1",
        "backups",
        "p",
        endpoint=f"http://127.0.0.1:{port}/devstoreaccount1",
        max_attempts=2,
        backoff_base=0.01,
        backoff_increment=0.01,
    )
    failures: list[StorageError] = []
    caplog.set_level(logging.WARNING, logger="vdistream.storage.azure")
    try:
        for operation in (storage.list(), storage.write_bytes("k", b"v"), storage.probe()):
            with pytest.raises(StorageError) as caught:
                await operation
            failures.append(caught.value)
    finally:
        await storage.aclose()
        server.close()
        await server.wait_closed()
    retries = [r for r in caplog.records if r.getMessage() == "azure_request_retry"]
    assert retries  # the log was written, and is checked below
    for text in [str(failure) for failure in failures] + [str(r.__dict__) for r in retries]:
        assert secret not in text, text
        assert "\n" not in text
    assert "?..." in str(failures[0])  # the URL is still named, without its query


async def test_a_dead_mark_taken_over_meanwhile_is_not_deleted(
    make_storage: StorageFactory, azurite: Azurite, container: str, proxy: FaultProxy
) -> None:
    """Two backups of one id start over a dead owner's mark. The first one's delete of
    the dead mark is held 2 s; meanwhile the second deletes it and places its own. The
    first one's delete (If-Match the dead mark's ETag) must not remove that live mark:
    it finds the backup being written, instead of both writing it."""
    put_mark(azurite, container, "b", dead_owner())
    held = proxy.add("delay", rf"^DELETE \S+/b/{re.escape(MARK_NAME)}", count=1, seconds=2.0)
    first = make_storage(endpoint=f"{proxy.endpoint}/devstoreaccount1")
    outcome: list[BaseException | None] = []

    async def enter_first() -> None:
        try:
            async with first.in_progress("b"):
                outcome.append(None)
        except BackupInProgressError as exc:
            outcome.append(exc)

    async with anyio.create_task_group() as group:
        group.start_soon(enter_first)
        with anyio.fail_after(10):
            while not held.hits:  # noqa: ASYNC110 (the proxy counts, it has no event)
                await anyio.sleep(0.01)
        async with make_storage().in_progress("b"):  # the second takes the mark over
            second = json.loads(azurite.get(container, f"backups/b/{MARK_NAME}"))
            with anyio.fail_after(10):
                while not outcome:  # noqa: ASYNC110 (until the first has decided)
                    await anyio.sleep(0.01)
            assert json.loads(azurite.get(container, f"backups/b/{MARK_NAME}")) == second
    assert isinstance(outcome[0], BackupInProgressError), outcome
    assert "is being written by another process" in str(outcome[0])
