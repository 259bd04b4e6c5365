"""How statements reach SQL Server: sqlcmd (a stand-in runner) and python-tds (fakes)."""

from __future__ import annotations

import decimal
import json
import os
import socket
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import anyio.to_thread
import pytest
from anyio.abc import SocketAttribute

from vdistream.engines.process import group_alive
from vdistream.errors import ConfigError
from vdistream.sqlserver import trigger as trigger_module
from vdistream.sqlserver.trigger import (
    KILL_AFTER_SECONDS,
    SqlcmdNotFoundError,
    SqlcmdTrigger,
    SqlMessage,
    SqlServerConnectionError,
    SqlServerError,
    StatementResult,
    TdsTrigger,
    find_sqlcmd,
    parse_sqlcmd_output,
    trigger_for,
)
from vdistream.sqlserver.tsql import StatementError
from vdistream.sqlserver.url import MssqlURL

PASSWORD = "hunter2-secret"
STATEMENT = "BACKUP DATABASE [db] TO VIRTUAL_DEVICE = N'set' WITH FORMAT, NAME = N'b'"
FAILED_BACKUP = (
    "Msg 911, Level 16, State 11, Server standin, Line 1\n"
    "Database 'x' does not exist. Make sure that the name is entered correctly.\n"
    "Msg 3013, Level 16, State 1, Server standin, Line 1\n"
    "BACKUP DATABASE is terminating abnormally.\n"
)
FAILED_TEXT = (
    "Database 'x' does not exist. Make sure that the name is entered correctly. "
    "BACKUP DATABASE is terminating abnormally."
)

# The stand-in sqlcmd: records argv, SQLCMDPASSWORD and the -Q text, then does what
# behaviour.json next to it says (print, exit, or start a grandchild and sleep).
RUNNER = r"""
import json, os, signal, socket, subprocess, sys, time
here = os.path.dirname(os.path.abspath(__file__))
with open(os.path.join(here, "behaviour.json")) as f:
    behaviour = json.load(f)
argv = sys.argv[1:]
record = {
    "argv": argv,
    "password": os.environ.get("SQLCMDPASSWORD"),
    "statement": argv[argv.index("-Q") + 1] if "-Q" in argv else None,
}
with open(os.path.join(here, "record.json"), "w") as f:
    json.dump(record, f)
if behaviour.get("sleep"):
    if behaviour.get("ignore_term"):
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    with socket.create_connection(("127.0.0.1", behaviour["notify"])) as notify:
        notify.sendall(json.dumps([os.getpid(), child.pid]).encode())
    time.sleep(600)
sys.stdout.write(behaviour.get("stdout", ""))
sys.stderr.write(behaviour.get("stderr", ""))
sys.exit(behaviour.get("exit", 0))
"""


class Runner:
    """The stand-in sqlcmd in a directory of its own."""

    def __init__(self, directory: Path) -> None:
        directory.mkdir()
        self.directory = directory
        self.path = directory / "sqlcmd"
        self.path.write_text(f"#!{sys.executable}\n{RUNNER}")
        self.path.chmod(0o755)
        self.behave()

    def behave(self, **behaviour: Any) -> None:
        (self.directory / "behaviour.json").write_text(json.dumps(behaviour))

    def record(self) -> dict[str, Any]:
        record: dict[str, Any] = json.loads((self.directory / "record.json").read_text())
        return record

    def trigger(self) -> SqlcmdTrigger:
        return SqlcmdTrigger("127.0.0.1", 14330, "sa", PASSWORD, sqlcmd=self.path)


@pytest.fixture
def runner(tmp_path: Path) -> Runner:
    return Runner(tmp_path / "runner")


# --- sqlcmd: command line, environment, output -----------------------------------------


