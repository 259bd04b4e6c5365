"""How a T-SQL statement reaches SQL Server: python-tds in a worker thread, or ``sqlcmd``.

A ``Trigger`` runs one statement (``run``) and returns what the server said:
``StatementResult`` with its messages (``SqlMessage``: number, severity, state, text)
and, for a query, its rows (each value as text, SQL ``NULL`` as ``None``). A statement
fails with ``SqlServerError``: one line with SQL Server's own words, the reason first
(e.g. 911 "Database 'x' does not exist. ...") and the 3013 "... is terminating
abnormally." after it, the numbers, and the statement, with the password removed from
all of it. ``SqlServerConnectionError`` is the same when no session could be opened (a
refused or timed-out connection, login failed, 18456).

Cancelling the task awaiting ``run`` stops the statement and returns only after it
ended: SQL Server aborts a BACKUP or RESTORE on an attention or when its connection
drops, and then signals abort on the device set; the engine must not close the set
before that (issue 13, "one job, one abort").

* ``TdsTrigger`` (default): python-tds (``pytds``), pure Python, in a worker thread of a
  limiter of its own (the device pumps' threads can never starve it), ``autocommit``,
  database ``master``, no command timeout (``timeout=None``: pytds calls
  ``sock.settimeout(login.query_timeout)`` after login, ``pytds/__init__.py``
  ``_connect``; ``0`` would make the socket non-blocking, not unbounded), the login
  bounded by ``LOGIN_TIMEOUT``. Messages are read from ``cursor.messages`` (pytds's
  DB-API extension: ``(class, exception)`` pairs whose exception carries ``number``,
  ``severity``, ``state``, ``text``, made by ``tds_base._create_exception_by_message``);
  a failed statement raises a ``pytds.tds_base.Error`` with the same fields, the last
  error's number, all texts joined. Cancelling sends an attention from the event loop's
  side (``_TdsSession.put_cancel``, which only writes the ATTENTION packet; pytds's
  public ``Cursor.cancel()`` would also read the reply, racing the worker thread that is
  reading it already), waits ``ATTENTION_SECONDS`` for the server to end the statement,
  then shuts the socket down (a ``close()`` from another thread does not wake a blocked
  ``recv`` on Linux; ``shutdown`` does, and also ends a ``connect`` in progress), which
  drops the connection; the thread then ends and the awaiting task returns.
  vdistream opens the TCP connection itself and hands it to ``pytds.connect(sock=...)``
  so that it can do that at any moment, the login included. Not run against a real SQL
  Server here: unit tests check the statements sent and the arguments of ``connect``.
* ``SqlcmdTrigger``: ``sqlcmd -S host,port -U user -d master -b -Q "<statement>"``
  (queries add ``-h -1 -W -s "|"``), as Microsoft's Linux sample does; the password
  only in the environment variable ``SQLCMDPASSWORD``. ``sqlcmd`` is the argument, else
  ``VDISTREAM_SQLCMD``, else the one on ``PATH``, else ``/opt/mssql-tools18/bin`` or
  ``/opt/mssql-tools/bin`` (where Microsoft's packages put it). It runs as every child of
  vdistream does (``vdistream.engines.process.open_child``: its own process group, the
  parent-death signal); its output is read to a bound. ``Msg N, Level L, State S, ...``
  lines and the text line after them are messages; other lines are informational
  messages (sqlcmd prints those without their numbers: the ones the engine relies on,
  3014 "... successfully processed ...", 4035 "Processed ... pages ...", 3262 "The
  backup set on file 1 is valid.", are recognised by their text) or, for a query, rows
  (``|``-split, ``NULL`` is ``None``: sqlcmd cannot show a value holding ``|`` or the
  text ``NULL`` unambiguously). Exit status 1 (``-b``: an error of severity 11 or more)
  or any such message fails the statement. Cancelling sends SIGTERM to its group,
  SIGKILL after ``KILL_AFTER_SECONDS``, and reaps it (``engines.process.terminate``).
  sqlcmd substitutes ``$(name)`` in the text it runs, so a statement containing ``$(``
  is refused (the tds trigger runs it).
"""

