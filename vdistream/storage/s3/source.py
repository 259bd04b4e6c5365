"""``S3Source``: a committed object read with one streamed GET, or with ranged GETs
and bounded read-ahead.

**Streamed** (the default, ``read_ahead=None``): a sequential read continues one
``GetObject`` of the bytes from its position to the end of the object, sent with
``If-Match`` and the ETag seen at open (an object replaced before the GET fails with
``StorageIntegrityError``; once the GET is answered S3 serves that one version to its
end; an answer whose ETag, ``Content-Range`` or length is not what was asked for
fails too, for servers that ignore ``If-Match`` or ``Range``). Memory stays bounded
without a task: aiohttp stops reading the socket while its buffer is full, so the
server sends only as fast as the consumer reads. A read at
another position (``readinto(position=)``) closes the stream and opens a new one
there. A failure while reading the body (a reset, a cut, a read timeout, a short
body) closes the stream and opens a new one where the data stopped, after the same
jittered backoff as any request; ``max_attempts`` failures in a row with no byte
received in between raise ``StorageError``. Measured (docs/benchmarks.md): against
moto, whose ranged GET copies the whole object for every range, a 4-device restore
went from about 0.3-0.4 to 0.8-1.0 of one streamed GET; on S3 itself it is the
pattern of ``aws s3 cp`` per device, one request per device instead of one per 8 MiB.

**Ranged** (``read_ahead`` an integer): reads are ranged ``GetObject`` calls of
``read_chunk_size`` (8 MiB), aligned to multiples of it, each sending ``If-Match``
(an object replaced midway fails with ``StorageIntegrityError``). While reading
sequentially inside ``async with source`` it keeps ``read_ahead`` further ranges in
flight in its task group (``tasks``), so restore overlaps network and consumer like
backup does; without ``async with``, a read fetches at most the ranges it needs,
``read_ahead`` at a time. ``readinto(position=)`` is supported (a jump drops the
read-ahead).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import anyio

from vdistream.errors import StorageError
from vdistream.log import get_logger
from vdistream.storage._streams import RangedSource
from vdistream.storage.s3.client import FAILURES, backoff_delay
from vdistream.storage.s3.errors import ChangedError, ShortBody, is_transient, translate_s3_error

if TYPE_CHECKING:
    from vdistream.storage.s3.storage import S3Storage

__all__ = ("S3Source",)

_log = get_logger(__name__)


class S3Source(RangedSource):
    """Reads a committed object with one streamed GET, or ranged GETs (module doc)."""

    def __init__(self, storage: S3Storage, full_key: str, *, size: int, etag: str | None) -> None:
        super().__init__(storage._url(full_key), size, chunk_size=storage.read_chunk_size)
        self.key = full_key
        self._storage = storage
        self._shared = storage.current_background()
        self._etag = etag
        self._streamed = storage.read_ahead is None
        self._body: Any = None  # the open streamed GET's body (aiobotocore's)
        self._body_at = 0  # the object offset its next byte has

    def __repr__(self) -> str:
        return f"<S3Source {self.url} {self._size} bytes>"

    async def _readinto(self, view: memoryview, start: int) -> int:
        if self._streamed:
            return await self._read_stream(view, start)
        return await self._read_ranges(view, start)

    def _read_ahead(self) -> int:
        return self._storage.read_ahead or 0

    async def _fetch(self, index: int) -> bytes:
        first = index * self._chunk_size
        last = min(self._size, first + self._chunk_size) - 1
        match: dict[str, Any] = {"IfMatch": self._etag} if self._etag else {}
        data: bytes = await self._storage._call(
            f"read bytes {first}-{last}",
            "get_object",
            Key=self.key,
            Range=f"bytes={first}-{last}",
            read=last - first + 1,
            precondition=ChangedError,
            **match,
        )
        return data

    async def _close(self) -> None:
        self._drop_body()
        await self._drop_chunks()

    # --- streamed ------------------------------------------------------------------

    async def _read_stream(self, view: memoryview, start: int) -> int:
        end = min(self._size, start + view.nbytes)
        done = 0
        failures = 0
        while start + done < end:
            offset = start + done
            if self._body is None or self._body_at != offset:
                self._drop_body()
                self._body = await self._open_body(offset)  # retried by _call
                self._body_at = offset
            try:
                chunk: bytes = await self._body.read(end - offset)
                if not chunk:
                    raise ShortBody(f"the body ended at byte {offset} of {self._size}")
            except FAILURES as exc:
                self._drop_body()
                failures += 1
                if failures >= self._storage.max_attempts or not is_transient(exc):
                    raise translate_s3_error(
                        exc,
                        what=f"read bytes {offset}-{self._size - 1}",
                        bucket=self._storage.bucket,
                        key=self.key,
                        url=self.url,
                        attempts=failures,
                        precondition=ChangedError,
                    ) from exc
                delay = backoff_delay(
                    failures, base=self._storage.backoff_base, cap=self._storage.backoff_cap
                )
                _log.warning(
                    "s3_stream_reopen",
                    key=self.key,
                    offset=offset,
                    attempt=failures,
                    delay=round(delay, 3),
                    error=f"{type(exc).__name__}: {exc}",
                )
                await anyio.sleep(delay)
                continue
            count = len(chunk)
            view[done : done + count] = chunk
            done += count
            self._body_at += count
            failures = 0  # a failure bound is for failures in a row
        return done

    async def _open_body(self, first: int) -> Any:
        match: dict[str, Any] = {"IfMatch": self._etag} if self._etag else {}
        response = await self._storage._call(
            f"read bytes {first}-{self._size - 1}",
            "get_object",
            Key=self.key,
            Range=f"bytes={first}-{self._size - 1}",
            precondition=ChangedError,
            **match,
        )
        body = response["Body"]
        problem = self._unexpected(response, first)
        if problem is not None:
            body.close()
            where = f"bucket {self._storage.bucket!r}, key {self.key!r}"
            kind = ChangedError if problem.startswith("the object changed") else StorageError
            raise kind(
                f"read bytes {first}-{self._size - 1} failed: {problem}; {where}", url=self.url
            )
        return body

    def _unexpected(self, response: dict[str, Any], first: int) -> str | None:
        """Why the answer to a streamed GET from ``first`` is not those bytes of the
        object seen at open, or None. Checked because the bytes go where they belong by
        position alone: a server (or proxy) that ignored ``Range`` would send them from
        byte 0, one that ignored ``If-Match`` another object's."""
        etag = response.get("ETag")
        if self._etag and etag and etag != self._etag:
            return f"the object changed (ETag {etag}, not {self._etag})"
        expected = f"bytes {first}-{self._size - 1}/{self._size}"
        got = response.get("ContentRange")  # none: the whole object (200), fine from 0
        if (got is None and first > 0) or (got is not None and got != expected):
            return f"asked for {expected}, answered {got or 'the whole object'}"
        length = response.get("ContentLength")
        if length is not None and int(length) != self._size - first:
            return f"asked for {self._size - first} bytes, answered {length}"
        return None

    def _drop_body(self) -> None:
        body, self._body = self._body, None
        if body is not None:
            body.close()  # unread data: aiohttp drops the connection instead of reusing it
