"""A small client of the control API, and ``submit_backup_to_daemon`` for
``vdistream backup --daemon``.

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

import json
import os
import sys
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from types import TracebackType
from typing import Any, Self, TextIO

import aiohttp
import anyio

from vdistream.errors import VdistreamError

__all__ = (
    "DEFAULT_SOCKET",
    "SOCKET_ENV",
    "ApiClient",
    "DaemonError",
    "DaemonUnreachableError",
    "absolute_target",
    "default_socket_path",
    "submit_backup_to_daemon",
)

SOCKET_ENV = "VDISTREAM_SOCKET"
DEFAULT_SOCKET = "/run/vdistream/vdistream.sock"
MIB = 1024 * 1024


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
            return str(load_settings(path, env).service.socket_path)
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

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        session, self._session = self._session, None
        if session is not None:
            with anyio.CancelScope(shield=True):
                await session.close()

    def _http(self) -> aiohttp.ClientSession:
        if self._session is None:
            raise RuntimeError("use `async with ApiClient(...)`")
        return self._session

    def _unreachable(self, exc: BaseException) -> DaemonUnreachableError:
        return DaemonUnreachableError(
            0,
            "unreachable",
            f"cannot reach the vdistream daemon at {self.where}: {exc} "
            "(is `vdistream serve` running? --socket or VDISTREAM_SOCKET names the socket)",
        )

    async def request(
        self,
        method: str,
        path: str,
        *,
        body: Any = None,
        params: Mapping[str, str] | None = None,
    ) -> Any:
        """One request; the decoded JSON answer (``DaemonError`` for 4xx/5xx)."""
        try:
            async with self._http().request(
                method,
                self.base_url + path,
                json=body,
                params=params,
            ) as response:
                text = await response.text()
                if response.status >= 400:
                    raise _error_of(response.status, text)
                if response.content_type == "application/json":
                    return json.loads(text)
                return text
        except aiohttp.ClientConnectionError as exc:
            raise self._unreachable(exc) from exc

    async def health(self) -> dict[str, Any]:
        result: dict[str, Any] = await self.request("GET", "/v1/health")
        return result

    async def ready(self) -> dict[str, Any]:
        result: dict[str, Any] = await self.request("GET", "/v1/ready")
        return result

    async def databases(self) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = (await self.request("GET", "/v1/databases"))["databases"]
        return result

    async def submit(self, body: Mapping[str, Any]) -> dict[str, Any]:
        """``POST /v1/jobs``: the accepted job."""
        result: dict[str, Any] = await self.request("POST", "/v1/jobs", body=dict(body))
        return result

    async def jobs(self, **filters: str) -> list[dict[str, Any]]:
        """``GET /v1/jobs`` (filters: state, database, kind, limit)."""
        result: list[dict[str, Any]] = (await self.request("GET", "/v1/jobs", params=filters))[
            "jobs"
        ]
        return result

    async def job(self, job_id: str) -> dict[str, Any]:
        result: dict[str, Any] = await self.request("GET", f"/v1/jobs/{job_id}")
        return result

    async def abort(self, job_id: str, reason: str | None = None) -> dict[str, Any]:
        body = {"reason": reason} if reason else None
        result: dict[str, Any] = await self.request("POST", f"/v1/jobs/{job_id}/abort", body=body)
        return result

    async def metrics(self) -> str:
        result: str = await self.request("GET", "/metrics")
        return result

    async def events(self, job_id: str, *, interval: float = 1.0) -> AsyncIterator[dict[str, Any]]:
        """The job's progress events (``{"event": ..., "job": {...}}``) until it ends."""
        try:
            async with self._http().get(
                f"{self.base_url}/v1/jobs/{job_id}/events",
                params={"interval": str(interval)},
                timeout=aiohttp.ClientTimeout(total=None, sock_connect=5, sock_read=None),
            ) as response:
                if response.status >= 400:
                    raise _error_of(response.status, await response.text())
                async for line in response.content:
                    if line.strip():
                        yield json.loads(line)
        except aiohttp.ClientConnectionError as exc:
            raise self._unreachable(exc) from exc

    async def wait(
        self, job_id: str, *, interval: float = 1.0, progress: TextIO | None = None
    ) -> dict[str, Any]:
        """Follow the job until it ends (a progress line on ``progress`` per event);
        its final form."""
        final: dict[str, Any] | None = None
        async for event in self.events(job_id, interval=interval):
            final = event["job"]
            if progress is not None:
                progress.write(progress_line(final) + "\n")
                progress.flush()
        return final if final is not None else await self.job(job_id)


def _error_of(status: int, text: str) -> DaemonError:
    try:
        error = json.loads(text)["error"]
        return DaemonError(status, str(error["code"]), str(error["message"]))
    except (ValueError, KeyError, TypeError):
        return DaemonError(status, "http_error", text.strip()[:200] or f"HTTP {status}")


