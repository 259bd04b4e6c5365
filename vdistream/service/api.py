"""The control API: aiohttp on a Unix socket (and optionally loopback TCP with a token).

``ApiServer(backend, settings).start()`` sets up a ``web.AppRunner`` in the caller's
event loop, with a ``SockSite`` on the Unix socket and, when ``service.listen`` is set,
a ``TCPSite``; ``stop()`` is the runner's ``cleanup()`` (stop listening, let requests
in flight finish for ``shutdown_timeout`` seconds, cancel the rest) and removes the
socket file. The endpoints are described in ``openapi.yaml`` next to this module
(served at ``GET /v1/openapi.yaml``; ``docs/openapi.yaml`` is the same file).

Contracts
---------

* **The socket** is bound, given ``service.socket_mode`` (0600 by default), and only
  then listened on, so nobody can connect while it still has the umask's mode. A
  stale socket file (nobody listening) is replaced; a live one, or a file that is not
  a socket, is an ``ApiStartError``.
* **Authentication.** The Unix socket's mode is its access control. On the TCP
  listener every request needs ``Authorization: Bearer <token>`` (compared in
  constant time); otherwise 401.
* **Errors** are ``{"error": {"code": ..., "message": ...}}`` with a 4xx/5xx status;
  a refused request changes nothing. Codes: ``malformed_json`` (400),
  ``invalid_request`` (400: unknown field, wrong type, missing field, bad query
  parameter), ``unauthorized`` (401), ``not_found`` / ``job_not_found`` (404),
  ``method_not_allowed`` (405), ``job_finished`` (409), ``body_too_large`` (413: the
  body limit is ``MAX_BODY`` bytes), ``unsupported_media_type`` (415),
  ``unknown_database`` (422), ``queue_full`` (429, with ``Retry-After``),
  ``shutting_down`` / ``not_ready`` (503), ``internal_error`` (500).
* **Bad input is a 4xx, never a 500.** A body is read only up to ``MAX_BODY`` bytes
  (413); it must be UTF-8 (400 ``malformed_json``) and standard JSON: no ``NaN`` or
  ``Infinity``, no key twice in one object, arrays and objects nested at most
  ``MAX_DEPTH`` deep (checked by a scan that does not recurse, *before* ``json.loads``,
  which would otherwise raise ``RecursionError`` on a deep body), no string holding a
  NUL character or a lone surrogate (``invalid_request``: such a string cannot be a
  name, a path or a reason). Query numbers are ASCII decimals only (``"²".isdigit()``
  is true, ``float("\\u0661")`` is 1.0: neither is accepted), and a query parameter
  given twice is refused. A body that cannot be read (broken chunking, a
  ``Content-Encoding`` that does not decode) is a 400 too. Whatever else escapes a
  handler is a bug: answered as a JSON 500 (``internal_error``) and logged with its
  traceback (``api_internal_error``). Only what is not HTTP at all (a malformed
  request line or header, a ``Content-Encoding`` aiohttp has no decoder for) gets
  aiohttp's own plain-text 400, and an ``Expect`` other than ``100-continue`` its
  417, before the application sees the request.
* **Bandwidth** (``vdistream.throttle``): ``POST /v1/jobs/{id}/throttle`` with
  ``{"max_rate": RATE}`` sets a queued or running job's own limit and answers its view
  (``max_rate`` in bytes per second); ``POST /v1/throttle`` sets the daemon's global
  limit (all running jobs together, until the next reload) and ``GET /v1/throttle``
  reads it. ``RATE`` is bytes per second as ``parse_rate`` reads it: an integer or a
  string (``"200M"``, ``"1.5G"``, ``"10MB"``); ``0``, ``"off"`` or ``null``: no limit.
  A rate that is no rate is a 400 ``invalid_request`` naming it.
* **Progress streams** (``GET /v1/jobs/{id}/events``) are newline-delimited JSON, or
  server-sent events with ``Accept: text/event-stream`` or ``?format=sse``: one
  ``{"event": "progress" | "end", "job": {...}}`` per interval and state change, the
  last one ``end`` with the job's final form.
"""

from __future__ import annotations

import errno
import hmac
import json
import os
import re
import socket
import stat
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from importlib import resources
from pathlib import Path
from typing import Any, Protocol, TypeVar

