"""Rotation on an Azure destination (the Azurite of tests/azure): each manifest replaced
by one conditional Put Blob, the stream blobs untouched (bytes, ETag, Last-Modified)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import anyio
import pytest

from tests.azure.azurite import Azurite, azurite  # noqa: F401  (the session fixture)
from tests.keys.conftest import backup, restore, sha256, vdistream
from vdistream.errors import WrongKeyError
from vdistream.operations import KeySource
from vdistream.pipeline.keys import generate_key_file

pytestmark = pytest.mark.asyncio

WRONG = "the key does not match the one this backup was encrypted with"


def _blobs(service: Azurite, container: str) -> dict[str, tuple[Any, Any, str]]:
    """Every blob: ETag, Last-Modified, SHA-256 of its bytes."""
    client = service.service.get_container_client(container)
    return {
        blob.name: (blob.etag, blob.last_modified, sha256(service.get(container, blob.name)))
        for blob in client.list_blobs()
    }


async def test_rotate_on_azure(
    tmp_path: Path,
    source: Path,
    azurite: Azurite,  # noqa: F811
) -> None:
    old, new = tmp_path / "old.key", tmp_path / "new.key"
    generate_key_file(old)
    generate_key_file(new)
    container = azurite.new_container()
    dest = azurite.url(container, "db1")
    for backup_id in ("b1", "b2"):
        await backup(source, dest, KeySource(key_file=str(old)), backup_id)
    before = _blobs(azurite, container)
    manifests = {"db1/b1/manifest.json", "db1/b2/manifest.json"}
    assert manifests <= before.keys()

    report = json.loads(
        vdistream("key", "rotate", dest, "--old", str(old), "--new", str(new), "--json").stdout
    )
    assert report["changed"] == ["b1", "b2"]

    after = _blobs(azurite, container)
    assert after.keys() == before.keys()  # no owner mark or temporary left behind
    for name in before:
        if name in manifests:
            assert after[name][2] != before[name][2]
        else:
            assert after[name] == before[name]  # streams: same bytes, ETag, Last-Modified
    original = sha256(await anyio.Path(source).read_bytes())
    for backup_id in ("b1", "b2"):
        ref = azurite.url(container, f"db1/{backup_id}")
        with pytest.raises(WrongKeyError, match=WRONG):
            await restore(ref, KeySource(key_file=str(old)), tmp_path / "o")
        assert sha256(await restore(ref, KeySource(key_file=str(new)), tmp_path / "o")) == original
