"""``AzureSink``: one device stream as one block blob, staged block by block and
committed with its block list only at ``commit``.

``write`` copies the caller's bytes into a private block buffer. A full buffer becomes
the next block, staged (``Put Block``) by a call in the sink's task group (S3's
``tasks``) while ``write`` fills a fresh buffer; at most ``max_blocks_in_flight`` (4)
are staged at a time, and a write that fills a block while that many are in flight
waits for one. So a sink holds at most ``max_blocks_in_flight + 1`` block buffers.
Block sizes follow ``blocks.block_size_for``; block 50,001 is ``StorageFullError``.
Staged blocks are *uncommitted*: no listing, ``stat`` or read shows them, so nothing of
an unfinished stream is ever visible as a backup.

``flush`` waits until every block cut so far is staged. ``commit`` stages the last
block, waits for all, then ``Put Block List`` with ``If-None-Match: *`` and the sink's
token in the blob's metadata (``vdistream_writer``): a blob already there makes it
``StorageExistsError`` and keeps the sink sealed. A stream that ends before filling a
block is sent at ``commit`` as one conditional ``Put Blob`` instead (up to 1 MiB; a
larger one as one staged block), so it stays in memory until then. A refused commit may
be retried after the old object is deleted when the stream is held in memory; staged
blocks go with a deleted blob on Azure, so that retry fails with ``InvalidBlockList``.
(Where Azurite refuses the put because someone's staged blocks are on the key, it is
committed as one block instead.) A conditional request replayed by the SDK's retries
after a lost answer meets its own earlier attempt: a refusal counts as success when the
blob there carries our token and our size (when that cannot be checked, the commit
fails, never "exists"). ``get_blob_properties`` then checks the size (else the blob is
deleted again and ``StorageIntegrityError`` raised). From the moment the block list is
sent until then, the outcome counts as unknown.

``abort`` lets the blocks in flight finish (at most ``abort_wait``, 10 s; then they are
cancelled, and the removal below is checked again a few times, for a request that
still lands) and removes the uncommitted blocks. Azure has no call that drops them, and
``Delete Blob`` is documented for blobs with committed data only (Azurite accepts it
for the others, the service may not), so abort commits an *empty* block list on the
key (``If-None-Match: *``; a commit discards every uncommitted block of the blob, which
Azure documents) and deletes that empty blob at once (``If-Match`` its ETag, so nothing
else is ever deleted); for that moment an empty blob is visible under the key. When a
blob was committed on the key meanwhile by someone else, the blocks cannot be removed
without touching that blob: Azure discards them with that blob's next commit or after
7 days, and nothing lists them. If a commit's outcome was unknown, abort deletes the
blob under the key if it carries our token. What the store refuses to remove raises
``OrphanUploadsError`` naming ``vdistream storage audit --clean URL`` (which finds
blobs holding only uncommitted blocks, ``AzureStorage.list_uploads``).
"""

from __future__ import annotations

import functools
import io
import secrets
from typing import TYPE_CHECKING

import anyio

from vdistream.errors import (
    StorageError,
    StorageExistsError,
    StorageFullError,
)
from vdistream.storage._streams import PieceSink
from vdistream.storage.azure.blocks import (
    MAX_BLOCKS,
    SINGLE_PUT_LIMIT,
    block_id,
    block_size_for,
)
from vdistream.storage.base import OrphanUploadsError, SinkState
from vdistream.storage.s3.tasks import Call

if TYPE_CHECKING:
    from anyio.abc import TaskGroup

    from vdistream.storage.azure.storage import AzureStorage

__all__ = ("AzureSink",)


