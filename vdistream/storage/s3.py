"""``s3://bucket/prefix``: objects in an S3 bucket (or any S3-compatible store).

Built on aiobotocore. One client per ``S3Storage``, created on first use and closed by
``aclose()`` (or ``async with storage``). Credentials come from the standard AWS chain
(environment, shared config and credentials files, ``profile=``, container and
instance metadata). The endpoint is ``endpoint_url=`` (URL query or argument), else
``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL``, else AWS. With an explicit endpoint the
client uses path-style addressing unless ``addressing_style`` says otherwise. Request
checksums and response checksum validation are on only where the S3 API requires them
(``"when_required"``), because many S3-compatible stores reject the CRC headers that
botocore sends by default.

URL form::

    s3://bucket/some/prefix?endpoint_url=http://127.0.0.1:9000&region=us-east-1

Query options: ``endpoint_url``, ``region``, ``profile``, ``addressing_style``
(``auto``/``path``/``virtual``). The storage's ``url`` is the URL without the query.

Sinks: one device stream, one multipart upload
-----------------------------------------------
``S3Sink.write`` copies the caller's bytes into a private part buffer (so the buffer is
free the moment ``write`` returns). When the buffer reaches the current part size it is
handed to a background task that uploads it as the next part, while ``write`` keeps
filling a fresh buffer. At most ``max_parts_in_flight`` parts (default 2) upload at a
time; a ``write`` that fills a part while that many are in flight waits for one to
finish. So a sink holds at most ``max_parts_in_flight + 1`` part buffers (plus, for a
moment, a copy of the part being cut: an immutable ``bytes`` that retries resend).

The multipart upload is created with the first full part. A stream that ends before
filling one part is sent at ``commit`` as a single conditional ``PutObject`` instead (no
upload to create, complete or abort).

Part sizes (``part_size_for``): S3 allows at most 10,000 parts per upload, each at
least 5 MiB (except the last) and at most 5 GiB, and objects up to 5 TiB. A stream of
unknown length therefore cannot use one fixed part size: 8 MiB parts stop at 78 GiB.
The schedule starts at ``part_size`` (default 8 MiB) and doubles every 1,000 parts,
capped at 5 GiB::

    parts     1-1000:   8 MiB each, streams up to   7.8 GiB
    parts  1001-2000:  16 MiB each, streams up to  23.4 GiB
    parts  2001-3000:  32 MiB each, streams up to  54.7 GiB
    parts  3001-4000:  64 MiB each, streams up to 117   GiB
    parts  4001-5000: 128 MiB each, streams up to 242   GiB
    parts  5001-6000: 256 MiB each, streams up to 492   GiB
    parts  6001-7000: 512 MiB each, streams up to 992   GiB
    parts  7001-8000:   1 GiB each, streams up to   1.95 TiB
    parts  8001-9000:   2 GiB each, streams up to   3.90 TiB
    parts 9001-10000:   4 GiB each, streams up to   7.80 TiB

so every stream up to the 5 TiB object limit fits (``stream_capacity``), and
small streams keep small parts. Memory follows the part size: a 1 TiB stream ends with
1 GiB parts, i.e. up to 3 GiB of part buffers for that device. With an ``expected_size``
hint (``open_sink(..., expected_size=)``) the first part size is the smallest
``part_size * 2**k`` that covers the hint in 2,000 parts (``initial_part_size``); the
doubling still applies, so a wrong hint is harmless. A stream that would need part
10,001 (or exceed 5 TiB) fails with ``StorageFullError``.

Each part's SHA-256 is computed (in a worker thread) and kept in ``S3Sink.parts`` /
``S3Sink.part_checksums``; with ``send_checksums=True`` it is also sent as
``ChecksumSHA256`` so S3 verifies it (not every S3-compatible store supports that).

``flush()``: S3 has no durable partial object. ``flush`` waits until every part cut so
far is uploaded (its bytes are stored by S3, though invisible until ``commit``); the
bytes still in the part being filled stay in memory until more data or ``commit``.

``commit()``: uploads the last part, waits for all parts, then
``CompleteMultipartUpload`` (or ``PutObject``) with ``If-None-Match: *``, a conditional
write: S3 refuses with 412 PreconditionFailed if an object already exists under the
key, which becomes ``StorageExistsError``; the upload (or the buffered bytes) is kept,
so the caller may delete the old object and commit again, or abort. moto honours the
condition on both calls (verified by the tests). Then ``HeadObject`` checks that the
object holds exactly ``size`` bytes (else it is deleted again and
``StorageIntegrityError`` raised). A conditional request replayed after a lost
response (by our retries, or by aiohttp, which silently resends an idempotent PUT once
when a pooled connection drops) may find its own earlier attempt: a 412 is accepted as
success when the object under the key has our size and the ETag our bytes produce (MD5
for a put, the MD5 of the parts' MD5s with ``-count`` for a multipart upload); a
byte-identical object replaces nothing. ``Expect: 100-continue`` is switched off on
the client: aiohttp waits for the interim answer without any read timeout, so a store
that never sent it would hang a part forever.

``abort()``: cancels parts in flight, calls ``AbortMultipartUpload`` and confirms with
``ListParts`` that the upload is gone (``NoSuchUpload``), aborting again if a part that
raced the abort still shows up. Idempotent; an upload already gone is not an error.

Zero orphans, also when answers are lost
----------------------------------------
* Before its first ``CreateMultipartUpload`` a sink notes the uploads already on its
  key. If a create attempt fails in a way the server may have acted on (the answer
  lost: ``is_ambiguous``), the sink aborts, when it commits or aborts, every upload on
  its exact key that was not there before and is not its own.
* If ``CompleteMultipartUpload`` (or the put of a small stream, or ``write_bytes``)
  fails after an ambiguous attempt, the object may exist: ``abort`` (for the put,
  the failing call itself) deletes the object under the key if it is ours (our size
  and the ETag our bytes produce), never someone else's.
* What the store refuses to remove raises ``OrphanUploadsError``: one line naming the
  uploads or objects left and ``vdistream storage audit --clean URL``.

Owner marks
-----------
``in_progress(backup_id)`` writes ``<prefix>/<backup_id>/.vdistream-owner.json`` (host,
boot id, pid, process start time, start of the backup), conditionally, and deletes it
at exit; ``sweep()`` removes the debris of backups whose mark names an owner that is
provably gone (same host and boot, pid gone or reused). Marks of other hosts are kept:
nothing proves their owner dead from here. Names starting with ``.vdistream-`` are not
keys: ``list`` skips them. ``probe()`` is ``HeadBucket`` plus a put and delete of a
tiny ``<prefix>/.vdistream-probe-<random>``.

Retries
-------
Every request is retried on transient failures: HTTP 500/502/503/504/429, the S3 codes
``SlowDown``, ``Throttling``, ``RequestTimeout``, ``InternalError``,
``ServiceUnavailable`` (and kin), connection refused/reset/closed, timeouts and short
bodies. Attempts are bounded by ``max_attempts`` (default 5, counting the first), with
"full jitter" exponential backoff: before attempt ``n + 1`` it sleeps a random time in
``[0, min(backoff_cap, backoff_base * 2**(n-1))]`` (defaults 0.25 s and 20 s).
botocore's own retries are switched off so the bound is exactly this. A request that
keeps failing raises a ``StorageError`` naming the operation, the S3 error code, the
bucket and the key. Other errors are not retried.

Errors
------
``ClientError`` and connection errors become ``StorageError`` subclasses at this seam:
``NoSuchKey``/404/``NoSuchUpload`` -> ``StorageNotFoundError``, ``PreconditionFailed``
-> ``StorageExistsError`` (writes) or ``StorageIntegrityError`` (a read whose object
changed: reads send ``If-Match`` with the ETag seen at open), ``EntityTooLarge`` and
quota errors -> ``StorageFullError``, ``BadDigest`` and similar ->
``StorageIntegrityError``; ``NoSuchBucket``, ``AccessDenied`` and the rest ->
``StorageError``.

Sources
-------
``S3Source`` reads with ranged ``GetObject`` calls of ``read_chunk_size`` (8 MiB),
aligned to multiples of it; while reading sequentially it keeps ``read_ahead`` (2)
further ranges in flight, so restore overlaps network and consumer like backup does.
``readinto(position=)`` is supported (a jump drops the read-ahead).

Limits, honestly
----------------
* Sinks are append-only (``random_access`` is False).
* ``delete`` checks existence with ``HeadObject`` first (S3's delete is silent for
  missing keys); an object created between the two calls is deleted all the same.
* Part uploads and read-ahead ranges run as asyncio tasks owned by their sink or
  source, not in an anyio task group: a sink lives across many calls of its caller
  (open, write..., commit), which no lexical task group can span. The owner keeps
  them bounded (``max_parts_in_flight``, ``read_ahead``), harvests each outcome, and
  ``abort``/``close`` cancel and await every one, shielded; no exception group can
  come out of this module.
* Cancellation follows ``vdistream.storage.base``: every call that started runs to its
  end, shielded, so retries and backoff delay a cancellation by up to their bound.
"""