import anyio
import anyio.to_thread
from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from vdistream._version import __version__
from vdistream.errors import VdistreamError
from vdistream.log import get_logger
from vdistream.service.jobs import (
    InvalidRequestError,
    JobRequest,
    QueueFullError,
    ServiceError,
)
from vdistream.service.manager import JobManager
from vdistream.service.metrics import CONTENT_TYPE
from vdistream.service.settings import ServiceSettings, Settings
from vdistream.service.state import JobState, JobType
from vdistream.throttle import parse_rate

__all__ = ("MAX_BODY", "MAX_DEPTH", "ApiBackend", "ApiServer", "ApiStartError", "create_app")

log = get_logger(__name__)

#: The largest request body accepted (bytes); larger ones get 413.
MAX_BODY = 64 * 1024
#: The deepest nesting of arrays and objects a JSON body may have (no request needs 3).
MAX_DEPTH = 32
_LIST_LIMIT = 1000
#: A JSON string (its closing quote optional, so that an unterminated one ends the
#: scan instead of making it quadratic) or a bracket: what ``_json_depth`` looks at.
_JSON_TOKEN = re.compile(rb'"(?:[^"\\]|\\.)*"?|[\[\]{}]', re.DOTALL)
#: What no string of a request may hold: NUL (no path or name has it) and lone
#: surrogates (not Unicode text: they cannot be encoded, logged or stored as UTF-8).
_BAD_CHARS = re.compile("[\x00\ud800-\udfff]")
#: Query numbers: ASCII decimals only.
_INTEGER = re.compile(r"[0-9]{1,9}")
_DECIMAL = re.compile(r"[0-9]{1,9}(?:\.[0-9]{1,9})?")
_E = TypeVar("_E", JobState, JobType)


class ApiStartError(VdistreamError):
    """The API cannot listen where the settings say."""


class _MalformedJSONError(ServiceError, status=400, code="malformed_json"):
    """The body is not UTF-8 JSON."""


class _UnsupportedMediaTypeError(ServiceError, status=415, code="unsupported_media_type"):
    """The body is not declared as JSON."""


class _NotReadyError(ServiceError, status=503, code="not_ready"):
    """The service is starting or shutting down."""


class ApiBackend(Protocol):
    """What the API needs from the service it controls."""

    @property
    def manager(self) -> JobManager: ...

    @property
    def settings(self) -> Settings: ...

    @property
    def ready(self) -> bool: ...

    async def metrics_text(self) -> bytes: ...

    def next_fires(self) -> dict[str, dict[str, datetime]]: ...


_BACKEND: web.AppKey[ApiBackend] = web.AppKey("backend", ApiBackend)

_STATUS_CODES = {
    400: "invalid_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    406: "not_acceptable",
    411: "length_required",
    413: "body_too_large",
    415: "unsupported_media_type",
}


def _error(status: int, code: str, message: str, **headers: str) -> web.Response:
    return web.json_response(
        {"error": {"code": code, "message": message}}, status=status, headers=headers or None
    )


def _shown_path(request: web.Request) -> str:
    """The path as the client sent it (still percent-encoded: a decoded ``%0A`` would
    break the message's one line), at most 200 characters."""
    path = request.raw_path.partition("?")[0]
    return path if len(path) <= 200 else path[:200] + "..."


def _reason(exc: BaseException) -> str:
    """One line from aiohttp's payload errors (``RequestPayloadError`` wraps an
    ``HttpProcessingError`` whose ``str`` spans lines: ``400, message:\n  ...``)."""
    cause = exc.__cause__ if isinstance(exc, web.RequestPayloadError) else exc
    if isinstance(cause, HttpProcessingError) and cause.message:
        return " ".join(str(cause.message).split())
    return " ".join(str(exc).split()) or type(exc).__name__