@pytest.mark.asyncio
async def test_sqlcmd_statement_argv_env_and_messages(runner: Runner) -> None:
    runner.behave(
        stdout="Processed 360 pages for database 'db', file 'db' on file 1.\n"
        "BACKUP DATABASE successfully processed 362 pages in 0.051 seconds (55.4 MB/sec).\n"
    )
    result = await runner.trigger().run(STATEMENT)
    record = runner.record()
    assert record["argv"] == [
        "-S", "127.0.0.1,14330", "-U", "sa", "-d", "master", "-b", "-Q", STATEMENT,
    ]  # fmt: skip
    assert record["statement"] == STATEMENT
    assert record["password"] == PASSWORD
    assert all(PASSWORD not in arg for arg in record["argv"])
    assert result.messages == (
        SqlMessage(4035, 0, 0, "Processed 360 pages for database 'db', file 'db' on file 1."),
        SqlMessage(
            3014,
            0,
            0,
            "BACKUP DATABASE successfully processed 362 pages in 0.051 seconds (55.4 MB/sec).",
        ),
    )
    assert result.has(3014)
    assert result.rows == ()


@pytest.mark.asyncio
async def test_sqlcmd_query_rows_and_null(runner: Runner) -> None:
    runner.behave(stdout="D|0|1000|2000|NULL|2026-12-06T10:00:00.123\nL|1|||x|NULL\n")
    result = await runner.trigger().run("SET NOCOUNT ON; SELECT 1", query=True)
    assert runner.record()["argv"] == [
        "-S", "127.0.0.1,14330", "-U", "sa", "-d", "master", "-b",
        "-h", "-1", "-W", "-s", "|", "-Q", "SET NOCOUNT ON; SELECT 1",
    ]  # fmt: skip
    assert result.rows == (
        ("D", "0", "1000", "2000", None, "2026-12-06T10:00:00.123"),
        ("L", "1", "", "", "x", None),
    )
    assert result.messages == ()


@pytest.mark.asyncio
async def test_sqlcmd_error_carries_sql_servers_words_without_the_password(
    runner: Runner,
) -> None:
    runner.behave(stdout=FAILED_BACKUP + f"echo {PASSWORD}\n", exit=1)
    statement = f"BACKUP DATABASE [{PASSWORD}] TO VIRTUAL_DEVICE = N'set' WITH FORMAT"
    with pytest.raises(SqlServerError) as caught:
        await runner.trigger().run(statement)
    error = caught.value
    assert type(error) is SqlServerError
    assert error.numbers == (911, 3013)
    assert error.number == 911
    assert error.text == FAILED_TEXT
    assert error.returncode == 1
    assert error.statement == "BACKUP DATABASE [***] TO VIRTUAL_DEVICE = N'set' WITH FORMAT"
    line = str(error)
    assert line == (
        f"SQL Server 127.0.0.1,14330: {FAILED_TEXT} [Msg 911, 3013] (statement: BACKUP "
        "DATABASE [***] TO VIRTUAL_DEVICE = N'set' WITH FORMAT)"
    )
    assert PASSWORD not in line
    assert all(PASSWORD not in m.text for m in error.messages)
    assert "\n" not in line


@pytest.mark.asyncio
async def test_sqlcmd_error_severity_fails_even_with_exit_zero(runner: Runner) -> None:
    runner.behave(stdout="Msg 3201, Level 16, State 1, Line 1\nCannot open backup device.\n")
    with pytest.raises(SqlServerError) as caught:
        await runner.trigger().run(STATEMENT)
    assert caught.value.numbers == (3201,)
    assert caught.value.returncode == 0


@pytest.mark.asyncio
async def test_sqlcmd_warning_below_severity_11_is_not_an_error(runner: Runner) -> None:
    runner.behave(stdout="Msg 50000, Level 10, State 1, Line 1\njust saying\n")
    result = await runner.trigger().run(STATEMENT)
    assert result.messages == (SqlMessage(50000, 10, 1, "just saying"),)


@pytest.mark.asyncio
async def test_sqlcmd_cannot_connect(runner: Runner) -> None:
    runner.behave(
        stdout="Sqlcmd: Error: Microsoft ODBC Driver 18 for SQL Server : Login timeout expired.\n",
        exit=1,
    )
    with pytest.raises(SqlServerConnectionError) as caught:
        await runner.trigger().run(STATEMENT)
    assert caught.value.number is None
    assert "Login timeout expired." in str(caught.value)


