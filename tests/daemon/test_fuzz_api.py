"""Malformed requests at a real daemon: always a 4xx with a JSON error body, never a 500,
and the daemon runs a real job afterwards (issue 11, "the control API never answers
500 to bad input"); and a refused restore is not counted as an abort.

The daemon is ``vdistream serve`` as a subprocess (``daemon_factory``), listening on its
Unix socket and on a loopback TCP port with a bearer token. Requests are sent with
``http.client`` (so that any method, header, query and body can be sent as is) or, for
what is not HTTP at all, as raw bytes on the socket.
"""

from __future__ import annotations

import http.client
import json
import re
import socket
import time
import urllib.parse
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import pytest
import yaml  # type: ignore[import-untyped]  # PyYAML comes with moto[server]
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from tests.daemon.conftest import REPO, TERMINAL, Daemon, _UnixHTTPConnection, make_sqlite
from tests.databases.pgserver import free_port
from vdistream.service.api import MAX_BODY, MAX_DEPTH, create_app

pytestmark = pytest.mark.timeout(120)

TOKEN = "fuzz-token-of-at-least-16-characters"

_SPEC = yaml.safe_load((REPO / "docs" / "openapi.yaml").read_text("utf-8"))
#: The error codes the OpenAPI document names, and the status each one comes with.
CODES: frozenset[str] = frozenset(
    _SPEC["components"]["schemas"]["Error"]["properties"]["error"]["properties"]["code"]["enum"]
)
STATUS_OF = {
    "malformed_json": 400,
    "invalid_request": 400,
    "unauthorized": 401,
    "not_found": 404,
    "job_not_found": 404,
    "method_not_allowed": 405,
    "job_finished": 409,
    "body_too_large": 413,
    "unsupported_media_type": 415,
    "unknown_database": 422,
    "queue_full": 429,
}
#: The application's endpoints (method, path with ``{job_id}`` left in): every one of
#: them gets fuzzed.
ENDPOINTS: tuple[tuple[str, str], ...] = tuple(
    sorted(
        {
            (route.method, route.resource.canonical)
            for route in create_app(None).router.routes()  # type: ignore[arg-type]
            if route.resource is not None
        }
    )
)
#: The query parameters each path knows (the others ignore their query).
QUERY_PARAMS = {
    "/v1/jobs": ("limit", "state", "kind", "database"),
    "/v1/jobs/{job_id}/events": ("interval", "format"),
    "/v1/jobs/{job_id}": (),
}
METHODS = ("GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS")
#: Characters ``str.isdigit``, ``int`` or ``float`` take for digits, none of them ASCII.
#: (superscripts, Arabic-Indic, fullwidth, mathematical bold, N'Ko, Bengali, ideographic
#: zero, a Roman numeral, a fraction)
UNICODE_DIGITS = (
    "\u00b2",
    "\u00b3",
    "\u00b9",
    "\u0661",
    "\u0663",
    "\uff15",
    "\U0001d7d7",
    "\u07c1",
    "\u09ea",
    "\u3007",
    "\u216b",
    "\u00bd",
)


class Answer:
    def __init__(self, status: int, headers: http.client.HTTPMessage, body: bytes) -> None:
        self.status = status
        self.headers = headers
        self.body = body

    def json(self) -> Any:
        return json.loads(self.body)

    def __repr__(self) -> str:
        return f"<{self.status} {self.headers.get('Content-Type')} {self.body[:300]!r}>"


def send(
    daemon: Daemon,
    method: str,
    target: str,
    *,
    headers: Iterable[tuple[str, str]] = (),
    body: bytes | None = None,
    port: int | None = None,
) -> Answer:
    """One request as given (no header added but Host and Content-Length); on the Unix
    socket, or on the TCP listener at ``port``."""
    connection: http.client.HTTPConnection = (
        _UnixHTTPConnection(str(daemon.socket), timeout=20)
        if port is None
        else http.client.HTTPConnection("127.0.0.1", port, timeout=20)
    )
    try:
        connection.putrequest(method, target, skip_accept_encoding=True)
        for name, value in headers:
            connection.putheader(name, value)
        if body is not None:
            connection.putheader("Content-Length", str(len(body)))
        try:
            connection.endheaders(body)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the daemon answered (413) before it read the whole body: read that
        response = connection.getresponse()
        return Answer(response.status, response.headers, response.read())
    finally:
        connection.close()


