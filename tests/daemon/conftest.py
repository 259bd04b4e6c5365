"""The daemon as a real subprocess: ``python -m vdistream serve --config tmp/vdistream.toml``.

``daemon_factory(databases, service=..., env=...)`` writes a settings file under the
test's temporary directory (state directory, socket and a ``local`` destination in
it), and returns a ``Daemon``; ``daemon.start()`` runs it and waits until
``GET /v1/ready`` answers 200. The fixture stops every daemon it started at the end
(SIGTERM, then SIGKILL by pid). ``daemon.client()`` is vdistream's own API client on
the socket, ``daemon.http()`` a bare aiohttp session on it (``UnixConnector``), and
``daemon.jobs_in_state_db()`` reads the state database directly (read-only), so the
tests check what is recorded, not only what the API says.

``daemon_pg`` is a PostgreSQL 15 server of the tests' own (``tests.databases.pgserver``),
started once per session, with a small table in the database ``app``.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import aiohttp
import anyio
import pytest

from tests.databases.pgserver import PG_BINDIR, PgCluster, PgServer, missing_tools
from vdistream.cli.client import ApiClient
from vdistream.service import Settings, load_settings

SLOW_SOURCE = Path(__file__).with_name("slow_source.py")
TERMINAL = frozenset({"succeeded", "failed", "aborted"})
REPO = Path(__file__).resolve().parents[2]


def slow_url(total: int = 200_000_000, rate: int = 2_000_000, *, stubborn: bool = False) -> str:
    """A ``cmd:`` source that writes ``total`` bytes at ``rate`` bytes per second
    (``stubborn``: see ``slow_source.py``)."""
    flag = " --stubborn" if stubborn else ""
    return f"cmd:{sys.executable} {SLOW_SOURCE} {total} {rate}{flag}"


def make_sqlite(path: Path, rows: int = 20_000) -> Path:
    db = sqlite3.connect(path)
    with db:
        db.execute("CREATE TABLE items (id INTEGER PRIMARY KEY, name TEXT)")
        db.executemany("INSERT INTO items (name) VALUES (?)", ((f"item {i}",) for i in range(rows)))
    db.close()
    return path


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, Mapping):
        return "{ " + ", ".join(f"{k} = {_toml_value(v)}" for k, v in value.items()) + " }"
    raise TypeError(f"no TOML for {value!r}")


def _toml(tables: Mapping[str, Mapping[str, Any]]) -> str:
    lines = []
    for name, table in tables.items():
        lines.append(f"[{name}]")
        lines.extend(f"{key} = {_toml_value(value)}" for key, value in table.items())
        lines.append("")
    return "\n".join(lines)


def embedded_settings(tmp_path: Path, **service: object) -> Settings:
    """Settings for an in-process ``Service``: databases ``app`` (SQLite) and ``slow``
    (``slow_url()``), the state directory and a ``local`` destination in ``tmp_path``."""
    source = make_sqlite(tmp_path / "app.db", rows=1_000)
    lines = [
        "[service]",
        f'state_dir = "{tmp_path / "state"}"',
        'timezone = "UTC"',
        *(f"{k} = {v!r}" for k, v in service.items()),
        "[destinations.local]",
        f'url = "{tmp_path / "backups"}"',
        "[databases.app]",
        f'url = "sqlite://{source}"',
        'destination = "local"',
        "devices = 2",
        "[databases.slow]",
        f'url = "{slow_url()}"',
        'destination = "local"',
        "devices = 2",
    ]
    config = tmp_path / "vdistream.toml"
    config.write_text("\n".join(lines) + "\n")
    return load_settings(config, env={})


class _UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self._path)
        except OSError:
            sock.close()
            raise
        self.sock = sock


class Daemon:
    """One ``vdistream serve`` process and its files (module doc)."""

    def __init__(
        self,
        root: Path,
        databases: Mapping[str, Mapping[str, Any]],
        *,
        service: Mapping[str, Any] | None = None,
        env: Mapping[str, str] | None = None,
    ) -> None:
        self.root = root
        self.state = root / "state"
        self.socket = self.state / "vdistream.sock"
        self.dest = root / "backups"
        self.config = root / "vdistream.toml"
        self.log = root / "daemon.log"
        self.env = {**os.environ, **(env or {})}
        self.env.pop("VDISTREAM_SOCKET", None)
        self.proc: subprocess.Popen[bytes] | None = None
        self.write_config(databases, service=service)

    def write_config(
        self,
        databases: Mapping[str, Mapping[str, Any]],
        *,
        service: Mapping[str, Any] | None = None,
    ) -> None:
        tables: dict[str, Mapping[str, Any]] = {
            "service": {
                "state_dir": str(self.state),
                "log_format": "json",
                "log_level": "info",
                "grace_period": 10,
                "timezone": "UTC",
                **(service or {}),
            },
            "destinations.local": {"url": str(self.dest)},
        }
        for name, table in databases.items():
            tables[f"databases.{name}"] = {"destination": "local", "devices": 2, **table}
        self.config.write_text(_toml(tables))

    # --- the process ------------------------------------------------------------------

    def start(self, timeout: float = 30.0) -> Daemon:
        assert self.proc is None or self.proc.poll() is not None, "already running"
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "vdistream", "serve", "--config", str(self.config)],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=self.env,
                cwd=REPO,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(
                    f"the daemon exited with {self.proc.returncode} while starting:\n"
                    + self.log.read_text()
                )
            if self.get("/v1/ready")[0] == 200:
                return self
            time.sleep(0.05)
        raise AssertionError("the daemon did not become ready:\n" + self.log.read_text())

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def send(self, signum: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(signum)

    def wait(self, timeout: float) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout)

    def kill(self) -> None:
        """kill -9, and reap it."""
        self.send(signal.SIGKILL)
        self.wait(10)

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM and wait; SIGKILL if it does not end."""
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc is not None else 0
        self.send(signal.SIGTERM)
        try:
            return self.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise

    def get(self, path: str) -> tuple[int, bytes]:
        """A plain synchronous GET over the socket; ``(0, b"")`` if nobody answers."""
        connection = _UnixHTTPConnection(str(self.socket), timeout=5)
        try:
            connection.request("GET", path)
            response = connection.getresponse()
            return response.status, response.read()
        except OSError:
            return 0, b""
        finally:
            connection.close()

    # --- looking at it ----------------------------------------------------------------

    def client(self) -> ApiClient:
        return ApiClient(self.socket, timeout=30)

    def http(self) -> aiohttp.ClientSession:
        return aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=str(self.socket)))

    def events(self) -> list[dict[str, Any]]:
        """The daemon's JSON log lines."""
        out = []
        for line in self.log.read_text().splitlines():
            with contextlib.suppress(ValueError):
                out.append(json.loads(line))
        return out

    def jobs_in_state_db(self) -> list[dict[str, Any]]:
        """Every job row of the state database, oldest first (read-only)."""
        db = sqlite3.connect(f"file:{self.state / 'state.db'}?mode=ro", uri=True)
        db.row_factory = sqlite3.Row
        try:
            rows = db.execute("SELECT * FROM jobs ORDER BY created, id").fetchall()
        finally:
            db.close()
        return [dict(row) for row in rows]

    def leftovers(self) -> list[str]:
        """Everything under the destination (temporaries included), relative."""
        if not self.dest.exists():
            return []
        return sorted(str(p.relative_to(self.dest)) for p in self.dest.rglob("*"))