from __future__ import annotations

import contextlib
import dataclasses
import decimal
import os
import re
import shutil
import socket
import subprocess
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Protocol

import anyio
import anyio.abc
import anyio.to_thread

from vdistream.engines.process import (
    STDERR_GRACE_SECONDS,
    OutputTail,
    describe_status,
    forget_child,
    open_child,
    terminate,
)
from vdistream.errors import ConfigError, VdistreamError
from vdistream.log import get_logger
from vdistream.sqlserver.tsql import StatementError
from vdistream.sqlserver.url import MssqlURL, redact_secret

if TYPE_CHECKING:
    from _typeshed import ReadableBuffer, WriteableBuffer

__all__ = (
    "ATTENTION_SECONDS",
    "ERROR_SEVERITY",
    "KILL_AFTER_SECONDS",
    "LOGIN_TIMEOUT",
    "SQLCMD_VARIABLE",
    "SqlMessage",
    "SqlServerConnectionError",
    "SqlServerError",
    "SqlcmdNotFoundError",
    "SqlcmdTrigger",
    "StatementResult",
    "TdsTrigger",
    "Trigger",
    "find_sqlcmd",
    "parse_sqlcmd_output",
    "trigger_for",
)

#: Messages of this severity or more are errors (SQL Server's own line; sqlcmd's -b too).
ERROR_SEVERITY = 11
#: Seconds between SIGTERM and SIGKILL for sqlcmd.
KILL_AFTER_SECONDS = 2.0
#: Seconds SQL Server gets to end a statement after an attention before the connection
#: is dropped.
ATTENTION_SECONDS = 2.0
#: Bound of connecting and logging in (python-tds).
LOGIN_TIMEOUT = 15.0
#: The environment variable naming the sqlcmd to run.
SQLCMD_VARIABLE = "VDISTREAM_SQLCMD"
#: Where Microsoft's packages install sqlcmd (not on PATH by default).
SQLCMD_DIRECTORIES = ("/opt/mssql-tools18/bin", "/opt/mssql-tools/bin")
#: The bytes of sqlcmd's standard output kept from its start, and from its end.
OUTPUT_HEAD = 16 * 1024 * 1024
OUTPUT_TAIL = 256 * 1024
#: Worker threads for statements per TdsTrigger (statements run beside the pumps).
STATEMENT_THREADS = 4
LOGIN_FAILED = 18456

_log = get_logger(__name__)


# --- results and errors ---------------------------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True)
class SqlMessage:
    """One message of SQL Server: its number (0 when sqlcmd printed an informational
    message this module does not recognise), severity, state and text."""

    number: int
    severity: int
    state: int
    text: str

    @property
    def is_error(self) -> bool:
        return self.severity >= ERROR_SEVERITY


@dataclasses.dataclass(frozen=True, slots=True)
class StatementResult:
    """What a statement that succeeded returned: its messages in order and, for a
    query, its rows (values as text, NULL as None)."""

    messages: tuple[SqlMessage, ...] = ()
    rows: tuple[tuple[str | None, ...], ...] = ()

    def has(self, number: int) -> bool:
        """Whether message ``number`` (e.g. 3014, success) was received."""
        return any(message.number == number for message in self.messages)


class SqlServerError(VdistreamError):
    """SQL Server failed the statement (module docstring). ``messages`` are all the
    messages received, ``numbers`` the errors' numbers in order (the reason first, 3013
    last), ``number`` the first of them (None when there was none, e.g. sqlcmd could
    not connect), ``text`` SQL Server's words, ``statement`` the statement, ``server``
    ``host,port``, ``returncode`` sqlcmd's exit status; the password removed from all.
    """

    def __init__(
        self,
        text: str,
        *,
        statement: str | None = None,
        server: str | None = None,
        messages: Iterable[SqlMessage] = (),
        returncode: int | None = None,
    ) -> None:
        self.text = _one_line(text)
        self.statement = _one_line(statement) if statement is not None else None
        self.server = server
        self.messages = tuple(messages)
        self.numbers = tuple(m.number for m in self.messages if m.is_error)
        self.number = self.numbers[0] if self.numbers else None
        self.returncode = returncode
        line = f"SQL Server {server}: {self.text}" if server else f"SQL Server: {self.text}"
        if self.numbers:
            line += f" [Msg {', '.join(str(n) for n in self.numbers)}]"
        if self.statement:
            line += f" (statement: {self.statement})"
        super().__init__(line)