def raw_exchange(daemon: Daemon, data: bytes) -> bytes:
    """``data`` as is on the Unix socket; what comes back until the daemon closes."""
    out = b""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(20)
        sock.connect(str(daemon.socket))
        try:
            sock.sendall(data)
            sock.shutdown(socket.SHUT_WR)
        except OSError:  # the daemon answered and closed before it read everything
            pass
        try:
            while chunk := sock.recv(65536):
                out += chunk
        except ConnectionResetError:
            pass
    return out


def check_error(answer: Answer, what: object) -> dict[str, Any]:
    """A 4xx with the documented error body, and nothing else in it."""
    assert 400 <= answer.status < 500, (what, answer)
    assert answer.headers.get_content_type() == "application/json", (what, answer)
    body = answer.json()
    assert isinstance(body, dict), (what, answer)
    assert set(body) == {"error"}, (what, answer)
    error = body["error"]
    assert isinstance(error, dict), (what, answer)
    assert set(error) == {"code", "message"}, (what, answer)
    assert error["code"] in CODES, (what, answer)
    assert STATUS_OF[error["code"]] == answer.status, (what, answer)
    message = error["message"]
    assert isinstance(message, str), (what, answer)
    assert message.strip(), (what, answer)
    assert "\n" not in message, (what, answer)
    assert "Traceback" not in message, (what, answer)
    if answer.status == 405:
        assert answer.headers.get("Allow"), (what, answer)
    return error


def start_daemon(daemon_factory: Callable[..., Daemon], tmp_path: Path) -> tuple[Daemon, int]:
    source = make_sqlite(tmp_path / "app.db", rows=2_000)
    port = free_port()
    daemon = daemon_factory(
        {"app": {"url": f"sqlite://{source}"}},
        service={"listen": f"127.0.0.1:{port}"},
        env={"VDISTREAM_API_TOKEN": TOKEN},
    ).start()
    return daemon, port


def submit(daemon: Daemon, body: dict[str, Any]) -> str:
    answer = send(
        daemon,
        "POST",
        "/v1/jobs",
        headers=[("Content-Type", "application/json")],
        body=json.dumps(body).encode(),
    )
    assert answer.status == 202, answer
    job_id: str = answer.json()["id"]
    return job_id


def wait_ended(daemon: Daemon, job_id: str, timeout: float = 60) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        answer = send(daemon, "GET", f"/v1/jobs/{job_id}")
        assert answer.status == 200, answer
        job: dict[str, Any] = answer.json()
        if job["state"] in TERMINAL:
            return job
        time.sleep(0.05)
    raise AssertionError(f"job {job_id} did not end in {timeout} s")


def run_backup(daemon: Daemon) -> dict[str, Any]:
    """A real backup job through the API, to its end (and its verification's)."""
    job = wait_ended(daemon, submit(daemon, {"kind": "backup", "database": "app"}))
    assert job["state"] == "succeeded", job
    assert (daemon.dest / job["backup_id"] / "manifest.json").is_file(), daemon.leftovers()
    deadline = time.monotonic() + 60
    while send(daemon, "GET", "/v1/jobs?state=queued,running").json()["jobs"]:
        assert time.monotonic() < deadline, "the verification did not end"
        time.sleep(0.05)
    return job


def internal_errors(daemon: Daemon) -> list[dict[str, Any]]:
    return [e for e in daemon.events() if e.get("event") == "api_internal_error"]


def metric(text: str, name: str, **labels: str) -> float:
    """One sample of the exposition ``text`` (0 when absent)."""
    wanted = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        key, _, value = line.rpartition(" ")
        sample, _, rest = key.partition("{")
        if sample != name:
            continue
        got = ",".join(sorted(p for p in rest.rstrip("}").split(",") if p))
        if got == wanted:
            return float(value)
    return 0.0


# --- the three requests of the issue ---------------------------------------------------


