"""A small client of the daemon's control API.

::

    async with ApiClient("/run/vdistream/vdistream.sock") as client:
        job = await client.submit({"kind": "backup", "database": "app"})
        async for event in client.events(job["id"]):
            ...
        final = await client.job(job["id"])

``ApiClient(socket_path)`` talks over the Unix socket; ``ApiClient(base_url=
"http://127.0.0.1:8450", token=...)`` over the loopback TCP listener. An error answer
raises ``DaemonError`` carrying the HTTP status, the API's error ``code`` and its
message; a daemon that cannot be reached raises ``DaemonUnreachableError``.

``default_socket_path()``: ``$VDISTREAM_SOCKET``, else the ``service.socket`` of the
settings file (``$VDISTREAM_CONFIG`` or ``/etc/vdistream/vdistream.toml``) when it can
be read, else ``/run/vdistream/vdistream.sock``.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import AsyncIterator, Callable, Mapping
from pathlib import Path
from typing import Any, Self, cast

import aiohttp
import anyio

from vdistream.errors import VdistreamError

__all__ = (
    "DEFAULT_SOCKET",
    "JSON",
    "SOCKET_ENV",
    "ApiClient",
    "DaemonError",
    "DaemonUnreachableError",
    "default_socket_path",
)

SOCKET_ENV = "VDISTREAM_SOCKET"
DEFAULT_SOCKET = "/run/vdistream/vdistream.sock"
#: a JSON object as the API sends it
JSON = dict[str, Any]


class DaemonError(VdistreamError):
    """The daemon refused a request: ``status`` (HTTP), ``code`` (the API's), message."""

    def __init__(self, status: int, code: str, message: str) -> None:
        self.status = status
        self.code = code
        self.message = message
        super().__init__(f"{message} ({code}, HTTP {status})" if status else message)


class DaemonUnreachableError(DaemonError):
    """Nothing answers at the socket or URL."""


def default_socket_path(
    config: str | os.PathLike[str] | None = None, env: Mapping[str, str] = os.environ
) -> str:
    """Where the daemon's socket is (module doc)."""
    if env.get(SOCKET_ENV):
        return env[SOCKET_ENV]
    from vdistream.service.settings import DEFAULT_SETTINGS_PATH, SettingsError, load_settings

    path = Path(config) if config else Path(env.get("VDISTREAM_CONFIG") or DEFAULT_SETTINGS_PATH)
    if path.is_file():
        try:
            return str(load_settings(path, env, check_passwords=False).service.socket_path)
        except (SettingsError, OSError):
            pass
    return DEFAULT_SOCKET


class ApiClient:
    """The control API over a Unix socket (or loopback TCP with a token)."""

    def __init__(
        self,
        socket_path: str | os.PathLike[str] | None = None,
        *,
        base_url: str | None = None,
        token: str | None = None,
        timeout: float = 30.0,
    ) -> None:
        if (socket_path is None) == (base_url is None):
            raise ValueError("give either a socket path or a base URL")
        self.socket_path = None if socket_path is None else os.fspath(socket_path)
        self.base_url = (base_url or "http://vdistream").rstrip("/")
        self._token = token
        self._timeout = timeout
        self._session: aiohttp.ClientSession | None = None

    @property
    def where(self) -> str:
        return f"unix:{self.socket_path}" if self.socket_path else self.base_url

    async def __aenter__(self) -> Self:
        connector: aiohttp.BaseConnector
        if self.socket_path is not None:
            connector = aiohttp.UnixConnector(path=self.socket_path)
        else:
            connector = aiohttp.TCPConnector()
        headers = {"Authorization": f"Bearer {self._token}"} if self._token else {}
        self._session = aiohttp.ClientSession(
            connector=connector,
            headers=headers,
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=5, sock_read=self._timeout),
        )
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        session, self._session = self._session, None
        if session is not None:
            with anyio.CancelScope(shield=True):
                await session.close()

    @contextlib.asynccontextmanager
    async def _answer(self, method: str, path: str, **kwargs: Any) -> AsyncIterator[Any]:
        """The answer to one request while it is read: an error answer raises
        ``DaemonError``, a connection that fails (also while reading)
        ``DaemonUnreachableError``."""
        if self._session is None:
            raise RuntimeError("use `async with ApiClient(...)`")
        try:
            async with self._session.request(method, self.base_url + path, **kwargs) as answer:
                if answer.status >= 400:
                    raise _error_of(answer.status, await answer.text())
                yield answer
        except aiohttp.ClientConnectionError as exc:
            raise DaemonUnreachableError(
                0,
                "unreachable",
                f"cannot reach the vdistream daemon at {self.where}: {exc} (is `vdistream "
                "serve` running? --socket or VDISTREAM_SOCKET names the socket)",
            ) from exc

    async def request(
        self,
        method: str,
        path: str,
        *,
        body: Any = None,
        params: Mapping[str, str] | None = None,
    ) -> Any:
        """One request; the decoded JSON answer (``DaemonError`` for 4xx/5xx)."""
        async with self._answer(method, path, json=body, params=params) as answer:
            text = await answer.text()
            return json.loads(text) if answer.content_type == "application/json" else text

    async def _json(self, method: str, path: str, **kwargs: Any) -> JSON:
        return cast(JSON, await self.request(method, path, **kwargs))

    async def health(self) -> JSON:
        return await self._json("GET", "/v1/health")

    async def ready(self) -> JSON:
        return await self._json("GET", "/v1/ready")

    async def databases(self) -> list[JSON]:
        return cast(list[JSON], (await self._json("GET", "/v1/databases"))["databases"])

    async def submit(self, body: Mapping[str, Any]) -> JSON:
        """``POST /v1/jobs``: the accepted job."""
        return await self._json("POST", "/v1/jobs", body=dict(body))

    async def jobs(self, **filters: str) -> list[JSON]:
        """``GET /v1/jobs`` (filters: state, database, kind, limit)."""
        return cast(list[JSON], (await self._json("GET", "/v1/jobs", params=filters))["jobs"])

    async def job(self, job_id: str) -> JSON:
        return await self._json("GET", f"/v1/jobs/{job_id}")

    async def abort(self, job_id: str, reason: str | None = None) -> JSON:
        body = {"reason": reason} if reason else None
        return await self._json("POST", f"/v1/jobs/{job_id}/abort", body=body)

    async def throttle(self, job_id: str, rate: int | None) -> JSON:
        """``POST /v1/jobs/{id}/throttle``: the job with its new bandwidth limit
        (``rate`` bytes per second, ``None``: none)."""
        return await self._json("POST", f"/v1/jobs/{job_id}/throttle", body={"max_rate": rate})

    async def global_rate(self, rate: int | None = None, *, change: bool = False) -> JSON:
        """``GET /v1/throttle``, or with ``change`` ``POST`` it: the daemon's global
        bandwidth limit (``{"max_rate": ...}``)."""
        if change:
            return await self._json("POST", "/v1/throttle", body={"max_rate": rate})
        return await self._json("GET", "/v1/throttle")

    async def metrics(self) -> str:
        return cast(str, await self.request("GET", "/metrics"))

    async def events(self, job_id: str, *, interval: float = 1.0) -> AsyncIterator[JSON]:
        """The job's progress events (``{"event": ..., "job": {...}}``) until it ends."""
        # the stream is quiet between events: no read timeout
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=5, sock_read=None)
        params = {"interval": str(interval)}
        path = f"/v1/jobs/{job_id}/events"
        async with self._answer("GET", path, params=params, timeout=timeout) as answer:
            async for line in answer.content:
                if line.strip():
                    yield json.loads(line)

    async def wait(
        self,
        job_id: str,
        *,
        interval: float = 1.0,
        on_update: Callable[[JSON], None] | None = None,
    ) -> JSON:
        """Follow the job until it ends (``on_update`` gets each new form of it); its
        final form."""
        final: JSON | None = None
        async for event in self.events(job_id, interval=interval):
            final = event["job"]
            if on_update is not None:
                on_update(final)
        return final if final is not None else await self.job(job_id)


def _error_of(status: int, text: str) -> DaemonError:
    try:
        error = json.loads(text)["error"]
        return DaemonError(status, str(error["code"]), str(error["message"]))
    except (ValueError, KeyError, TypeError):
        return DaemonError(status, "http_error", text.strip()[:200] or f"HTTP {status}")
