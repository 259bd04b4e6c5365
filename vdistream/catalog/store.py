"""Reading and writing manifests, listing backups, checking stored streams."""

from __future__ import annotations

import hashlib
from collections.abc import Awaitable, Callable

from vdistream import threads
from vdistream.catalog.manifest import MANIFEST_NAME, CatalogError, Manifest, manifest_key
from vdistream.errors import StorageExistsError, StorageNotFoundError
from vdistream.storage import Storage

__all__ = (
    "check_streams",
    "hash_stream",
    "list_manifests",
    "parse_backup_ref",
    "read_manifest",
    "replace_manifest",
    "write_manifest",
)

_CHUNK = 4 * 1024 * 1024


def parse_backup_ref(ref: str) -> tuple[str, str]:
    """``DEST/ID`` or ``DEST/ID/manifest.json`` -> (DEST, ID).

    A URL's query (``s3://bucket/prefix/ID?endpoint_url=...``) belongs to DEST.
    """
    text, question, query = ref.partition("?")
    dest, backup_id = _split_ref(text, ref)
    return (dest + question + query, backup_id)


def _split_ref(text: str, ref: str) -> tuple[str, str]:
    text = text.rstrip("/")
    if text.endswith("/" + MANIFEST_NAME):
        text = text[: -len(MANIFEST_NAME) - 1]
    dest, sep, backup_id = text.rpartition("/")
    if not sep or not backup_id or not dest or dest.endswith(":/"):
        raise CatalogError(
            f"{ref!r} names no backup: give DEST/ID (a backup's id inside its destination) "
            "or the location of its manifest.json"
        )
    return dest, backup_id


async def write_manifest(storage: Storage, manifest: Manifest) -> str:
    """Commit the manifest (never replacing one); returns its URL."""
    key = manifest_key(manifest.backup_id)
    try:
        await storage.write_bytes(key, manifest.to_json())
    except StorageExistsError as exc:
        raise CatalogError(
            f"backup {manifest.backup_id} already exists in {storage.url}; not replacing it"
        ) from exc
    return f"{storage.url.rstrip('/')}/{key}"


async def replace_manifest(storage: Storage, manifest: Manifest) -> str:
    """Replace a committed manifest with ``manifest`` (same backup) atomically, through
    ``Storage.replace_bytes``: a reader sees the old manifest or the new one, never
    neither and never a mix, and the old one stays until the new one is durable (file:
    temporary, fsync, rename, directory fsync; S3: one PutObject). Returns its URL.

    For the key commands, which rewrap a backup's data key and change nothing else; the
    caller holds the backup's ``Storage.in_progress`` mark, so two replacements of one
    manifest cannot interleave. ``CatalogError`` if there is no manifest to replace;
    the storage's ``StorageError`` if it cannot replace (then the old one is intact).

    The manifest in place is read first (the caller's mark keeps it as it is): it must
    be valid, say nothing that this version's ``Manifest`` would drop (fields of a newer
    version), and differ from ``manifest`` in its key block only; else ``CatalogError``
    and nothing is written.
    """
    key = manifest_key(manifest.backup_id)
    where = f"{storage.url.rstrip('/')}/{key}"
    try:
        data = await storage.read_bytes(key)
    except StorageNotFoundError as exc:
        raise CatalogError(f"no manifest to replace at {where}") from exc
    current = Manifest.from_json(data, where=where)
    if not current.carries(data):
        raise CatalogError(
            f"manifest {where} holds fields this vdistream does not know (a newer version "
            "wrote it): not rewriting it; use that version"
        )
    block = manifest.key_block
    if block is None or current.key_block is None or current.with_key_block(block) != manifest:
        raise CatalogError(
            f"refusing to replace manifest {where}: the new one differs in more than its key"
        )
    try:
        await storage.replace_bytes(key, manifest.to_json())
    except StorageNotFoundError as exc:
        raise CatalogError(f"no manifest to replace at {where}") from exc
    return where


async def read_manifest(storage: Storage, backup_id: str) -> Manifest:
    key = manifest_key(backup_id)
    where = f"{storage.url.rstrip('/')}/{key}"
    try:
        data = await storage.read_bytes(key)
    except StorageNotFoundError as exc:
        raise CatalogError(
            f"no backup {backup_id!r} in {storage.url}: it has no committed manifest "
            f"({where} does not exist)"
        ) from exc
    manifest = Manifest.from_json(data, where=where)
    if manifest.backup_id != backup_id:
        raise CatalogError(
            f"manifest {where} describes backup {manifest.backup_id!r}, not {backup_id!r}"
        )
    return manifest


async def list_manifests(storage: Storage) -> tuple[list[Manifest], list[str]]:
    """Every backup with a committed manifest, oldest first, and what could not be read."""
    manifests: list[Manifest] = []
    problems: list[str] = []
    for key in await storage.list():
        backup_id, _, name = key.rpartition("/")
        if name != MANIFEST_NAME or not backup_id or "/" in backup_id:
            continue
        try:
            manifests.append(await read_manifest(storage, backup_id))
        except CatalogError as exc:
            problems.append(str(exc))
    manifests.sort(key=lambda m: (m.started, m.backup_id))
    return manifests, problems


async def check_streams(storage: Storage, manifest: Manifest) -> None:
    """Every device stream exists with the size the manifest says (cheap; no reading)."""
    for device in manifest.devices:
        try:
            size = await storage.stat(device.key)
        except StorageNotFoundError as exc:
            raise CatalogError(
                f"backup {manifest.backup_id}: the stream of device {device.index} "
                f"({device.url}) is missing"
            ) from exc
        if size != device.bytes:
            raise CatalogError(
                f"backup {manifest.backup_id}: the stream of device {device.index} "
                f"({device.url}) has {size} bytes, the manifest says {device.bytes}"
                + (" (truncated)" if size < device.bytes else "")
            )


async def hash_stream(
    storage: Storage,
    key: str,
    *,
    after_read: Callable[[int], Awaitable[object]] | None = None,
    chunk: int = _CHUNK,
) -> tuple[int, str]:
    """Read a stored stream back: its size and SHA-256. ``after_read(n)`` is awaited
    after each read of ``n`` bytes (a bandwidth limit's wait), reads of ``chunk``."""
    hasher = hashlib.sha256()
    size = 0
    buffer = bytearray(chunk)
    view = memoryview(buffer)
    async with await storage.open_source(key) as source:
        while True:
            got = await source.readinto(view)
            if not got:
                break
            await threads.run_sync(hasher.update, view[:got])
            size += got
            if after_read is not None:
                await after_read(got)
    return size, hasher.hexdigest()