def test_the_issues_requests_get_a_400_not_a_500(
    daemon_factory: Callable[..., Daemon], tmp_path: Path
) -> None:
    """An array nested 30,000 deep and an object nested 10,000 deep (500 RecursionError
    before), ``?limit=²`` (500 ValueError: ``"²".isdigit()`` is true), and their
    neighbours: each a 400 with a JSON error; nothing recorded, nothing logged as an
    internal error."""
    daemon, _ = start_daemon(daemon_factory, tmp_path)
    json_type = [("Content-Type", "application/json")]
    deep_array = b"[" * 30_000 + b"]" * 30_000
    deep_object = b'{"a":' * 10_000 + b"1" + b"}" * 10_000
    for path in ("/v1/jobs", "/v1/jobs/x/abort"):
        for body in (deep_array, deep_object):
            answer = send(daemon, "POST", path, headers=json_type, body=body)
            assert answer.status == 400, answer
            assert check_error(answer, path)["code"] == "invalid_request"
            assert f"deeper than {MAX_DEPTH}" in answer.json()["error"]["message"]
    for limit in ("\u00b2", "\u0661\u0660", "\uff15", "\U0001d7d7"):
        target = "/v1/jobs?limit=" + urllib.parse.quote(limit)
        answer = send(daemon, "GET", target)
        assert answer.status == 400, (limit, answer)
        message = check_error(answer, limit)["message"]
        assert "limit must be a whole number from 1 to 1000" in message
    for interval in ("\u0661", "\uff15", "1_0", "nan", "inf", "1e1"):
        target = "/v1/jobs/x/events?interval=" + urllib.parse.quote(interval)
        answer = send(daemon, "GET", target)
        assert answer.status == 400, (interval, answer)
        assert "interval" in check_error(answer, interval)["message"]
    # as deep as allowed still parses (and is then refused for what it says)
    nested_ok = b'{"kind": ' + b"[" * (MAX_DEPTH - 1) + b"]" * (MAX_DEPTH - 1) + b"}"
    answer = send(daemon, "POST", "/v1/jobs", headers=json_type, body=nested_ok)
    assert "'kind' must be one of" in check_error(answer, "depth 32")["message"]
    assert send(daemon, "GET", "/v1/jobs?limit=1000").status == 200
    assert internal_errors(daemon) == []
    assert daemon.jobs_in_state_db() == []


_ODD_BODIES = (
    (b"\xff\xfe{}", "malformed_json", "not UTF-8"),
    (b'{"kind": NaN}', "malformed_json", "NaN is not a JSON value"),
    (b'{"kind": "backup", "kind": "verify"}', "malformed_json", "appears twice"),
    (b'{"kind": "backup", "database": "a\\u0000p"}', "invalid_request", "NUL"),
    (b'{"kind": "backup", "database": "\\ud800"}', "invalid_request", "lone surrogate"),
    (b'{"kind": "backup", "database": "' + b"\xed\xa0\x80" + b'"}', "malformed_json", "UTF-8"),
    (b"1" * 5000, "malformed_json", "not valid JSON"),
    (b'"' + b"[" * 70_000, "body_too_large", str(MAX_BODY)),
    (b'{"kind": "backup"}', "unsupported_media_type", "text/plain"),
)


def test_bodies_that_are_not_plain_json_are_refused(
    daemon_factory: Callable[..., Daemon], tmp_path: Path
) -> None:
    """Not UTF-8, NaN, a key twice, NUL, lone surrogates (escaped or encoded), a number
    past Python's digit limit, too large, not JSON: each its own 4xx and code."""
    daemon, _ = start_daemon(daemon_factory, tmp_path)
    for body, code, message in _ODD_BODIES:
        content_type = "text/plain" if code == "unsupported_media_type" else "application/json"
        answer = send(
            daemon, "POST", "/v1/jobs", headers=[("Content-Type", content_type)], body=body
        )
        error = check_error(answer, body[:40])
        assert error["code"] == code, (body[:40], answer)
        assert message in error["message"], (body[:40], answer)
    assert internal_errors(daemon) == []
    assert daemon.jobs_in_state_db() == []


# --- random requests --------------------------------------------------------------------

_TEXT = st.text(st.characters(codec="utf-8"), max_size=40) | st.text(max_size=8)
_JSON_SCALARS = st.none() | st.booleans() | st.integers() | st.floats() | _TEXT


