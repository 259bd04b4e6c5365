"""The Azure connection: URL and options, credentials, the one async client, requests.

URL: ``azure://ACCOUNT/CONTAINER[/PREFIX][?endpoint=URL]``. ``url`` is the URL without
the query; no credentials ever go in it.

Credentials, the first that is set:

* ``AZURE_STORAGE_CONNECTION_STRING``: a connection string (``AccountName=...;
  AccountKey=...`` or ``SharedAccessSignature=...``, ``BlobEndpoint=...``,
  ``UseDevelopmentStorage=true``); when it names an account, it must be the URL's;
* ``AZURE_STORAGE_KEY``: the account key of the URL's account;
* ``AZURE_STORAGE_SAS_TOKEN``: a shared access signature (container or account scope).

Without any, the first request fails with a one-line ``StorageError`` saying which
variables to set. The endpoint is the URL's ``endpoint=`` query option, else
``AZURE_STORAGE_ENDPOINT``, else the connection string's ``BlobEndpoint``, else
``https://ACCOUNT.blob.core.windows.net``. For Azurite: ``?endpoint=http://127.0.0.1:
10000/devstoreaccount1`` (the account in the path), with its well-known key.

One client per storage (``BlobServiceClient`` of ``azure.storage.blob.aio``, on aiohttp),
created on first use, closed by ``aclose()``. Retries are the SDK's own exponential
policy, bounded: at most ``max_attempts`` attempts in all (connect, read and status
retries included); before retry ``n`` (1, 2, ...) it sleeps ``backoff_base +
backoff_increment**n`` seconds, give or take ``backoff_base / 2`` (defaults 0.25 and
1.5: about 13 s over the four retries). Every retry is
logged (``azure_request_retry``) and told to ``vdistream.storage.s3.observe_retries``
(the daemon's retry metric counts both backends) as ``"azure: OPERATION"`` without
block numbers or byte ranges (``"azure: stage block"``), so metric labels stay few. A
request that keeps failing, or any other failure, raises a one-line ``StorageError``
naming the operation, the service's error code, the container and the blob
(``errors.translate_azure_error``).
"""

from __future__ import annotations

import binascii
import contextlib
import dataclasses
import logging
import os
import re
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, Self, TypeVar
from urllib.parse import parse_qsl, unquote, urlsplit, urlunsplit

import anyio
from azure.core.exceptions import AzureError
from azure.storage.blob.aio import BlobServiceClient, ExponentialRetry

from vdistream.errors import StorageError, StorageExistsError, StorageURLError
from vdistream.log import get_logger
from vdistream.storage._common import check_key, join_url
from vdistream.storage._objects import PrefixedKeys
from vdistream.storage.azure.blocks import (
    BLOCK_GROWTH_INTERVAL,
    DEFAULT_BLOCK_SIZE,
    MAX_BLOCK_SIZE,
)
from vdistream.storage.azure.errors import one_line, translate_azure_error
from vdistream.storage.s3.hooks import retry_observer

if TYPE_CHECKING:
    from azure.storage.blob.aio import BlobClient, ContainerClient

__all__ = ("DEVELOPMENT_KEY", "FAILURES", "AzureConnection", "parse_connection_string")

_log = get_logger(__name__)
_T = TypeVar("_T")

_ACCOUNT = re.compile(r"[a-z0-9]{3,24}")
_CONTAINER = re.compile(r"(?!.*--)[a-z0-9][a-z0-9-]{1,61}[a-z0-9]|\$root")
_URL_OPTIONS = frozenset({"endpoint"})
_NUMBERED = re.compile(r" [0-9][0-9-]*$")
#: A logger outside the logging tree (no parent, no handlers, WARNING): where the SDK's
#: per-request HTTP log goes (``_connect``). Not configuration: nothing global changes.
_SDK_HTTP_LOG = logging.Logger("vdistream.storage.azure.sdk_http", logging.WARNING)
_POSITIVE = (
    "block_growth_interval",
    "max_blocks_in_flight",
    "read_chunk_size",
    "max_attempts",
    "list_page_size",
)
#: The well-known key of Azurite's account ``devstoreaccount1`` (public, documented by
#: Microsoft), which ``UseDevelopmentStorage=true`` stands for.
DEVELOPMENT_KEY = (
    "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="
)
#: What a request fails with: the SDK's errors, and ``ValueError`` for a malformed key
#: or connection string (the SDK decodes keys when it signs the first request).
FAILURES = (AzureError, ValueError, binascii.Error)


