"""``S3Sink``: one device stream as one multipart upload (or one put if it stays small).

``write`` copies the caller's bytes into a private part buffer. A full buffer becomes
the next part, uploaded by a call in the sink's task group (``tasks``) while ``write``
fills a fresh buffer; at most ``max_parts_in_flight`` (2) upload at a time, and a write
that fills a part while that many are in flight waits for one. So a sink holds at most
``max_parts_in_flight + 1`` part buffers (plus, for a moment, the immutable copy of the
part being cut, which retries resend). Uploads overlap the caller's next writes inside
``async with sink``; without it each call waits for the parts it started.

The upload is created with the first full part; a stream that ends before filling one
is sent at ``commit`` as a single conditional ``PutObject``. Part sizes follow
``parts.part_size_for``; part 10,001 (or more than 5 TiB) is ``StorageFullError``. Each
part's SHA-256 is computed (in a worker thread) and kept (``parts``,
``part_checksums``); with ``send_checksums=True`` S3 verifies it too (not every
S3-compatible store supports that).

``flush`` waits until every part cut so far is uploaded (S3 has no durable partial
object; the part being filled stays in memory). ``commit`` uploads the last part, waits
for all, then ``CompleteMultipartUpload`` (or ``PutObject``) with ``If-None-Match: *``:
a 412 becomes ``StorageExistsError`` and keeps the upload (or the bytes) for another
try. ``HeadObject`` then checks the size (else the object is deleted again and
``StorageIntegrityError`` raised). A conditional request replayed after a lost answer
(by our retries, or by aiohttp, which resends an idempotent PUT once when a pooled
connection drops) may meet its own earlier attempt: a 412 (or ``NoSuchUpload``) counts
as success when the object has our size and the ETag our bytes produce (MD5 for a put,
the MD5 of the parts' MD5s with ``-count`` for an upload).

``abort`` cancels parts in flight, aborts the upload and confirms it gone (``ListParts``
-> ``NoSuchUpload``, again if a racing part shows up). No orphans when answers are
lost: before its first create the sink notes the uploads already on its key; if a
create attempt was ambiguous (``is_ambiguous``), commit and abort abort every later
upload on the exact key that is not its own; if a complete was ambiguous, abort deletes
the object under the key if it is ours, never someone else's. What the store refuses to
remove raises ``OrphanUploadsError`` (the sink stays failed; ``abort`` may try again).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
from typing import TYPE_CHECKING, Any

from vdistream.errors import (
    StorageError,
    StorageExistsError,
    StorageFullError,
    StorageNotFoundError,
)
from vdistream.log import get_logger
from vdistream.storage._streams import PieceSink
from vdistream.storage.base import OrphanUploadsError, SinkState
from vdistream.storage.s3.errors import is_ambiguous
from vdistream.storage.s3.parts import (
    MAX_OBJECT_SIZE,
    MAX_PARTS,
    b64,
    digest,
    multipart_etag,
    part_size_for,
)
from vdistream.storage.s3.tasks import Call

if TYPE_CHECKING:
    from anyio.abc import TaskGroup
    from types_aiobotocore_s3.type_defs import CompletedPartTypeDef

    from vdistream.storage.s3.storage import S3Storage

__all__ = ("S3Part", "S3Sink")

_log = get_logger(__name__)


@dataclasses.dataclass(frozen=True)
class S3Part:
    """One uploaded part: its number, size, the ETag S3 returned and our SHA-256."""

    number: int
    size: int
    etag: str
    sha256: str


class S3Sink(PieceSink[S3Part]):
    """One device stream as one multipart upload; see the module docstring."""

    random_access = False

    def __init__(
        self,
        storage: S3Storage,
        full_key: str,
        *,
        device: str | None,
        initial_part_size: int,
    ) -> None:
        super().__init__(storage._url(full_key), device)
        self.key = full_key
        self._storage = storage
        self._shared = storage.current_background()
        self._initial = initial_part_size
        self._buffer = bytearray()
        self._capacity = self._part_size(1)
        self._next_part = 1
        self._upload_id: str | None = None
        self._in_flight: dict[int, Call[S3Part]] = {}
        self._landed: dict[int, S3Part] = {}  # part number -> part
        self._single_sha256: str | None = None
        #: uploads on this key before our first create: never ours to abort
        self._foreign_uploads: frozenset[str] = frozenset()
        #: a CreateMultipartUpload attempt failed in a way the server may have acted on
        self._create_unsure = False
        #: CompleteMultipartUpload was sent and the sink is not committed: the object
        #: may exist all the same (a lost answer)
        self._complete_unsure = False

    @property
    def upload_id(self) -> str | None:
        """The multipart upload's id, once the first part has been sent."""
        return self._upload_id

    @property
    def parts(self) -> tuple[S3Part, ...]:
        """The parts uploaded so far, by number."""
        return tuple(self._landed[number] for number in sorted(self._landed))

    @property
    def part_checksums(self) -> tuple[str, ...]:
        """Hex SHA-256 of each uploaded part, in order (of the whole object when it was
        committed as a single put)."""
        if self._single_sha256 is not None:
            return (self._single_sha256,)
        return tuple(part.sha256 for part in self.parts)

    @property
    def parts_in_flight(self) -> int:
        """Parts being uploaded right now (at most ``max_parts_in_flight``)."""
        return len(self._in_flight)

    def _part_size(self, number: int) -> int:
        return part_size_for(
            number, initial=self._initial, growth_interval=self._storage.part_growth_interval
        )

    def _ids(self) -> dict[str, Any]:
        """The arguments naming this sink in every request and error."""
        return {"Key": self.key, "device": self.device}

    async def _write(self, view: memoryview, start: int) -> None:
        self._harvest()
        if self._size + view.nbytes > MAX_OBJECT_SIZE:
            raise StorageFullError(
                f"S3 objects hold at most {MAX_OBJECT_SIZE} bytes", url=self.url, device=self.device
            )
        await self._fill(view)

    async def _ship(self, group: TaskGroup) -> None:
        """Hand the filled buffer to a background upload; start a new buffer."""
        number = self._next_part
        if number > MAX_PARTS:
            raise StorageFullError(
                f"the stream needs more than {MAX_PARTS} parts (S3's limit)",
                url=self.url,
                device=self.device,
            )
        data = bytes(self._buffer)  # immutable, so retries and BytesIO share it
        self._buffer = bytearray()
        if self._upload_id is None:
            await self._create_upload()
        await self._wait_in_flight(below=self._storage.max_parts_in_flight)
        upload = functools.partial(self._upload_part, number, data)
        self._in_flight[number] = self._start(group, upload, f"upload of part {number}")
        self._next_part = number + 1
        self._capacity = self._part_size(self._next_part)

    async def _create_upload(self) -> None:
        storage = self._storage
        checksum: dict[str, Any] = {}
        if storage.send_checksums:
            checksum["ChecksumAlgorithm"] = "SHA256"
        # The uploads already on this key are not ours: if a create's answer is lost,
        # the new ones are (see _abort_strays). Clocks cannot tell (S3-compatible
        # stores report odd Initiated times), this snapshot can.
        self._foreign_uploads = frozenset(
            upload.upload_id for upload in await storage._uploads_on(self.key)
        )

        def failed(exc: BaseException) -> None:
            if is_ambiguous(exc):
                self._create_unsure = True  # an upload we never heard of may exist

        created = await storage._call(
            "start upload", "create_multipart_upload", failed=failed, **self._ids(), **checksum
        )
        self._upload_id = created["UploadId"]

    async def _upload_part(self, number: int, data: bytes) -> S3Part:
        sha256 = await digest(hashlib.sha256, data)
        response = await self._storage._call(
            f"upload part {number}",
            "upload_part",
            UploadId=self._upload_id,
            PartNumber=number,
            body=data,
            **self._ids(),
            sha256=sha256,
        )
        return S3Part(number, len(data), str(response["ETag"]), sha256.hex())

    async def _seal(self) -> None:
        """Upload the last part and wait for all: the data is final from here on."""
        if self._upload_id is None:
            return
        await self._send_rest("parts", lambda part: part.size)

    async def _publish(self) -> None:
        if self._upload_id is None:
            self._single_sha256 = await self._storage._put_new(
                self.key, bytes(self._buffer), device=self.device
            )
        else:
            await self._complete(self._upload_id)
        self._buffer = bytearray()
        if self._create_unsure:
            # The object is committed: a stray we cannot abort is reported, the
            # commit stands (storage audit --clean finds the upload).
            try:
                await self._abort_strays(keep=None)
            except OrphanUploadsError as exc:
                _log.error("orphan_upload_left", key=self.key, error=str(exc))

    async def _complete(self, upload_id: str) -> None:
        storage = self._storage
        parts = self.parts
        listed: list[CompletedPartTypeDef] = []
        for part in parts:
            entry: CompletedPartTypeDef = {"PartNumber": part.number, "ETag": part.etag}
            if storage.send_checksums:
                entry["ChecksumSHA256"] = b64(bytes.fromhex(part.sha256))
            listed.append(entry)
        self._complete_unsure = True  # until committed: abort looks for the object
        try:
            await storage._call(
                "commit (complete upload)",
                "complete_multipart_upload",
                UploadId=upload_id,
                MultipartUpload={"Parts": listed},
                IfNoneMatch="*",
                **self._ids(),
            )
        except (StorageExistsError, StorageNotFoundError):
            # A replay may meet its own earlier, successful attempt: 412 (the object
            # now exists) or NoSuchUpload (the upload became the object).
            expected = multipart_etag([part.etag for part in parts])
            if not await storage._is_ours(self.key, expected, self._size):
                raise
        await storage._verify_size(self.key, self._size, device=self.device)
        self._complete_unsure = False

    async def _discard(self) -> None:
        """See the module docstring: parts, upload, strays, a maybe-completed object."""
        await self._cancel(self._in_flight.values())
        self._in_flight.clear()
        self._buffer = bytearray()
        self._state = SinkState.FAILED  # until everything is confirmed gone
        failures: list[OrphanUploadsError] = []
        for needed, step in (
            (self._upload_id is not None, self._abort_upload),
            (self._create_unsure, functools.partial(self._abort_strays, keep=self._upload_id)),
            (self._complete_unsure, self._take_back),
        ):
            if needed:
                try:
                    await step()
                except OrphanUploadsError as exc:
                    failures.append(exc)
        if failures:
            raise OrphanUploadsError.merge(failures)

    async def _abort_upload(self, upload_id: str | None = None) -> None:
        upload_id = upload_id or self._upload_id
        assert upload_id is not None
        await self._storage._abort_or_report(self.key, upload_id, device=self.device)

    async def _take_back(self) -> None:
        expected = multipart_etag([part.etag for part in self.parts])
        cause = StorageError("commit failed", url=self.url)
        await self._storage._take_back(self.key, expected, self._size, cause=cause)
        self._complete_unsure = False

    async def _abort_strays(self, *, keep: str | None) -> None:
        """Abort the uploads on this key that were not there before the first create
        (``_foreign_uploads``), except ``keep``: a create whose answer was lost started
        them. A writer of the same key at the same time would lose its upload too;
        ``Storage.in_progress`` keeps two jobs off one backup's keys."""
        storage = self._storage
        try:
            uploads = await storage._uploads_on(self.key)
        except StorageError as exc:
            raise OrphanUploadsError(
                storage.url, [f"upload {storage._relative(self.key)} (unknown id)"], reason=str(exc)
            ) from exc
        failures: list[OrphanUploadsError] = []
        for upload in uploads:
            if upload.upload_id in (keep, *self._foreign_uploads):
                continue
            try:
                await self._abort_upload(upload.upload_id)
            except OrphanUploadsError as exc:
                failures.append(exc)
            else:
                _log.info("stray_upload_aborted", key=self.key, upload_id=upload.upload_id)
        if failures:
            raise OrphanUploadsError.merge(failures)
        self._create_unsure = False