def _nested(inner: st.SearchStrategy[object]) -> st.SearchStrategy[object]:
    # a named function: hypothesis reads a lambda's source to see that it recurses,
    # and that reading fails now and then
    return st.lists(inner, max_size=4) | st.dictionaries(_TEXT, inner, max_size=4)


_JSON = st.recursive(_JSON_SCALARS, _nested, max_leaves=12)
_FIELDS = (
    "kind",
    "database",
    "source",
    "destination",
    "backup_id",
    "verify",
    "target",
    "overwrite",
    "create",
    "owner",
    "content",
    "reason",
)


def _not_a_database(value: object) -> bool:
    # "app" is the daemon's one database: a random request must never start a job
    # (a restore to a random relative path would write into the daemon's directory).
    return value != "app"


@st.composite
def _request_objects(draw: st.DrawFn) -> Any:
    """Objects that look like requests: the real field names, wrong or odd values."""
    fields = draw(st.lists(st.sampled_from(_FIELDS), max_size=6, unique=True))
    body: dict[str, Any] = {}
    for name in fields:
        body[name] = draw(
            st.sampled_from(["backup", "restore", "verify", "latest", "", "../x", "app.1"])
            | _JSON.filter(_not_a_database)
        )
    if "database" in body and body["database"] == "app":
        body["database"] = "app2"
    if draw(st.booleans()):
        body[draw(_TEXT)] = draw(_JSON)
    return body


@st.composite
def _bodies(draw: st.DrawFn) -> bytes | None:
    # Hypothesis favours the simplest choice (0), so 0 is the most dangerous body: deep
    # nesting, the RecursionError of the issue (and 12, 13 make it twice as likely).
    choice = draw(st.integers(0, 13))
    if choice in (12, 13):
        choice = 0
    if choice == 2:
        return None
    if choice == 1:
        return draw(st.sampled_from([b"", b" ", b"\r\n", b"null", b"[]", b"{}", b'""', b"0"]))
    if choice == 0:  # deep: arrays, objects, mixed, unbalanced; around both limits
        depth = draw(st.sampled_from([5_000, 30_000, 999, 1_001, 40_000, MAX_DEPTH, MAX_DEPTH + 1]))
        opener, closer = draw(
            st.sampled_from([(b"[", b"]"), (b'{"a":', b"}"), (b'[{"b":', b"}]"), (b"[", b"")])
        )
        return opener * depth + b"0" + closer * depth
    if choice == 3:  # larger than the limit, or just under it
        size = draw(st.sampled_from([MAX_BODY - 1, MAX_BODY, MAX_BODY + 1, 3 * MAX_BODY]))
        return b'{"kind": "' + b"x" * max(size - 12, 0) + b'"}'
    if choice == 4:
        return draw(st.binary(max_size=200))
    if choice == 5:  # not UTF-8 inside a string, or encoded surrogates
        junk = draw(st.sampled_from([b"\xff", b"\xc3\x28", b"\xed\xa0\x80", b"\xf4\x90\x80\x80"]))
        return b'{"kind": "backup", "database": "' + junk + b'"}'
    if choice == 6:
        text = json.dumps(draw(_request_objects()), ensure_ascii=draw(st.booleans()))
        return text.encode("utf-8", "surrogatepass")
    if choice == 7:
        return json.dumps(draw(_JSON)).encode("utf-8", "surrogatepass")
    if choice == 8:  # truncated, or with extra bytes
        raw = json.dumps(draw(_request_objects())).encode("utf-8", "surrogatepass")
        cut = draw(st.integers(0, len(raw)))
        return raw[:cut] + draw(st.sampled_from([b"", b"}", b",", b"\x00", b"]]]"]))
    if choice == 9:
        return draw(
            st.sampled_from(
                [
                    b'{"kind": NaN}',
                    b'{"kind": Infinity}',
                    b'{"kind": -Infinity}',
                    b'{"a": 1, "a": 2}',
                    b'{"kind": 1' + b"0" * 5000 + b"}",
                    b'{"kind": 1e999999}',
                    b"\xef\xbb\xbf{}",
                    b'{"kind": "\\ud800"}',
                    b'{"reason": "\\udfff"}',
                    b'{"reason": "a\\u0000b"}',
                    b'{"kind": "backup", "database": "x", "target": "\\u0000"}',
                    b"[" * MAX_DEPTH + b"]" * MAX_DEPTH,
                    b'{"reason": ' + b'"' + b"\\" * 3000 + b'"}',
                    b'"' * 10_000,
                    b'"\\' * 20_000,
                ]
            )
        )
    if choice == 10:
        return json.dumps({"reason": draw(_JSON)}).encode("utf-8", "surrogatepass")
    return draw(_TEXT).encode("utf-8", "surrogatepass")


