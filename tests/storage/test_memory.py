"""memory:// storage: the conformance suite, shared named stores, prefixes."""

from __future__ import annotations

import pytest

from vdistream.errors import StorageURLError
from vdistream.storage import MemoryStorage, MemoryStore, Storage, StorageRegistry
from vdistream.testing import STORAGE_CHECKS, StorageConformance, check_storage


class TestMemoryConformance(StorageConformance):
    @pytest.fixture
    def storage(self) -> Storage:
        return MemoryStorage(MemoryStore("conformance"), "some/prefix")


@pytest.mark.asyncio
async def test_check_storage_runs_every_check_on_fresh_storages() -> None:
    made: list[MemoryStorage] = []

    async def make() -> Storage:
        made.append(MemoryStorage())
        return made[-1]

    def residue(storage: Storage) -> list[str]:
        assert isinstance(storage, MemoryStorage)
        return list(storage.store.objects)

    await check_storage(make, residue=residue)
    assert len(made) == len(STORAGE_CHECKS)  # one fresh storage per check
    assert len({id(storage.store) for storage in made}) == len(STORAGE_CHECKS)


@pytest.mark.asyncio
async def test_same_name_same_store_through_one_registry() -> None:
    registry = StorageRegistry.with_builtins()
    first = registry.open_storage("memory://shared")
    await first.write_bytes("k", b"v")
    again = registry.open_storage("memory://shared")
    assert await again.read_bytes("k") == b"v"
    assert await registry.open_storage("memory://other").list() == []
    # a separate registry owns separate stores
    assert await StorageRegistry.with_builtins().open_storage("memory://shared").list() == []


@pytest.mark.asyncio
async def test_prefixes_partition_one_store() -> None:
    store = MemoryStore("parts")
    left, right = MemoryStorage(store, "db/left"), MemoryStorage(store, "db/right")
    await left.write_bytes("x", b"L")
    await right.write_bytes("x", b"R")
    assert await left.read_bytes("x") == b"L"
    assert await right.list() == ["x"]
    assert sorted(store.objects) == ["db/left/x", "db/right/x"]
    assert await MemoryStorage(store, "db").list() == ["left/x", "right/x"]
    assert await MemoryStorage(store, "db/le").list() == []  # prefixes are whole names
    assert left.url == "memory://parts/db/left"


@pytest.mark.asyncio
async def test_sink_data_enters_the_store_only_at_commit_as_a_copy() -> None:
    store = MemoryStore()
    storage = MemoryStorage(store)
    backing = bytearray(b"abc")
    sink = await storage.open_sink("k")
    await sink.write(memoryview(backing))
    assert store.objects == {}
    backing[:] = b"xyz"
    await sink.commit()
    assert store.objects == {"k": b"abc"}
    assert type(store.objects["k"]) is bytes


def test_url_forms() -> None:
    registry = StorageRegistry.with_builtins()
    storage = registry.open_storage("memory://n/a/b/")
    assert isinstance(storage, MemoryStorage)
    assert (storage.store.name, storage.prefix, storage.url) == ("n", "a/b", "memory://n/a/b")
    for url in ("memory://", "memory:x", "memory://n/a//b", "memory://n?q=1"):
        with pytest.raises(StorageURLError) as caught:
            registry.open_storage(url)
        assert caught.value.url == url