class SqlServerConnectionError(SqlServerError):
    """No session with SQL Server: the connection or the login failed."""


class SqlcmdNotFoundError(ConfigError):
    """No sqlcmd to run: not given, not in VDISTREAM_SQLCMD, not on PATH."""


def _one_line(text: str) -> str:
    return " ".join(text.split())


class Trigger(Protocol):
    """Runs one T-SQL statement on the server (module docstring)."""

    async def run(self, statement: str, *, query: bool = False) -> StatementResult:
        """Run ``statement``; ``query=True`` when it returns rows. Raises
        ``SqlServerError``; cancelling stops the statement and returns once it ended."""
        ...


def trigger_for(url: MssqlURL) -> Trigger:
    """The trigger the URL asks for (``?trigger=``, default ``tds``)."""
    if url.trigger == "sqlcmd":
        return SqlcmdTrigger(url.host, url.port, url.user, url.password)
    return TdsTrigger(url.host, url.port, url.user, url.password)


def _failure(
    cls: type[SqlServerError],
    text: str,
    *,
    password: str,
    statement: str | None,
    server: str,
    messages: Sequence[SqlMessage] = (),
    returncode: int | None = None,
) -> SqlServerError:
    """The error with the password removed from every text in it."""

    def clean(value: str) -> str:
        return redact_secret(value, password)

    return cls(
        clean(text),
        statement=clean(statement) if statement is not None else None,
        server=server,
        messages=[dataclasses.replace(m, text=clean(m.text)) for m in messages],
        returncode=returncode,
    )


def _errors_text(messages: Sequence[SqlMessage]) -> str:
    return " ".join(m.text.strip() for m in messages if m.is_error and m.text.strip())


# --- sqlcmd ---------------------------------------------------------------------------


def find_sqlcmd(
    program: str | os.PathLike[str] | None = None, env: Mapping[str, str] | None = None
) -> str:
    """The sqlcmd to run (module docstring); ``SqlcmdNotFoundError`` naming where it
    was looked for."""
    environment = os.environ if env is None else env
    origin = "the sqlcmd setting"
    if program is None and environment.get(SQLCMD_VARIABLE):
        program, origin = environment[SQLCMD_VARIABLE], SQLCMD_VARIABLE
    if program is not None:
        text = os.fspath(program)
        found = shutil.which(text, path=environment.get("PATH", os.defpath))
        if found is None:
            raise SqlcmdNotFoundError(f"sqlcmd {text!r} ({origin}) is not an executable file")
        return found
    found = shutil.which("sqlcmd", path=environment.get("PATH", os.defpath))
    for directory in SQLCMD_DIRECTORIES:
        if found is not None:
            break
        found = shutil.which("sqlcmd", path=directory)
    if found is None:
        raise SqlcmdNotFoundError(
            "sqlcmd not found: not on PATH nor in "
            f"{' or '.join(SQLCMD_DIRECTORIES)}; install mssql-tools18 or set "
            f"{SQLCMD_VARIABLE} to its path"
        )
    return found


_MSG = re.compile(r"^Msg (\d+), Level (\d+), State (\d+)(?:,.*)?$")
#: sqlcmd prints informational messages as text only; those the engine relies on.
_KNOWN_INFO = (
    (re.compile(r"^(?:BACKUP|RESTORE) .* successfully processed \d+ pages in "), 3014),
    (re.compile(r"^Processed \d+ pages for database "), 4035),
    (re.compile(r"^The backup set on file \d+ is valid\."), 3262),
)


def _info_number(text: str) -> int:
    for pattern, number in _KNOWN_INFO:
        if pattern.match(text):
            return number
    return 0


