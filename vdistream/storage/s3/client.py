"""The S3 connection: URL and options, the one aiobotocore client, requests with retries.

One client per storage, created on first use, closed by ``aclose()``. Credentials come
from the AWS chain (environment, config files, ``profile=``, container and instance
metadata). The endpoint is ``endpoint_url=``, else ``AWS_ENDPOINT_URL_S3`` /
``AWS_ENDPOINT_URL``, else AWS; with an explicit one, path-style addressing unless
``addressing_style`` says otherwise. Checksums only where the API requires them
(``"when_required"``): many S3-compatible stores reject botocore's default CRC headers.
No ``Expect: 100-continue``: aiohttp waits for that answer without a read timeout.

Transient failures (``errors.is_transient``) are retried, at most ``max_attempts`` in
all (5), with "full jitter" backoff: before attempt ``n + 1`` a random sleep in ``[0,
min(backoff_cap, backoff_base * 2**(n-1))]`` (20 s, 0.25 s); botocore's own retries are
off, so that bound is exact. Every retry is logged (``s3_request_retry``) and told to
``observe_retries``. A request that keeps failing, or any other failure, raises a
``StorageError`` naming the operation, the S3 error code, the bucket and the key.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import io
import os
import random
import re
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Self
from urllib.parse import parse_qsl, unquote, urlsplit

import aiohttp
import anyio
from aiobotocore.config import AioConfig
from aiobotocore.session import AioSession
from botocore.exceptions import BotoCoreError, ClientError
from botocore.handlers import add_expect_header

from vdistream.errors import StorageError, StorageExistsError, StorageURLError
from vdistream.log import get_logger
from vdistream.storage._common import check_key, join_url
from vdistream.storage._objects import PrefixedKeys
from vdistream.storage.s3.errors import ShortBody, is_transient, translate_s3_error
from vdistream.storage.s3.hooks import retry_observer
from vdistream.storage.s3.parts import (
    DEFAULT_PART_SIZE,
    MAX_OBJECT_SIZE,
    MAX_PART_SIZE,
    MAX_PARTS,
    MIN_PART_SIZE,
    PART_GROWTH_INTERVAL,
    b64,
    stream_capacity,
)

if TYPE_CHECKING:
    from types_aiobotocore_s3 import S3Client

__all__ = ("FAILURES", "S3Connection", "backoff_delay")

#: " 17" (a part) or " 0-8388607" (a range) at the end of an operation's name
_NUMBERED = re.compile(r" [0-9][0-9-]*$")
_log = get_logger(__name__)

_POSITIVE = (
    "part_growth_interval",
    "max_parts_in_flight",
    "read_chunk_size",
    "max_attempts",
    "max_pool_connections",
    "list_page_size",
)
_BUCKET = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{1,254}")
_URL_OPTIONS = frozenset({"endpoint_url", "region", "profile", "addressing_style"})
_ADDRESSING = frozenset({"auto", "path", "virtual"})
#: What a request (or the read of its body) fails with; ``errors`` tells which to retry.
FAILURES = (ClientError, BotoCoreError, aiohttp.ClientError, TimeoutError, ShortBody)


def backoff_delay(
    attempt: int, *, base: float, cap: float, rng: random.Random | None = None
) -> float:
    """Seconds to sleep after failed attempt ``attempt`` (1-based): full jitter,
    uniform in ``[0, min(cap, base * 2**(attempt - 1))]``."""
    ceiling = min(cap, base * 2 ** min(attempt - 1, 62))
    return (rng or random).uniform(0.0, ceiling)


@dataclasses.dataclass(eq=False, repr=False)
class S3Connection(PrefixedKeys):
    """The bucket, prefix and options of an S3 storage, its client and its requests.

    Tuning knobs (keyword-only): ``part_size`` (the first part size; refused if the
    schedule could not reach 5 TiB from it, e.g. 5 MiB), ``min_part_size`` (S3's rule;
    lower only for test servers configured to allow it, which also lifts the 5 TiB
    check), ``part_growth_interval``, ``max_parts_in_flight`` (per sink),
    ``read_ahead`` (per source: ``None``, the default, reads with one streamed GET;
    an integer reads ranges of ``read_chunk_size`` with that many ahead, see
    ``source``), ``max_attempts``,
    ``backoff_base``/``backoff_cap`` (seconds), ``connect_timeout``/``read_timeout``
    (seconds), ``max_pool_connections``, ``send_checksums``, ``list_page_size``.
    """

    bucket: str
    prefix: str = ""
    _: dataclasses.KW_ONLY
    endpoint_url: str | None = None
    region: str | None = None
    profile: str | None = None
    addressing_style: str | None = None
    part_size: int = DEFAULT_PART_SIZE
    min_part_size: int = MIN_PART_SIZE
    part_growth_interval: int = PART_GROWTH_INTERVAL
    max_parts_in_flight: int = 2
    read_chunk_size: int = 8 << 20
    read_ahead: int | None = None
    max_attempts: int = 5
    backoff_base: float = 0.25
    backoff_cap: float = 20.0
    connect_timeout: float = 10.0
    read_timeout: float = 60.0
    max_pool_connections: int = 64
    send_checksums: bool = False
    list_page_size: int = 1_000
    session: AioSession | None = None

    def __post_init__(self) -> None:
        base = f"s3://{self.bucket}"
        if not _BUCKET.fullmatch(self.bucket):
            raise StorageURLError(f"invalid bucket name {self.bucket!r}", url=base)
        prefix = self.prefix.strip("/")
        self.prefix = check_key(prefix, url=base) if prefix else ""
        self.url = join_url(base, self.prefix) if self.prefix else base
        if self.addressing_style not in (None, *_ADDRESSING):
            raise StorageURLError(
                f"addressing_style must be one of {sorted(_ADDRESSING)}", url=self.url
            )
        part_size, growth = self.part_size, self.part_growth_interval
        if not self.min_part_size <= part_size <= MAX_PART_SIZE:
            raise StorageURLError(
                f"part_size {part_size} must lie within [{self.min_part_size}, {MAX_PART_SIZE}]",
                url=self.url,
            )
        if (
            self.min_part_size >= MIN_PART_SIZE
            and growth >= 1
            and stream_capacity(initial=part_size, growth_interval=growth) < MAX_OBJECT_SIZE
        ):
            raise StorageURLError(
                f"part_size {part_size} with growth every {growth} parts "
                f"cannot reach S3's {MAX_OBJECT_SIZE}-byte object limit in {MAX_PARTS} parts",
                url=self.url,
            )
        for name in _POSITIVE:
            if (value := getattr(self, name)) < 1:
                raise StorageURLError(f"{name} must be at least 1, not {value}", url=self.url)
        if self.read_ahead is not None and self.read_ahead < 0:
            raise StorageURLError(f"read_ahead must be >= 0, not {self.read_ahead}", url=self.url)
        self._s3: S3Client | None = None
        self._exit_stack: contextlib.AsyncExitStack | None = None
        self._client_lock = anyio.Lock()

    @classmethod
    def from_url(cls, url: str) -> Self:
        """``s3://bucket[/prefix][?endpoint_url=...&region=...&profile=...]``."""
        parts = urlsplit(url)
        for wrong, problem in (
            (parts.scheme.lower() != "s3", "expected an s3:// URL"),
            (not parts.netloc, "an s3 URL needs a bucket: s3://bucket/prefix"),
            (
                "@" in parts.netloc,
                "an s3 URL must not carry credentials; use the AWS credential chain",
            ),
            (parts.fragment, "an s3 URL takes no fragment"),
        ):
            if wrong:
                raise StorageURLError(problem, url=url)
        options: dict[str, Any] = {}  # only the string-valued _URL_OPTIONS
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
        return cls(unquote(parts.netloc), prefix, **options)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.url}>"

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
                if self._s3 is None:  # another task may have connected meanwhile
                    self._s3 = await self._connect()
                client = self._s3
        return client

    async def _connect(self) -> S3Client:
        endpoint = self._endpoint()
        config = AioConfig(
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
            retries={"mode": "standard", "total_max_attempts": 1},
            connect_timeout=self.connect_timeout,
            read_timeout=self.read_timeout,
            max_pool_connections=self.max_pool_connections,
            s3={"addressing_style": self.addressing_style or ("path" if endpoint else "auto")},
        )
        session = self.session or AioSession(profile=self.profile)
        stack = contextlib.AsyncExitStack()
        try:
            client = await stack.enter_async_context(
                session.create_client(
                    "s3", region_name=self.region, endpoint_url=endpoint, config=config
                )
            )
            client.meta.events.unregister("before-call.s3", add_expect_header)
        except BotoCoreError as exc:
            await stack.aclose()
            raise StorageError(
                f"cannot create the S3 client: {type(exc).__name__}: {exc}", url=self.url
            ) from exc
        self._exit_stack = stack
        return client

    async def aclose(self) -> None:
        """Close the client (a later call creates a new one); runs to completion."""
        with anyio.CancelScope(shield=True):
            async with self._client_lock:
                stack, self._exit_stack, self._s3 = self._exit_stack, None, None
                if stack is not None:
                    await stack.aclose()

    async def _call(
        self,
        what: str,
        method: str,
        *,
        url: str | None = None,
        device: str | None = None,
        body: bytes | None = None,
        read: int | None = None,
        sha256: bytes | None = None,
        precondition: type[StorageError] = StorageExistsError,
        failed: Callable[[BaseException], None] | None = None,
        **params: Any,
    ) -> Any:
        """``client.<method>(Bucket=bucket, **params)`` with bounded, jittered retries
        of transient failures; failures become ``StorageError`` naming ``what``, the S3
        code, bucket and key. ``body`` is sent as a fresh stream per attempt (BytesIO
        shares the bytes, it does not copy); with ``read`` (-1: all) the answer's body
        is read and returned, a shorter one retried; ``sha256`` is sent for S3 to check
        when ``send_checksums`` is on. ``failed`` is told of every failed attempt (the
        last one included)."""
        send = functools.partial(getattr(await self._client(), method), Bucket=self.bucket)
        key = params.get("Key", params.get("Prefix"))
        if url is None:  # the object's URL, else the storage's
            url = self._url(params["Key"]) if "Key" in params else self.url
        if sha256 is not None and self.send_checksums:
            params["ChecksumSHA256"] = b64(sha256)

        async def attempt() -> Any:
            response = await send(**params, **({} if body is None else {"Body": io.BytesIO(body)}))
            if read is None:
                return response
            async with response["Body"] as stream:
                data = await stream.read()
            if read >= 0 and len(data) != read:
                raise ShortBody(f"got {len(data)} of {read} bytes")
            return data

        attempts = 1
        while True:
            try:
                return await attempt()
            except FAILURES as exc:
                if failed is not None:
                    failed(exc)
                if attempts >= self.max_attempts or not is_transient(exc):
                    raise translate_s3_error(
                        exc,
                        what=what,
                        bucket=self.bucket,
                        key=key,
                        url=url,
                        device=device,
                        attempts=attempts,
                        precondition=precondition,
                    ) from exc
                delay = backoff_delay(attempts, base=self.backoff_base, cap=self.backoff_cap)
                _log.warning(
                    "s3_request_retry",
                    operation=what,
                    bucket=self.bucket,
                    key=key,
                    attempt=attempts,
                    delay=round(delay, 3),
                    error=f"{type(exc).__name__}: {exc}",
                )
                if (observer := retry_observer.get()) is not None:
                    # the operation without its part number or byte range: a metric
                    # label must not get one value per part of a long job
                    observer(_NUMBERED.sub("", what))
            await anyio.sleep(delay)
            attempts += 1