_QUERY_VALUES = (
    st.sampled_from(UNICODE_DIGITS)
    | st.lists(st.sampled_from(UNICODE_DIGITS), min_size=1, max_size=4).map("".join)
    | st.tuples(st.sampled_from("0123456789"), st.sampled_from(UNICODE_DIGITS)).map("".join)
    | st.sampled_from(
        ["0", "1", "-1", "1000", "1001", "99999999999999999999", "0.1", "60", "61", "1e3", "0x10"]
    )
    | st.sampled_from(["nan", "inf", "-inf", " 5", "5 ", "1_000", "running,queued", "sse", ","])
    | _TEXT
)


@st.composite
def _queries(draw: st.DrawFn, known: tuple[str, ...], *, focused: bool) -> str:
    """A query string: mostly the parameters the endpoint knows (``focused``: one or two
    of them, so that each value is what gets refused, if anything)."""
    names = st.sampled_from(known) | st.sampled_from(known) | _TEXT if known else _TEXT
    pairs = draw(st.lists(st.tuples(names, _QUERY_VALUES), max_size=3 - focused))
    if focused and known:
        pairs.insert(0, (draw(st.sampled_from(known)), draw(_QUERY_VALUES)))
    parts = [
        urllib.parse.quote(name, safe="") + "=" + urllib.parse.quote(value, safe="")
        for name, value in pairs
    ]
    if draw(st.integers(0, 3)) == 3:
        parts.append(draw(st.sampled_from(["%ff", "%00", "%", "=", "&&", "limit", "a=%zz", ";"])))
    if not parts and not draw(st.booleans()):
        return ""
    return "?" + "&".join(parts)  # (a lone "?" too)


@st.composite
def _paths(draw: st.DrawFn, route: str, real_ids: tuple[str, ...], *, mangle: bool) -> str:
    job_id = draw(
        st.sampled_from(real_ids)
        | _TEXT.filter(bool)
        | st.integers(1, 3000).map(lambda n: "9" * n)
        | st.sampled_from(["%00", "%ff%fe", "..", ".", "%2F", "%2e%2e"])
    )
    path = route.replace("{job_id}", urllib.parse.quote(job_id, safe="%"))
    if not mangle:
        return path
    if draw(st.integers(0, 4)) == 0:  # mostly the endpoint itself
        path += draw(
            st.sampled_from(["/", "//", "/x", "/..", "/%00", "%20", "/events/abort"])
            | _TEXT.map(lambda t: "/" + urllib.parse.quote(t, safe=""))
        )
    if draw(st.integers(0, 9)) == 0:
        path = "/" + urllib.parse.quote(draw(_TEXT), safe="/")
    return path


@st.composite
def _requests(
    draw: st.DrawFn, real_ids: tuple[str, ...], focus: str
) -> tuple[str, str, list[tuple[str, str]], bytes | None]:
    """``(method, target, headers, body)``: an endpoint of the route table, mostly with
    its own method and the query parameters it knows, and random everything else.
    ``focus``: ``body`` (the endpoints that read one), ``query`` (those that read their
    query string) or ``any``."""
    if focus == "body":
        endpoints = [e for e in ENDPOINTS if e[0] == "POST"]
    elif focus == "query":
        endpoints = [e for e in ENDPOINTS if e[0] == "GET" and e[1] in QUERY_PARAMS]
    else:
        endpoints = list(ENDPOINTS)
    method, route = draw(st.sampled_from(endpoints))
    if focus == "any" and draw(st.integers(0, 4)) == 0:
        method = draw(st.sampled_from(METHODS))
    path = draw(_paths(route, real_ids, mangle=focus == "any"))
    query = draw(_queries(QUERY_PARAMS.get(route, ()), focused=focus == "query"))
    headers = draw(_headers())
    if method == "POST" and draw(st.integers(0, 3)) > 0:
        headers.insert(0, ("Content-Type", "application/json"))
    body = draw(_bodies()) if method == "POST" or draw(st.integers(0, 3)) == 0 else None
    once: dict[str, tuple[str, str]] = {}
    for name, value in headers:  # a header twice is the not-HTTP test's business
        once.setdefault(name.lower(), (name, value))
    return method, path + query, list(once.values()), body