def parse_connection_string(text: str) -> dict[str, str]:
    """``Name=value;Name=value`` as a dict with lower-case names (values keep ``=``)."""
    found: dict[str, str] = {}
    for item in text.split(";"):
        name, sep, value = item.strip().partition("=")
        if sep and name:
            found[name.strip().lower()] = value.strip()
    return found


@dataclasses.dataclass(eq=False, repr=False)
class AzureConnection(PrefixedKeys):
    """The account, container, prefix and options of an Azure storage, its client and
    its requests.

    Tuning knobs (keyword-only): ``block_size`` (the first block), ``block_growth_
    interval``, ``max_blocks_in_flight`` (per sink, 4), ``read_chunk_size`` (ranged
    reads, 8 MiB), ``read_ahead`` (ranges in flight per source, 2), ``max_attempts``
    (5), ``backoff_base``/``backoff_increment`` (seconds), ``connect_timeout``/
    ``read_timeout`` (seconds), ``list_page_size``, ``abort_wait`` (seconds an abort
    lets blocks in flight finish before cancelling them); ``credential`` overrides the
    environment (anything the SDK accepts: a key dict, a SAS, a token credential).
    """

    account: str
    container: str
    prefix: str = ""
    _: dataclasses.KW_ONLY
    endpoint: str | None = None
    block_size: int = DEFAULT_BLOCK_SIZE
    block_growth_interval: int = BLOCK_GROWTH_INTERVAL
    max_blocks_in_flight: int = 4
    read_chunk_size: int = 8 << 20
    read_ahead: int = 2
    max_attempts: int = 5
    backoff_base: float = 0.25
    backoff_increment: float = 1.5
    connect_timeout: float = 10.0
    read_timeout: float = 60.0
    list_page_size: int = 1_000
    abort_wait: float = 10.0
    credential: Any = None

    def __post_init__(self) -> None:
        base = f"azure://{self.account}"
        if not _ACCOUNT.fullmatch(self.account):
            raise StorageURLError(
                f"invalid storage account name {self.account!r} (3-24 lower-case letters "
                "and digits)",
                url=base,
            )
        base = f"{base}/{self.container}"
        if not _CONTAINER.fullmatch(self.container):
            raise StorageURLError(
                f"invalid container name {self.container!r} (3-63 lower-case letters, "
                "digits and single hyphens)",
                url=base,
            )
        prefix = self.prefix.strip("/")
        self.prefix = check_key(prefix, url=base) if prefix else ""
        self.url = join_url(base, self.prefix) if self.prefix else base
        if not 1 <= self.block_size <= MAX_BLOCK_SIZE:
            raise StorageURLError(
                f"block_size {self.block_size} must lie within [1, {MAX_BLOCK_SIZE}]", url=self.url
            )
        for name in _POSITIVE:
            if (value := getattr(self, name)) < 1:
                raise StorageURLError(f"{name} must be at least 1, not {value}", url=self.url)
        for name in ("read_ahead", "abort_wait", "backoff_base", "backoff_increment"):
            if (value := getattr(self, name)) < 0:
                raise StorageURLError(f"{name} must be >= 0, not {value}", url=self.url)
        if self.endpoint is not None and not self.endpoint.startswith(("http://", "https://")):
            raise StorageURLError(
                f"endpoint {self.endpoint!r} must be an http:// or https:// URL", url=self.url
            )
        self._service: BlobServiceClient | None = None
        self._containers: ContainerClient | None = None
        self._client_lock = anyio.Lock()

    @classmethod
    def from_url(cls, url: str) -> Self:
        """``azure://account/container[/prefix][?endpoint=...]``. Errors show the URL
        without user info and without a SAS (credentials someone put in it)."""
        parts = urlsplit(url)
        url = one_line(urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2])))
        for wrong, problem in (
            (parts.scheme.lower() != "azure", "expected an azure:// URL"),
            (not parts.netloc, "an azure URL needs an account: azure://account/container/prefix"),
            (
                "@" in parts.netloc,
                "an azure URL must not carry credentials; set AZURE_STORAGE_CONNECTION_STRING "
                "or AZURE_STORAGE_KEY",
            ),
            (parts.fragment, "an azure URL takes no fragment"),
        ):
            if wrong:
                raise StorageURLError(problem, url=url)
        options: dict[str, Any] = {}
        for name, value in parse_qsl(parts.query, keep_blank_values=True):
            if name not in _URL_OPTIONS:
                raise StorageURLError(
                    f"unknown azure URL option {name!r}; known: {', '.join(sorted(_URL_OPTIONS))}",
                    url=url,
                )
            if not value:
                raise StorageURLError(f"empty azure URL option {name!r}", url=url)
            options[name] = value
        container, _, prefix = unquote(parts.path).lstrip("/").partition("/")
        if not container:
            raise StorageURLError(
                "an azure URL needs a container: azure://account/container/prefix", url=url
            )
        prefix = prefix.strip("/")
        if "\0" in prefix or any(p in ("", ".", "..") for p in prefix.split("/") if prefix):
            raise StorageURLError("invalid prefix in azure URL", url=url)
        return cls(unquote(parts.netloc), container, prefix, **options)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.url}>"

    # --- the client ---

    def _endpoint(self) -> str:
        """The blob endpoint requests go to (see the module docstring)."""
        explicit = self.endpoint or os.environ.get("AZURE_STORAGE_ENDPOINT")
        if explicit:
            return explicit.rstrip("/")
        text = os.environ.get("AZURE_STORAGE_CONNECTION_STRING")
        if text and (endpoint := parse_connection_string(text).get("blobendpoint")):
            return endpoint.rstrip("/")
        return f"https://{self.account}.blob.core.windows.net"

    async def _client(self) -> ContainerClient:
        """The storage's container client, created on first use (shielded)."""
        if self._containers is not None:
            return self._containers
        with anyio.CancelScope(shield=True):
            async with self._client_lock:
                if self._containers is None:
                    self._service = self._connect()
                    self._containers = self._service.get_container_client(self.container)
                client = self._containers
        return client

    def _connect(self) -> BlobServiceClient:
        options: dict[str, Any] = {
            "retry_policy": ExponentialRetry(
                initial_backoff=self.backoff_base,  # type: ignore[arg-type]
                increment_base=self.backoff_increment,  # type: ignore[arg-type]
                retry_total=self.max_attempts - 1,
                retry_connect=self.max_attempts - 1,
                retry_read=self.max_attempts - 1,
                retry_status=self.max_attempts - 1,
                random_jitter_range=self.backoff_base / 2,  # type: ignore[arg-type]
            ),
            # the SDK logs every request and answer, headers and all, at INFO: a daemon
            # logging at INFO would print several lines per block. Its HTTP log goes to a
            # logger outside the logging tree instead (vdistream logs retries and failures).
            "logger": _SDK_HTTP_LOG,
            "connection_timeout": self.connect_timeout,
            "read_timeout": self.read_timeout,
            # a sink sends a stream smaller than one block as one put, never chunked
            "max_single_put_size": max(self.block_size, 64 << 20),
            "max_single_get_size": max(self.read_chunk_size, 32 << 20),
        }
        try:
            if self.credential is not None:
                return BlobServiceClient(self._endpoint(), credential=self.credential, **options)
            text = os.environ.get("AZURE_STORAGE_CONNECTION_STRING")
            if text:
                return self._from_connection_string(text, options)
            if key := os.environ.get("AZURE_STORAGE_KEY"):
                credential: Any = {"account_name": self.account, "account_key": key}
                return BlobServiceClient(self._endpoint(), credential=credential, **options)
            if sas := os.environ.get("AZURE_STORAGE_SAS_TOKEN"):
                return BlobServiceClient(self._endpoint(), credential=sas.lstrip("?"), **options)
        except FAILURES as exc:
            raise StorageError(
                f"cannot create the Azure client: {type(exc).__name__}: {one_line(exc)}",
                url=self.url,
            ) from exc
        raise StorageError(
            "no Azure credentials: set AZURE_STORAGE_CONNECTION_STRING, or AZURE_STORAGE_KEY "
            f"(the key of account {self.account!r}), or AZURE_STORAGE_SAS_TOKEN",
            url=self.url,
        )

    def _from_connection_string(self, text: str, options: dict[str, Any]) -> BlobServiceClient:
        fields = parse_connection_string(text)
        named = fields.get("accountname")
        if named and named != self.account:
            raise StorageError(
                f"AZURE_STORAGE_CONNECTION_STRING is for account {named!r}, the URL names "
                f"{self.account!r}",
                url=self.url,
            )
        if self.endpoint or os.environ.get("AZURE_STORAGE_ENDPOINT"):
            credential: Any = None
            key = ""
            if fields.get("usedevelopmentstorage", "").lower() == "true":
                key = DEVELOPMENT_KEY
            if key := fields.get("accountkey") or key:
                credential = {"account_name": self.account, "account_key": key}
            elif sas := fields.get("sharedaccesssignature"):
                credential = sas
            return BlobServiceClient(self._endpoint(), credential=credential, **options)
        return BlobServiceClient.from_connection_string(text, **options)

    async def aclose(self) -> None:
        """Close the client (a later call creates a new one); runs to completion."""
        with anyio.CancelScope(shield=True):
            async with self._client_lock:
                service, self._service, self._containers = self._service, None, None
                if service is not None:
                    with contextlib.suppress(Exception):
                        await service.close()

    async def _blob(self, full_key: str) -> BlobClient:
        return (await self._client()).get_blob_client(full_key)

    # --- requests ---

    def _retry_hook(self, what: str, blob: str | None) -> Callable[..., None]:
        def hook(*, retry_count: int, error: BaseException | None = None, **rest: Any) -> None:
            response = rest.get("response")
            cause = (
                f"{type(error).__name__}: {one_line(error)}"  # no SAS: see one_line
                if error is not None
                else f"HTTP {getattr(response, 'status_code', '?')}"
            )
            _log.warning(
                "azure_request_retry",
                operation=what,
                container=self.container,
                blob=blob,
                attempt=retry_count + 1,
                error=cause,
            )
            if (observer := retry_observer.get()) is not None:
                # a metric label: "azure: stage block", not one label per block number
                observer("azure: " + _NUMBERED.sub("", what))

        return hook

    async def _call(
        self,
        what: str,
        request: Callable[..., Awaitable[_T]],
        *args: Any,
        blob: str | None = None,
        device: str | None = None,
        url: str | None = None,
        exists: type[StorageError] = StorageExistsError,
        failed: Callable[[BaseException], None] | None = None,
        **kwargs: Any,
    ) -> _T:
        """``await request(*args, **kwargs)`` with the SDK's retries (and our retry
        hook); failures become ``StorageError`` naming ``what``, the error code, the
        container and ``blob`` (a full key). ``failed`` is told of the final failure."""
        if url is None:
            url = self._url(blob) if blob is not None else self.url
        try:
            return await request(*args, retry_hook=self._retry_hook(what, blob), **kwargs)
        except FAILURES as exc:
            if failed is not None:
                failed(exc)
            raise translate_azure_error(
                exc,
                what=what,
                container=self.container,
                blob=blob,
                url=url,
                device=device,
                exists=exists,
            ) from exc
