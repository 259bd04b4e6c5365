"""Azure failures, classified (ambiguous?) and translated into vdistream's
``StorageError`` tree (pure): not found, exists (a conditional creation refused), full,
integrity, and the rest. Messages are one line: the SDK's own messages carry request
ids and XML bodies on further lines, which are dropped."""

from __future__ import annotations

import re
import socket

import aiohttp
from azure.core.exceptions import (
    AzureError,
    ClientAuthenticationError,
    HttpResponseError,
    ServiceRequestError,
    ServiceRequestTimeoutError,
)

from vdistream.errors import (
    StorageError,
    StorageExistsError,
    StorageFullError,
    StorageIntegrityError,
    StorageNotFoundError,
)

__all__ = ("error_code", "is_ambiguous", "one_line", "probe_reason", "translate_azure_error")

#: a URL's query (``_URL_QUERY``) and a ``sig=`` value anywhere (``_SIGNATURE``)
_URL_QUERY = re.compile(r"(\bhttps?://[^\s'\"?#<>]*)\?[^\s'\"#<>]*", re.IGNORECASE)
_SIGNATURE = re.compile(r"(\bsig=)[^&\s'\"<>]+", re.IGNORECASE)

_NOT_FOUND = frozenset({"BlobNotFound", "ContainerNotFound", "ResourceNotFound"})
_EXISTS = frozenset({"BlobAlreadyExists", "ConditionNotMet"})
_FULL = frozenset({"RequestBodyTooLarge", "BlockCountExceedsLimit", "AccountIsDisabled"})
_INTEGRITY = frozenset({"Md5Mismatch", "Crc64Mismatch", "InvalidBlockList"})
_DENIED = frozenset(
    {
        "AuthenticationFailed",
        "AuthorizationFailure",
        "AuthorizationPermissionMismatch",
        "InsufficientAccountPermissions",
    }
)


def error_code(exc: BaseException) -> str | None:
    """The storage service's error code (``BlobNotFound``), or None."""
    if not isinstance(exc, HttpResponseError):
        return None
    code = getattr(exc, "error_code", None)  # set by the storage SDK's error handling
    text = getattr(code, "value", code)  # an enum for the codes the SDK knows
    if text:
        return str(text)
    headers = getattr(exc.response, "headers", None) or {}
    header = headers.get("x-ms-error-code")
    return str(header) if header else None


def _status(exc: BaseException) -> int | None:
    return exc.status_code if isinstance(exc, HttpResponseError) else None


def one_line(text: object) -> str:
    """The first line of ``text``, with every URL's query and any ``sig=`` value left
    out: a SAS travels in the query of each request (its ``sig`` is the credential), and
    aiohttp's ``ClientResponseError`` (a malformed answer: an endpoint that speaks no
    HTTP) names the request's whole URL."""
    line = str(text).strip().splitlines()[0] if str(text).strip() else ""
    return _SIGNATURE.sub(r"\1<redacted>", _URL_QUERY.sub(r"\1?...", line))


def is_ambiguous(exc: BaseException) -> bool:
    """Whether a failed request may have been carried out all the same: its answer was
    lost, or it failed with a 5xx. A 4xx answer, or a request never sent (refused
    connection, name lookup, connect timeout, a request that could not be signed), is
    not ambiguous.

    ``ServiceRequestError`` alone proves nothing: azure-core raises it for every aiohttp
    ``ClientError`` that is not a ``ClientResponseError``, a connection reset or a
    server that hung up after the request went out (``ClientOSError``,
    ``ServerDisconnectedError``) included. Only a failed connect proves that nothing
    was sent (as ``vdistream.storage.s3.errors.is_ambiguous`` decides)."""
    if isinstance(exc, ClientAuthenticationError) and exc.response is None:
        return False  # the SDK could not sign the request (AzureSigningError): not sent
    if isinstance(exc, HttpResponseError):
        status = _status(exc)
        return status is None or status >= 500
    if isinstance(exc, ServiceRequestTimeoutError):
        return False  # the connection was never made
    if isinstance(exc, ServiceRequestError):
        cause = exc.inner_exception or exc.__cause__
        return not isinstance(cause, aiohttp.ClientConnectorError | socket.gaierror)
    return True  # a lost or undecodable answer; unproven either way counts as maybe


def translate_azure_error(
    exc: BaseException,
    *,
    what: str,
    container: str,
    blob: str | None,
    url: str | None,
    device: str | None = None,
    exists: type[StorageError] = StorageExistsError,
) -> StorageError:
    """The ``StorageError`` for a failed request (after the SDK's retries); the message
    names the operation, the error code, the container and the blob. ``exists`` is the
    class a refused condition becomes (a read's ``If-Match`` means the object changed:
    ``StorageIntegrityError``). Raise it ``from exc``."""
    where = f"container {container!r}" + (f", blob {blob!r}" if blob is not None else "")
    cls: type[StorageError] = StorageError
    if isinstance(exc, HttpResponseError):
        code, status = error_code(exc), _status(exc)
        for codes, kind in (
            (_NOT_FOUND, StorageNotFoundError),
            (_EXISTS, exists),
            (_FULL, StorageFullError),
            (_INTEGRITY, StorageIntegrityError),
        ):
            if code in codes:
                cls = kind
                break
        else:
            if status == 404:
                cls = StorageNotFoundError
        reason = f"Azure {code or 'error'}" + (f" (HTTP {status})" if status else "")
        message = one_line(exc.reason or "") if code else one_line(exc.message)
        if message and message != code:
            reason += f": {message}"
    elif isinstance(exc, AzureError):
        reason = f"{type(exc).__name__}: {one_line(exc.message)}"
    else:
        reason = f"{type(exc).__name__}: {one_line(exc)}"
    return cls(f"{what} failed: {reason}; {where}", url=url, device=device)


def probe_reason(exc: StorageError, endpoint: str, doing: str = "reach") -> str:
    """A probe failure in the user's terms."""
    cause = exc.__cause__
    if isinstance(cause, HttpResponseError):
        code, status = error_code(cause), _status(cause)
        if code == "ContainerNotFound" or (doing == "reach" and status == 404):
            return "no such container"
        if code == "ResourceNotFound":
            return "no such account"
        if isinstance(cause, ClientAuthenticationError) or code in _DENIED or status == 403:
            reason = "access denied: the account key, SAS or connection string is not accepted"
            if code == "AuthorizationPermissionMismatch" or doing == "write":
                reason = "access denied (cannot write)"
            return reason
        http = f" (HTTP {status})" if status else ""
        return f"cannot {doing} it: Azure {code or 'error'}{http}"
    if cause is not None:
        where = one_line(endpoint)
        return f"cannot connect to {where}: {type(cause).__name__}: {one_line(cause)}"
    return str(exc).removesuffix(f" ({exc.url})") if exc.url else str(exc)