#: Header names the fuzz leaves to the request itself, or to the test of what is not
#: HTTP: aiohttp answers an unknown ``Expect`` (417) or a ``Content-Encoding`` it cannot
#: decode (400) in plain text before the application sees the request.
_OWN_HEADERS = (
    "authorization",
    "content-length",
    "transfer-encoding",
    "host",
    "expect",
    "content-encoding",
)
_HEADER_NAME = st.from_regex(r"\A[A-Za-z0-9!#$%&'*+.^_`|~-]{1,20}\Z").filter(
    lambda n: n.lower() not in _OWN_HEADERS
)
_HEADER_VALUE = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=60)
_CONTENT_TYPES = st.sampled_from(
    [
        "application/json",
        "application/json; charset=utf-8",
        "application/json; charset=latin-1",
        "text/json",
        "text/plain",
        "application/x-www-form-urlencoded",
        "multipart/form-data; boundary=x",
        "application/json;;;=",
        "",
        "*/*",
    ]
)


@st.composite
def _headers(draw: st.DrawFn) -> list[tuple[str, str]]:
    headers = draw(st.lists(st.tuples(_HEADER_NAME, _HEADER_VALUE), max_size=4))
    if draw(st.booleans()):
        headers.append(("Content-Type", draw(_CONTENT_TYPES | _HEADER_VALUE)))
    if draw(st.booleans()):
        headers.append(("Accept", draw(st.sampled_from(["text/event-stream", "*/*", "text/html"]))))
    if draw(st.integers(0, 4)) == 0:
        headers.append(("Connection", draw(st.sampled_from(["close", "keep-alive", "upgrade"]))))
        if draw(st.booleans()):
            headers.append(("Upgrade", draw(st.sampled_from(["websocket", "h2c", "x"]))))
    return headers


_AUTH = st.sampled_from(
    [
        None,
        f"Bearer {TOKEN}",
        f"bearer {TOKEN}",
        "Bearer wrong-token-wrong-token",
        "Bearer ",
        f"Basic {TOKEN}",
        f"Bearer {TOKEN}x",
        TOKEN,
    ]
)