def parse_sqlcmd_output(
    text: str, *, query: bool
) -> tuple[tuple[SqlMessage, ...], tuple[tuple[str | None, ...], ...], tuple[str, ...]]:
    """Messages, rows and sqlcmd's own error lines (``Sqlcmd: Error: ...``: it could not
    connect or run the statement at all) in what ``sqlcmd`` printed (module docstring)."""
    messages: list[SqlMessage] = []
    rows: list[tuple[str | None, ...]] = []
    tool: list[str] = []
    lines = text.splitlines()
    index = 0
    while index < len(lines):
        line = lines[index].rstrip()
        index += 1
        header = _MSG.match(line)
        if header:
            body = lines[index].strip() if index < len(lines) else ""
            index += 1
            number, level, state = (int(group) for group in header.groups())
            messages.append(SqlMessage(number, level, state, body))
        elif line.startswith("Sqlcmd: Error"):
            tool.append(line.strip())
        elif not line.strip():
            continue
        elif query:
            rows.append(tuple(None if value == "NULL" else value for value in line.split("|")))
        else:
            text_line = line.strip()
            messages.append(SqlMessage(_info_number(text_line), 0, 0, text_line))
    return tuple(messages), tuple(rows), tuple(tool)


class _Output:
    """A child's output: the first ``head`` bytes and the last ``tail`` bytes."""

    def __init__(self, head: int = OUTPUT_HEAD, tail: int = OUTPUT_TAIL) -> None:
        self.limit = head
        self.head = bytearray()
        self.tail = OutputTail(tail)

    def append(self, chunk: bytes) -> None:
        room = self.limit - len(self.head)
        if room > 0:
            self.head += chunk[:room]
            chunk = chunk[room:]
        if chunk:
            self.tail.append(chunk)

    def text(self) -> str:
        text = self.head.decode("utf-8", errors="replace")
        if self.tail.total:
            cut = self.tail.total - len(self.tail.text().encode())
            marker = f"\n[{cut} bytes left out]\n" if cut > 0 else ""
            text += marker + self.tail.text()
        return text