@web.middleware
async def _errors(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    try:
        return await handler(request)
    except QueueFullError as exc:
        return _error(exc.status, exc.code, str(exc), **{"Retry-After": "5"})
    except ServiceError as exc:
        return _error(exc.status, exc.code, str(exc))
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        code = _STATUS_CODES.get(exc.status, "http_error")
        if exc.status == 413:
            message = f"the request body is larger than {MAX_BODY} bytes"
        elif exc.status == 404:
            message = f"no such endpoint: {request.method} {_shown_path(request)}"
        elif exc.status == 405:
            allowed = exc.headers.get("Allow", "")
            message = (
                f"{request.method} is not allowed on {_shown_path(request)} (allowed: {allowed})"
            )
        else:
            message = exc.text or exc.reason
        headers = {k: v for k, v in exc.headers.items() if k in ("Allow", "WWW-Authenticate")}
        return _error(exc.status, code, message, **headers)
    except (HttpProcessingError, web.RequestPayloadError) as exc:  # an undecodable body
        return _error(400, "invalid_request", f"malformed HTTP request: {_reason(exc)}")
    except (ConnectionError, anyio.get_cancelled_exc_class()):
        raise
    except Exception as exc:  # a bug: answer 500, log it, keep serving
        log.exception("api_internal_error", method=request.method, path=request.path)
        return _error(500, "internal_error", f"internal error: {type(exc).__name__}")


@web.middleware
async def _auth(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    transport = request.transport
    sockname = transport.get_extra_info("sockname") if transport is not None else None
    if isinstance(sockname, tuple):  # TCP: the bearer token is required
        token = request.app[_BACKEND].settings.service.token
        header = request.headers.get("Authorization", "")
        scheme, _, given = header.partition(" ")
        challenge = {"WWW-Authenticate": 'Bearer realm="vdistream"'}
        if token is None:
            return _error(401, "unauthorized", "the TCP listener has no token configured")
        if scheme.lower() != "bearer" or not given.strip():
            return _error(
                401,
                "unauthorized",
                "this listener needs the header 'Authorization: Bearer <token>'",
                **challenge,
            )
        if not hmac.compare_digest(given.strip().encode(), token.reveal().encode()):
            return _error(401, "unauthorized", "the bearer token is wrong", **challenge)
    return await handler(request)


def _json_depth(raw: bytes) -> int:
    """How deeply arrays and objects nest in ``raw`` (brackets inside strings do not
    count); stops counting past ``MAX_DEPTH``. A loop, not a recursion: safe on any
    input ``json.loads`` would choke on."""
    depth = deepest = 0
    for match in _JSON_TOKEN.finditer(raw):
        token = match[0]
        if token in (b"[", b"{"):
            depth += 1
            if depth > deepest:
                deepest = depth
                if deepest > MAX_DEPTH:
                    break
        elif token in (b"]", b"}"):
            depth -= 1
    return deepest


def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON value")


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"the key {key!r} appears twice in one object")
        out[key] = value
    return out


def _check_strings(value: Any, where: str = "the body") -> None:
    """Refuse NUL and lone surrogates in any key or string (depth is bounded)."""
    if isinstance(value, str):
        if _BAD_CHARS.search(value):
            raise InvalidRequestError(
                f"{where} holds a NUL character or a lone surrogate (\\u0000, \\ud800...)"
            )
    elif isinstance(value, dict):
        for key, item in value.items():
            _check_strings(key, "a field name")
            _check_strings(item, f"{key!r}" if _BAD_CHARS.search(key) is None else where)
    elif isinstance(value, list):
        for item in value:
            _check_strings(item, where)


def _parse_json(raw: bytes) -> Any:
    """``raw`` as JSON, with the module doc's limits (``ServiceError`` otherwise)."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise _MalformedJSONError(
            f"the body is not UTF-8 text (byte {exc.start}: {exc.reason})"
        ) from None
    if _json_depth(raw) > MAX_DEPTH:
        raise InvalidRequestError(f"the JSON body is nested deeper than {MAX_DEPTH} levels")
    try:
        value = json.loads(text, parse_constant=_no_constants, object_pairs_hook=_unique_keys)
    except ValueError as exc:  # JSONDecodeError, the hooks', int digits limit
        raise _MalformedJSONError(f"the body is not valid JSON: {exc}") from None
    except RecursionError:  # not reached after _json_depth; never a 500 all the same
        raise InvalidRequestError(
            f"the JSON body is nested deeper than {MAX_DEPTH} levels"
        ) from None
    _check_strings(value)
    return value


async def _json_body(request: web.Request, *, required: bool) -> Any:
    try:
        raw = await request.read()  # 413 past client_max_size
    except (HttpProcessingError, web.RequestPayloadError) as exc:
        raise InvalidRequestError(f"the request body cannot be read: {_reason(exc)}") from None
    if not raw.strip():
        if required:
            raise InvalidRequestError("the request needs a JSON object as its body")
        return None
    if "Content-Type" in request.headers and request.content_type not in (
        "application/json",
        "text/json",
    ):
        raise _UnsupportedMediaTypeError(
            f"the body must be JSON (Content-Type: application/json), not {request.content_type}"
        )
    return _parse_json(raw)


def _query(request: web.Request, allowed: tuple[str, ...]) -> dict[str, str]:
    out: dict[str, str] = {}
    for name, value in request.query.items():
        if name not in allowed:
            known = ", ".join(allowed) or "none"
            raise InvalidRequestError(f"unknown query parameter {name[:100]!r} (known: {known})")
        if name in out:
            raise InvalidRequestError(f"the query parameter {name!r} is given twice")
        if _BAD_CHARS.search(value):
            raise InvalidRequestError(
                f"the query parameter {name!r} holds a NUL character or a lone surrogate"
            )
        out[name] = value
    return out


def _integer(query: dict[str, str], name: str, low: int, high: int, default: int) -> int:
    """An ASCII decimal query parameter from ``low`` to ``high``."""
    text = query.get(name)
    if text is None:
        return default
    if _INTEGER.fullmatch(text) is None or not low <= int(text) <= high:
        raise InvalidRequestError(f"{name} must be a whole number from {low} to {high}")
    return int(text)


# --- handlers ---------------------------------------------------------------------------


async def _health(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok", "version": __version__})


async def _ready(request: web.Request) -> web.Response:
    backend = request.app[_BACKEND]
    if not backend.ready:
        raise _NotReadyError("the service is not ready: it is starting or shutting down")
    return web.json_response({"ready": True, "jobs": backend.manager.counts})


async def _metrics(request: web.Request) -> web.Response:
    body = await request.app[_BACKEND].metrics_text()
    response = web.Response(body=body)
    response.headers["Content-Type"] = CONTENT_TYPE
    return response


async def _openapi(request: web.Request) -> web.Response:
    text = resources.files("vdistream.service").joinpath("openapi.yaml").read_text("utf-8")
    return web.Response(text=text, content_type="application/yaml")


async def _databases(request: web.Request) -> web.Response:
    backend = request.app[_BACKEND]
    settings = backend.settings
    fires = backend.next_fires()
    rows = []
    for name, database in sorted(settings.databases.items()):
        destination = settings.destinations[database.destination]
        rows.append(
            {
                "name": name,
                "kind": database.kind,
                "url": database.display_url,
                "mode": database.mode,
                "destination": destination.name,
                "destination_url": destination.display_url,
                "devices": database.devices,
                "max_jobs": database.max_jobs,
                "schedule": None if database.schedule is None else database.schedule.text,
                "schedule_diff": _text(database.schedule_diff),
                "schedule_log": _text(database.schedule_log),
                # by kind (full, diff, log), when the schedules run
                "next_backups": {
                    kind: when.astimezone(UTC).isoformat(timespec="seconds")
                    for kind, when in fires.get(name, {}).items()
                },
                "keep_last": database.retention.keep_last,
                "keep_within": None
                if database.retention.keep_within is None
                else database.retention.keep_within.total_seconds(),
                "verify_after_backup": database.verify_after_backup,
            }
        )
    return web.json_response({"databases": rows})


def _text(value: object | None) -> str | None:
    return None if value is None else str(value)


async def _submit(request: web.Request) -> web.Response:
    body = await _json_body(request, required=True)
    job_request = JobRequest.from_json(body)
    record = await request.app[_BACKEND].manager.submit(job_request)
    view = await request.app[_BACKEND].manager.view(record.id)
    return web.json_response(view, status=202, headers={"Location": f"/v1/jobs/{record.id}"})


def _choice(kind: type[_E], name: str, text: str) -> _E:
    """The ``kind`` member whose value is ``text`` (a query parameter ``name``)."""
    try:
        return kind(text)
    except ValueError:
        known = ", ".join(member.value for member in kind)
        raise InvalidRequestError(f"{name} {text!r} is not one of {known}") from None


async def _list(request: web.Request) -> web.Response:
    query = _query(request, ("state", "database", "kind", "limit"))
    states = None
    if "state" in query:
        states = [_choice(JobState, "state", part.strip()) for part in query["state"].split(",")]
    kind = _choice(JobType, "kind", query["kind"]) if "kind" in query else None
    limit = _integer(query, "limit", 1, _LIST_LIMIT, 100)
    views = await request.app[_BACKEND].manager.views(
        state=states, database=query.get("database"), kind=kind, limit=limit
    )
    return web.json_response({"jobs": views})


async def _job(request: web.Request) -> web.Response:
    _query(request, ())
    view = await request.app[_BACKEND].manager.view(request.match_info["job_id"])
    return web.json_response(view)


async def _abort(request: web.Request) -> web.Response:
    body = await _json_body(request, required=False)
    if body is not None and not isinstance(body, dict):
        raise InvalidRequestError('the body of an abort is an object: {"reason": "..."}')
    for name in body or {}:
        if name != "reason":
            raise InvalidRequestError(f"unknown field {name!r} (known: reason)")
    reason = (body or {}).get("reason", "requested through the API")
    if not isinstance(reason, str) or not reason.strip():
        raise InvalidRequestError("'reason' must be a non-empty string")
    manager = request.app[_BACKEND].manager
    job_id = request.match_info["job_id"]
    await manager.abort(job_id, reason.strip()[:500])
    return web.json_response(await manager.view(job_id), status=202)


async def _rate_body(request: web.Request) -> int | None:
    """The ``max_rate`` of a throttle request's body (module doc)."""
    body = await _json_body(request, required=True)
    for name in body if isinstance(body, dict) else ():
        if name != "max_rate":
            raise InvalidRequestError(f"unknown field {name!r} (known: max_rate)")
    if not isinstance(body, dict) or "max_rate" not in body:
        raise InvalidRequestError(
            'the body of a throttle request is an object: {"max_rate": "200M"} '
            '(bytes per second; 0 or "off": no limit)'
        )
    try:
        return parse_rate(body["max_rate"], what="max_rate")
    except VdistreamError as exc:
        raise InvalidRequestError(str(exc)) from None


async def _throttle(request: web.Request) -> web.Response:
    rate = await _rate_body(request)
    manager = request.app[_BACKEND].manager
    return web.json_response(await manager.throttle(request.match_info["job_id"], rate))


async def _global_rate(request: web.Request) -> web.Response:
    _query(request, ())
    if request.method == "POST":
        request.app[_BACKEND].manager.throttle_global(await _rate_body(request))
    return web.json_response({"max_rate": request.app[_BACKEND].manager.global_rate})


async def _events(request: web.Request) -> web.StreamResponse:
    query = _query(request, ("interval", "format"))
    interval = 1.0
    if "interval" in query:
        text = query["interval"]
        interval = float(text) if _DECIMAL.fullmatch(text) is not None else -1.0
        if not 0.1 <= interval <= 60:
            raise InvalidRequestError("interval must be a number of seconds from 0.1 to 60")
    fmt = query.get("format")
    if fmt is None:
        fmt = "sse" if "text/event-stream" in request.headers.get("Accept", "") else "ndjson"
    if fmt not in ("ndjson", "sse"):
        raise InvalidRequestError(f"format {fmt!r} is not ndjson or sse")
    manager = request.app[_BACKEND].manager
    job_id = request.match_info["job_id"]
    await manager.view(job_id)  # 404 before the stream starts
    response = web.StreamResponse(
        headers={
            "Content-Type": "text/event-stream" if fmt == "sse" else "application/x-ndjson",
            "Cache-Control": "no-cache",
        }
    )
    await response.prepare(request)
    async for view in manager.watch(job_id, interval):
        event = "end" if JobState(view["state"]).terminal else "progress"
        data = json.dumps({"event": event, "job": view}, separators=(",", ":"))
        if fmt == "sse":
            await response.write(f"event: {event}\ndata: {data}\n\n".encode())
        else:
            await response.write(data.encode() + b"\n")
    await response.write_eof()
    return response


def create_app(backend: ApiBackend) -> web.Application:
    """The aiohttp application of the control API (``MAX_BODY`` bytes per body)."""
    app = web.Application(middlewares=[_errors, _auth], client_max_size=MAX_BODY)
    app[_BACKEND] = backend
    app.router.add_get("/v1/health", _health)
    app.router.add_get("/v1/ready", _ready)
    app.router.add_get("/metrics", _metrics)
    app.router.add_get("/v1/openapi.yaml", _openapi)
    app.router.add_get("/v1/databases", _databases)
    app.router.add_post("/v1/jobs", _submit)
    app.router.add_get("/v1/jobs", _list)
    app.router.add_get("/v1/jobs/{job_id}", _job)
    app.router.add_get("/v1/jobs/{job_id}/events", _events)
    app.router.add_post("/v1/jobs/{job_id}/abort", _abort)
    app.router.add_post("/v1/jobs/{job_id}/throttle", _throttle)
    app.router.add_get("/v1/throttle", _global_rate)
    app.router.add_post("/v1/throttle", _global_rate)
    return app


# --- the server -------------------------------------------------------------------------


def _bind_unix(path: Path, mode: int) -> tuple[socket.socket, int]:
    """A bound (not yet listening) Unix socket at ``path`` with ``mode``; its inode."""
    if not path.parent.exists():
        path.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
    try:
        info = path.lstat()
    except FileNotFoundError:
        pass
    else:
        if not stat.S_ISSOCK(info.st_mode):
            raise ApiStartError(
                f"{path} exists and is not a socket; remove it or set service.socket elsewhere"
            )
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        probe.settimeout(2.0)
        try:
            probe.connect(str(path))
        except OSError as exc:
            if exc.errno not in (errno.ECONNREFUSED, errno.ENOENT):
                raise ApiStartError(f"cannot check the socket {path}: {exc}") from exc
            path.unlink(missing_ok=True)  # stale: nobody listens
        else:
            raise ApiStartError(
                f"another process listens on {path} (is a vdistream daemon already running?)"
            )
        finally:
            probe.close()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(str(path))
        # Nobody can connect before listen(), which the site calls: chmod first.
        os.chmod(path, mode)
        inode = path.stat().st_ino
    except OSError as exc:
        sock.close()
        raise ApiStartError(f"cannot listen on {path}: {exc.strerror or exc}") from exc
    sock.setblocking(False)
    return sock, inode


class ApiServer:
    """The control API's listeners in the caller's loop (module doc)."""

    def __init__(
        self, backend: ApiBackend, settings: ServiceSettings, *, shutdown_timeout: float = 3.0
    ) -> None:
        self._backend = backend
        self._settings = settings
        self._shutdown_timeout = shutdown_timeout
        self._runner: web.AppRunner | None = None
        self._inode: int | None = None
        self.addresses: list[str] = []

    @property
    def socket_path(self) -> Path:
        return self._settings.socket_path

    async def start(self) -> list[str]:
        """Listen; returns the addresses (``unix:PATH``, ``http://HOST:PORT``)."""
        runner = web.AppRunner(
            create_app(self._backend),
            handle_signals=False,
            access_log=None,
            shutdown_timeout=self._shutdown_timeout,
        )
        await runner.setup()
        self._runner = runner
        try:
            sock, self._inode = await anyio.to_thread.run_sync(
                _bind_unix, self.socket_path, self._settings.socket_mode
            )
            await web.SockSite(runner, sock).start()
            self.addresses.append(f"unix:{self.socket_path}")
            if self._settings.listen is not None:
                host, port = self._settings.listen
                tcp = web.TCPSite(runner, host, port)
                try:
                    await tcp.start()
                except OSError as exc:
                    raise ApiStartError(
                        f"cannot listen on {host}:{port} (service.listen): {exc.strerror or exc}"
                    ) from exc
                self.addresses.append(f"http://{host}:{port}")
        except BaseException:
            await self.stop()  # shielded
            raise
        log.info("api_listening", addresses=self.addresses)
        return self.addresses

    async def stop(self) -> None:
        """Stop listening, finish or cancel requests in flight, remove the socket.
        Idempotent; shielded."""
        runner, self._runner = self._runner, None
        with anyio.CancelScope(shield=True):
            if runner is not None:
                await runner.cleanup()
            if self._inode is not None:
                inode, self._inode = self._inode, None
                try:
                    if self.socket_path.stat().st_ino == inode:
                        self.socket_path.unlink()
                except FileNotFoundError:
                    pass