def test_random_malformed_requests_get_a_4xx_json_error(
    daemon_factory: Callable[..., Daemon], tmp_path: Path
) -> None:
    """Random methods, every route with random ids and suffixes, random queries (Unicode
    digits among them), random headers and bodies (deep, huge, not UTF-8, wrong types),
    on the socket and on the TCP listener with right, wrong and missing tokens: each
    answer is a 4xx with the documented error body (a 2xx only for a read); no 500, no
    ``api_internal_error``, no job recorded; then the daemon runs a real backup."""
    daemon, port = start_daemon(daemon_factory, tmp_path)
    first = run_backup(daemon)
    real_ids = (first["id"],)
    jobs_before = daemon.jobs_in_state_db()
    seen: dict[int, int] = {}

    def check(
        request: tuple[str, str, list[tuple[str, str]], bytes | None],
        tcp: bool,
        auth: str | None,
    ) -> None:
        method, target, headers, body = request
        headers = list(headers)
        if tcp and auth is not None:
            headers.append(("Authorization", auth))
        what = (method, target[:200], headers, None if body is None else body[:100], tcp, auth)
        answer = send(
            daemon, method, target, headers=headers, body=body, port=port if tcp else None
        )
        seen[answer.status] = seen.get(answer.status, 0) + 1
        assert answer.status < 500, (what, answer)
        authorized = not tcp or auth in (f"Bearer {TOKEN}", f"bearer {TOKEN}")
        if not authorized:
            assert answer.status == 401, (what, answer)
        if 200 <= answer.status < 300:
            assert method in ("GET", "HEAD"), (what, answer)  # a read, never a new job
            return
        if method == "HEAD":
            assert 400 <= answer.status < 500, (what, answer)
            assert answer.body == b"", (what, answer)
            return
        error = check_error(answer, what)
        if answer.status == 401 and tcp:
            assert error["code"] == "unauthorized"
            assert answer.headers.get("WWW-Authenticate", "").startswith("Bearer"), what

    tcp = st.integers(0, 2).map(lambda n: n == 0)  # a third on the TCP listener
    auth = st.just(f"Bearer {TOKEN}") | _AUTH
    bounded = settings(deadline=None, database=None, suppress_health_check=list(HealthCheck))
    json_type = [("Content-Type", "application/json")]

    @settings(bounded, max_examples=100)
    @given(request=_requests(real_ids, "body"), tcp=tcp, auth=auth)
    @example(request=("POST", "/v1/jobs", json_type, b"[" * 30_000), tcp=False, auth=None)
    @example(
        request=("POST", "/v1/jobs", json_type, b'{"a":' * 10_000 + b"1" + b"}" * 10_000),
        tcp=False,
        auth=None,
    )
    def fuzz_bodies(
        request: tuple[str, str, list[tuple[str, str]], bytes | None],
        tcp: bool,
        auth: str | None,
    ) -> None:
        check(request, tcp, auth)

    @settings(bounded, max_examples=80)
    @given(request=_requests(real_ids, "query"), tcp=tcp, auth=auth)
    @example(request=("GET", "/v1/jobs?limit=%C2%B2", [], None), tcp=False, auth=None)
    def fuzz_queries(
        request: tuple[str, str, list[tuple[str, str]], bytes | None],
        tcp: bool,
        auth: str | None,
    ) -> None:
        check(request, tcp, auth)

    @settings(bounded, max_examples=120)
    @given(request=_requests(real_ids, "any"), tcp=tcp, auth=auth)
    def fuzz_anything(
        request: tuple[str, str, list[tuple[str, str]], bytes | None],
        tcp: bool,
        auth: str | None,
    ) -> None:
        check(request, tcp, auth)

    fuzz_bodies()
    fuzz_queries()
    fuzz_anything()

    assert sum(seen.values()) >= 250, seen
    assert any(400 <= s < 500 for s in seen), seen
    assert internal_errors(daemon) == []
    assert daemon.proc is not None
    assert daemon.proc.poll() is None, "the daemon died"
    assert daemon.jobs_in_state_db() == jobs_before, "a random request recorded a job"
    assert daemon.get("/v1/ready")[0] == 200
    again = run_backup(daemon)
    assert again["id"] != first["id"]
    assert internal_errors(daemon) == []


_POST = b"POST /v1/jobs HTTP/1.1\r\nHost: x\r\n"
_CHUNKED = b"POST /v1/jobs HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
_NOT_HTTP = st.sampled_from(
    [
        b"FOO /v1/jobs HTTP/1.1\r\nHost: x\r\n\r\n",
        b"GET /v1/jobs/\xff\xfe HTTP/1.1\r\nHost: x\r\n\r\n",
        b"GET /v1/jobs?st\xffate=1 HTTP/1.1\r\nHost: x\r\n\r\n",
        b"GET /v1/jobs HTTP/1.1\r\nHost: x\r\nX: \x01\r\n\r\n",
        b"GET /v1/jobs HTTP/9.9\r\nHost: x\r\n\r\n",
        b"POST /v1/jobs HTTP/1.1\r\nHost: x\r\nContent-Length: \xc2\xb2\r\n\r\n{}",
        b"POST /v1/jobs HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n{}",
        b"POST /v1/jobs HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\n{}",
        _CHUNKED + b"zz\r\n{}\r\n0\r\n\r\n",
        _CHUNKED + b"\xc2\xb2\r\n{}\r\n0\r\n\r\n",
        _CHUNKED + b"2\r\n{}\r\n",  # no last chunk: the client stops sending
        b"POST /v1/jobs HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip\r\n\r\n{}",
        _POST + b"Content-Encoding: br\r\nContent-Length: 2\r\n\r\n{}",
        _POST + b"Content-Type: application/json\r\nContent-Type: text/json\r\n\r\n",
        b"GET /v1/jobs HTTP/1.1\r\nHost: x\r\nHost: y\r\n\r\n",
        _POST + b"Content-Encoding: gzip\r\nContent-Length: 2\r\n\r\n{}",
        b"POST /v1/jobs HTTP/1.1\r\nHost: x\r\nExpect: x\r\nContent-Length: 2\r\n\r\n{}",
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03",  # a TLS hello
        b"GET " + b"/v1/jobs/" + b"x" * 20_000 + b" HTTP/1.1\r\nHost: x\r\n\r\n",
        b"GET /v1/jobs HTTP/1.1\r\nHost: x\r\nX: " + b"y" * 20_000 + b"\r\n\r\n",
    ]
) | st.binary(min_size=1, max_size=300).map(lambda b: b"GET /" + b + b"\r\n\r\n")


