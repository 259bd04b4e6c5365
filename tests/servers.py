"""What the test runs' own servers (moto's S3, Azurite) share: a free loopback port,
and the process environment set for a session and put back after it."""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Iterable, Iterator, Mapping


def free_port() -> int:
    """A loopback port nothing listens on now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@contextlib.contextmanager
def environment(set_: Mapping[str, str], unset: Iterable[str]) -> Iterator[None]:
    """``os.environ`` with ``set_`` set and ``unset`` removed for the block, then as
    it was (a session fixture's: monkeypatch is function-scoped)."""
    names = (*set_, *unset)
    saved = {name: os.environ.get(name) for name in names}
    os.environ.update(set_)
    for name in unset:
        os.environ.pop(name, None)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
