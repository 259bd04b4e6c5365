"""``AzureStorage``: the storage operations on a container and prefix, and the
maintenance of uncommitted blocks.

Objects are block blobs committed with ``If-None-Match: *`` (``Put Block List``, or
``Put Blob`` for a small one), so a replayed or concurrent job never replaces one
(``StorageExistsError``). Each committed blob carries its writer's random token in its
metadata (``vdistream_writer``): after a request whose answer was lost, that is how a
blob is told to be ours (the SDK's retry met its own attempt) or someone else's, and
only ours is ever taken back. What the store refuses to remove raises
``OrphanUploadsError``, naming what is left and ``vdistream storage audit --clean URL``.

Uncommitted blocks (a sink's staged stream; see ``sink``) are invisible to ``list``,
``stat`` and reads. A killed job leaves blobs holding only uncommitted blocks: Azure
garbage-collects them after 7 days, and ``list_uploads`` finds them before that (a
listing with ``include=["uncommittedblobs"]`` minus the committed blobs), each as an
``AzureUpload`` with the upload id ``"uncommitted-blocks"``; ``abort_upload`` removes
them (an empty block list committed on the key, then that empty blob deleted by its
ETag). ``vdistream.catalog.audit`` uses those two methods as it does S3's uploads.

Owner marks: ``in_progress(backup_id)`` writes ``<backup_id>/.vdistream-owner.json``
(host, boot id, pid, process start, start of the backup) conditionally and deletes it
at exit; a dead owner's mark is taken over by deleting exactly the version read
(``If-Match``), so of two processes taking it over at once one finds the other's live
mark. ``sweep()`` removes the debris of backups whose owner is provably gone (same
host and boot, pid gone or reused), uncommitted blocks included; other hosts' marks are
kept. Names starting with ``.vdistream-`` are not keys (``list`` skips them).
``probe()`` lists one blob under the prefix, then puts and deletes
``<prefix>/.vdistream-probe-<random>``. Every call that started runs to its end,
shielded: the SDK's retries delay a cancellation by up to their bound.
"""

from __future__ import annotations

import builtins
import contextlib
import dataclasses
import io
import json
import secrets
from collections.abc import Callable
from datetime import datetime
from typing import TYPE_CHECKING, Any, ClassVar

import anyio
import anyio.lowlevel
from azure.core import MatchConditions

from vdistream.errors import (
    StorageError,
    StorageExistsError,
    StorageIntegrityError,
    StorageNotFoundError,
    StorageURLError,
)
from vdistream.log import get_logger
from vdistream.storage._common import (
    INTERNAL_PREFIX,
    check_key,
)
from vdistream.storage._objects import MARK_NAME, MarkedObjectStore
from vdistream.storage.azure.blocks import SINGLE_PUT_LIMIT, block_id, initial_block_size
from vdistream.storage.azure.client import AzureConnection
from vdistream.storage.azure.errors import is_ambiguous, probe_reason
from vdistream.storage.azure.sink import AzureSink
from vdistream.storage.azure.source import AzureSource
from vdistream.storage.base import (
    OrphanUploadsError,
    StorageProbeError,
)

if TYPE_CHECKING:
    from azure.storage.blob import BlobProperties

__all__ = ("MARK_NAME", "AzureObject", "AzureStorage", "AzureUpload")

_log = get_logger(__name__)


@dataclasses.dataclass(frozen=True)
class AzureObject:
    """A committed blob (``key`` relative to the storage)."""

    key: str
    size: int
    etag: str
    last_modified: datetime | None


@dataclasses.dataclass(frozen=True)
class AzureUpload:
    """A blob holding only uncommitted blocks (``key`` relative to the storage); the
    audit treats it like an S3 multipart upload."""

    key: str
    upload_id: str
    initiated: datetime | None