async def _drain(stream: anyio.abc.ByteReceiveStream | None, take: Callable[[bytes], None]) -> None:
    if stream is None:
        return
    with contextlib.suppress(anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
        async for chunk in stream:
            take(chunk)


class SqlcmdTrigger:
    """Statements through ``sqlcmd`` (module docstring). ``options`` are inserted after
    ``-b`` (e.g. ``["-C"]`` to trust the server's self-signed certificate)."""

    def __init__(
        self,
        host: str,
        port: int,
        user: str,
        password: str,
        *,
        sqlcmd: str | os.PathLike[str] | None = None,
        options: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
    ) -> None:
        self.program = find_sqlcmd(sqlcmd, env)
        self.host = host
        self.port = port
        self.user = user
        self.options = tuple(options)
        self.env = env
        self._password = password
        self.server = f"{host},{port}"

    def __repr__(self) -> str:
        return f"SqlcmdTrigger({self.program!r}, {self.server!r}, user={self.user!r})"

    def argv(self, statement: str, *, query: bool = False) -> list[str]:
        """The command line for ``statement`` (Contract C; never the password)."""
        argv = [self.program, "-S", self.server, "-U", self.user, "-d", "master", "-b"]
        argv += self.options
        if query:
            argv += ["-h", "-1", "-W", "-s", "|"]
        return [*argv, "-Q", statement]

    async def run(self, statement: str, *, query: bool = False) -> StatementResult:
        if "$(" in statement:
            raise StatementError(
                "sqlcmd would substitute the $(...) in this statement; use trigger=tds: "
                + _one_line(redact_secret(statement, self._password))
            )
        if "\n" in statement or "\r" in statement:
            # a line of its own starting with GO or :!! is a sqlcmd command, not T-SQL
            raise StatementError(
                "a name in this statement has a line break, which sqlcmd would read as "
                "its own commands; use trigger=tds: "
                + _one_line(redact_secret(statement, self._password))
            )
        argv = self.argv(statement, query=query)
        out, err = _Output(), OutputTail()
        try:
            process, record, observer = await open_child(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                env=self.env,
                extra_env={"SQLCMDPASSWORD": self._password},
            )
        except OSError as exc:
            raise self._error(
                SqlServerConnectionError,
                f"cannot start {self.program}: {exc.strerror or exc}",
                statement,
            ) from None
        try:
            async with anyio.create_task_group() as group:
                group.start_soon(_drain, process.stdout, out.append)
                group.start_soon(_drain, process.stderr, err.append)
                await process.wait()
                # A grandchild holding the pipes open must not keep us here.
                group.cancel_scope.deadline = anyio.current_time() + STDERR_GRACE_SECONDS
        finally:
            with anyio.CancelScope(shield=True):
                await terminate(process, KILL_AFTER_SECONDS)
                await process.aclose()
                await forget_child(record, observer)
        returncode = process.returncode
        assert returncode is not None
        messages, rows, tool = parse_sqlcmd_output(out.text(), query=query)
        errors = [m for m in messages if m.is_error]
        if returncode == 0 and not errors and not tool:
            return StatementResult(messages, rows)
        stderr_lines = [line.strip() for line in err.text().splitlines() if line.strip()]
        text = (
            _errors_text(messages)
            or " ".join(tool)
            or " ".join(stderr_lines[-5:])
            or f"sqlcmd {describe_status(returncode)}"
        )
        connection = bool(tool) or any(m.number == LOGIN_FAILED for m in errors)
        raise self._error(
            SqlServerConnectionError if connection else SqlServerError,
            text,
            statement,
            messages=messages,
            returncode=returncode,
        )

    def _error(
        self,
        cls: type[SqlServerError],
        text: str,
        statement: str,
        *,
        messages: Sequence[SqlMessage] = (),
        returncode: int | None = None,
    ) -> SqlServerError:
        return _failure(
            cls,
            text,
            password=self._password,
            statement=statement,
            server=self.server,
            messages=messages,
            returncode=returncode,
        )


# --- python-tds -----------------------------------------------------------------------


def _value_text(value: object) -> str | None:
    """A column value as sqlcmd would print it (rows are text whichever trigger ran)."""
    if value is None:
        return None
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, decimal.Decimal):
        return format(value, "f")
    if isinstance(value, bytes | bytearray):
        return "0x" + bytes(value).hex().upper()
    if hasattr(value, "isoformat"):
        return str(value.isoformat())
    return str(value)


def _pytds_messages(cursor: Any) -> list[SqlMessage]:
    """The messages pytds collected for the cursor's last request (module docstring)."""
    try:
        pairs = cursor.messages or []
    except Exception:  # a closed or broken cursor: nothing more to learn from it
        return []
    return [_message_of(error) for _, error in pairs]


def _message_of(error: object) -> SqlMessage:
    text = getattr(error, "text", None)
    return SqlMessage(
        int(getattr(error, "number", 0) or 0),
        int(getattr(error, "severity", 0) or 0),
        int(getattr(error, "state", 0) or 0),
        str(text if text is not None else error),
    )


class _CallSocket(socket.socket):
    """The socket of one call. While ``login_error`` is set (during pytds's login), a
    failure of the socket raises it: pytds treats a login error as final, whereas on a
    connection error it sleeps out the login timeout and retries, on this same, dead,
    socket."""

    login_error: type[Exception] | None = None

    def recv_into(self, buffer: WriteableBuffer, nbytes: int = 0, flags: int = 0) -> int:
        try:
            return super().recv_into(buffer, nbytes, flags)
        except OSError as exc:
            if self.login_error is None:
                raise
            raise self.login_error(str(exc)) from exc

    def recv(self, bufsize: int, flags: int = 0) -> bytes:
        try:
            return super().recv(bufsize, flags)
        except OSError as exc:
            if self.login_error is None:
                raise
            raise self.login_error(str(exc)) from exc

    def sendall(self, data: ReadableBuffer, flags: int = 0) -> None:
        try:
            super().sendall(data, flags)
        except OSError as exc:
            if self.login_error is None:
                raise
            raise self.login_error(str(exc)) from exc