@pytest.fixture
def daemon_factory(tmp_path: Path) -> Iterator[Callable[..., Daemon]]:
    started: list[Daemon] = []
    count = 0

    def make(databases: Mapping[str, Mapping[str, Any]], **kwargs: Any) -> Daemon:
        nonlocal count
        count += 1
        root = tmp_path / f"d{count}"
        root.mkdir()
        daemon = Daemon(root, databases, **kwargs)
        started.append(daemon)
        return daemon

    yield make
    for daemon in started:
        if daemon.proc is not None and daemon.proc.poll() is None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                daemon.stop(20)


async def wait_job(
    client: ApiClient,
    job_id: str,
    states: frozenset[str] = TERMINAL,
    *,
    timeout: float = 30.0,
    min_bytes: int = 0,
) -> dict[str, Any]:
    """Poll the job until its state is in ``states`` (and it moved ``min_bytes``)."""
    job: dict[str, Any] = {}
    with anyio.move_on_after(timeout):
        while True:
            job = await client.job(job_id)
            moved = (job.get("progress") or {}).get("bytes", 0)
            if job["state"] in states and moved >= min_bytes:
                return job
            if job["state"] in TERMINAL and job["state"] not in states:
                raise AssertionError(f"job ended {job['state']}: {job.get('error')}")
            await anyio.sleep(0.05)
    raise AssertionError(f"job {job_id} not in {sorted(states)} after {timeout} s: {job}")


async def wait_for(
    predicate: Callable[[], Any], *, timeout: float = 30.0, what: str = "condition"
) -> Any:
    """Await ``predicate()`` (sync or async) until it returns something truthy."""
    with anyio.move_on_after(timeout):
        while True:
            value = predicate()
            if hasattr(value, "__await__"):
                value = await value
            if value:
                return value
            await anyio.sleep(0.05)
    raise AssertionError(f"{what}: not reached after {timeout} s")


@pytest.fixture(scope="session")
def daemon_pg() -> Iterator[PgServer]:
    """A PostgreSQL server of the daemon tests, with a table in the database ``app``."""
    missing = missing_tools(PG_BINDIR)
    if missing:
        pytest.fail(
            f"PostgreSQL's binaries are missing in {PG_BINDIR} ({', '.join(missing)}): run "
            "scripts/test (it installs .ci/apt-packages)",
            pytrace=False,
        )
    cluster = PgCluster(PG_BINDIR)
    try:
        server = cluster.initdb("daemon")
        server.start()
        server.psql("CREATE DATABASE app")
        server.psql(
            "CREATE TABLE items AS SELECT g AS id, md5(g::text) AS name "
            "FROM generate_series(1, 20000) AS g",
            "app",
        )
        yield server
    finally:
        cluster.close()
