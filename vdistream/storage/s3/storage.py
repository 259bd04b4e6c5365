"""``S3Storage``: the storage operations on a bucket and prefix, and upload maintenance.

Objects are committed with conditional writes (``If-None-Match: *``), so a replayed or
concurrent job never replaces one (``StorageExistsError``). A write that failed after
an ambiguous attempt (``is_ambiguous``) deletes the object under its key if it is ours
(our size and ETag), never someone else's; what the store refuses to remove raises
``OrphanUploadsError``, naming what is left and ``vdistream storage audit --clean URL``.

Owner marks: ``in_progress(backup_id)`` writes ``<backup_id>/.vdistream-owner.json``
(host, boot id, pid, process start, start of the backup) conditionally and deletes it
at exit; ``sweep()`` removes the debris of backups whose owner is provably gone (same
host and boot, pid gone or reused); other hosts' marks are kept. Names starting with
``.vdistream-`` are not keys (``list`` skips them). ``probe()`` is ``HeadBucket`` plus a
put and delete of ``<prefix>/.vdistream-probe-<random>``. ``delete`` checks existence
with ``HeadObject`` first (S3's delete is silent for missing keys). Every call that
started runs to its end, shielded: retries delay a cancellation by up to their bound.
"""

from __future__ import annotations

import builtins
import contextlib
import dataclasses
import hashlib
import json
import secrets
from datetime import datetime
from typing import Any

import anyio
import anyio.lowlevel

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
from vdistream.storage.base import (
    OrphanUploadsError,
    StorageProbeError,
)
from vdistream.storage.s3.client import S3Connection
from vdistream.storage.s3.errors import is_ambiguous, probe_reason
from vdistream.storage.s3.parts import digest, initial_part_size, md5
from vdistream.storage.s3.sink import S3Sink
from vdistream.storage.s3.source import S3Source

__all__ = ("MARK_NAME", "S3Object", "S3Storage", "S3Upload")

_log = get_logger(__name__)


@dataclasses.dataclass(frozen=True)
class S3Upload:
    """An in-progress multipart upload (``key`` relative to the storage)."""

    key: str
    upload_id: str
    initiated: datetime | None


@dataclasses.dataclass(frozen=True)
class S3Object:
    """A committed object (``key`` relative to the storage)."""

    key: str
    size: int
    etag: str
    last_modified: datetime | None