def progress_line(job: Mapping[str, Any]) -> str:
    """One line about a job: state, bytes, rate, bytes per device."""
    progress = job.get("progress") or {}
    devices = progress.get("devices") or []
    line = f"job {job['id']} ({job['kind']} {job['database']}): {job['state']}"
    if devices:
        per_device = " ".join(f"{d['bytes'] / MIB:.0f}" for d in devices)
        line += (
            f", {progress.get('bytes', 0) / MIB:,.1f} MiB at "
            f"{progress.get('rate', 0) / 1e6:,.1f} MB/s (MiB per device: {per_device})"
        )
    if job.get("queue_position") is not None:
        line += f", position {job['queue_position'] + 1} in the queue"
    if job.get("error"):
        line += f": {job['error']}"
    return line


async def submit_backup_to_daemon(
    socket_path: str | None,
    database: str | None,
    source: str | None,
    dest: str | None,
    *,
    backup_id: str | None = None,
    verify: bool | None = None,
    wait: bool = True,
    json_output: bool = False,
    stdout: TextIO | None = None,
    stderr: TextIO | None = None,
) -> int:
    """``vdistream backup --daemon``: have the daemon back up a configured database.

    ``database`` names it; or ``source`` and ``dest`` (as given to ``vdistream
    backup``) must match one configured database's URL and destination (relative
    paths are taken from the current directory). ``socket_path`` ``None`` is
    ``default_socket_path()``. With ``wait`` the job is followed until it ends
    (progress on ``stderr`` when it is a terminal) and an interruption aborts it in the
    daemon; on success ``stdout`` gets the bare backup id and ``stderr`` the summary
    (logical and stored bytes). Without ``wait`` ``stdout`` gets the job's id and the
    command returns at once. ``json_output``: the job as one JSON object on ``stdout``.

    Exit code: 0 when the backup succeeded (or, without ``wait``, was accepted); 1 when
    it failed or was aborted, the queue is full, the daemon is shutting down or cannot
    be reached; 2 when the request is invalid (an unknown database, no configured
    database for that source and destination).
    """
    from vdistream.cli.output import byte_counts

    out = stdout if stdout is not None else sys.stdout
    err = stderr if stderr is not None else sys.stderr
    body: dict[str, Any] = {"kind": "backup"}
    if database:
        body["database"] = database
    else:
        if not source or not dest:
            err.write("vdistream: give a database name, or the source and the destination\n")
            return 2
        body["source"] = _absolute_source(source)
        body["destination"] = _absolute_dest(dest)
    if backup_id:
        body["backup_id"] = backup_id
    if verify is not None:
        body["verify"] = verify
    path = socket_path or default_socket_path()
    try:
        async with ApiClient(path) as client:
            job = await client.submit(body)
            if not wait:
                _print_job(out, job, json_output, job["id"])
                err.write(f"job {job['id']} queued for database {job.get('database')}\n")
                return 0
            try:
                final = await client.wait(
                    job["id"], progress=None if json_output or not err.isatty() else err
                )
            except anyio.get_cancelled_exc_class():
                with anyio.CancelScope(shield=True), anyio.move_on_after(5):
                    await client.abort(job["id"], "the client was interrupted")
                raise
    except DaemonError as exc:
        err.write(f"vdistream: {exc}\n")
        return 2 if exc.status in (400, 404, 422) else 1
    result = final.get("result") or {}
    if final["state"] == "succeeded":
        _print_job(out, final, json_output, str(final["backup_id"]))
        err.write(
            f"backup {final['backup_id']} complete: "
            f"{byte_counts(result.get('logical_bytes'), result.get('bytes'))} on "
            f"{len(result.get('devices') or [])} devices in {result.get('seconds', 0):.1f} s "
            f"(job {final['id']}); manifest {result.get('manifest')}\n"
        )
        err.flush()
        return 0
    _print_job(out, final, json_output, "")
    err.write(f"vdistream: backup failed ({final['state']}): {final.get('error')}\n")
    return 1


def _print_job(out: TextIO, job: Mapping[str, Any], json_output: bool, text: str) -> None:
    if json_output:
        out.write(json.dumps(job, default=str) + "\n")
    elif text:
        out.write(text + "\n")
    out.flush()


def _absolute_source(source: str) -> str:
    if source.startswith("sqlite:"):
        rest = source[len("sqlite:") :]
        path = rest[2:] if rest.startswith("//") else rest
        return f"sqlite://{os.path.abspath(path)}"
    return source


def absolute_target(target: str) -> str:
    """A restore target as the daemon must receive it: a relative path resolved against
    this process's directory; a URL (``postgresql://...``, ``sqlite:...``) or a
    ``cmd:`` command unchanged, except a relative ``sqlite:`` path."""
    if target.startswith("sqlite:"):
        return _absolute_source(target)
    if "://" in target or target.startswith(("cmd:", "postgresql:", "postgres:")):
        return target
    return os.path.abspath(target)


def _absolute_dest(dest: str) -> str:
    if "://" in dest or ("/" not in dest and not Path(dest).exists()):
        return dest  # a URL, or a destination's name
    return os.path.abspath(dest)