class _TdsCall:
    """One statement on one connection, run by a worker thread (``work``) and
    interrupted from the event loop's thread (``attention``, ``drop``)."""

    def __init__(
        self,
        connect: Callable[..., Any] | None,
        arguments: dict[str, Any],
        statement: str,
        query: bool,
    ) -> None:
        self.connect = connect
        self.arguments = arguments
        self.statement = statement
        self.query = query
        self.lock = threading.Lock()
        self.cancelled = False
        self.socket: socket.socket | None = None
        self.connection: Any = None
        self.cursor: Any = None
        self.executing = False
        # outcome
        self.messages: list[SqlMessage] = []
        self.rows: list[tuple[str | None, ...]] = []
        self.connect_error: BaseException | None = None
        self.error: BaseException | None = None

    def stopped(self) -> bool:
        # A method, not the attribute: another thread sets it between two reads.
        return self.cancelled

    # -- the worker thread ---------------------------------------------------------

    def work(self) -> None:
        """Connect, run, collect; never raises (the outcome is in the attributes)."""
        try:
            connect = self.connect if self.connect is not None else self.own_socket
            connection = connect(**self.arguments)
        except Exception as exc:
            self.connect_error = exc
            return
        try:
            with self.lock:
                self.connection = connection
                if self.stopped():
                    return
            cursor = connection.cursor()
            with self.lock:
                self.cursor = cursor
                if self.stopped():
                    return
                self.executing = True
            try:
                self._execute(cursor)
            except Exception as exc:
                self.error = exc
            finally:
                with self.lock:
                    self.executing = False
            self.messages = _pytds_messages(cursor)
        finally:
            with contextlib.suppress(Exception):
                connection.close()

    def _execute(self, cursor: Any) -> None:
        cursor.execute(self.statement)
        while not self.stopped():
            if self.query and cursor.description is not None:
                self.rows += [tuple(_value_text(v) for v in row) for row in cursor.fetchall()]
            if not cursor.nextset():
                break

    def own_socket(self, **arguments: Any) -> Any:
        """``pytds.connect`` over a socket this call opened, so that ``drop`` can end
        the connection at any moment (module docstring)."""
        import pytds  # type: ignore[import-untyped]  # loaded when used, not at import

        host, port = arguments["dsn"], arguments["port"]
        failure: OSError | None = None
        for family, kind, proto, _, address in socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM
        ):
            sock = _CallSocket(family, kind, proto)
            with self.lock:
                if self.cancelled:
                    sock.close()
                    raise OSError("cancelled before connecting")
                self.socket = sock
            try:
                sock.settimeout(arguments["login_timeout"])
                sock.connect(address)
                break
            except OSError as exc:
                failure = exc
                with self.lock:
                    self.socket = None
                sock.close()
        else:
            raise failure or OSError(f"{host} has no address")
        sock.login_error = pytds.tds_base.LoginError
        try:
            connection = pytds.connect(**arguments, sock=sock, disable_connect_retry=True)
        except BaseException:
            sock.close()
            raise
        sock.login_error = None
        return connection

    # -- the event loop's thread ---------------------------------------------------

    def attention(self) -> bool:
        """Ask the server to end the statement; False when none was sent (yet)."""
        with self.lock:
            self.cancelled = True
            cursor = self.cursor if self.executing else None
        if cursor is None:
            return False
        session = getattr(cursor, "_session", None)
        put_cancel = getattr(session, "put_cancel", None)
        try:
            if callable(put_cancel):
                put_cancel()  # writes the ATTENTION packet only; the worker reads the reply
            else:
                cursor.cancel()
        except Exception as exc:  # a broken connection ends the statement anyway
            _log.debug("tds_attention_failed", error=str(exc))
            return False
        return True

    def drop(self) -> None:
        """End the connection under the worker: its blocked call returns."""
        with self.lock:
            self.cancelled = True
            sock, connection = self.socket, self.connection
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        elif connection is not None:
            with contextlib.suppress(Exception):
                connection.close()