class S3Storage(S3Connection, MarkedObjectStore):
    """The objects under ``prefix`` in ``bucket``; options as ``S3Connection``.

    URL form: ``s3://bucket/some/prefix?endpoint_url=http://127.0.0.1:9000&region=us-east-1``
    with the query options ``endpoint_url``, ``region``, ``profile`` and
    ``addressing_style`` (``auto``/``path``/``virtual``). ``url`` is the URL without
    the query. Sinks are append-only (``random_access`` is False).
    """

    _events = _log

    # --- the Storage contract ---

    async def open_sink(
        self, key: str, *, device: str | None = None, expected_size: int | None = None
    ) -> S3Sink:
        """A sink for ``key``; nothing is sent until the first part fills (or commit).

        ``expected_size`` (optional) picks the first part size (``initial_part_size``).
        """
        full_key = self._full_key(key)
        await anyio.lowlevel.checkpoint_if_cancelled()
        return S3Sink(
            self,
            full_key,
            device=device,
            initial_part_size=initial_part_size(expected_size, default=self.part_size),
        )

    async def open_source(self, key: str) -> S3Source:
        full_key = self._full_key(key)
        await anyio.lowlevel.checkpoint_if_cancelled()
        with anyio.CancelScope(shield=True):
            head = await self._head(full_key, what="open")
        return S3Source(self, full_key, size=int(head["ContentLength"]), etag=head.get("ETag"))

    async def _head(self, full_key: str, *, what: str) -> Any:
        return await self._call(what, "head_object", Key=full_key)

    async def list_objects(self, prefix: str = "") -> builtins.list[S3Object]:
        """The committed objects whose key starts with ``prefix``, sorted by key, with
        size, ETag and modification time (``ListObjectsV2``, every page)."""
        found: builtins.list[S3Object] = []
        for obj in await self._list_raw(prefix):
            try:
                check_key(obj.key, url=self.url)
            except StorageURLError:
                continue  # a "directory marker", an owner mark: no object our keys name
            found.append(obj)
        return found

    async def _listing(
        self,
        what: str,
        prefix: str,
        method: str,
        limit: str,
        items: str,
        follow: dict[str, str],
    ) -> builtins.list[Any]:
        """The ``items`` of every page of a listing under the storage's prefix +
        ``prefix``; ``follow`` names each next-page marker's field in a page."""
        full_prefix = self._root() + prefix
        found: builtins.list[Any] = []
        markers: dict[str, Any] = {}
        while True:
            limits: dict[str, Any] = {limit: self.list_page_size}
            page = await self._call(what, method, Prefix=full_prefix, **limits, **markers)
            found.extend(page.get(items, []))
            markers = {name: page.get(field, "") for name, field in follow.items()}
            if not page.get("IsTruncated") or not any(markers.values()):
                return found

    async def _list_raw(self, prefix: str = "") -> builtins.list[S3Object]:
        """Every object under the storage's prefix + ``prefix``, internal names too."""
        follow = {"ContinuationToken": "NextContinuationToken"}
        listed = await self._listing(
            "list", prefix, "list_objects_v2", "MaxKeys", "Contents", follow
        )
        found = [
            S3Object(
                key=self._relative(item["Key"]),
                size=int(item.get("Size", 0)),
                etag=str(item.get("ETag", "")),
                last_modified=item.get("LastModified"),
            )
            for item in listed
        ]
        return sorted(found, key=lambda obj: obj.key)

    async def stat(self, key: str) -> int:
        head = await self._head(self._full_key(key), what="stat")
        return int(head["ContentLength"])

    async def delete(self, key: str) -> None:
        """Delete ``key``: ``HeadObject`` (``StorageNotFoundError``), then ``DeleteObject``."""
        full_key = self._full_key(key)
        await anyio.lowlevel.checkpoint_if_cancelled()
        with anyio.CancelScope(shield=True):
            await self._head(full_key, what="delete")
            await self._delete(full_key)

    async def _delete(self, full_key: str, *, device: str | None = None) -> None:
        await self._call("delete", "delete_object", Key=full_key, device=device)

    async def replace_bytes(self, key: str, data: bytes | bytearray | memoryview) -> None:
        """``HeadObject`` (``StorageNotFoundError``), then one unconditional ``PutObject``:
        S3 replaces an object atomically (readers see the old or the new one, and the new
        one only once it is stored), then its size is checked."""
        full_key = self._full_key(key)
        with memoryview(data) as view, view.cast("B") as flat:
            body = bytes(flat)
        await anyio.lowlevel.checkpoint_if_cancelled()
        with anyio.CancelScope(shield=True):
            await self._head(full_key, what="replace")
            sha256 = await digest(hashlib.sha256, body)
            await self._call("replace (put)", "put_object", Key=full_key, body=body, sha256=sha256)
            await self._verify_size(full_key, len(body), device=None)

    async def write_bytes(
        self,
        key: str,
        data: bytes | bytearray | memoryview,
        *,
        overwrite: bool = False,
        device: str | None = None,
    ) -> None:
        """One conditional ``PutObject`` (``If-None-Match: *``): a replayed or concurrent
        job can never replace a committed object (``StorageExistsError``). With
        ``overwrite`` the old object is deleted and the put repeated once."""
        full_key = self._full_key(key)
        with memoryview(data) as view, view.cast("B") as flat:
            body = bytes(flat)  # a copy: the caller's buffer is not retained
        await anyio.lowlevel.checkpoint_if_cancelled()
        with anyio.CancelScope(shield=True):
            try:
                await self._put_new(full_key, body, device=device)
            except StorageExistsError:
                if not overwrite:
                    raise
                try:
                    await self.delete(key)
                except StorageNotFoundError:
                    pass  # someone else removed it first; the put below decides
                await self._put_new(full_key, body, device=device)

    async def _put_new(self, full_key: str, body: bytes, *, device: str | None) -> str:
        """Conditional put of a whole small object, then check its size; returns the
        body's hex SHA-256. A failed put publishes nothing (``_take_back``)."""
        sha256 = await digest(hashlib.sha256, body)
        unsure: builtins.list[BaseException] = []
        expected = f'"{(await digest(md5, body)).hex()}"'
        try:
            await self._call(
                "commit (put)",
                "put_object",
                Key=full_key,
                IfNoneMatch="*",
                body=body,
                device=device,
                failed=lambda exc: unsure.extend([exc] if is_ambiguous(exc) else []),
                sha256=sha256,
            )
        except StorageExistsError:
            if not await self._is_ours(full_key, expected, len(body)):
                raise
        except StorageError as exc:
            if unsure:  # an attempt may have landed
                await self._take_back(full_key, expected, len(body), cause=exc)
            raise
        await self._verify_size(full_key, len(body), device=device)
        return sha256.hex()

    async def _ours(self, full_key: str, etag: str | None, size: int, *, what: str) -> bool:
        """Whether the object under ``full_key`` has our ``size`` and ``etag`` (any ETag
        when None: it could not be computed); False when there is none."""
        try:
            head = await self._head(full_key, what=what)
        except StorageNotFoundError:
            return False
        return int(head["ContentLength"]) == size and etag in (None, head.get("ETag"))

    async def _take_back(
        self, full_key: str, etag: str | None, size: int, *, cause: StorageError
    ) -> None:
        """After a write whose outcome is unknown failed: delete the object under
        ``full_key`` if it is ours, never someone else's. Raises ``OrphanUploadsError``
        if that cannot be done."""
        left = [f"object {self._relative(full_key)}"]
        try:
            if not await self._ours(full_key, etag, size, what="check for a lost write"):
                return
        except StorageError as exc:
            raise OrphanUploadsError(self.url, left, reason=str(cause)) from exc
        try:
            await self._delete(full_key)
        except StorageError as exc:
            raise OrphanUploadsError(self.url, left, reason=str(exc)) from exc
        _log.info("lost_write_removed", bucket=self.bucket, key=full_key)

    async def _is_ours(self, full_key: str, etag: str | None, size: int) -> bool:
        """After a 412 on a conditional write: is the object there exactly our bytes (a
        replayed request meeting its own earlier, successful attempt)?"""
        if etag is None:
            return False
        try:
            return await self._ours(full_key, etag, size, what="check ownership")
        except StorageError:
            return False

    async def _verify_size(self, full_key: str, size: int, *, device: str | None) -> None:
        """The committed object holds ``size`` bytes, else it is removed again."""
        try:
            actual = int((await self._head(full_key, what="verify commit"))["ContentLength"])
            if actual != size:
                raise StorageIntegrityError(
                    f"commit refused: S3 holds {actual} bytes, the sink wrote {size}; "
                    f"bucket {self.bucket!r}, key {full_key!r}",
                    url=self._url(full_key),
                    device=device,
                )
        except StorageError:
            try:  # best effort: take back an object we just published but must not keep
                await self._delete(full_key, device=device)
            except StorageError as exc:
                _log.error("s3_discard_failed", bucket=self.bucket, key=full_key, error=str(exc))
            raise

    # --- debris: owner marks (the sweep is MarkedObjectStore's), probe ---

    async def _put_mark(self, full_key: str, body: bytes, token: str) -> None:
        await self._put_new(full_key, body, device=None)

    async def _read_mark_version(self, full_key: str) -> tuple[dict[str, Any] | None, str | None]:
        """The owner record; no version (S3's delete of the dead mark is plain)."""
        try:
            data = await self._call("read owner mark", "get_object", Key=full_key, read=-1)
            record = json.loads(data)
        except (StorageNotFoundError, ValueError):
            return None, None  # gone, or unreadable: no proof of anything
        return (record if isinstance(record, dict) else None), None

    async def _delete_dead_mark(self, full_key: str, version: str | None) -> None:
        with contextlib.suppress(StorageNotFoundError):
            await self._delete(full_key)

    async def probe(self) -> None:
        """``HeadBucket``, then a tiny ``PutObject`` and ``DeleteObject`` of
        ``<prefix>/.vdistream-probe-<random>`` (see ``Storage.probe``)."""
        await self._client()  # a client that cannot be made is no probe result
        endpoint = self._endpoint() or "AWS"
        try:
            await self._call("check the bucket", "head_bucket")
        except StorageError as exc:
            raise StorageProbeError(self.url, probe_reason(exc, endpoint)) from exc
        name = f"{INTERNAL_PREFIX}probe-{secrets.token_hex(8)}"
        key = self._root() + name
        with anyio.CancelScope(shield=True):
            try:
                await self._call("write a probe object", "put_object", Key=key, body=b"probe")
                await self._delete(key)
            except StorageError as exc:
                raise StorageProbeError(self.url, probe_reason(exc, endpoint, "write")) from exc

    # --- multipart uploads (S3 only; used by sinks and vdistream.catalog.audit) ---

    async def list_uploads(self, prefix: str = "") -> builtins.list[S3Upload]:
        """In-progress multipart uploads whose key starts with ``prefix`` (every page)."""
        follow = {"KeyMarker": "NextKeyMarker", "UploadIdMarker": "NextUploadIdMarker"}
        listed = await self._listing(
            "list uploads", prefix, "list_multipart_uploads", "MaxUploads", "Uploads", follow
        )
        uploads = [
            S3Upload(
                key=self._relative(item.get("Key", "")),
                upload_id=item.get("UploadId", ""),
                initiated=item.get("Initiated"),
            )
            for item in listed
        ]
        return sorted(uploads, key=lambda upload: (upload.key, upload.upload_id))

    async def _uploads_on(self, full_key: str) -> builtins.list[S3Upload]:
        """The uploads on exactly ``full_key``."""
        relative = self._relative(full_key)
        return [upload for upload in await self.list_uploads(relative) if upload.key == relative]

    async def abort_upload(self, key: str, upload_id: str) -> None:
        """Abort the multipart upload ``upload_id`` of ``key`` and confirm it is gone
        (``ListParts`` -> ``NoSuchUpload``). Idempotent; runs to completion."""
        full_key = self._full_key(key)
        with anyio.CancelScope(shield=True):
            await self._abort_upload(full_key, upload_id)

    async def _abort_or_report(self, full_key: str, upload_id: str, *, device: str | None) -> None:
        """``_abort_upload``; what cannot be aborted raises ``OrphanUploadsError``."""
        try:
            await self._abort_upload(full_key, upload_id, device=device)
        except StorageError as exc:
            left = [f"upload {self._relative(full_key)} {upload_id}"]
            raise OrphanUploadsError(self.url, left, reason=str(exc)) from exc

    async def _abort_upload(
        self, full_key: str, upload_id: str, *, device: str | None = None
    ) -> None:
        ids: dict[str, Any] = {"Key": full_key, "UploadId": upload_id, "device": device}
        leftover = -1
        for round_ in range(4):
            if round_:
                await anyio.sleep(0.05 * round_)  # a racing part may still be landing
            try:
                await self._call("abort upload", "abort_multipart_upload", **ids)
                listing = await self._call("confirm abort", "list_parts", MaxParts=10, **ids)
            except StorageNotFoundError:
                return  # NoSuchUpload: aborted (or completed) before, or confirmed
            leftover = len(listing.get("Parts", []))
        if leftover == 0:
            # AWS may list an aborted upload without parts for a short while; no bytes
            # remain, which is what abort promises.
            return
        raise StorageError(
            f"abort did not take: upload {upload_id} still lists {leftover} parts; "
            f"bucket {self.bucket!r}, key {full_key!r}",
            url=self._url(full_key),
            device=device,
        )