class AzureStorage(AzureConnection, MarkedObjectStore):
    """The blobs under ``prefix`` in ``container`` of ``account``; options as
    ``AzureConnection`` (URL form and credentials in ``vdistream.storage.azure``).
    Sinks are append-only (``random_access`` is False)."""

    _events = _log
    #: the metadata entry holding a committed blob's writer token
    WRITER: ClassVar[str] = "vdistream_writer"
    #: the upload id ``list_uploads`` gives a blob of uncommitted blocks
    UPLOAD_ID: ClassVar[str] = "uncommitted-blocks"

    @staticmethod
    def if_missing() -> dict[str, Any]:
        """The SDK's arguments for ``If-None-Match: *``."""
        return {"match_condition": MatchConditions.IfMissing}

    @staticmethod
    def if_unchanged() -> dict[str, Any]:
        """The SDK's arguments for ``If-Match: <etag>`` (with ``etag=``)."""
        return {"match_condition": MatchConditions.IfNotModified}

    # --- the Storage contract ---

    async def open_sink(
        self, key: str, *, device: str | None = None, expected_size: int | None = None
    ) -> AzureSink:
        """A sink for ``key``; nothing is sent until the first block fills (or commit).
        ``expected_size`` (optional) picks the first block size."""
        full_key = self._full_key(key)
        await anyio.lowlevel.checkpoint_if_cancelled()
        return AzureSink(
            self,
            full_key,
            device=device,
            initial_block_size=initial_block_size(expected_size, default=self.block_size),
        )

    async def open_source(self, key: str) -> AzureSource:
        full_key = self._full_key(key)
        await anyio.lowlevel.checkpoint_if_cancelled()
        with anyio.CancelScope(shield=True):
            props = await self._props(full_key, what="open")
        return AzureSource(self, full_key, size=int(props.size), etag=str(props.etag))

    async def _props(self, full_key: str, *, what: str) -> BlobProperties:
        blob = await self._blob(full_key)
        return await self._call(what, blob.get_blob_properties, blob=full_key)

    async def list_objects(self, prefix: str = "") -> builtins.list[AzureObject]:
        """The committed blobs whose key starts with ``prefix``, sorted by key, with
        size, ETag and modification time (every page)."""
        found: builtins.list[AzureObject] = []
        for obj in await self._list_raw(prefix):
            try:
                check_key(obj.key, url=self.url)
            except StorageURLError:
                continue  # an owner mark, a foreign name: no object our keys name
            found.append(obj)
        return found

    async def _list_raw(
        self, prefix: str = "", *, uncommitted: bool = False
    ) -> builtins.list[AzureObject]:
        """Every blob under the storage's prefix + ``prefix``, internal names too; with
        ``uncommitted`` also the blobs holding only uncommitted blocks."""
        container = await self._client()
        include = ["uncommittedblobs"] if uncommitted else None

        async def collect(**options: Any) -> builtins.list[AzureObject]:
            listed = container.list_blobs(
                name_starts_with=self._root() + prefix,
                include=include,
                results_per_page=self.list_page_size,
                **options,
            )
            return [
                AzureObject(
                    key=self._relative(item.name),
                    size=int(item.size or 0),
                    etag=str(item.etag or ""),
                    last_modified=item.last_modified or item.creation_time,
                )
                async for item in listed
            ]

        found = await self._call("list uncommitted blobs" if uncommitted else "list", collect)
        return sorted(found, key=lambda obj: obj.key)

    async def stat(self, key: str) -> int:
        return int((await self._props(self._full_key(key), what="stat")).size)

    async def delete(self, key: str) -> None:
        """Delete the committed blob ``key`` (its properties first: a blob of only
        uncommitted blocks is no object, ``StorageNotFoundError``). Once the blob was
        seen, a 404 from the delete is success: the SDK's replay of a delete whose
        answer was lost meets its own work (or someone else removed it meanwhile)."""
        full_key = self._full_key(key)
        await anyio.lowlevel.checkpoint_if_cancelled()
        with anyio.CancelScope(shield=True):
            await self._props(full_key, what="delete")
            with contextlib.suppress(StorageNotFoundError):
                await self._delete(full_key)

    async def _delete(
        self, full_key: str, *, device: str | None = None, etag: str | None = None
    ) -> None:
        """Delete the blob (and snapshots); with ``etag`` only that version of it."""
        blob = await self._blob(full_key)
        match = {"etag": etag, **self.if_unchanged()} if etag is not None else {}
        await self._call(
            "delete",
            blob.delete_blob,
            delete_snapshots="include",
            blob=full_key,
            device=device,
            **match,
        )

    async def write_bytes(
        self,
        key: str,
        data: bytes | bytearray | memoryview,
        *,
        overwrite: bool = False,
        device: str | None = None,
    ) -> None:
        """One conditional ``Put Blob`` (``If-None-Match: *``); with ``overwrite`` the old
        blob is deleted and the put repeated once."""
        full_key = self._full_key(key)
        with memoryview(data) as view, view.cast("B") as flat:
            body = bytes(flat)  # a copy: the caller's buffer is not retained
        await anyio.lowlevel.checkpoint_if_cancelled()
        token = secrets.token_hex(8)
        with anyio.CancelScope(shield=True):
            try:
                await self._put_new(full_key, body, token, device=device)
            except StorageExistsError:
                if not overwrite:
                    raise
                with contextlib.suppress(StorageNotFoundError):
                    await self.delete(key)  # someone else may have removed it first
                await self._put_new(full_key, body, token, device=device)

    async def replace_bytes(self, key: str, data: bytes | bytearray | memoryview) -> None:
        """``Storage.replace_bytes``: the blob's properties (``StorageNotFoundError``),
        then one write conditional on that ETag (``If-Match``): Azure swaps a block blob
        atomically (readers see the old or the new one, the new one only once stored),
        and a blob changed meanwhile by someone else is never overwritten (a
        ``StorageError``; a replay of our own write that met its own success counts as
        done). Then the size is checked (a mismatch is ``StorageIntegrityError``; the blob
        is kept: it is the only copy)."""
        full_key = self._full_key(key)
        with memoryview(data) as view, view.cast("B") as flat:
            body = bytes(flat)
        await anyio.lowlevel.checkpoint_if_cancelled()
        token = secrets.token_hex(8)
        with anyio.CancelScope(shield=True):
            props = await self._props(full_key, what="replace")
            condition = {"etag": props.etag, **self.if_unchanged()}
            try:
                await self._write_whole(
                    full_key, body, token, "replace", condition, exists=StorageError, device=None
                )
            except StorageError:
                if not await self._is_ours(full_key, token, len(body)):
                    raise
            stored = int((await self._props(full_key, what="verify replace")).size)
            if stored != len(body):
                raise StorageIntegrityError(
                    f"replace refused: Azure holds {stored} bytes, {len(body)} were sent; "
                    f"container {self.container!r}, blob {full_key!r}",
                    url=self._url(full_key),
                )

    async def _put_new(self, full_key: str, body: bytes, token: str, *, device: str | None) -> None:
        """Conditional creation (``If-None-Match: *``) of a whole blob carrying ``token``,
        then a check of its size. A write whose outcome is unknown publishes nothing
        (``_take_back``)."""
        unsure: builtins.list[BaseException] = []

        def failed(exc: BaseException) -> None:
            unsure.extend([exc] if is_ambiguous(exc) else [])

        try:
            try:
                await self._write_whole(
                    full_key, body, token, "commit", self.if_missing(), device=device, failed=failed
                )
            except StorageExistsError as refused:
                try:
                    ours = await self._is_ours(full_key, token, len(body))
                except StorageError:
                    unsure.append(refused)  # maybe our own replayed put: take it back
                    raise
                if ours:
                    pass  # a replay met its own earlier, successful attempt
                elif await self._only_uncommitted(full_key) and len(body) <= SINGLE_PUT_LIMIT:
                    # Azurite refuses Put Blob where only someone's staged blocks are
                    await self._write_whole(
                        full_key,
                        body,
                        token,
                        "commit",
                        self.if_missing(),
                        device=device,
                        failed=failed,
                        as_block=True,
                    )
                else:
                    raise
        except StorageExistsError:
            raise
        except StorageError:
            if unsure:  # an attempt may have landed
                await self._take_back(full_key, token)
            raise
        await self._verify_size(full_key, len(body), token, device=device)

    async def _write_whole(
        self,
        full_key: str,
        body: bytes,
        token: str,
        what: str,
        condition: dict[str, Any],
        *,
        device: str | None,
        exists: type[StorageError] = StorageExistsError,
        failed: Callable[[BaseException], None] | None = None,
        as_block: bool = False,
    ) -> None:
        """Write ``body`` as the whole blob under ``condition``, with ``token`` in its
        metadata: one ``Put Blob`` up to ``SINGLE_PUT_LIMIT`` (aiohttp warns of larger
        bodies sent from bytes, and the SDK reads a stream given to ``Put Blob`` into
        bytes), else (or with ``as_block``) one staged block and a ``Put Block List``,
        the block sent as a stream."""
        blob = await self._blob(full_key)
        common: dict[str, Any] = {
            "metadata": {self.WRITER: token},
            "blob": full_key,
            "device": device,
            "exists": exists,
            "failed": failed,
            **condition,
        }
        if len(body) <= SINGLE_PUT_LIMIT and not as_block:
            await self._call(
                f"{what} (put blob)",
                blob.upload_blob,
                body,
                length=len(body),
                overwrite=True,
                **common,
            )
            return
        ids = [block_id(token, 1)]
        await self._call(
            f"{what} (stage block)",
            blob.stage_block,
            ids[0],
            io.BytesIO(body),  # a stream: sent in pieces; BytesIO shares the bytes
            length=len(body),
            blob=full_key,
            device=device,
        )
        await self._call(f"{what} (put block list)", blob.commit_block_list, ids, **common)

    async def _only_uncommitted(self, full_key: str) -> bool:
        """Whether the blob that refused a conditional put holds no committed data (only
        someone's staged blocks: Azurite refuses ``Put Blob`` with ``If-None-Match: *``
        there, though no object exists)."""
        try:
            await self._props(full_key, what="check a refused put")
        except StorageNotFoundError:
            return True
        except StorageError:
            return False
        return False

    async def _ours(self, full_key: str, token: str, size: int | None) -> BlobProperties | None:
        """The blob's properties if it carries ``token`` (and has ``size``), else None."""
        try:
            props = await self._props(full_key, what="check ownership")
        except StorageNotFoundError:
            return None
        metadata = {name.lower(): value for name, value in (props.metadata or {}).items()}
        if metadata.get(self.WRITER) != token or size not in (None, int(props.size)):
            return None
        return props

    async def _is_ours(self, full_key: str, token: str, size: int) -> bool:
        """After a refused conditional write: is the blob there exactly ours? A check
        that fails raises (``StorageError``): a refusal that may be our own replayed
        write must not pass for someone else's blob."""
        return await self._ours(full_key, token, size) is not None

    async def _take_back(self, full_key: str, token: str) -> None:
        """After a write whose outcome is unknown: delete the blob under ``full_key`` if
        it carries ``token``, never someone else's. ``OrphanUploadsError`` if that
        cannot be done."""
        left = [f"object {self._relative(full_key)}"]
        try:
            props = await self._ours(full_key, token, None)
            if props is None:
                return
            await self._delete(full_key, etag=str(props.etag))
        except StorageNotFoundError:
            return
        except StorageError as exc:
            raise OrphanUploadsError(self.url, left, reason=str(exc)) from exc
        _log.info("lost_write_removed", container=self.container, key=full_key)

    async def _verify_size(
        self, full_key: str, size: int, token: str, *, device: str | None
    ) -> None:
        """The committed blob holds ``size`` bytes, else it is removed again."""
        props = await self._props(full_key, what="verify commit")
        if int(props.size) == size:
            return
        with anyio.CancelScope(shield=True):
            try:
                await self._delete(full_key, device=device, etag=str(props.etag))
            except StorageError as exc:
                _log.error("azure_discard_failed", key=full_key, error=str(exc))
        raise StorageIntegrityError(
            f"commit refused: Azure holds {props.size} bytes, the sink wrote {size}; "
            f"container {self.container!r}, blob {full_key!r}",
            url=self._url(full_key),
            device=device,
        )

    async def _drop_uncommitted(
        self, full_key: str, *, device: str | None = None, settle: bool = False
    ) -> None:
        """Remove the uncommitted blocks of the blob ``full_key``: commit an empty block
        list (``If-None-Match: *``, which discards every uncommitted block), then delete
        that empty blob by its ETag. When a committed blob is there, its blocks stay for
        Azure to discard (see ``sink``); nothing committed is ever touched.

        With ``settle`` (stagings were cancelled in flight, and a request that went out
        may still land) the blob's block list is checked again after pauses of 0.1,
        0.2, 0.5 and 0.8 s, and the removal repeated whenever blocks showed up; one
        landing later than that is left to ``storage audit`` (and Azure's 7 days)."""
        if not await self._drop_once(full_key, device=device) or not settle:
            return
        for pause in (0.1, 0.2, 0.5, 0.8):
            await anyio.sleep(pause)
            if await self._has_uncommitted(full_key) and not await self._drop_once(
                full_key, device=device
            ):
                return  # a committed blob holds the key now: nothing more to do here

    async def _has_uncommitted(self, full_key: str) -> bool:
        blob = await self._blob(full_key)
        try:
            _, uncommitted = await self._call(
                "check for uncommitted blocks", blob.get_block_list, "uncommitted", blob=full_key
            )
        except StorageNotFoundError:
            return False
        return bool(uncommitted)

    async def _drop_once(self, full_key: str, *, device: str | None) -> bool:
        """One removal (``_drop_uncommitted``); False when a committed blob is there."""
        blob = await self._blob(full_key)
        token = secrets.token_hex(8)
        try:
            result = await self._call(
                "remove uncommitted blocks (commit an empty block list)",
                blob.commit_block_list,
                [],
                metadata={self.WRITER: token},
                blob=full_key,
                device=device,
                **self.if_missing(),
            )
            etag = str(result["etag"])
        except StorageExistsError:
            props = await self._ours(full_key, token, 0)  # our own replayed commit?
            if props is None:
                _log.info("azure_blocks_left_to_expire", container=self.container, key=full_key)
                return False
            etag = str(props.etag)
        with contextlib.suppress(StorageNotFoundError, StorageExistsError):
            # gone already, or replaced by someone else's blob since: not ours to delete
            await self._delete(full_key, device=device, etag=etag)
        return True

    # --- debris: owner marks (the sweep is MarkedObjectStore's), probe ---

    async def _put_mark(self, full_key: str, body: bytes, token: str) -> None:
        await self._put_new(full_key, body, token, device=None)

    async def _read_mark_version(self, full_key: str) -> tuple[dict[str, Any] | None, str | None]:
        """The owner record and the ETag of the mark it was read from."""
        blob = await self._blob(full_key)
        try:
            downloader = await self._call("read owner mark", blob.download_blob, blob=full_key)
            etag = str(downloader.properties.etag)
            data = await self._call(
                "read owner mark", lambda **_: downloader.readall(), blob=full_key
            )
            record = json.loads(data)
        except (StorageNotFoundError, ValueError):
            return None, None  # gone, or unreadable: no proof of anything
        return (record if isinstance(record, dict) else None), etag

    async def _delete_dead_mark(self, full_key: str, version: str | None) -> None:
        # Only the version of the mark read (If-Match): a process that took it over
        # meanwhile placed a live mark, never deleted.
        with contextlib.suppress(StorageNotFoundError, StorageExistsError):
            await self._delete(full_key, etag=version)

    async def probe(self) -> None:
        """A listing of one blob under the prefix, then a tiny put and delete of
        ``<prefix>/.vdistream-probe-<random>`` (see ``Storage.probe``).

        A listing, not ``Get Container Properties``: a container SAS (a service SAS)
        grants no container-level operation, only the blob operations and the listing a
        backup needs, so the properties would refuse a credential that works."""
        container = await self._client()  # a client that cannot be made is no probe result
        endpoint = self._endpoint()

        async def list_one(**options: Any) -> None:
            root = self._root()
            async for _ in container.list_blobs(
                name_starts_with=root, results_per_page=1, **options
            ):
                break

        try:
            await self._call("check the container", list_one)
        except StorageError as exc:
            raise StorageProbeError(self.url, probe_reason(exc, endpoint)) from exc
        key = self._root() + f"{INTERNAL_PREFIX}probe-{secrets.token_hex(8)}"
        with anyio.CancelScope(shield=True):
            try:
                blob = await self._blob(key)
                await self._call(
                    "write a probe object", blob.upload_blob, b"probe", overwrite=True, blob=key
                )
                await self._delete(key)
            except StorageError as exc:
                raise StorageProbeError(self.url, probe_reason(exc, endpoint, "write")) from exc

    # --- uncommitted blocks (used by sinks and vdistream.catalog.audit) ---

    async def list_uploads(self, prefix: str = "") -> builtins.list[AzureUpload]:
        """The blobs under ``prefix`` that hold only uncommitted blocks (a killed
        sink's staged stream), as uploads with the id ``UPLOAD_ID``.

        A listing that includes them minus the committed listing gives candidates; each
        is confirmed by its block list (uncommitted blocks, no committed ones), because
        a blob committed or deleted between the two listings (a probe, an owner mark, a
        finishing stream) is in one listing only and is no upload."""
        listed = await self._list_raw(prefix, uncommitted=True)
        committed = {obj.key for obj in await self._list_raw(prefix)}
        return [
            AzureUpload(obj.key, self.UPLOAD_ID, obj.last_modified)
            for obj in listed
            if obj.key not in committed and await self._only_blocks(self._root() + obj.key)
        ]

    async def _only_blocks(self, full_key: str) -> bool:
        """Whether the blob holds uncommitted blocks and no committed data."""
        blob = await self._blob(full_key)
        try:
            committed, uncommitted = await self._call(
                "list blocks", blob.get_block_list, "all", blob=full_key
            )
        except StorageNotFoundError:
            return False  # deleted since the listing
        return bool(uncommitted) and not committed

    async def abort_upload(self, key: str, upload_id: str = UPLOAD_ID) -> None:
        """Remove the uncommitted blocks of the blob ``key`` (see ``_drop_uncommitted``);
        idempotent, runs to completion. ``upload_id`` is ``UPLOAD_ID``: a blob's
        uncommitted blocks go together."""
        full_key = self._full_key(key)
        with anyio.CancelScope(shield=True):
            await self._drop_uncommitted(full_key)