@pytest.mark.asyncio
async def test_sqlcmd_login_failed_is_a_connection_error(runner: Runner) -> None:
    runner.behave(
        stdout="Msg 18456, Level 14, State 1, Server s, Line 1\nLogin failed for user 'sa'.\n",
        exit=1,
    )
    with pytest.raises(SqlServerConnectionError) as caught:
        await runner.trigger().run(STATEMENT)
    assert caught.value.numbers == (18456,)
    assert "Login failed for user 'sa'." in str(caught.value)


@pytest.mark.asyncio
async def test_sqlcmd_other_failure_uses_stderr(runner: Runner) -> None:
    runner.behave(stderr="something broke\n", exit=3)
    with pytest.raises(SqlServerError, match="something broke") as caught:
        await runner.trigger().run(STATEMENT)
    assert caught.value.returncode == 3


@pytest.mark.asyncio
async def test_sqlcmd_refuses_variable_substitution(runner: Runner) -> None:
    with pytest.raises(StatementError, match=r"\$\(\.\.\.\)"):
        await runner.trigger().run("BACKUP DATABASE [$(x)] TO VIRTUAL_DEVICE = N's'")
    assert not (runner.directory / "record.json").exists()


@pytest.mark.parametrize("ignore_term", [False, True], ids=["term", "kill"])
@pytest.mark.asyncio
async def test_sqlcmd_cancel_kills_the_whole_group(runner: Runner, ignore_term: bool) -> None:
    trigger = runner.trigger()
    ready = anyio.Event()
    pids = bytearray()

    async def told(stream: anyio.abc.SocketStream) -> None:
        # The runner sends its pids once its grandchild started.
        async with stream:
            async for chunk in stream:
                pids.extend(chunk)
        ready.set()

    async with await anyio.create_tcp_listener(local_host="127.0.0.1") as listener:
        port = listener.extra(SocketAttribute.local_port)
        runner.behave(sleep=True, ignore_term=ignore_term, notify=port)
        with anyio.fail_after(30):
            async with anyio.create_task_group() as group:
                group.start_soon(listener.serve, told)
                group.start_soon(trigger.run, STATEMENT)
                await ready.wait()
                started = time.monotonic()
                group.cancel_scope.cancel()
            elapsed = time.monotonic() - started
    sqlcmd_pid, grandchild_pid = json.loads(pids)
    if ignore_term:  # SIGTERM ignored: SIGKILL after 2 s
        assert KILL_AFTER_SECONDS - 0.1 <= elapsed < KILL_AFTER_SECONDS + 2.0
    else:
        assert elapsed < 1.5
    with pytest.raises(ProcessLookupError):
        os.kill(sqlcmd_pid, 0)  # reaped by us
    assert not group_alive(sqlcmd_pid)  # its whole group, the grandchild too, is gone
    assert not _exists(grandchild_pid)