class TdsTrigger:
    """Statements through python-tds (module docstring). ``connect`` replaces
    ``pytds.connect`` (tests): it is called with keyword arguments only, ``dsn``,
    ``port``, ``user``, ``password``, ``database``, ``autocommit``, ``timeout``,
    ``login_timeout``, ``appname``, and returns a DB-API connection."""

    def __init__(
        self,
        host: str,
        port: int,
        user: str,
        password: str,
        *,
        connect: Callable[..., Any] | None = None,
        login_timeout: float = LOGIN_TIMEOUT,
    ) -> None:
        self.host = host
        self.port = port
        self.user = user
        self.login_timeout = login_timeout
        self.server = f"{host},{port}"
        self._password = password
        self._connect = connect
        self._limiter: anyio.CapacityLimiter | None = None

    def __repr__(self) -> str:
        return f"TdsTrigger({self.server!r}, user={self.user!r})"

    def connect_arguments(self) -> dict[str, Any]:
        """What ``connect`` is called with (the password included: never log it)."""
        return {
            "dsn": self.host,
            "port": self.port,
            "user": self.user,
            "password": self._password,
            "database": "master",
            "autocommit": True,
            "timeout": None,
            "login_timeout": self.login_timeout,
            "appname": "vdistream",
        }

    async def run(self, statement: str, *, query: bool = False) -> StatementResult:
        if self._limiter is None:
            self._limiter = anyio.CapacityLimiter(STATEMENT_THREADS)
        call = _TdsCall(self._connect, self.connect_arguments(), statement, query)
        done = anyio.Event()
        async with anyio.create_task_group() as group:
            group.start_soon(self._interrupt_when_cancelled, call, done)
            try:
                await anyio.to_thread.run_sync(
                    call.work, abandon_on_cancel=False, limiter=self._limiter
                )
            finally:
                done.set()
            group.cancel_scope.cancel()
        return self._outcome(call)

    async def _interrupt_when_cancelled(self, call: _TdsCall, done: anyio.Event) -> None:
        try:
            await done.wait()
        except anyio.get_cancelled_exc_class():
            if not done.is_set():  # the caller was cancelled, not our own ending
                with anyio.CancelScope(shield=True):
                    await self._interrupt(call, done)
            raise

    async def _interrupt(self, call: _TdsCall, done: anyio.Event) -> None:
        _log.info("tds_statement_cancelling", server=self.server)
        with anyio.move_on_after(ATTENTION_SECONDS):
            # A worker thread: the write is tiny but the socket is a blocking one. If it
            # hangs, drop() below ends it.
            if await anyio.to_thread.run_sync(call.attention, abandon_on_cancel=True):
                await done.wait()
        if not done.is_set():
            call.drop()
        await done.wait()  # the shut-down socket makes every call in the thread return

    def _outcome(self, call: _TdsCall) -> StatementResult:
        if call.connect_error is not None:
            exc = call.connect_error
            messages = [_message_of(exc)] if getattr(exc, "number", None) else []
            raise _failure(
                SqlServerConnectionError,
                f"cannot connect as {self.user!r}: {_message_of(exc).text or type(exc).__name__}",
                password=self._password,
                statement=call.statement,
                server=self.server,
                messages=messages,
            ) from None
        messages = call.messages
        if call.error is not None:
            exc = call.error
            if getattr(exc, "number", None) and not any(m.is_error for m in messages):
                messages = [*messages, _message_of(exc)]
            text = _errors_text(messages) or (
                f"the connection failed: {_message_of(exc).text or type(exc).__name__}"
            )
            cls = (
                SqlServerConnectionError
                if any(m.number == LOGIN_FAILED for m in messages)
                else SqlServerError
            )
            raise _failure(
                cls,
                text,
                password=self._password,
                statement=call.statement,
                server=self.server,
                messages=messages,
            ) from None
        if any(m.is_error for m in messages):
            raise _failure(
                SqlServerError,
                _errors_text(messages),
                password=self._password,
                statement=call.statement,
                server=self.server,
                messages=messages,
            )
        return StatementResult(tuple(messages), tuple(call.rows))
