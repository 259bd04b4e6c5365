"""``observe_retries``: the hook through which S3 retries reach an observer (the
daemon's metrics). Light on purpose: importing it loads no AWS library."""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable, Iterator

__all__ = ("observe_retries",)

#: the callback of the innermost ``observe_retries``; tasks inherit it when started
retry_observer: contextvars.ContextVar[Callable[[str], None] | None] = contextvars.ContextVar(
    "vdistream_s3_retry_observer", default=None
)


@contextlib.contextmanager
def observe_retries(callback: Callable[[str], None]) -> Iterator[None]:
    """Within this context (and the tasks started in it), every retried S3 request
    calls ``callback(operation)``, ``operation`` naming the request as its log event
    ``s3_request_retry`` does. No global registry; outside any, retries call nothing."""
    token = retry_observer.set(callback)
    try:
        yield
    finally:
        retry_observer.reset(token)
