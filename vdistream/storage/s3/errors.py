"""S3 failures, classified (transient? ambiguous?) and translated into vdistream's
``StorageError`` tree (pure): not found, exists (a failed precondition; a read whose
object changed is ``StorageIntegrityError``), full, integrity, and the rest."""

from __future__ import annotations

import asyncio
import socket

import aiohttp
from botocore.exceptions import (
    ClientError,
    ConnectTimeoutError,
    EndpointConnectionError,
    HTTPClientError,
    IncompleteReadError,
)
from botocore.exceptions import ConnectionError as BotoConnectionError

from vdistream.errors import (
    StorageError,
    StorageExistsError,
    StorageFullError,
    StorageIntegrityError,
    StorageNotFoundError,
)

__all__ = (
    "ChangedError",
    "ShortBody",
    "is_ambiguous",
    "is_transient",
    "probe_reason",
    "translate_s3_error",
)

_TRANSIENT_STATUS = frozenset({429, 500, 502, 503, 504})
_TRANSIENT_CODES = frozenset(
    (  # noqa: SIM905 (a list of words reads better as words)
        "SlowDown Throttling ThrottlingException ThrottledException RequestThrottled"
        " RequestLimitExceeded TooManyRequests RequestTimeout RequestTimeoutException"
        " InternalError ServiceUnavailable ConditionalRequestConflict"
    ).split()
)
_NOT_FOUND_CODES = frozenset({"NoSuchKey", "404", "NotFound", "NoSuchUpload"})
_PRECONDITION_CODES = frozenset({"PreconditionFailed", "412"})
_FULL_CODES = frozenset({"EntityTooLarge", "QuotaExceeded", "XMinioStorageFull"})
_INTEGRITY_CODES = frozenset(
    {"BadDigest", "InvalidDigest", "XAmzContentSHA256Mismatch", "InvalidChecksum"}
)


class ShortBody(Exception):
    """A ranged GET returned fewer bytes than asked: retried like a dropped connection."""


class ChangedError(StorageIntegrityError):
    """The object changed (its ETag) while a source was reading it."""


def _details(exc: ClientError) -> tuple[str, int | None, str]:
    error = exc.response.get("Error", {})
    code = str(error.get("Code") or "Unknown")
    status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    return code, status, str(error.get("Message") or "")


def is_transient(exc: BaseException) -> bool:
    """Whether a failed request is worth retrying (throttling, 5xx, broken connection)."""
    if isinstance(exc, ClientError):
        code, status, _ = _details(exc)
        return code in _TRANSIENT_CODES or status in _TRANSIENT_STATUS
    return isinstance(
        exc,
        BotoConnectionError
        | HTTPClientError
        | IncompleteReadError
        | aiohttp.ClientError
        | asyncio.TimeoutError
        | ShortBody,
    )


def is_ambiguous(exc: BaseException) -> bool:
    """Whether a failed request may have been carried out by the server all the same:
    its answer was lost (connection reset or timed out after sending) or it failed with
    a 5xx. A 4xx answer, or a connection that was never made, is not ambiguous."""
    if isinstance(exc, ClientError):
        _, status, _ = _details(exc)
        return status is None or status >= 500
    if isinstance(exc, ConnectTimeoutError):
        return False
    if isinstance(exc, EndpointConnectionError):
        # aiobotocore reports a reset of an established connection this way too; only
        # a failed connect (or name lookup) proves that nothing was sent
        cause = getattr(exc, "kwargs", {}).get("error")
        return not isinstance(cause, aiohttp.ClientConnectorError | socket.gaierror)
    return not isinstance(exc, aiohttp.ClientConnectorError | socket.gaierror)


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
        code, status, message = _details(exc)
        for codes, kind in (
            (_NOT_FOUND_CODES, StorageNotFoundError),
            (_PRECONDITION_CODES, precondition),
            (_FULL_CODES, StorageFullError),
            (_INTEGRITY_CODES, StorageIntegrityError),
        ):
            if code in codes:
                cls = kind
                break
        reason = f"S3 {code}" + (f" (HTTP {status})" if status else "")
        if message:
            reason += f": {message}"
    else:
        reason = f"{type(exc).__name__}: {exc}"
    return cls(f"{what} failed{tries}: {reason}; {where}", url=url, device=device)


def probe_reason(exc: StorageError, endpoint: str, doing: str = "reach") -> str:
    """A probe failure in the user's terms."""
    cause = exc.__cause__
    if isinstance(cause, ClientError):
        code, status, _ = _details(cause)
        if code in ("NoSuchBucket", "404", "NotFound") or (doing == "reach" and status == 404):
            return "no such bucket"
        if code in ("AccessDenied", "403", "Forbidden") or status == 403:
            return "access denied" + (" (cannot write)" if doing == "write" else "")
        return f"cannot {doing} it: S3 {code}" + (f" (HTTP {status})" if status else "")
    if cause is not None:
        return f"cannot connect to {endpoint}: {type(cause).__name__}: {cause}"
    return str(exc)