from __future__ import annotations

import asyncio
import base64
import builtins
import contextlib
import dataclasses
import functools
import hashlib
import io
import json
import os
import random
import re
import secrets
import socket
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import parse_qsl, unquote, urlsplit

import aiohttp
import anyio
import anyio.lowlevel
import anyio.to_thread
from aiobotocore.config import AioConfig
from aiobotocore.session import AioSession
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    ConnectTimeoutError,
    EndpointConnectionError,
    HTTPClientError,
    IncompleteReadError,
)
from botocore.exceptions import ConnectionError as BotoConnectionError
from botocore.handlers import add_expect_header

from vdistream.errors import (
    StorageError,
    StorageExistsError,
    StorageFullError,
    StorageIntegrityError,
    StorageNotFoundError,
    StorageURLError,
)
from vdistream.log import get_logger
from vdistream.ownership import owner_record, record_owner_gone, record_owner_state
from vdistream.storage._common import (
    INTERNAL_PREFIX,
    MANIFEST_NAME,
    OwnerMark,
    SinkState,
    byte_view,
    check_backup_id,
    check_key,
    check_position,
    join_url,
    owner_text,
    require,
)
from vdistream.storage.base import (
    BackupInProgressError,
    OrphanUploadsError,
    Sink,
    Source,
    Storage,
    StorageProbeError,
)

if TYPE_CHECKING:
    from types_aiobotocore_s3 import S3Client
    from types_aiobotocore_s3.type_defs import CompletedPartTypeDef

__all__ = (
    "DEFAULT_PART_SIZE",
    "MARK_NAME",
    "MAX_OBJECT_SIZE",
    "MAX_PARTS",
    "MAX_PART_SIZE",
    "MIN_PART_SIZE",
    "PART_GROWTH_INTERVAL",
    "S3Object",
    "S3Part",
    "S3Sink",
    "S3Source",
    "S3Storage",
    "S3Upload",
    "backoff_delay",
    "initial_part_size",
    "is_ambiguous",
    "is_transient",
    "part_size_for",
    "part_sizes",
    "stream_capacity",
    "translate_s3_error",
)

_log = get_logger(__name__)
_T = TypeVar("_T")

MiB = 1 << 20
#: S3's smallest part (every part but the last).
MIN_PART_SIZE = 5 * MiB
#: S3's largest part.
MAX_PART_SIZE = 5 << 30
#: S3's most parts per upload.
MAX_PARTS = 10_000
#: S3's largest object.
MAX_OBJECT_SIZE = 5 << 40
#: The first part size when nothing else is known.
DEFAULT_PART_SIZE = 8 * MiB
#: The part size doubles after every this many parts.
PART_GROWTH_INTERVAL = 1_000
#: Parts of this many bytes are covered by a size hint (see ``initial_part_size``).
_HINT_PARTS = 2_000
DEFAULT_READ_CHUNK_SIZE = 8 * MiB
DEFAULT_READ_AHEAD = 2
DEFAULT_PARTS_IN_FLIGHT = 2
DEFAULT_MAX_ATTEMPTS = 5
# Hash in a worker thread above this size (hashlib releases the GIL there).
_THREAD_HASH_BYTES = 1 * MiB

#: the owner mark ``in_progress`` writes under ``<backup_id>/``
MARK_NAME = ".vdistream-owner.json"

_BUCKET = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{1,254}")
_URL_OPTIONS = frozenset({"endpoint_url", "region", "profile", "addressing_style"})
_ADDRESSING = frozenset({"auto", "path", "virtual"})


# --- part sizes (pure) ---------------------------------------------------------------


def part_size_for(
    part_number: int,
    *,
    initial: int = DEFAULT_PART_SIZE,
    growth_interval: int = PART_GROWTH_INTERVAL,
) -> int:
    """The size of part ``part_number`` (1-based): ``initial`` doubled once per
    ``growth_interval`` parts before it, at most ``MAX_PART_SIZE``."""
    if part_number < 1:
        raise ValueError(f"part numbers start at 1, not {part_number}")
    if initial < 1 or growth_interval < 1:
        raise ValueError("initial part size and growth interval must be positive")
    steps = (part_number - 1) // growth_interval
    if steps >= 64:  # beyond any real size; avoid shifting absurdly far
        return MAX_PART_SIZE
    return min(MAX_PART_SIZE, initial << steps)