def _exists(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie waiting for init does not count)."""
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except OSError:
        return False


def test_parse_sqlcmd_output() -> None:
    messages, rows, tool = parse_sqlcmd_output(
        "Processed 8 pages for database 'd', file 'd_log' on file 1.\n"
        + FAILED_BACKUP
        + "\nThe backup set on file 1 is valid.\nSqlcmd: Warning: odd.\nSqlcmd: Error: bad.\n",
        query=False,
    )
    assert [m.number for m in messages] == [4035, 911, 3013, 3262, 0]
    assert [m.severity for m in messages] == [0, 16, 16, 0, 0]
    assert messages[-1].text == "Sqlcmd: Warning: odd."
    assert messages[1].state == 11
    assert rows == ()
    assert tool == ("Sqlcmd: Error: bad.",)
    messages, rows, _ = parse_sqlcmd_output(
        "a|NULL\r\n\r\nMsg 1, Level 16, State 2\nbad\n", query=True
    )
    assert rows == (("a", None),)
    assert messages == (SqlMessage(1, 16, 2, "bad"),)


def test_output_is_bounded() -> None:
    output = trigger_module._Output(head=10, tail=5)
    for _ in range(100):
        output.append(b"0123456789")
    text = output.text()
    assert text.startswith("0123456789\n[985 bytes left out]\n")
    assert text.endswith("56789")
    assert len(output.head) == 10


# --- finding sqlcmd -------------------------------------------------------------------


def test_missing_sqlcmd_names_path_and_variable(tmp_path: Path) -> None:
    env = {"PATH": str(tmp_path)}
    with pytest.raises(SqlcmdNotFoundError) as caught:
        SqlcmdTrigger("h", 1, "sa", "pw", env=env)
    message = str(caught.value)
    assert "PATH" in message
    assert "VDISTREAM_SQLCMD" in message
    assert isinstance(caught.value, ConfigError)
    missing = tmp_path / "no-sqlcmd"
    with pytest.raises(SqlcmdNotFoundError, match=f"'{missing}' .VDISTREAM_SQLCMD."):
        find_sqlcmd(env={"VDISTREAM_SQLCMD": str(missing), "PATH": str(tmp_path)})
    with pytest.raises(SqlcmdNotFoundError, match="the sqlcmd setting"):
        find_sqlcmd(missing)


def test_sqlcmd_found_by_variable_then_path(runner: Runner, tmp_path: Path) -> None:
    assert find_sqlcmd(env={"VDISTREAM_SQLCMD": str(runner.path)}) == str(runner.path)
    assert find_sqlcmd(env={"PATH": str(runner.directory)}) == str(runner.path)
    explicit = find_sqlcmd(runner.path, env={"VDISTREAM_SQLCMD": str(tmp_path / "x")})
    assert explicit == str(runner.path)


def test_trigger_for(monkeypatch: pytest.MonkeyPatch, runner: Runner) -> None:
    monkeypatch.setenv("VDISTREAM_SQLCMD", str(runner.path))
    env = {"VDISTREAM_MSSQL_PASSWORD": PASSWORD}
    chosen = trigger_for(MssqlURL.parse("mssql://sa@h:9/db?trigger=sqlcmd", password_env=env))
    assert isinstance(chosen, SqlcmdTrigger)
    assert chosen.argv("S") == [str(runner.path), "-S", "h,9", "-U", "sa", "-d", "master",
                                "-b", "-Q", "S"]  # fmt: skip
    tds = trigger_for(MssqlURL.parse("mssql://sa@h:9/db", password_env=env))
    assert isinstance(tds, TdsTrigger)
    assert tds.connect_arguments()["password"] == PASSWORD
    assert PASSWORD not in repr(tds) + repr(chosen)


# --- python-tds, through a recording fake of its connection -----------------------------


class FakeError(Exception):
    """What pytds raises: pytds.tds_base.OperationalError's fields."""

    def __init__(self, number: int, severity: int, state: int, text: str) -> None:
        super().__init__(text)
        self.number, self.severity, self.state, self.text = number, severity, state, text


class FakeSession:
    def __init__(self, cursor: FakeCursor) -> None:
        self.cursor = cursor

    def put_cancel(self) -> None:
        self.cursor.attentions += 1
        if self.cursor.server.obey_attention:
            self.cursor.wake.set()


class FakeCursor:
    def __init__(self, server: FakeServer) -> None:
        self.server = server
        self.attentions = 0
        self.wake = threading.Event()
        self._session = FakeSession(self)
        self._sets: list[list[tuple[Any, ...]]] = []
        self.description: Any = None

    def execute(self, statement: str) -> None:
        self.server.statements.append(statement)
        self.server.executing.set()
        try:
            if self.server.block:
                assert self.wake.wait(10), "never woken"
                if self.server.closed:
                    raise OSError("connection closed")
                return
            if self.server.error is not None:
                raise self.server.error
            self._sets = [list(rows) for rows in self.server.result_sets]
            self._advance()
        finally:
            self.server.execute_returned = True

    def _advance(self) -> None:
        self.description = [("c",)] if self._sets else None

    def fetchall(self) -> list[tuple[Any, ...]]:
        return self._sets[0] if self._sets else []

    def nextset(self) -> bool | None:
        if self._sets:
            self._sets.pop(0)
        self._advance()
        return True if self._sets else None

    @property
    def messages(self) -> list[tuple[type, FakeError]]:
        return [(FakeError, FakeError(*m)) for m in self.server.messages]


class FakeConnection:
    def __init__(self, server: FakeServer) -> None:
        self.server = server

    def cursor(self) -> FakeCursor:
        self.server.cursor = FakeCursor(self.server)
        return self.server.cursor

    def close(self) -> None:
        self.server.closed = True
        if self.server.cursor is not None:
            self.server.cursor.wake.set()


