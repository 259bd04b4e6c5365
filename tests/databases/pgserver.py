"""Throw-away PostgreSQL servers for the tests, started by the test run itself.

``initdb`` and ``postgres`` refuse to run as root, and the tests run as root (CI, the
development machines). So, when we are root, the cluster's directories belong to the
``postgres`` user and the server tools run through ``runuser -u postgres --``; every
client tool (``psql``, ``pgbench``, and vdistream's ``pg_basebackup`` / ``pg_dump`` /
``pg_restore``) runs as root and connects as ``-U postgres`` through the Unix socket,
where ``initdb -A trust`` lets it in. A base backup restored by vdistream belongs to
root (tarfile's ``data`` filter never takes owners from an archive); the tests give it
to ``postgres`` with the restore engine's ``owner`` option before a server starts on
it. When the tests do not run as root, everything runs as the current user instead.

Servers listen on a Unix socket only (``listen_addresses=''``, ``-k <dir>``) in a
directory of their own, with ``fsync=off`` for speed.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path

#: Debian's PostgreSQL 15 (``scripts/test`` installs it from ``.ci/apt-packages``).
PG_BINDIR = Path(os.environ.get("VDISTREAM_TEST_PG_BINDIR", "/usr/lib/postgresql/15/bin"))
SERVER_USER = "postgres"
TOOLS = ("initdb", "pg_ctl", "postgres", "psql", "pgbench", "pg_basebackup", "pg_dump")


def missing_tools(bindir: Path = PG_BINDIR) -> list[str]:
    return [tool for tool in TOOLS if not (bindir / tool).is_file()]


def running_as_root() -> bool:
    return os.geteuid() == 0


def as_server_user(argv: list[str]) -> list[str]:
    """``argv`` run as the server's user (``postgres`` when we are root)."""
    if running_as_root():
        return ["runuser", "-u", SERVER_USER, "--", *argv]
    return argv


def give_to_server_user(path: Path) -> None:
    """Make ``path`` (a directory we created) the server user's, when we are root."""
    if running_as_root():
        entry = pwd.getpwnam(SERVER_USER)
        os.chown(path, entry.pw_uid, entry.pw_gid)


def free_port() -> int:
    """A port number nothing listens on (the servers use it only to name the socket)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def run(argv: list[str], *, timeout: float = 120) -> str:
    """Run ``argv``; its stdout. Fails with the command's own output on error."""
    done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
    if done.returncode != 0:
        raise RuntimeError(
            f"{' '.join(argv)} exited with {done.returncode}:\n{done.stdout}\n{done.stderr}"
        )
    return done.stdout


class PgServer:
    """One server on ``data``, listening on ``socket_dir`` with socket port ``port``."""

    def __init__(self, bindir: Path, data: Path, socket_dir: Path, log: Path) -> None:
        self.bindir = bindir
        self.data = data
        self.socket_dir = socket_dir
        self.log = log
        self.port = free_port()
        self.running = False

    def tool(self, name: str) -> str:
        return str(self.bindir / name)

    def url(self, dbname: str = "postgres", *, password: str | None = None) -> str:
        user = f"{SERVER_USER}:{password}" if password else SERVER_USER
        return f"postgresql://{user}@/{dbname}?host={self.socket_dir}&port={self.port}"

    def start(self) -> None:
        options = (
            f"-c listen_addresses='' -k {self.socket_dir} -p {self.port} -c fsync=off "
            "-c full_page_writes=off -c max_wal_size=256MB"
        )
        argv = [self.tool("pg_ctl"), "-D", str(self.data), "-l", str(self.log), "-w", "-t", "60"]
        try:
            run(as_server_user([*argv, "-o", options, "start"]))
        except RuntimeError as exc:
            log = self.log.read_text() if self.log.exists() else "(no log)"
            raise RuntimeError(f"{exc}\nserver log:\n{log}") from None
        self.running = True

    def stop(self) -> None:
        if self.running:
            run(
                as_server_user(
                    [self.tool("pg_ctl"), "-D", str(self.data), "-m", "fast", "-w", "stop"]
                )
            )
            self.running = False

    def connection(self, dbname: str) -> list[str]:
        return ["-h", str(self.socket_dir), "-p", str(self.port), "-U", SERVER_USER, "-d", dbname]

    def psql(self, sql: str, dbname: str = "postgres") -> str:
        """One statement through psql (as root, connecting as postgres); its output."""
        argv = [self.tool("psql"), "-X", "-w", "-A", "-t", "-v", "ON_ERROR_STOP=1"]
        return run([*argv, *self.connection(dbname), "-c", sql]).strip()

    def pgbench_summary(self, dbname: str = "postgres") -> tuple[int, str]:
        """(rows, checksum) of pgbench_accounts: what a restore must reproduce."""
        count = int(self.psql("SELECT count(*) FROM pgbench_accounts", dbname))
        digest = self.psql(
            "SELECT md5(string_agg(aid::text || ':' || abalance::text, ',' ORDER BY aid)) "
            "FROM pgbench_accounts",
            dbname,
        )
        return count, digest


class PgCluster:
    """A temporary area for servers: the first one (``primary``) and any later ones."""

    def __init__(self, bindir: Path = PG_BINDIR) -> None:
        self.bindir = bindir
        self.root = Path(tempfile.mkdtemp(prefix="vdistream-pg-"))
        give_to_server_user(self.root)
        self.servers: list[PgServer] = []

    def directory(self, name: str) -> Path:
        """A new directory the server's user owns (for data, sockets, logs)."""
        path = self.root / name
        path.mkdir(mode=0o700)
        give_to_server_user(path)
        return path

    def place(self, name: str) -> Path:
        """A path (not yet existing) where a server's user can reach a data directory."""
        return self.root / name

    def server(self, name: str, data: Path) -> PgServer:
        """A server (not started) on the data directory ``data``."""
        server = PgServer(
            self.bindir, data, self.directory(f"{name}-socket"), self.root / f"{name}.log"
        )
        if running_as_root():
            self.root.joinpath(f"{name}.log").touch()
            give_to_server_user(self.root / f"{name}.log")
        self.servers.append(server)
        return server

    def initdb(self, name: str) -> PgServer:
        data = self.directory(f"{name}-data")
        run(
            as_server_user(
                [
                    str(self.bindir / "initdb"),
                    "-D",
                    str(data),
                    "-U",
                    SERVER_USER,
                    "-A",
                    "trust",
                    "-N",
                ]
            )
        )
        return self.server(name, data)

    def close(self) -> None:
        for server in self.servers:
            with contextlib.suppress(Exception):
                server.stop()
        shutil.rmtree(self.root, ignore_errors=True)
