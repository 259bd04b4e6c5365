"""``AzureStorage.replace_bytes`` against Azurite: one put conditional on the ETag read,
over an existing blob only (``vdistream key rotate`` rewrites manifests with it)."""

from __future__ import annotations

import anyio
import pytest

from tests.azure.azurite import Azurite
from tests.azure.conftest import StorageFactory
from tests.s3.proxy import FaultProxy
from vdistream.errors import StorageError, StorageNotFoundError

pytestmark = pytest.mark.asyncio


async def test_replace_swaps_the_blob_and_refuses_a_missing_one(
    make_storage: StorageFactory, azurite: Azurite, container: str
) -> None:
    storage = make_storage()
    await storage.write_bytes("b1/manifest.json", b"old")
    await storage.replace_bytes("b1/manifest.json", b"new and longer")
    assert await storage.read_bytes("b1/manifest.json") == b"new and longer"
    assert azurite.get(container, "backups/b1/manifest.json") == b"new and longer"
    assert await storage.list() == ["b1/manifest.json"]
    with pytest.raises(StorageNotFoundError):
        await storage.replace_bytes("b2/manifest.json", b"x")
    assert await storage.list() == ["b1/manifest.json"]
    assert azurite.blobs(container, uncommitted=True) == []


async def test_replace_never_overwrites_a_blob_changed_meanwhile(
    make_storage: StorageFactory, azurite: Azurite, container: str, proxy: FaultProxy
) -> None:
    """The proxy holds the replacing put 1 s; meanwhile another writer replaces the
    blob: the put's If-Match fails and the other writer's bytes stay."""
    storage = make_storage(endpoint=f"{proxy.endpoint}/devstoreaccount1")
    await storage.write_bytes("m.json", b"v1")
    held = proxy.add("delay", r"^PUT \S+/m\.json", count=1, seconds=1.0)
    failure: list[BaseException] = []

    async def replace() -> None:
        try:
            await storage.replace_bytes("m.json", b"ours")
        except StorageError as exc:
            failure.append(exc)

    async with anyio.create_task_group() as group:
        group.start_soon(replace)
        with anyio.fail_after(10):
            while not held.hits:  # noqa: ASYNC110 (the proxy counts, it has no event)
                await anyio.sleep(0.01)
        blob = azurite.service.get_blob_client(container, "backups/m.json")
        blob.upload_blob(b"theirs", overwrite=True)
    assert len(failure) == 1
    assert "ConditionNotMet" in str(failure[0])
    assert azurite.get(container, "backups/m.json") == b"theirs"
