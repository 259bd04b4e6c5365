"""``S3Storage.replace_bytes`` against moto: one unconditional put over an existing object."""

from __future__ import annotations

import pytest

from tests.s3.conftest import StorageFactory
from vdistream.errors import StorageNotFoundError


@pytest.mark.asyncio
async def test_s3_replace_swaps_the_object_and_refuses_a_missing_one(
    make_storage: StorageFactory,
) -> None:
    storage = make_storage()
    await storage.write_bytes("b1/manifest.json", b"old")
    await storage.replace_bytes("b1/manifest.json", b"new and longer")
    assert await storage.read_bytes("b1/manifest.json") == b"new and longer"
    assert await storage.list() == ["b1/manifest.json"]
    with pytest.raises(StorageNotFoundError):
        await storage.replace_bytes("b2/manifest.json", b"x")
    assert await storage.list() == ["b1/manifest.json"]
