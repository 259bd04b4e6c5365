"""Drive a stand-in SQL Server from tests and benchmarks (Contract D; stdlib only, synchronous)."""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

from standin.mssql.wire import Connection

if TYPE_CHECKING:
    from standin.sqlvdi.build import Libraries

__all__ = ("SQLCMD", "StandinError", "StandinServer")

SQLCMD = Path(__file__).resolve().with_name("sqlcmd")
_ROOT = Path(__file__).resolve().parents[2]


class StandinError(Exception):
    """The stand-in server refused a control request or could not be started."""


class StandinServer:
    """A running ``python -m standin.mssql.server`` and its control API."""

    def __init__(
        self, proc: subprocess.Popen[bytes], port: int, user: str, password: str, workdir: Path
    ) -> None:
        self.proc = proc
        self.host = "127.0.0.1"
        self.port = port
        self.user = user
        self.password = password
        self.pid = proc.pid
        self.sqlcmd = SQLCMD
        self.workdir = workdir

    @classmethod
    def start(
        cls,
        workdir: Path,
        *,
        libs: Libraries,
        user: str = "sa",
        password: str = "Standin-Pass-1",
        timeout: float = 20.0,
    ) -> StandinServer:
        """Spawn the server (its data in ``workdir``) and wait for its ``READY <port>``."""
        workdir.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(_ROOT), env.get("PYTHONPATH")]))
        # the password goes by environment, never on a command line anyone can list
        env["STANDIN_MSSQL_PASSWORD"] = password
        cmd = [sys.executable, "-m", "standin.mssql.server", "--data", str(workdir)]
        cmd += ["--lib", str(libs.server), "--user", user]
        log = (workdir / "server.log").open("ab")
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log, env=env, cwd=_ROOT)
        log.close()
        assert proc.stdout is not None
        deadline = time.monotonic() + timeout
        line = b""
        while not line.endswith(b"\n"):
            left = deadline - time.monotonic()
            ready, _, _ = select.select([proc.stdout], [], [], max(0.0, left))
            chunk = os.read(proc.stdout.fileno(), 256) if ready else b""
            if not chunk:
                proc.kill()
                proc.wait()
                raise StandinError(
                    f"stand-in SQL Server did not start within {timeout} s; see "
                    f"{workdir / 'server.log'}"
                )
            line += chunk
        word, _, port = line.decode().strip().partition(" ")
        if word != "READY":
            proc.kill()
            proc.wait()
            raise StandinError(f"stand-in SQL Server said {line!r} instead of READY")
        return cls(proc, int(port), user, password, workdir)

    # -- plumbing

    def _call(self, cmd: str, **args: Any) -> Any:
        try:
            conn = Connection.connect(self.host, self.port, 5.0)
        except OSError as exc:
            raise StandinError(f"stand-in SQL Server at port {self.port} is not reachable") from exc
        try:
            conn.send({"op": "login", "user": self.user, "password": self.password})
            hello = conn.read()
            if not hello or not hello.get("ok"):
                raise StandinError("stand-in SQL Server refused the control login")
            conn.send({"op": "control", "cmd": cmd, "args": args})
            reply = conn.read()
        finally:
            conn.close()
        if reply is None:
            raise StandinError(f"stand-in SQL Server closed the connection during {cmd}")
        if not reply.get("ok"):
            raise StandinError(f"{cmd}: {reply.get('error')}")
        return reply.get("result")

    # -- Contract D

    def url(self, database: str) -> str:
        return f"mssql://{self.user}@{self.host}:{self.port}/{quote(database, safe='')}"

    def create_database(self, name: str, size: int, *, seed: int = 0) -> None:
        self._call("create_database", name=name, size=size, seed=seed)

    def write(self, name: str, pages: int = 16) -> None:
        self._call("write", name=name, pages=pages)

    def checksum(self, name: str) -> str:
        return str(self._call("checksum", name=name))

    def checksum_at(self, name: str, when: datetime) -> str:
        if when.tzinfo is not None:
            when = when.astimezone(UTC).replace(tzinfo=None)
        return str(self._call("checksum_at", name=name, when=when.isoformat()))

    def state(self, name: str) -> str | None:
        result = self._call("state", name=name)
        return None if result is None else str(result)

    def drop_database(self, name: str) -> None:
        self._call("drop_database", name=name)

    def statements(self) -> list[str]:
        return list(self._call("statements"))

    def history(self, name: str) -> list[dict[str, Any]]:
        return list(self._call("history", name=name))

    def fail_next_backup(self, name: str, *, after_bytes: int) -> None:
        self._call("fail_next_backup", name=name, after_bytes=after_bytes)

    def set_pace(self, bytes_per_second: int | None) -> None:
        self._call("set_pace", bytes_per_second=bytes_per_second)

    def running(self) -> list[str]:
        return list(self._call("running"))

    def sets_seen(self) -> list[str]:
        """Names of every device set a statement of this server used (also after its death)."""
        log = self.workdir / "sets.log"
        return log.read_text(encoding="utf-8").splitlines() if log.exists() else []

    def kill(self) -> None:
        """SIGKILL: the server dies as a crashed SQL Server would, mid-statement or not."""
        if self.proc.poll() is None:
            os.kill(self.pid, signal.SIGKILL)
        self.proc.wait(10)
        self._close_pipe()

    def stop(self, timeout: float = 15.0) -> None:
        """Graceful: running statements are cancelled (their sets aborted), then it exits."""
        if self.proc.poll() is None:
            try:
                conn = Connection.connect(self.host, self.port, 2.0)
                conn.send({"op": "login", "user": self.user, "password": self.password})
                conn.read()
                conn.send({"op": "shutdown"})
                conn.read()
                conn.close()
            except OSError:
                self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._close_pipe()

    def _close_pipe(self) -> None:
        if self.proc.stdout is not None:
            self.proc.stdout.close()

    def __enter__(self) -> StandinServer:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