def stream_capacity(
    *,
    initial: int = DEFAULT_PART_SIZE,
    growth_interval: int = PART_GROWTH_INTERVAL,
    max_parts: int = MAX_PARTS,
) -> int:
    """The largest stream the schedule can upload in ``max_parts`` parts."""
    total, number = 0, 1
    while number <= max_parts:  # whole runs of equal parts at once
        size = part_size_for(number, initial=initial, growth_interval=growth_interval)
        run_end = min(max_parts, ((number - 1) // growth_interval + 1) * growth_interval)
        total += size * (run_end - number + 1)
        number = run_end + 1
    return total


def part_sizes(
    total_size: int,
    *,
    initial: int = DEFAULT_PART_SIZE,
    growth_interval: int = PART_GROWTH_INTERVAL,
    max_parts: int = MAX_PARTS,
) -> builtins.list[int]:
    """The part sizes a stream of ``total_size`` bytes is cut into, in order.

    All but the last follow ``part_size_for``; the last holds the remainder. Raises
    ``ValueError`` if the stream needs more than ``max_parts`` parts. A stream of 0
    bytes is one empty part (sent as a plain put).
    """
    if total_size < 0:
        raise ValueError(f"negative size {total_size}")
    sizes: builtins.list[int] = []
    left = total_size
    while True:
        number = len(sizes) + 1
        if number > max_parts:
            raise ValueError(f"{total_size} bytes need more than {max_parts} parts")
        size = part_size_for(number, initial=initial, growth_interval=growth_interval)
        if left <= size:
            sizes.append(left)
            return sizes
        sizes.append(size)
        left -= size


def initial_part_size(
    expected_size: int | None,
    *,
    default: int = DEFAULT_PART_SIZE,
) -> int:
    """The first part size for a stream expected to hold ``expected_size`` bytes.

    No hint (or a small one): ``default``. Otherwise the smallest ``default * 2**k``
    whose 2,000 parts cover the hint, at most ``MAX_PART_SIZE``.
    """
    size = default
    if expected_size is None:
        return size
    while size * _HINT_PARTS < expected_size and size < MAX_PART_SIZE:
        size *= 2
    return min(size, MAX_PART_SIZE)


# --- retries and errors (pure) -------------------------------------------------------

_TRANSIENT_STATUS = frozenset({429, 500, 502, 503, 504})
_TRANSIENT_CODES = frozenset(
    {
        "SlowDown",
        "Throttling",
        "ThrottlingException",
        "ThrottledException",
        "RequestThrottled",
        "RequestLimitExceeded",
        "TooManyRequests",
        "RequestTimeout",
        "RequestTimeoutException",
        "InternalError",
        "ServiceUnavailable",
        "ConditionalRequestConflict",
    }
)
_NOT_FOUND_CODES = frozenset({"NoSuchKey", "404", "NotFound", "NoSuchUpload"})
_PRECONDITION_CODES = frozenset({"PreconditionFailed", "412"})
_FULL_CODES = frozenset({"EntityTooLarge", "QuotaExceeded", "XMinioStorageFull"})
_INTEGRITY_CODES = frozenset(
    {"BadDigest", "InvalidDigest", "XAmzContentSHA256Mismatch", "InvalidChecksum"}
)


class _ShortBody(Exception):
    """A ranged GET returned fewer bytes than asked: retried like a dropped connection."""


def _client_error_details(exc: ClientError) -> tuple[str, int | None, str]:
    error = exc.response.get("Error", {})
    code = str(error.get("Code") or "Unknown")
    status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    message = str(error.get("Message") or "")
    return code, status, message


def is_transient(exc: BaseException) -> bool:
    """Whether a failed request is worth retrying (throttling, 5xx, broken connection)."""
    if isinstance(exc, ClientError):
        code, status, _ = _client_error_details(exc)
        return code in _TRANSIENT_CODES or status in _TRANSIENT_STATUS
    return isinstance(
        exc,
        BotoConnectionError
        | HTTPClientError
        | IncompleteReadError
        | aiohttp.ClientError
        | asyncio.TimeoutError
        | _ShortBody,
    )


def is_ambiguous(exc: BaseException) -> bool:
    """Whether a failed request may have been carried out by the server all the same:
    its answer was lost (connection reset or timed out after sending) or it failed with
    a 5xx. A 4xx answer, or a connection that was never made, is not ambiguous."""
    if isinstance(exc, ClientError):
        _, status, _ = _client_error_details(exc)
        return status is None or status >= 500
    if isinstance(exc, ConnectTimeoutError):
        return False
    if isinstance(exc, EndpointConnectionError):
        # aiobotocore reports a reset of an established connection this way too; only
        # a failed connect (or name lookup) proves that nothing was sent
        cause = getattr(exc, "kwargs", {}).get("error")
        return not isinstance(cause, aiohttp.ClientConnectorError | socket.gaierror)
    return not isinstance(exc, aiohttp.ClientConnectorError | socket.gaierror)


def backoff_delay(
    attempt: int, *, base: float, cap: float, rng: random.Random | None = None
) -> float:
    """Seconds to sleep after failed attempt ``attempt`` (1-based): full jitter,
    uniform in ``[0, min(cap, base * 2**(attempt - 1))]``."""
    ceiling = min(cap, base * 2 ** min(attempt - 1, 62))
    return (rng or random).uniform(0.0, ceiling)


def translate_s3_error(
    exc: BaseException,
    *,
    what: str,
    bucket: str,
    key: str | None,
    url: str | None,
    device: str | None = None,
    attempts: int = 1,
    precondition: type[StorageError] = StorageExistsError,
) -> StorageError:
    """The ``StorageError`` for a failed S3 request; the message names the operation,
    the S3 error code, the bucket and the key. Raise it ``from exc``."""
    where = f"bucket {bucket!r}" + (f", key {key!r}" if key is not None else "")
    tries = f" after {attempts} attempts" if attempts > 1 else ""
    cls: type[StorageError] = StorageError
    if isinstance(exc, ClientError):
        code, status, message = _client_error_details(exc)
        if code in _NOT_FOUND_CODES:
            cls = StorageNotFoundError
        elif code in _PRECONDITION_CODES:
            cls = precondition
        elif code in _FULL_CODES:
            cls = StorageFullError
        elif code in _INTEGRITY_CODES:
            cls = StorageIntegrityError
        reason = f"S3 {code}" + (f" (HTTP {status})" if status else "")
        if message:
            reason += f": {message}"
    else:
        reason = f"{type(exc).__name__}: {exc}"
    return cls(f"{what} failed{tries}: {reason}; {where}", url=url, device=device)


def _b64_sha256(digest: bytes) -> str:
    return base64.b64encode(digest).decode("ascii")


def _multipart_etag(etags: builtins.list[str]) -> str | None:
    """The ETag S3 gives a multipart object: MD5 of the parts' MD5s, ``-count``."""
    try:
        joined = b"".join(bytes.fromhex(etag.strip('"')) for etag in etags)
    except ValueError:
        return None  # not MD5 ETags (some stores, SSE-KMS): cannot tell
    return f'"{hashlib.md5(joined, usedforsecurity=False).hexdigest()}-{len(etags)}"'


def _probe_reason(exc: StorageError, storage: S3Storage, doing: str = "reach") -> str:
    """A probe failure in the user's terms."""
    cause = exc.__cause__
    if isinstance(cause, ClientError):
        code, status, _ = _client_error_details(cause)
        if code in ("NoSuchBucket", "404", "NotFound") or (doing == "reach" and status == 404):
            return "no such bucket"
        if code in ("AccessDenied", "403", "Forbidden") or status == 403:
            return "access denied" + (" (cannot write)" if doing == "write" else "")
        return f"cannot {doing} it: S3 {code}" + (f" (HTTP {status})" if status else "")
    if cause is not None:
        endpoint = storage._endpoint() or "AWS"
        return f"cannot connect to {endpoint}: {type(cause).__name__}: {cause}"
    return str(exc)


# --- public records ------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class S3Part:
    """One uploaded part: its number, size, the ETag S3 returned and our SHA-256."""

    number: int
    size: int
    etag: str
    sha256: str


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


# --- the storage ---------------------------------------------------------------------


class S3Storage(Storage):
    """The objects under ``prefix`` in ``bucket``; see the module docstring.

    Tuning knobs (all keyword-only, defaults in brackets): ``part_size`` (8 MiB, the
    first part size; refused if the schedule could not reach 5 TiB from it, e.g. 5 MiB),
    ``min_part_size`` (5 MiB, S3's rule; lower only for test servers configured to
    allow it, which also lifts the 5 TiB check), ``part_growth_interval`` (1,000),
    ``max_parts_in_flight`` (2 per sink), ``read_chunk_size`` (8 MiB) and
    ``read_ahead`` (2 per source), ``max_attempts`` (5), ``backoff_base`` (0.25 s),
    ``backoff_cap`` (20 s), ``connect_timeout`` (10 s), ``read_timeout`` (60 s),
    ``max_pool_connections`` (64),
    ``send_checksums`` (False), ``list_page_size`` (1,000).
    """

    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        *,
        endpoint_url: str | None = None,
        region: str | None = None,
        profile: str | None = None,
        addressing_style: str | None = None,
        part_size: int = DEFAULT_PART_SIZE,
        min_part_size: int = MIN_PART_SIZE,
        part_growth_interval: int = PART_GROWTH_INTERVAL,
        max_parts_in_flight: int = DEFAULT_PARTS_IN_FLIGHT,
        read_chunk_size: int = DEFAULT_READ_CHUNK_SIZE,
        read_ahead: int = DEFAULT_READ_AHEAD,
        max_attempts: int = DEFAULT_MAX_ATTEMPTS,
        backoff_base: float = 0.25,
        backoff_cap: float = 20.0,
        connect_timeout: float = 10.0,
        read_timeout: float = 60.0,
        max_pool_connections: int = 64,
        send_checksums: bool = False,
        list_page_size: int = 1_000,
        session: AioSession | None = None,
    ) -> None:
        base = f"s3://{bucket}"
        if not _BUCKET.fullmatch(bucket):
            raise StorageURLError(f"invalid bucket name {bucket!r}", url=base)
        self.bucket = bucket
        self.prefix = check_key(prefix.strip("/"), url=base) if prefix.strip("/") else ""
        self.url = join_url(base, self.prefix) if self.prefix else base
        if addressing_style is not None and addressing_style not in _ADDRESSING:
            raise StorageURLError(
                f"addressing_style must be one of {sorted(_ADDRESSING)}", url=self.url
            )
        if not min_part_size <= part_size <= MAX_PART_SIZE:
            raise StorageURLError(
                f"part_size {part_size} must lie within [{min_part_size}, {MAX_PART_SIZE}]",
                url=self.url,
            )
        if (
            min_part_size >= MIN_PART_SIZE
            and part_growth_interval >= 1
            and stream_capacity(initial=part_size, growth_interval=part_growth_interval)
            < MAX_OBJECT_SIZE
        ):
            raise StorageURLError(
                f"part_size {part_size} with growth every {part_growth_interval} parts "
                f"cannot reach S3's {MAX_OBJECT_SIZE}-byte object limit in {MAX_PARTS} parts",
                url=self.url,
            )
        for name, value in (
            ("part_growth_interval", part_growth_interval),
            ("max_parts_in_flight", max_parts_in_flight),
            ("read_chunk_size", read_chunk_size),
            ("max_attempts", max_attempts),
            ("max_pool_connections", max_pool_connections),
            ("list_page_size", list_page_size),
        ):
            if value < 1:
                raise StorageURLError(f"{name} must be at least 1, not {value}", url=self.url)
        if read_ahead < 0:
            raise StorageURLError(f"read_ahead must be >= 0, not {read_ahead}", url=self.url)
        self.endpoint_url = endpoint_url
        self.region = region
        self.profile = profile
        self.addressing_style = addressing_style
        self.part_size = part_size
        self.min_part_size = min_part_size
        self.part_growth_interval = part_growth_interval
        self.max_parts_in_flight = max_parts_in_flight
        self.read_chunk_size = read_chunk_size
        self.read_ahead = read_ahead
        self.max_attempts = max_attempts
        self.backoff_base = backoff_base
        self.backoff_cap = backoff_cap
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self.max_pool_connections = max_pool_connections
        self.send_checksums = send_checksums
        self.list_page_size = list_page_size
        self._session = session
        self._s3: S3Client | None = None
        self._exit_stack: contextlib.AsyncExitStack | None = None
        self._client_lock = asyncio.Lock()

    @classmethod
    def from_url(cls, url: str) -> S3Storage:
        """``s3://bucket[/prefix][?endpoint_url=...&region=...&profile=...]``."""
        parts = urlsplit(url)
        if parts.scheme.lower() != "s3":
            raise StorageURLError("expected an s3:// URL", url=url)
        if not parts.netloc:
            raise StorageURLError("an s3 URL needs a bucket: s3://bucket/prefix", url=url)
        if "@" in parts.netloc:
            raise StorageURLError(
                "an s3 URL must not carry credentials; use the AWS credential chain", url=url
            )
        if parts.fragment:
            raise StorageURLError("an s3 URL takes no fragment", url=url)
        options: dict[str, str] = {}
        for name, value in parse_qsl(parts.query, keep_blank_values=True, strict_parsing=False):
            if name not in _URL_OPTIONS:
                raise StorageURLError(
                    f"unknown s3 URL option {name!r}; known: {', '.join(sorted(_URL_OPTIONS))}",
                    url=url,
                )
            if not value:
                raise StorageURLError(f"empty s3 URL option {name!r}", url=url)
            options[name] = value
        prefix = unquote(parts.path).strip("/")
        if "\0" in prefix or any(p in ("", ".", "..") for p in prefix.split("/") if prefix):
            raise StorageURLError("invalid prefix in s3 URL", url=url)
        return cls(
            unquote(parts.netloc),
            prefix,
            endpoint_url=options.get("endpoint_url"),
            region=options.get("region"),
            profile=options.get("profile"),
            addressing_style=options.get("addressing_style"),
        )

    def __repr__(self) -> str:
        return f"<S3Storage {self.url}>"

    # --- client and requests ---

    def _endpoint(self) -> str | None:
        return (
            self.endpoint_url
            or os.environ.get("AWS_ENDPOINT_URL_S3")
            or os.environ.get("AWS_ENDPOINT_URL")
            or None
        )

    async def _client(self) -> S3Client:
        """The storage's one client, created on first use (shielded)."""
        if self._s3 is not None:
            return self._s3
        with anyio.CancelScope(shield=True):
            async with self._client_lock:
                if self._s3 is None:
                    endpoint = self._endpoint()
                    style = self.addressing_style or ("path" if endpoint else "auto")
                    config = AioConfig(
                        request_checksum_calculation="when_required",
                        response_checksum_validation="when_required",
                        retries={"mode": "standard", "total_max_attempts": 1},
                        connect_timeout=self.connect_timeout,
                        read_timeout=self.read_timeout,
                        max_pool_connections=self.max_pool_connections,
                        s3={"addressing_style": style},
                    )
                    session = self._session or AioSession(profile=self.profile)
                    stack = contextlib.AsyncExitStack()
                    try:
                        self._s3 = await stack.enter_async_context(
                            session.create_client(
                                "s3",
                                region_name=self.region,
                                endpoint_url=endpoint,
                                config=config,
                            )
                        )
                        # No "Expect: 100-continue" (see the module docstring).
                        self._s3.meta.events.unregister("before-call.s3", add_expect_header)
                    except BotoCoreError as exc:
                        await stack.aclose()
                        raise StorageError(
                            f"cannot create the S3 client: {type(exc).__name__}: {exc}",
                            url=self.url,
                        ) from exc
                    self._exit_stack = stack
        assert self._s3 is not None
        return self._s3

    async def aclose(self) -> None:
        """Close the client (a later call creates a new one); runs to completion."""
        with anyio.CancelScope(shield=True):
            async with self._client_lock:
                stack, self._exit_stack, self._s3 = self._exit_stack, None, None
                if stack is not None:
                    await stack.aclose()

    async def _request(
        self,
        what: str,
        key: str | None,
        call: Callable[[], Awaitable[_T]],
        *,
        url: str | None = None,
        device: str | None = None,
        precondition: type[StorageError] = StorageExistsError,
        failed: Callable[[BaseException], None] | None = None,
    ) -> _T:
        """``await call()`` with bounded, jittered retries of transient failures;
        failures become ``StorageError`` naming ``what``, the S3 code, bucket and key.
        ``failed`` is told of every failed attempt (the last one included)."""
        attempt = 1
        while True:
            try:
                return await call()
            except (
                ClientError,
                BotoCoreError,
                aiohttp.ClientError,
                TimeoutError,
                _ShortBody,
            ) as exc:
                if failed is not None:
                    failed(exc)
                if attempt >= self.max_attempts or not is_transient(exc):
                    raise translate_s3_error(
                        exc,
                        what=what,
                        bucket=self.bucket,
                        key=key,
                        url=url or self.url,
                        device=device,
                        attempts=attempt,
                        precondition=precondition,
                    ) from exc
                delay = backoff_delay(attempt, base=self.backoff_base, cap=self.backoff_cap)
                _log.warning(
                    "s3_request_retry",
                    operation=what,
                    bucket=self.bucket,
                    key=key,
                    attempt=attempt,
                    delay=round(delay, 3),
                    error=f"{type(exc).__name__}: {exc}",
                )
            await anyio.sleep(delay)
            attempt += 1

    def _full_key(self, key: str) -> str:
        check_key(key, url=self.url)
        return f"{self.prefix}/{key}" if self.prefix else key

    def _relative(self, full_key: str) -> str:
        return full_key[len(self.prefix) + 1 :] if self.prefix else full_key

    def _root(self) -> str:
        return f"{self.prefix}/" if self.prefix else ""

    # --- the Storage contract ---

    async def open_sink(
        self, key: str, *, device: str | None = None, expected_size: int | None = None
    ) -> S3Sink:
        """A sink for ``key``; nothing is sent until the first part fills (or commit).

        ``expected_size`` (optional) picks the first part size; see the module doc.
        """
        full_key = self._full_key(key)
        await anyio.lowlevel.checkpoint_if_cancelled()
        return S3Sink(
            self,
            full_key,
            url=join_url(self.url, key),
            device=device,
            initial_part_size=initial_part_size(expected_size, default=self.part_size),
        )

    async def open_source(self, key: str) -> S3Source:
        full_key = self._full_key(key)
        url = join_url(self.url, key)
        await anyio.lowlevel.checkpoint_if_cancelled()
        with anyio.CancelScope(shield=True):
            head = await self._head(full_key, url=url, what="open")
        return S3Source(
            self,
            full_key,
            url=url,
            size=int(head["ContentLength"]),
            etag=head.get("ETag"),
        )

    async def _head(self, full_key: str, *, url: str, what: str) -> Any:
        client = await self._client()
        return await self._request(
            what,
            full_key,
            lambda: client.head_object(Bucket=self.bucket, Key=full_key),
            url=url,
        )

    async def list(self, prefix: str = "") -> builtins.list[str]:
        return [obj.key for obj in await self.list_objects(prefix)]

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

    async def _list_raw(self, prefix: str = "") -> builtins.list[S3Object]:
        """Every object under the storage's prefix + ``prefix``, internal names too."""
        client = await self._client()
        root = self._root()
        found: builtins.list[S3Object] = []
        token: str | None = None
        while True:
            kwargs: dict[str, Any] = {
                "Bucket": self.bucket,
                "Prefix": root + prefix,
                "MaxKeys": self.list_page_size,
            }
            if token:
                kwargs["ContinuationToken"] = token
            page = await self._request(
                "list", root + prefix, functools.partial(client.list_objects_v2, **kwargs)
            )
            found.extend(
                S3Object(
                    key=self._relative(item["Key"]),
                    size=int(item.get("Size", 0)),
                    etag=str(item.get("ETag", "")),
                    last_modified=item.get("LastModified"),
                )
                for item in page.get("Contents", [])
            )
            token = page.get("NextContinuationToken")
            if not page.get("IsTruncated") or not token:
                break
        found.sort(key=lambda obj: obj.key)
        return found

    async def stat(self, key: str) -> int:
        full_key = self._full_key(key)
        head = await self._head(full_key, url=join_url(self.url, key), what="stat")
        return int(head["ContentLength"])

    async def delete(self, key: str) -> None:
        """Delete ``key``: ``HeadObject`` (``StorageNotFoundError``), then ``DeleteObject``."""
        full_key = self._full_key(key)
        url = join_url(self.url, key)
        await anyio.lowlevel.checkpoint_if_cancelled()
        with anyio.CancelScope(shield=True):
            await self._head(full_key, url=url, what="delete")
            await self._delete(full_key, url=url)

    async def _delete(self, full_key: str, *, url: str, device: str | None = None) -> None:
        client = await self._client()
        await self._request(
            "delete",
            full_key,
            lambda: client.delete_object(Bucket=self.bucket, Key=full_key),
            url=url,
            device=device,
        )

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
        url = join_url(self.url, key)
        with memoryview(data) as view, view.cast("B") as flat:
            body = bytes(flat)  # a copy: the caller's buffer is not retained
        await anyio.lowlevel.checkpoint_if_cancelled()
        with anyio.CancelScope(shield=True):
            try:
                await self._put_new(full_key, body, url=url, device=device)
            except StorageExistsError:
                if not overwrite:
                    raise
                try:
                    await self.delete(key)
                except StorageNotFoundError:
                    pass  # someone else removed it first; the put below decides
                await self._put_new(full_key, body, url=url, device=device)

    async def _put_new(self, full_key: str, body: bytes, *, url: str, device: str | None) -> str:
        """Conditional put of a whole small object, then check its size; returns the
        body's hex SHA-256."""
        client = await self._client()
        sha256 = await _hash(hashlib.sha256, body)
        kwargs: dict[str, Any] = {"Bucket": self.bucket, "Key": full_key, "IfNoneMatch": "*"}
        if self.send_checksums:
            kwargs["ChecksumSHA256"] = _b64_sha256(sha256)

        def call() -> Awaitable[Any]:
            # A fresh stream per attempt (BytesIO shares the bytes, it does not copy).
            return client.put_object(Body=io.BytesIO(body), **kwargs)

        unsure: builtins.list[BaseException] = []

        def failed(exc: BaseException) -> None:
            if is_ambiguous(exc):
                unsure.append(exc)

        expected = f'"{(await _hash(_md5, body)).hex()}"'
        try:
            await self._request(
                "commit (put)", full_key, call, url=url, device=device, failed=failed
            )
        except StorageExistsError:
            if not await self._is_ours(full_key, expected, len(body), url):
                raise
        except StorageError as exc:
            if unsure:  # an attempt may have landed: a failed put must publish nothing
                await self._take_back(full_key, expected, len(body), url=url, cause=exc)
            raise
        await self._verify_size(full_key, len(body), url=url, device=device)
        return sha256.hex()

    async def _take_back(
        self, full_key: str, etag: str | None, size: int, *, url: str, cause: StorageError
    ) -> None:
        """After a write whose outcome is unknown failed: delete the object under
        ``full_key`` if it is ours (our ETag and size; by size alone when the ETag
        cannot be computed). Raises ``OrphanUploadsError`` if that cannot be done."""
        try:
            head = await self._head(full_key, url=url, what="check for a lost write")
        except StorageNotFoundError:
            return
        except StorageError as exc:
            raise OrphanUploadsError(
                self.url, [f"object {self._relative(full_key)}"], reason=str(cause)
            ) from exc
        ours = int(head["ContentLength"]) == size and (etag is None or head.get("ETag") == etag)
        if not ours:
            return  # someone else's object: not ours to remove
        try:
            await self._delete(full_key, url=url)
        except StorageError as exc:
            raise OrphanUploadsError(
                self.url, [f"object {self._relative(full_key)}"], reason=str(exc)
            ) from exc
        _log.info("lost_write_removed", bucket=self.bucket, key=full_key)

    async def _is_ours(self, full_key: str, etag: str | None, size: int, url: str) -> bool:
        """After a 412 on a conditional write: is the object there exactly our bytes (a
        replayed request meeting its own earlier, successful attempt)?"""
        if etag is None:
            return False
        try:
            head = await self._head(full_key, url=url, what="check ownership")
        except StorageError:
            return False
        return bool(head.get("ETag") == etag and int(head["ContentLength"]) == size)

    async def _verify_size(self, full_key: str, size: int, *, url: str, device: str | None) -> None:
        """The committed object holds ``size`` bytes, else it is removed again."""
        try:
            head = await self._head(full_key, url=url, what="verify commit")
            actual = int(head["ContentLength"])
        except StorageError:
            await self._discard(full_key, url=url, device=device)
            raise
        if actual != size:
            await self._discard(full_key, url=url, device=device)
            raise StorageIntegrityError(
                f"commit refused: S3 holds {actual} bytes, the sink wrote {size}; "
                f"bucket {self.bucket!r}, key {full_key!r}",
                url=url,
                device=device,
            )

    async def _discard(self, full_key: str, *, url: str, device: str | None) -> None:
        """Best effort: take back an object we just published but must not keep."""
        try:
            await self._delete(full_key, url=url, device=device)
        except StorageError as exc:
            _log.error("s3_discard_failed", bucket=self.bucket, key=full_key, error=str(exc))

    # --- debris: owner marks, sweep, probe ---

    def _mark_key(self, backup_id: str) -> str:
        check_backup_id(backup_id, url=self.url)
        return f"{self._root()}{backup_id}/{MARK_NAME}"

    @contextlib.asynccontextmanager
    async def in_progress(self, backup_id: str) -> AsyncIterator[None]:
        """Write the owner mark ``<prefix>/<backup_id>/.vdistream-owner.json`` (this
        process's host, boot id, pid, process start time, and when the backup started)
        for the backup's life; delete it on exit (see ``Storage.in_progress``).

        A mark already there whose owner is provably gone (``record_owner_gone``) is
        replaced; any other (a live owner, or one on another host, which cannot be
        told) raises ``BackupInProgressError``. A mark that cannot be deleted at exit
        is logged; its owner is gone by then, so the next ``sweep`` on this host
        removes it.
        """
        full_key = self._mark_key(backup_id)
        url = join_url(self.url, f"{backup_id}/{MARK_NAME}")
        body = json.dumps(
            {
                **owner_record(),
                "backup_id": backup_id,
                "started": datetime.now(UTC).isoformat(timespec="seconds"),
                # unique, so that a conditional put meeting another holder's mark in
                # this very process is never mistaken for its own replay
                "token": secrets.token_hex(8),
            }
        ).encode()
        with anyio.CancelScope(shield=True):
            await self._place_mark(backup_id, full_key, body, url=url)
        try:
            yield
        finally:
            with anyio.CancelScope(shield=True):
                try:
                    await self._delete(full_key, url=url)
                except StorageError as exc:
                    _log.warning("owner_mark_not_removed", key=full_key, error=str(exc))

    async def _place_mark(self, backup_id: str, full_key: str, body: bytes, *, url: str) -> None:
        for _ in range(3):
            try:
                await self._put_new(full_key, body, url=url, device=None)
                return
            except StorageExistsError:
                pass
            record = await self._read_mark(full_key, url=url)
            if not record_owner_gone(record):
                raise BackupInProgressError(
                    f"backup {backup_id} is being written by another process "
                    f"({owner_text(record)})",
                    url=join_url(self.url, backup_id),
                )
            with contextlib.suppress(StorageNotFoundError):
                await self._delete(full_key, url=url)  # a dead owner's: ours now
        raise BackupInProgressError(
            f"backup {backup_id} is being started by another process at the same time",
            url=join_url(self.url, backup_id),
        )

    async def _read_mark(self, full_key: str, *, url: str) -> dict[str, Any] | None:
        client = await self._client()

        async def call() -> bytes:
            response = await client.get_object(Bucket=self.bucket, Key=full_key)
            async with response["Body"] as body:
                data: bytes = await body.read()
            return data

        try:
            data = await self._request("read owner mark", full_key, call, url=url)
            record = json.loads(data)
        except StorageNotFoundError:
            return None
        except ValueError:
            return None  # unreadable: no proof of anything
        return record if isinstance(record, dict) else None

    async def owner_marks(self) -> builtins.list[OwnerMark]:
        """Every backup's owner mark: ``alive`` False when its owner is provably gone,
        True when it is this host's and runs, None when it cannot be told (another
        host, an unreadable mark)."""
        marks: builtins.list[OwnerMark] = []
        for obj in await self._list_raw():
            backup_id, _, name = obj.key.partition("/")
            if name != MARK_NAME:
                continue
            full_key = self._root() + obj.key
            record = await self._read_mark(full_key, url=join_url(self.url, obj.key))
            alive = record_owner_state(record)
            marks.append(OwnerMark(backup_id, obj.key, alive, obj.last_modified, record))
        return marks

    async def remove_mark(self, mark: OwnerMark) -> None:
        """Delete an owner mark (``vdistream.catalog.audit`` decides which)."""
        full_key = self._root() + mark.name
        with anyio.CancelScope(shield=True):
            with contextlib.suppress(StorageNotFoundError):
                await self._delete(full_key, url=join_url(self.url, mark.name))

    async def sweep(self) -> builtins.list[str]:
        """Remove the debris of backups whose owner mark says the owner is provably
        gone (``Storage.sweep``): abort the multipart uploads under ``<backup_id>/``,
        delete its objects unless a committed manifest is there, then the mark.

        Marks of other hosts are kept: a process there cannot be proven dead from
        here (``vdistream storage audit --clean --min-age`` is the operator's tool).
        """
        removed: builtins.list[str] = []
        with anyio.CancelScope(shield=True):
            for mark in await self.owner_marks():
                if mark.alive is not False:
                    continue
                try:
                    removed += await self._sweep_backup(mark)
                except StorageError as exc:
                    _log.warning("debris_not_removed", storage=self.url, error=str(exc))
        return removed

    async def _sweep_backup(self, mark: OwnerMark) -> builtins.list[str]:
        prefix = f"{mark.backup_id}/"
        removed: builtins.list[str] = []

        def gone(item: str) -> None:
            removed.append(item)
            _log.info("debris_removed", storage=self.url, item=item)

        async def still_dead() -> bool:
            # A new backup with the same id may take the dead mark over at any time
            # (``_place_mark``): then everything under the id is its own. Checked after
            # each listing, before anything listed is removed.
            url = join_url(self.url, mark.name)
            return await self._read_mark(self._root() + mark.name, url=url) == mark.record

        uploads = await self.list_uploads(prefix)
        if not await still_dead():
            return removed
        for upload in uploads:
            await self.abort_upload(upload.key, upload.upload_id)
            gone(f"upload {upload.key} {upload.upload_id}")
        keys = await self.list(prefix)
        if f"{prefix}{MANIFEST_NAME}" not in keys:
            if not await still_dead():
                return removed
            for key in keys:
                with contextlib.suppress(StorageNotFoundError):
                    await self._delete(self._full_key(key), url=join_url(self.url, key))
                gone(key)
        if await still_dead():
            await self.remove_mark(mark)
            gone(mark.name)
        return removed

    async def probe(self) -> None:
        """``HeadBucket``, then a tiny ``PutObject`` and ``DeleteObject`` of
        ``<prefix>/.vdistream-probe-<random>`` (see ``Storage.probe``)."""
        client = await self._client()
        try:
            await self._request(
                "check the bucket", None, lambda: client.head_bucket(Bucket=self.bucket)
            )
        except StorageError as exc:
            raise StorageProbeError(self.url, _probe_reason(exc, self)) from exc
        key = f"{self._root()}{INTERNAL_PREFIX}probe-{secrets.token_hex(8)}"
        url = join_url(self.url, key[len(self._root()) :])
        with anyio.CancelScope(shield=True):
            try:
                await self._request(
                    "write a probe object",
                    key,
                    lambda: client.put_object(Bucket=self.bucket, Key=key, Body=b"probe"),
                    url=url,
                )
                await self._delete(key, url=url)
            except StorageError as exc:
                raise StorageProbeError(self.url, _probe_reason(exc, self, "write")) from exc

    # --- multipart uploads (S3 only; used by sinks and vdistream.catalog.audit) ---

    async def list_uploads(self, prefix: str = "") -> builtins.list[S3Upload]:
        """In-progress multipart uploads whose key starts with ``prefix`` (every page)."""
        client = await self._client()
        root = self._root()
        uploads: builtins.list[S3Upload] = []
        markers: dict[str, str] = {}
        while True:
            kwargs: dict[str, Any] = {
                "Bucket": self.bucket,
                "Prefix": root + prefix,
                "MaxUploads": self.list_page_size,
                **markers,
            }
            page = await self._request(
                "list uploads",
                root + prefix,
                functools.partial(client.list_multipart_uploads, **kwargs),
            )
            for item in page.get("Uploads", []):
                full_key = item.get("Key", "")
                uploads.append(
                    S3Upload(
                        key=self._relative(full_key),
                        upload_id=item.get("UploadId", ""),
                        initiated=item.get("Initiated"),
                    )
                )
            if not page.get("IsTruncated"):
                break
            markers = {
                "KeyMarker": page.get("NextKeyMarker", ""),
                "UploadIdMarker": page.get("NextUploadIdMarker", ""),
            }
        uploads.sort(key=lambda upload: (upload.key, upload.upload_id))
        return uploads

    async def abort_upload(self, key: str, upload_id: str) -> None:
        """Abort the multipart upload ``upload_id`` of ``key`` and confirm it is gone
        (``ListParts`` -> ``NoSuchUpload``). Idempotent; runs to completion."""
        full_key = self._full_key(key)
        with anyio.CancelScope(shield=True):
            await self._abort_upload(full_key, upload_id, url=join_url(self.url, key))

    async def _abort_upload(
        self, full_key: str, upload_id: str, *, url: str, device: str | None = None
    ) -> None:
        client = await self._client()
        leftover = -1
        for round_ in range(4):
            if round_:
                await anyio.sleep(0.05 * round_)  # a racing part may still be landing
            try:
                await self._request(
                    "abort upload",
                    full_key,
                    lambda: client.abort_multipart_upload(
                        Bucket=self.bucket, Key=full_key, UploadId=upload_id
                    ),
                    url=url,
                    device=device,
                )
            except StorageNotFoundError:
                return  # already gone: aborted or completed before
            try:
                listing = await self._request(
                    "confirm abort",
                    full_key,
                    lambda: client.list_parts(
                        Bucket=self.bucket, Key=full_key, UploadId=upload_id, MaxParts=10
                    ),
                    url=url,
                    device=device,
                )
            except StorageNotFoundError:
                return  # NoSuchUpload: confirmed
            leftover = len(listing.get("Parts", []))
        if leftover == 0:
            # AWS may list an aborted upload without parts for a short while; no bytes
            # remain, which is what abort promises.
            return
        raise StorageError(
            f"abort did not take: upload {upload_id} still lists {leftover} parts; "
            f"bucket {self.bucket!r}, key {full_key!r}",
            url=url,
            device=device,
        )


# --- sinks ---------------------------------------------------------------------------


class S3Sink(Sink):
    """One device stream as one multipart upload (or one put if it stays under a part).

    See the module docstring for part sizes, memory bounds, ``flush`` and ``commit``.
    """

    def __init__(
        self,
        storage: S3Storage,
        full_key: str,
        *,
        url: str,
        device: str | None,
        initial_part_size: int,
    ) -> None:
        self.url = url
        self.device = device
        self.key = full_key
        self._storage = storage
        self._initial = initial_part_size
        self._buffer = bytearray()
        self._capacity = self._part_size(1)
        self._next_part = 1
        self._upload_id: str | None = None
        self._in_flight: dict[int, asyncio.Task[S3Part]] = {}
        self._parts: dict[int, S3Part] = {}
        self._single_sha256: str | None = None
        self._size = 0
        self._state = SinkState.OPEN
        #: uploads on this key before our first create: never ours to abort
        self._foreign_uploads: frozenset[str] = frozenset()
        #: a CreateMultipartUpload attempt failed in a way the server may have acted on
        self._create_unsure = False
        #: CompleteMultipartUpload was sent and the sink is not committed: the object
        #: may exist all the same (a lost answer)
        self._complete_unsure = False

    def __repr__(self) -> str:
        return f"<S3Sink {self.url} {self._state.value}, {self._size} bytes>"

    @property
    def random_access(self) -> bool:
        return False

    @property
    def bytes_written(self) -> int:
        return self._size

    @property
    def size(self) -> int:
        return self._size

    @property
    def upload_id(self) -> str | None:
        """The multipart upload's id, once the first part has been sent."""
        return self._upload_id

    @property
    def parts(self) -> tuple[S3Part, ...]:
        """The parts uploaded so far, by number."""
        return tuple(self._parts[number] for number in sorted(self._parts))

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

    @contextlib.contextmanager
    def _failing(self) -> Iterator[None]:
        """Any error leaves the sink failed (only abort remains)."""
        try:
            yield
        except BaseException:
            self._state = SinkState.FAILED
            raise

    def _harvest(self) -> None:
        """Collect finished part uploads; re-raise the first failure."""
        for number, task in builtins.list(self._in_flight.items()):
            if not task.done():
                continue
            del self._in_flight[number]
            if task.cancelled():
                raise StorageError(
                    f"upload of part {number} was cancelled", url=self.url, device=self.device
                )
            error = task.exception()
            if error is not None:
                raise error
            self._parts[number] = task.result()

    async def _wait_in_flight(self, *, below: int) -> None:
        while len(self._in_flight) >= max(below, 1):
            # asyncio.wait never cancels what it waits for
            await asyncio.wait(self._in_flight.values(), return_when=asyncio.FIRST_COMPLETED)
            self._harvest()

    async def write(self, data: memoryview, *, position: int | None = None) -> None:
        require(self._state, SinkState.OPEN, what="write", url=self.url, device=self.device)
        check_position(position, random_access=False, url=self.url, device=self.device)
        view = byte_view(data)
        await anyio.lowlevel.checkpoint_if_cancelled()
        # Shielded: a write that started copies all of it (and ships full parts).
        with anyio.CancelScope(shield=True), self._failing():
            self._harvest()
            total = view.nbytes
            if self._size + total > MAX_OBJECT_SIZE:
                raise StorageFullError(
                    f"S3 objects hold at most {MAX_OBJECT_SIZE} bytes",
                    url=self.url,
                    device=self.device,
                )
            done = 0
            while done < total:
                take = min(self._capacity - len(self._buffer), total - done)
                with view[done : done + take] as piece:
                    self._buffer += piece  # copies
                done += take
                if len(self._buffer) >= self._capacity:
                    await self._ship()
        self._size += total

    async def _ship(self) -> None:
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
        loop = asyncio.get_running_loop()
        self._in_flight[number] = loop.create_task(
            self._upload_part(number, data), name=f"s3-part-{number}:{self.key}"
        )
        self._next_part = number + 1
        self._capacity = self._part_size(self._next_part)

    async def _create_upload(self) -> None:
        storage = self._storage
        client = await storage._client()
        kwargs: dict[str, Any] = {"Bucket": storage.bucket, "Key": self.key}
        if storage.send_checksums:
            kwargs["ChecksumAlgorithm"] = "SHA256"
        # The uploads already on this key are not ours: if a create's answer is lost,
        # the new ones are (see _abort_strays). Clocks cannot tell (S3-compatible
        # stores report odd Initiated times), this snapshot can.
        relative = storage._relative(self.key)
        self._foreign_uploads = frozenset(
            upload.upload_id
            for upload in await storage.list_uploads(relative)
            if upload.key == relative
        )

        def failed(exc: BaseException) -> None:
            if is_ambiguous(exc):
                self._create_unsure = True  # an upload we never heard of may exist

        created = await storage._request(
            "start upload",
            self.key,
            lambda: client.create_multipart_upload(**kwargs),
            url=self.url,
            device=self.device,
            failed=failed,
        )
        self._upload_id = created["UploadId"]

    async def _abort_strays(self, *, keep: str | None) -> None:
        """Abort the uploads on this sink's exact key that it started without learning
        their id (a CreateMultipartUpload whose answer was lost): those that were not
        there before its first create (``_foreign_uploads``), except ``keep``. Another
        writer of the very same key at the same time would lose its upload too;
        ``Storage.in_progress`` keeps two jobs off one backup's keys. Raises
        ``OrphanUploadsError`` for those that could not be aborted."""
        storage = self._storage
        relative = storage._relative(self.key)
        left: builtins.list[str] = []
        reason = ""
        try:
            uploads = await storage.list_uploads(relative)
        except StorageError as exc:
            raise OrphanUploadsError(
                storage.url, [f"upload {relative} (unknown id)"], reason=str(exc)
            ) from exc
        for upload in uploads:
            if upload.key != relative or upload.upload_id in (keep, *self._foreign_uploads):
                continue
            try:
                await storage._abort_upload(
                    self.key, upload.upload_id, url=self.url, device=self.device
                )
            except StorageError as exc:
                left.append(f"upload {relative} {upload.upload_id}")
                reason = reason or str(exc)
            else:
                _log.info("stray_upload_aborted", key=self.key, upload_id=upload.upload_id)
        if left:
            raise OrphanUploadsError(storage.url, left, reason=reason)

    async def _upload_part(self, number: int, data: bytes) -> S3Part:
        storage = self._storage
        digest = await _hash(hashlib.sha256, data)
        client = await storage._client()
        assert self._upload_id is not None
        kwargs: dict[str, Any] = {
            "Bucket": storage.bucket,
            "Key": self.key,
            "UploadId": self._upload_id,
            "PartNumber": number,
        }
        if storage.send_checksums:
            kwargs["ChecksumSHA256"] = _b64_sha256(digest)
        response = await storage._request(
            f"upload part {number}",
            self.key,
            lambda: client.upload_part(Body=io.BytesIO(data), **kwargs),
            url=self.url,
            device=self.device,
        )
        return S3Part(number, len(data), str(response["ETag"]), digest.hex())

    async def flush(self) -> None:
        """Wait until every part cut so far is uploaded (S3 has no partial object; the
        bytes of the part still filling stay in memory until it fills or commit)."""
        require(self._state, SinkState.OPEN, what="flush", url=self.url, device=self.device)
        await anyio.lowlevel.checkpoint_if_cancelled()
        with anyio.CancelScope(shield=True), self._failing():
            await self._wait_in_flight(below=1)

    async def commit(self) -> None:
        if self._state is SinkState.COMMITTED:
            return
        require(
            self._state,
            SinkState.OPEN,
            SinkState.SEALED,
            what="commit",
            url=self.url,
            device=self.device,
        )
        await anyio.lowlevel.checkpoint_if_cancelled()
        with anyio.CancelScope(shield=True):
            if self._state is SinkState.OPEN:
                with self._failing():
                    await self._seal()
            await self._publish()
            if self._create_unsure:
                # The object is committed: a stray we cannot abort is reported, the
                # commit stands (storage audit --clean finds the upload).
                try:
                    await self._abort_strays(keep=None)
                except OrphanUploadsError as exc:
                    _log.error("orphan_upload_left", key=self.key, error=str(exc))
                else:
                    self._create_unsure = False

    async def _seal(self) -> None:
        """Upload the last part and wait for all: the data is final from here on."""
        if self._upload_id is not None:
            if self._buffer:
                await self._ship()
            await self._wait_in_flight(below=1)
            stored = sum(part.size for part in self._parts.values())
            if stored != self._size or sorted(self._parts) != builtins.list(
                range(1, len(self._parts) + 1)
            ):
                raise StorageIntegrityError(
                    f"commit refused: {len(self._parts)} parts hold {stored} bytes, "
                    f"the sink wrote {self._size}",
                    url=self.url,
                    device=self.device,
                )
        self._state = SinkState.SEALED

    async def _publish(self) -> None:
        storage = self._storage
        try:
            if self._upload_id is None:
                self._single_sha256 = await storage._put_new(
                    self.key, bytes(self._buffer), url=self.url, device=self.device
                )
            else:
                await self._complete()
        except StorageExistsError:
            self._state = SinkState.SEALED  # the old object is untouched; data kept
            raise
        except BaseException:
            self._state = SinkState.FAILED
            raise
        self._buffer = bytearray()
        self._state = SinkState.COMMITTED

    async def _complete(self) -> None:
        storage = self._storage
        client = await storage._client()
        assert self._upload_id is not None
        parts = self.parts
        listed: builtins.list[CompletedPartTypeDef] = []
        for part in parts:
            entry: CompletedPartTypeDef = {"PartNumber": part.number, "ETag": part.etag}
            if storage.send_checksums:
                entry["ChecksumSHA256"] = _b64_sha256(bytes.fromhex(part.sha256))
            listed.append(entry)
        upload_id = self._upload_id

        def call() -> Awaitable[Any]:
            return client.complete_multipart_upload(
                Bucket=storage.bucket,
                Key=self.key,
                UploadId=upload_id,
                MultipartUpload={"Parts": listed},
                IfNoneMatch="*",
            )

        self._complete_unsure = True  # until committed: abort looks for the object
        try:
            await storage._request(
                "commit (complete upload)", self.key, call, url=self.url, device=self.device
            )
        except (StorageExistsError, StorageNotFoundError):
            # A replay may meet its own earlier, successful attempt: 412 (the object
            # now exists) or NoSuchUpload (the upload became the object).
            expected = _multipart_etag([part.etag for part in parts])
            if not await storage._is_ours(self.key, expected, self._size, self.url):
                raise
        await storage._verify_size(self.key, self._size, url=self.url, device=self.device)
        self._complete_unsure = False

    async def abort(self) -> None:
        """Cancel parts in flight, abort the upload, abort the strays of a create whose
        answer was lost, and delete the object of a complete whose answer was lost.

        What the store refuses to remove raises ``OrphanUploadsError`` (one line naming
        what is left and ``vdistream storage audit --clean URL``); the sink then stays
        failed, and calling ``abort`` again tries again.
        """
        if self._state in (SinkState.COMMITTED, SinkState.ABORTED):
            return
        # No checkpoint first: abort must run even in an already-cancelled scope.
        with anyio.CancelScope(shield=True):
            tasks = builtins.list(self._in_flight.values())
            self._in_flight.clear()
            for task in tasks:
                task.cancel()
            if tasks:
                await asyncio.wait(tasks)
                for task in tasks:  # retrieve outcomes so none is reported as lost
                    if not task.cancelled():
                        task.exception()
            self._buffer = bytearray()
            self._state = SinkState.FAILED  # until everything is confirmed gone
            storage = self._storage
            relative = storage._relative(self.key)
            left: builtins.list[str] = []
            reasons: builtins.list[str] = []
            if self._upload_id is not None:
                try:
                    await storage._abort_upload(
                        self.key, self._upload_id, url=self.url, device=self.device
                    )
                except StorageError as exc:
                    left.append(f"upload {relative} {self._upload_id}")
                    reasons.append(str(exc))
            if self._create_unsure:
                try:
                    await self._abort_strays(keep=self._upload_id)
                    self._create_unsure = False
                except OrphanUploadsError as exc:
                    left += exc.leftovers
                    reasons.append(exc.reason)
            if self._complete_unsure:
                expected = _multipart_etag([part.etag for part in self.parts])
                try:
                    await storage._take_back(
                        self.key,
                        expected,
                        self._size,
                        url=self.url,
                        cause=StorageError("commit failed", url=self.url),
                    )
                    self._complete_unsure = False
                except OrphanUploadsError as exc:
                    left += exc.leftovers
                    reasons.append(exc.reason)
            if left:
                raise OrphanUploadsError(storage.url, left, reason=reasons[0])
            self._state = SinkState.ABORTED


def _md5(data: bytes) -> Any:
    return hashlib.md5(data, usedforsecurity=False)


async def _hash(algorithm: Callable[[bytes], Any], data: bytes) -> bytes:
    """The digest of ``data``; large inputs hash in a worker thread (GIL released)."""
    if len(data) <= _THREAD_HASH_BYTES:
        return bytes(algorithm(data).digest())
    digest = await anyio.to_thread.run_sync(lambda: algorithm(data).digest())
    return bytes(digest)


# --- sources -------------------------------------------------------------------------


class S3Source(Source):
    """Reads a committed object with ranged GETs and bounded read-ahead."""

    def __init__(
        self, storage: S3Storage, full_key: str, *, url: str, size: int, etag: str | None
    ) -> None:
        self.url = url
        self.key = full_key
        self._storage = storage
        self._size = size
        self._etag = etag
        self._chunk_size = storage.read_chunk_size
        self._chunks: dict[int, asyncio.Task[bytes]] = {}
        self._position = 0
        self._closed = False

    def __repr__(self) -> str:
        return f"<S3Source {self.url} {self._size} bytes>"

    @property
    def random_access(self) -> bool:
        return True

    @property
    def size(self) -> int:
        return self._size

    async def readinto(self, buffer: memoryview, *, position: int | None = None) -> int:
        if self._closed:
            raise StorageError("cannot read: the source is closed", url=self.url)
        check_position(position, random_access=True, url=self.url)
        view = byte_view(buffer)
        await anyio.lowlevel.checkpoint_if_cancelled()
        start = self._position if position is None else position
        sequential = start == self._position
        done = 0
        # Shielded for the same reason as S3Sink.write: the buffer is shared memory.
        with anyio.CancelScope(shield=True):
            while done < view.nbytes and start + done < self._size:
                offset = start + done
                index = offset // self._chunk_size
                chunk = await self._chunk(index, sequential)
                within = offset - index * self._chunk_size
                count = min(len(chunk) - within, view.nbytes - done)
                with memoryview(chunk) as whole, whole[within : within + count] as piece:
                    view[done : done + count] = piece
                done += count
        self._position = start + done
        return done

    async def _chunk(self, index: int, sequential: bool) -> bytes:
        """Chunk ``index``; keeps the next ``read_ahead`` in flight when sequential."""
        last = (self._size - 1) // self._chunk_size
        ahead = self._storage.read_ahead if sequential else 0
        high = min(index + ahead, last)
        stale = [i for i in self._chunks if i < index or i > high]
        await self._drop(stale)
        loop = asyncio.get_running_loop()
        for i in range(index, high + 1):
            if i not in self._chunks:
                self._chunks[i] = loop.create_task(self._fetch(i), name=f"s3-range-{i}:{self.key}")
        task = self._chunks[index]
        await asyncio.wait([task])
        if task.cancelled() or task.exception() is not None:
            del self._chunks[index]  # a later read tries again
        return task.result()

    async def _drop(self, indexes: builtins.list[int]) -> None:
        tasks = [self._chunks.pop(i) for i in indexes]
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks)
            for task in tasks:
                if not task.cancelled():
                    task.exception()

    async def _fetch(self, index: int) -> bytes:
        storage = self._storage
        client = await storage._client()
        first = index * self._chunk_size
        last = min(self._size, first + self._chunk_size) - 1
        kwargs: dict[str, Any] = {
            "Bucket": storage.bucket,
            "Key": self.key,
            "Range": f"bytes={first}-{last}",
        }
        if self._etag:
            kwargs["IfMatch"] = self._etag

        async def call() -> bytes:
            response = await client.get_object(**kwargs)
            async with response["Body"] as body:
                data = await body.read()
            if len(data) != last - first + 1:
                raise _ShortBody(f"got {len(data)} of {last - first + 1} bytes")
            return data

        return await storage._request(
            f"read bytes {first}-{last}",
            self.key,
            call,
            url=self.url,
            precondition=_ChangedError,
        )

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        with anyio.CancelScope(shield=True):
            await self._drop(builtins.list(self._chunks))


class _ChangedError(StorageIntegrityError):
    """The object changed (its ETag) while a source was reading it."""
