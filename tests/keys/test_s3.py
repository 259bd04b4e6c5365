"""Rotation on an S3 destination (the moto server of tests/s3): each manifest replaced by
one PutObject, the stream objects untouched (bytes, ETag, LastModified)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import anyio
import pytest

from tests.keys.conftest import backup, restore, sha256, vdistream
from tests.s3.conftest import MotoServer
from vdistream.errors import WrongKeyError
from vdistream.operations import KeySource
from vdistream.pipeline.keys import generate_key_file

pytestmark = pytest.mark.asyncio

WRONG = "the key does not match the one this backup was encrypted with"


def _objects(moto: MotoServer, bucket: str) -> dict[str, tuple[str, Any, str]]:
    """Every object: ETag, LastModified, SHA-256 of its bytes."""
    out = {}
    for key in moto.keys(bucket):
        head = moto.client.head_object(Bucket=bucket, Key=key)
        body = moto.client.get_object(Bucket=bucket, Key=key)["Body"].read()
        out[key] = (head["ETag"], head["LastModified"], sha256(body))
    return out


async def test_rotate_on_s3(
    tmp_path: Path, source: Path, moto_server: MotoServer, bucket: str
) -> None:
    old, new = tmp_path / "old.key", tmp_path / "new.key"
    generate_key_file(old)
    generate_key_file(new)
    dest = f"s3://{bucket}/db1?endpoint_url={moto_server.endpoint}"
    for backup_id in ("b1", "b2"):
        await backup(source, dest, KeySource(key_file=str(old)), backup_id, compress="lz4")
    before = _objects(moto_server, bucket)
    manifests = {k for k in before if k.endswith("manifest.json")}
    assert manifests == {"db1/b1/manifest.json", "db1/b2/manifest.json"}
    old_bodies = {
        k: json.loads(moto_server.client.get_object(Bucket=bucket, Key=k)["Body"].read())
        for k in manifests
    }

    report = json.loads(
        vdistream("key", "rotate", dest, "--old", str(old), "--new", str(new), "--json").stdout
    )
    assert report["changed"] == ["b1", "b2"]

    after = _objects(moto_server, bucket)
    assert after.keys() == before.keys()  # no owner mark or temporary left behind
    for key in before:
        if key in manifests:
            assert after[key][2] != before[key][2]
            body = json.loads(moto_server.client.get_object(Bucket=bucket, Key=key)["Body"].read())
            for kept in (body, old_bodies[key]):
                kept.pop("checksum")
                kept["pipeline"]["encryption"].pop("key")
            assert body == old_bodies[key]  # nothing but the key block changed
        else:
            assert after[key] == before[key]  # streams: same bytes, ETag, LastModified

    for backup_id in ("b1", "b2"):
        ref = f"s3://{bucket}/db1/{backup_id}?endpoint_url={moto_server.endpoint}"
        with pytest.raises(WrongKeyError, match=WRONG):
            await restore(ref, KeySource(key_file=str(old)), tmp_path / "o")
        data = await restore(ref, KeySource(key_file=str(new)), tmp_path / "o")
        assert sha256(data) == sha256(await anyio.Path(source).read_bytes())


async def test_a_backup_being_written_on_s3_is_reported(
    tmp_path: Path, source: Path, moto_server: MotoServer, bucket: str
) -> None:
    """A live owner mark without a manifest (a backup being written, here by this
    process) fails the rotation, named; the backups with a manifest are rotated."""
    from vdistream.operations import opened_storage

    old, new = tmp_path / "old.key", tmp_path / "new.key"
    generate_key_file(old)
    generate_key_file(new)
    dest = f"s3://{bucket}/db1?endpoint_url={moto_server.endpoint}"
    await backup(source, dest, KeySource(key_file=str(old)), "b1")
    rotate = ("key", "rotate", dest, "--old", str(old), "--new", str(new), "--json")
    async with opened_storage(dest) as storage, storage.in_progress("b2"):
        done = await anyio.to_thread.run_sync(lambda: vdistream(*rotate, check=1))
    report = json.loads(done.stdout)
    assert report["changed"] == ["b1"]
    assert [r["id"] for r in report["running"]] == ["b2"]
    assert done.stderr.startswith("vdistream: backup b2 is being written (")
    assert "db1/b2/.vdistream-owner.json" not in moto_server.keys(bucket)