def test_what_is_not_http_gets_a_4xx_and_harms_nothing(
    daemon_factory: Callable[..., Daemon], tmp_path: Path
) -> None:
    """Bytes that are not a valid HTTP request (an unknown method, raw non-ASCII in the
    request line, a bad header, broken chunking, a TLS hello) are answered 400 (aiohttp's
    own plain-text answer: the application never sees them) or not at all, never 5xx;
    the daemon serves on."""
    daemon, _ = start_daemon(daemon_factory, tmp_path)

    @settings(
        max_examples=60, deadline=None, database=None, suppress_health_check=list(HealthCheck)
    )
    @given(data=_NOT_HTTP)
    def fuzz(data: bytes) -> None:
        answer = raw_exchange(daemon, data)
        if answer:
            status = re.match(rb"HTTP/[0-9]\.[0-9] ([0-9]{3}) ", answer)
            assert status is not None, (data[:100], answer[:200])
            assert 400 <= int(status[1]) < 500, (data[:100], answer[:300])

    fuzz()
    assert internal_errors(daemon) == []
    assert daemon.proc is not None
    assert daemon.proc.poll() is None
    assert daemon.get("/v1/ready")[0] == 200


# --- a refused restore is not an abort --------------------------------------------------


def test_a_refused_restore_is_counted_as_refused_not_as_an_abort(
    daemon_factory: Callable[..., Daemon], tmp_path: Path
) -> None:
    """A restore onto an existing file without ``overwrite`` fails before it writes
    anything: the job is ``failed``, the file is untouched, ``/metrics`` counts it in
    ``vdistream_refused_jobs_total{kind="restore",reason="target_exists"}`` and never in
    ``vdistream_aborts_total`` (it was ``cause="engine"``)."""
    daemon, _ = start_daemon(daemon_factory, tmp_path)
    run_backup(daemon)
    target = tmp_path / "existing.db"
    target.write_bytes(b"precious")
    job_id = submit(daemon, {"kind": "restore", "database": "app", "target": str(target)})
    job = wait_ended(daemon, job_id)
    assert job["state"] == "failed", job
    assert "already exists" in job["error"], job
    assert target.read_bytes() == b"precious"
    status, body = daemon.get("/metrics")
    assert status == 200
    text = body.decode()
    assert metric(text, "vdistream_refused_jobs_total", kind="restore", reason="target_exists") == 1
    assert metric(text, "vdistream_jobs_total", kind="restore", outcome="failed") == 1
    aborts = [
        line
        for line in text.splitlines()
        if line.startswith("vdistream_aborts_total{") and not line.endswith(" 0.0")
    ]
    assert aborts == [], aborts

    # the same restore with overwrite succeeds (the refusal was only the refusal)
    job_id = submit(
        daemon,
        {"kind": "restore", "database": "app", "target": str(target), "overwrite": True},
    )
    assert wait_ended(daemon, job_id)["state"] == "succeeded"
    assert target.read_bytes().startswith(b"SQLite format 3\x00")
    text = daemon.get("/metrics")[1].decode()
    assert metric(text, "vdistream_jobs_total", kind="restore", outcome="succeeded") == 1
    assert metric(text, "vdistream_refused_jobs_total", kind="restore", reason="target_exists") == 1