class FakeServer:
    """Records what the trigger sends; answers as told."""

    def __init__(self) -> None:
        self.connects: list[dict[str, Any]] = []
        self.statements: list[str] = []
        self.messages: list[tuple[int, int, int, str]] = []
        self.result_sets: list[list[tuple[Any, ...]]] = []
        self.error: Exception | None = None
        self.connect_error: Exception | None = None
        self.block = False
        self.obey_attention = True
        self.executing = threading.Event()
        self.execute_returned = False
        self.closed = False
        self.cursor: FakeCursor | None = None

    def connect(self, **arguments: Any) -> FakeConnection:
        self.connects.append(arguments)
        if self.connect_error is not None:
            raise self.connect_error
        return FakeConnection(self)


@pytest.fixture
def server() -> FakeServer:
    return FakeServer()


def tds(server: FakeServer) -> TdsTrigger:
    return TdsTrigger("sql.example", 1433, "sa", PASSWORD, connect=server.connect)


@pytest.mark.asyncio
async def test_tds_connect_arguments_and_statement(server: FakeServer) -> None:
    server.messages = [
        (4035, 0, 1, "Processed 8 pages for database 'db', file 'db' on file 1."),
        (3014, 0, 1, "BACKUP DATABASE successfully processed 8 pages in 0.1 seconds."),
    ]
    result = await tds(server).run(STATEMENT)
    assert server.connects == [
        {
            "dsn": "sql.example",
            "port": 1433,
            "user": "sa",
            "password": PASSWORD,
            "database": "master",
            "autocommit": True,
            "timeout": None,
            "login_timeout": trigger_module.LOGIN_TIMEOUT,
            "appname": "vdistream",
        }
    ]
    assert server.statements == [STATEMENT]
    assert server.closed
    assert result == StatementResult(
        messages=(
            SqlMessage(4035, 0, 1, "Processed 8 pages for database 'db', file 'db' on file 1."),
            SqlMessage(
                3014, 0, 1, "BACKUP DATABASE successfully processed 8 pages in 0.1 seconds."
            ),
        )
    )
    assert result.has(3014)


@pytest.mark.asyncio
async def test_tds_query_rows_as_text(server: FakeServer) -> None:
    server.result_sets = [
        [("D", False, decimal.Decimal("34000000012300001"), None, b"\x01\xab", 7)],
        [("second set",)],
    ]
    result = await tds(server).run("SET NOCOUNT ON; SELECT 1", query=True)
    assert result.rows == (
        ("D", "0", "34000000012300001", None, "0x01AB", "7"),
        ("second set",),
    )


@pytest.mark.asyncio
async def test_tds_error_has_the_reason_first_and_no_password(server: FakeServer) -> None:
    server.messages = [
        (911, 16, 11, "Database 'x' does not exist. Make sure that the name is entered correctly."),
        (3013, 16, 1, "BACKUP DATABASE is terminating abnormally."),
    ]
    server.error = FakeError(3013, 16, 1, "BACKUP DATABASE is terminating abnormally.")
    statement = f"BACKUP DATABASE [{PASSWORD}] TO VIRTUAL_DEVICE = N's' WITH FORMAT"
    with pytest.raises(SqlServerError) as caught:
        await tds(server).run(statement)
    error = caught.value
    assert type(error) is SqlServerError
    assert error.numbers == (911, 3013)
    assert error.text == FAILED_TEXT
    assert error.statement == "BACKUP DATABASE [***] TO VIRTUAL_DEVICE = N's' WITH FORMAT"
    assert PASSWORD not in str(error)
    assert server.closed


@pytest.mark.asyncio
async def test_tds_error_without_collected_messages_uses_the_exception(
    server: FakeServer,
) -> None:
    server.error = FakeError(3201, 16, 1, "Cannot open backup device 'set'.")
    with pytest.raises(SqlServerError) as caught:
        await tds(server).run(STATEMENT)
    assert caught.value.numbers == (3201,)
    assert "Cannot open backup device 'set'." in str(caught.value)