class AzureSink(PieceSink[int]):
    """One device stream as one block blob; see the module docstring."""

    random_access = False

    def __init__(
        self, storage: AzureStorage, full_key: str, *, device: str | None, initial_block_size: int
    ) -> None:
        super().__init__(storage._url(full_key), device)
        self.key = full_key
        #: written into the blob's metadata at commit; also the prefix of its block ids
        self.token = secrets.token_hex(8)
        self._storage = storage
        self._shared = storage.current_background()
        self._initial = initial_block_size
        self._buffer = bytearray()
        self._capacity = self._block_size(1)
        self._next_block = 1
        self._in_flight: dict[int, Call[int]] = {}
        self._landed: dict[int, int] = {}  # block number -> size
        self._peak = 0
        #: a block was (or may have been) staged: abort has blocks to remove
        self._blocks_sent = False
        #: the commit was sent and its outcome is unknown: abort looks for our blob
        self._commit_unsure = False

    @property
    def blocks(self) -> tuple[int, ...]:
        """The sizes of the blocks staged so far, in order."""
        return tuple(self._landed[number] for number in sorted(self._landed))

    @property
    def blocks_in_flight(self) -> int:
        """Blocks being staged right now (at most ``max_blocks_in_flight``)."""
        return len(self._in_flight)

    @property
    def peak_blocks_in_flight(self) -> int:
        """The most blocks this sink had in flight at once."""
        return self._peak

    def _block_size(self, number: int) -> int:
        return block_size_for(
            number, initial=self._initial, growth_interval=self._storage.block_growth_interval
        )

    async def _write(self, view: memoryview, start: int) -> None:
        self._harvest()
        await self._fill(view)

    async def _ship(self, group: TaskGroup) -> None:
        """Hand the filled buffer to a background staging; start a new buffer."""
        number = self._next_block
        if number > MAX_BLOCKS:
            raise StorageFullError(
                f"the stream needs more than {MAX_BLOCKS} blocks (Azure's limit)",
                url=self.url,
                device=self.device,
            )
        await self._wait_in_flight(below=self._storage.max_blocks_in_flight)
        data = bytes(self._buffer)  # immutable, so the SDK's retries resend it as is
        self._buffer = bytearray()
        self._blocks_sent = True
        stage = functools.partial(self._stage, number, data)
        self._in_flight[number] = self._start(group, stage, f"staging of block {number}")
        self._peak = max(self._peak, len(self._in_flight))
        self._next_block = number + 1
        self._capacity = self._block_size(self._next_block)

    async def _stage(self, number: int, data: bytes) -> int:
        storage = self._storage
        blob = await storage._blob(self.key)
        await storage._call(
            f"stage block {number}",
            blob.stage_block,
            block_id(self.token, number),
            io.BytesIO(data),  # a stream: aiohttp sends it in pieces (and the SDK rewinds it
            length=len(data),  # for a retry); BytesIO shares the bytes, it does not copy
            blob=self.key,
            device=self.device,
        )
        return len(data)

    async def _seal(self) -> None:
        """Stage the last block and wait for all: the data is final from here on. A
        stream that never filled a block is sent by ``_publish`` in one ``Put Blob``, if
        it is small enough (``SINGLE_PUT_LIMIT``); else it is staged here as one block."""
        if not self._blocks_sent and len(self._buffer) <= SINGLE_PUT_LIMIT:
            return
        await self._send_rest("blocks", int)

    async def _publish(self) -> None:
        storage = self._storage
        if not self._blocks_sent:
            await storage._put_new(self.key, bytes(self._buffer), self.token, device=self.device)
            self._buffer = bytearray()
            return
        blob = await storage._blob(self.key)
        ids = [block_id(self.token, number) for number in sorted(self._landed)]
        # Unsure from the moment the list is sent until the blob is verified ours: a
        # lost answer, or a refusal that cannot be told from our own replayed attempt,
        # leaves abort to take back the blob if (and only if) it carries our token.
        self._commit_unsure = True
        try:
            await storage._call(
                "commit (put block list)",
                blob.commit_block_list,
                ids,
                metadata={storage.WRITER: self.token},
                blob=self.key,
                device=self.device,
                **storage.if_missing(),
            )
        except StorageExistsError:
            # An SDK retry may meet its own earlier, successful attempt. If the blob
            # cannot be checked, that error stands (not "exists": it may be ours).
            if not await storage._is_ours(self.key, self.token, self._size):
                self._commit_unsure = False  # someone else's blob: nothing of ours there
                raise
        await storage._verify_size(self.key, self._size, self.token, device=self.device)
        self._commit_unsure = False

    async def _discard(self) -> None:
        """See the module docstring: blocks in flight, uncommitted blocks, our blob."""
        # Stagings in flight are let finish (bounded): one cancelled after its request
        # went out may still land after the blocks were dropped, and leave a blob of
        # uncommitted blocks behind.
        with anyio.move_on_after(self._storage.abort_wait):
            for call in self._in_flight.values():
                await call.wait()
        cut_short = not all(call.done for call in self._in_flight.values())
        await self._cancel(self._in_flight.values())
        self._in_flight.clear()
        self._buffer = bytearray()
        self._state = SinkState.FAILED  # until everything is confirmed gone
        storage = self._storage
        left = [f"upload {storage._relative(self.key)} {storage.UPLOAD_ID}"]
        try:
            if self._commit_unsure:
                await storage._take_back(self.key, self.token)
                self._commit_unsure = False
            if self._blocks_sent:
                await storage._drop_uncommitted(self.key, device=self.device, settle=cut_short)
                self._blocks_sent = False
        except OrphanUploadsError:
            raise
        except StorageError as exc:
            raise OrphanUploadsError(storage.url, left, reason=str(exc)) from exc
