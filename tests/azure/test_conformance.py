"""The shipped storage conformance suite against Azurite, on both commit paths.

``residue`` lists the committed blobs *and* the blobs holding only uncommitted blocks
under the prefix, so "nothing left behind" covers staged blocks too. With 128 KiB blocks
the suite's larger streams (200 KB to 1 MiB) are staged block by block and committed
with their block list; its small ones are single conditional puts.
"""

from __future__ import annotations

from collections.abc import Collection

import pytest

from tests.azure.azurite import Azurite
from tests.azure.conftest import StorageFactory
from vdistream.storage import Storage
from vdistream.storage.azure import AzureStorage
from vdistream.testing import StorageConformance
from vdistream.testing.storage_suite import StorageCheck, check_cancel_commit, check_round_trip


class TestAzureConformance(StorageConformance):
    server: Azurite | None = None

    @pytest.fixture
    def storage(self, make_storage: StorageFactory, azurite: Azurite) -> Storage:
        type(self).server = azurite
        return make_storage("conformance", block_size=128 << 10, read_chunk_size=96 << 10)

    def residue(self, storage: Storage) -> Collection[str] | None:
        assert isinstance(storage, AzureStorage)
        assert self.server is not None
        return self.server.residue(storage)


@pytest.mark.asyncio
@pytest.mark.parametrize("check", [check_round_trip, check_cancel_commit])
async def test_single_put_path(
    check: StorageCheck, make_storage: StorageFactory, azurite: Azurite
) -> None:
    """Default 8 MiB blocks: every stream of these checks is one conditional put."""
    storage = make_storage("single", block_size=8 << 20)
    await check(storage, azurite.residue)