@pytest.mark.asyncio
async def test_tds_connect_failure(server: FakeServer) -> None:
    server.connect_error = FakeError(18456, 14, 1, f"Login failed for user 'sa' ({PASSWORD}).")
    with pytest.raises(SqlServerConnectionError) as caught:
        await tds(server).run(STATEMENT)
    assert caught.value.numbers == (18456,)
    assert "cannot connect as 'sa': Login failed for user 'sa' (***)." in str(caught.value)
    assert PASSWORD not in str(caught.value)
    assert server.statements == []


@pytest.mark.asyncio
async def test_tds_cancel_sends_an_attention_and_waits_for_the_end(server: FakeServer) -> None:
    server.block = True
    with anyio.fail_after(10):
        async with anyio.create_task_group() as group:
            group.start_soon(tds(server).run, STATEMENT)
            await anyio.to_thread.run_sync(server.executing.wait)
            group.cancel_scope.cancel()
    assert server.cursor is not None
    assert server.cursor.attentions == 1
    assert server.execute_returned  # the statement ended before run() returned
    assert server.closed


@pytest.mark.asyncio
async def test_tds_cancel_drops_the_connection_when_attention_is_ignored(
    server: FakeServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(trigger_module, "ATTENTION_SECONDS", 0.3)
    server.block = True
    server.obey_attention = False
    with anyio.fail_after(10):
        async with anyio.create_task_group() as group:
            group.start_soon(tds(server).run, STATEMENT)
            await anyio.to_thread.run_sync(server.executing.wait)
            started = time.monotonic()
            group.cancel_scope.cancel()
    assert time.monotonic() - started >= 0.3
    assert server.cursor is not None
    assert server.cursor.attentions == 1
    assert server.execute_returned
    assert server.closed


# --- python-tds itself, against sockets that never answer --------------------------------


@pytest.fixture
def listener() -> Iterator[socket.socket]:
    sock = socket.create_server(("127.0.0.1", 0))
    yield sock
    sock.close()


@pytest.mark.asyncio
async def test_tds_cancel_during_login_ends_pytds(listener: socket.socket) -> None:
    port = listener.getsockname()[1]
    trigger = TdsTrigger("127.0.0.1", port, "sa", PASSWORD, login_timeout=60)
    with anyio.fail_after(10):
        async with anyio.create_task_group() as group:
            group.start_soon(trigger.run, STATEMENT)
            accepted, _ = await anyio.to_thread.run_sync(listener.accept)
            # pytds sent its PRELOGIN and waits for the answer that never comes.
            assert await anyio.to_thread.run_sync(accepted.recv, 1)
            started = time.monotonic()
            group.cancel_scope.cancel()
        elapsed = time.monotonic() - started
    with accepted:
        accepted.settimeout(5)
        while accepted.recv(65536):  # the rest of the PRELOGIN, then end of file
            pass
    assert elapsed < 1.0  # no attention (no statement yet): the socket shut at once


@pytest.mark.asyncio
async def test_tds_connection_refused(listener: socket.socket) -> None:
    port = listener.getsockname()[1]
    listener.close()
    trigger = TdsTrigger("127.0.0.1", port, "sa", PASSWORD, login_timeout=5)
    with anyio.fail_after(10), pytest.raises(SqlServerConnectionError) as caught:
        await trigger.run(STATEMENT)
    assert f"SQL Server 127.0.0.1,{port}: cannot connect as 'sa'" in str(caught.value)
    assert PASSWORD not in str(caught.value)


@pytest.mark.asyncio
async def test_sqlcmd_refuses_a_line_break_it_would_read_as_its_own_commands(
    tmp_path: Path,
) -> None:
    from vdistream.sqlserver.trigger import SqlcmdTrigger
    from vdistream.sqlserver.tsql import StatementError

    program, ran = tmp_path / "sqlcmd", tmp_path / "ran"
    program.write_text(f"#!/bin/sh\ntouch {ran}\n")
    program.chmod(0o755)
    trigger = SqlcmdTrigger("127.0.0.1", 1433, "sa", "pw", sqlcmd=str(program))
    with pytest.raises(StatementError, match="line break"):
        await trigger.run("BACKUP DATABASE [a\nGO\n:!! rm -rf /] TO VIRTUAL_DEVICE = N'x'")
    assert not ran.exists()
