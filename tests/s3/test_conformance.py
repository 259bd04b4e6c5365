"""The storage conformance suite against S3 (moto), on both commit paths.

``residue`` lists the objects *and* the in-progress multipart uploads under the prefix,
so "nothing left behind" covers uploads too. With 128 KiB parts the suite's larger
streams (200 KB to 1 MiB) are real multipart uploads and its small ones single puts.
"""

from __future__ import annotations

from collections.abc import Collection

import pytest
import pytest_asyncio

from tests.s3.conftest import MotoServer, StorageFactory
from vdistream.storage import Storage
from vdistream.storage.s3 import S3Storage
from vdistream.testing import StorageConformance
from vdistream.testing.storage_suite import StorageCheck, check_cancel_commit, check_round_trip


class TestS3Conformance(StorageConformance):
    server: MotoServer | None = None

    @pytest_asyncio.fixture
    async def storage(self, make_storage: StorageFactory, moto_server: MotoServer) -> Storage:
        type(self).server = moto_server
        return make_storage("conformance", part_size=128 << 10, read_chunk_size=256 << 10)

    def residue(self, storage: Storage) -> Collection[str] | None:
        assert isinstance(storage, S3Storage)
        assert self.server is not None
        return self.server.residue(storage)


@pytest.mark.asyncio
@pytest.mark.parametrize("check", [check_round_trip, check_cancel_commit])
async def test_single_put_path(
    check: StorageCheck, make_storage: StorageFactory, moto_server: MotoServer
) -> None:
    """Default 8 MiB parts: every stream of these checks is one conditional put (writes
    and aborts of such sinks do no I/O; commit is the step worth cancelling)."""
    storage = make_storage(
        "single", part_size=8 << 20, min_part_size=5 << 20, read_chunk_size=256 << 10
    )
    await check(storage, moto_server.residue)
