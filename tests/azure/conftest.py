"""The Azure tests run against a real Azurite (``tests/azure/azurite.py``); each test
gets its own container."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
import pytest_asyncio

from tests.azure.azurite import Azurite, azurite  # noqa: F401  (the session fixture)
from tests.s3.proxy import FaultProxy
from vdistream.storage.azure import AzureStorage

#: Test defaults: small blocks and ranges (Azure has no smallest block), quick retries.
FAST: dict[str, Any] = {
    "block_size": 64 << 10,
    "read_chunk_size": 64 << 10,
    "backoff_base": 0.01,
    "backoff_increment": 0.02,
    "connect_timeout": 5.0,
    "read_timeout": 10.0,
}

StorageFactory = Callable[..., AzureStorage]


@pytest.fixture
def container(azurite: Azurite) -> str:  # noqa: F811
    return azurite.new_container()


@pytest_asyncio.fixture
async def make_storage(
    azurite: Azurite,  # noqa: F811
    container: str,
) -> AsyncIterator[StorageFactory]:
    """``make_storage(prefix="backups", **options)``: storages on this test's container
    (on Azurite directly unless ``endpoint`` says otherwise); closed at the end."""
    made: list[AzureStorage] = []

    def make(prefix: str = "backups", **options: Any) -> AzureStorage:
        settings = {**FAST, **options}
        storage = azurite.storage(settings.pop("container", container), prefix, **settings)
        made.append(storage)
        return storage

    yield make
    for storage in made:
        with contextlib.suppress(Exception):
            await storage.aclose()


@pytest_asyncio.fixture
async def proxy(azurite: Azurite) -> AsyncIterator[FaultProxy]:  # noqa: F811
    """The fault-injecting proxy of the S3 tests, in front of Azurite."""
    proxy = FaultProxy(azurite.port)
    await proxy.start()
    yield proxy
    await proxy.stop()
