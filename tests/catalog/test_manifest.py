"""Manifests: round trip, tamper detection, references, listing."""

from __future__ import annotations

import dataclasses
import json

import pytest

from vdistream.catalog import (
    CatalogError,
    DeviceEntry,
    Manifest,
    check_streams,
    list_manifests,
    parse_backup_ref,
    read_manifest,
    write_manifest,
)
from vdistream.storage import MemoryStorage


def manifest(backup_id: str = "b1", started: str = "2026-11-25T10:00:00+00:00") -> Manifest:
    return Manifest(
        backup_id=backup_id,
        engine="sqlite",
        mode=None,
        source="sqlite:///srv/app.db",
        started=started,
        ended=started,
        vdi={"device_count": 2, "block_size": 65536, "max_transfer_size": 1048576},
        devices=(
            DeviceEntry(0, "set", f"{backup_id}/stream-00-of-02.vdi", "memory://x/a", 3, "aa"),
            DeviceEntry(1, "set1", f"{backup_id}/stream-01-of-02.vdi", "memory://x/b", 4, "bb"),
        ),
        versions={"vdistream": "0.1.0"},
        logical_bytes=5,
    )


def test_round_trip() -> None:
    original = manifest()
    again = Manifest.from_json(original.to_json(), where="here")
    assert again == original
    assert again.stored_bytes == 7
    assert again.summary()["bytes"] == 7


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda b: b["devices"][0].update(bytes=99), "modified"),
        (lambda b: b.update(source="sqlite:///elsewhere.db"), "modified"),
        (lambda b: b.pop("checksum"), "modified"),
        (lambda b: b.update(version=7), "format version 7"),
        (lambda b: b.update(format="other"), "not a vdistream manifest"),
    ],
)
def test_a_manifest_edited_by_hand_is_refused(edit: object, message: str) -> None:
    body = json.loads(manifest().to_json())
    edit(body)  # type: ignore[operator]
    with pytest.raises(CatalogError, match=message) as info:
        Manifest.from_json(json.dumps(body).encode(), where="memory://x/b1/manifest.json")
    assert "memory://x/b1/manifest.json" in str(info.value)


def test_garbage_is_refused() -> None:
    with pytest.raises(CatalogError, match="not valid JSON"):
        Manifest.from_json(b"{nope", where="w")


@pytest.mark.parametrize(
    ("ref", "expected"),
    [
        ("/backups/b1", ("/backups", "b1")),
        ("/backups/b1/", ("/backups", "b1")),
        ("/backups/b1/manifest.json", ("/backups", "b1")),
        ("file:///backups/b1", ("file:///backups", "b1")),
        ("memory://store/b1", ("memory://store", "b1")),
        ("rel/dir/b1", ("rel/dir", "b1")),
    ],
)
def test_backup_references(ref: str, expected: tuple[str, str]) -> None:
    assert parse_backup_ref(ref) == expected


@pytest.mark.parametrize("ref", ["b1", "/", "", "memory://b1"])
def test_references_that_name_no_backup(ref: str) -> None:
    with pytest.raises(CatalogError, match="names no backup"):
        parse_backup_ref(ref)


@pytest.mark.asyncio
async def test_write_read_list_and_streams() -> None:
    storage = MemoryStorage()
    first, second = manifest("b1"), manifest("b2", started="2026-11-25T11:00:00+00:00")
    for m in (second, first):
        for d in m.devices:
            await storage.write_bytes(d.key, b"x" * d.bytes)
        await write_manifest(storage, m)
    # a backup whose manifest never got written does not exist
    await storage.write_bytes("b3/stream-00-of-01.vdi", b"partial")
    listed, problems = await list_manifests(storage)
    assert [m.backup_id for m in listed] == ["b1", "b2"]
    assert problems == []
    assert await read_manifest(storage, "b1") == first
    with pytest.raises(CatalogError, match="no backup 'b3'"):
        await read_manifest(storage, "b3")
    with pytest.raises(CatalogError, match="already exists"):
        await write_manifest(storage, first)
    await check_streams(storage, first)
    await storage.delete(first.devices[1].key)
    await storage.write_bytes(first.devices[1].key, b"xy")
    with pytest.raises(CatalogError, match="has 2 bytes, the manifest says 4 \\(truncated\\)"):
        await check_streams(storage, first)
    await storage.delete(first.devices[0].key)
    with pytest.raises(CatalogError, match=r"device 0 .* is missing"):
        await check_streams(storage, first)


@pytest.mark.asyncio
async def test_a_broken_manifest_is_reported_not_listed() -> None:
    storage = MemoryStorage()
    await storage.write_bytes("bad/manifest.json", b"{}")
    listed, problems = await list_manifests(storage)
    assert listed == []
    assert len(problems) == 1
    assert "not a vdistream manifest" in problems[0]


def test_a_urls_query_stays_with_the_destination() -> None:
    assert parse_backup_ref("s3://b/p/id1?endpoint_url=http://127.0.0.1:9000") == (
        "s3://b/p?endpoint_url=http://127.0.0.1:9000",
        "id1",
    )
    assert parse_backup_ref("s3://b/p/id1/manifest.json?region=x") == ("s3://b/p?region=x", "id1")


def test_relocated_names_where_the_streams_are_now() -> None:
    original = manifest()
    moved = original.relocated("file:///mnt/copy/")
    assert [d.url for d in moved.devices] == [
        "file:///mnt/copy/b1/stream-00-of-02.vdi",
        "file:///mnt/copy/b1/stream-01-of-02.vdi",
    ]
    assert [d.url for d in original.devices] == ["memory://x/a", "memory://x/b"]
    assert moved.to_json() != original.to_json()  # only for reading: never written


def test_the_summary_names_both_byte_counts() -> None:
    entry = DeviceEntry(0, "set", "b1/stream-00-of-01.vdi", "u", 10, "aa", 30, "cc")
    summary = dataclasses.replace(manifest(), devices=(entry,)).summary()
    assert (summary["bytes"], summary["stored_bytes"], summary["logical_bytes"]) == (10, 10, 30)
    plain = manifest().summary()  # without stages both are the same
    assert (plain["stored_bytes"], plain["logical_bytes"]) == (7, 7)
