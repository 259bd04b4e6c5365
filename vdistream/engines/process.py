"""A subprocess as a byte producer (its stdout) or consumer (its stdin).

``ProcessProducer(argv)`` is the source of a backup: the command's standard output.
``ProcessConsumer(argv)`` is the destination of a restore: the command's standard
input. Both are ``ScopedStream``\\s for ``ScopedBackup`` / ``ScopedRestore``
(``vdistream.engines.scoped``), which stripe and frame the stream exactly like the
SQL-Server-like striping engine. ``run_tool`` runs a helper command to its end (a version
query, ``pg_verifybackup``, ``createdb``) under the same rules.

How a process is run, and why:

* ``argv`` is a list; no shell is involved unless the caller's argv starts one
  (``["/bin/sh", "-c", line]``), so nothing in a path or a URL is ever interpreted.
* The environment is passed through (``env=None``: vdistream's own, plus ``extra_env``),
  so ``PG*`` variables, ``PATH`` and the like work as in a shell.
* Standard input of a producer (and of ``run_tool``) is ``/dev/null``, and every
  process starts in a session of its own, without a controlling terminal: a tool that
  wants to prompt (for a password, a confirmation) cannot reach the user's terminal and
  fails instead of hanging the job. The own session is also a process group, so that
  terminating the process reaches its children too (``sh -c 'a | b'``).
* Standard error is read while the process runs (so a chatty tool never blocks on a
  full pipe) into a bounded buffer keeping the last ``stderr_limit`` bytes (64 KiB).
  Errors carry that text, trimmed, with the exit status.
* Data moves zero copy: the producer reads the pipe with ``readv`` straight into the
  set's buffer, the consumer writes the buffer's view to the pipe. The pipes are made
  non-blocking and waited on with ``anyio.wait_readable`` / ``wait_writable``. The
  producer fills a large buffer in one worker-thread call (``_read_available``: it
  waits up to 20 ms in ``poll`` for more output), so the copy out of the pipe costs the
  event loop one thread hop per buffer, not one ``readv`` per 64-128 KiB the tool wrote.

Failure semantics:

* A producer's stream ends only when its stdout reached end of file AND the process
  exited with status 0: ``readinto`` waits for the exit before it returns ``0``, so a
  truncated stream from a failing tool can never complete a backup (a tool that
  closes its output but goes on running keeps the job waiting, cancellably; the job's
  stall watchdog ends that). A non-zero exit,
  death by a signal, or (``fail_on_stderr=True``) any output on stderr raises
  ``ProducerFailedError``: the engine aborts the set with it.
* A consumer that exits non-zero, dies, or stops reading before the whole stream was
  written raises ``ConsumerFailedError``; ``finish()`` closes its stdin and waits for
  the exit (the tool's own work after end of input is part of the restore).
* On abort, failure or cancellation the process group is terminated: SIGTERM, then
  SIGKILL after ``terminate_timeout`` seconds, and the process is reaped before the
  engine returns. No orphan is left behind.

A child never outlives vdistream, even after ``kill -9``:

* Every child (producer, consumer, ``run_tool``) is started with the parent-death
  signal ``PR_SET_PDEATHSIG`` = ``SIGKILL``: the kernel kills it when vdistream dies,
  however it dies. It is set without a ``preexec_fn`` (unsafe in a process with
  threads): the child is exec'd through util-linux's ``setpriv --pdeathsig KILL``, which
  makes the ``prctl`` in the single-threaded exec'd child, then through a two-line
  ``/bin/sh`` shim that closes the race of a parent dying between ``fork`` and
  ``prctl`` (then nobody would signal the child): after the ``prctl`` the shim checks
  that its parent is still the vdistream process that started it, and exits with 125
  otherwise; then it ``exec``\\s the command, so the command keeps the child's pid (and
  so its process group, see below) and the parent-death signal (kept across ``exec``
  except for set-user-id programs). Cost: two more ``exec``\\s, a few milliseconds per
  child. Since the shim runs the command, a program that is missing or not executable
  is looked up in vdistream first (as ``subprocess`` would, ``PATH`` of the child's
  environment, relative to its ``cwd``) so that the error stays "cannot be started".
* The signal fires when the *thread* that forked the child ends. Children are forked
  only by ``anyio.open_process``, which on asyncio forks in the event-loop thread
  (never in a worker thread): they live as long as the loop's thread, which is as long
  as any job can use them.
* Only the direct child gets the signal: what it started itself (``sh -c 'a | b'``) is
  not signalled by the kernel; such grandchildren see their pipes to vdistream close
  (end of input, ``EPIPE``), and the daemon's ledger (below) ends them at its next start.
* Fallback: without ``setpriv`` (not Linux, or util-linux older than 2.33) children are
  started directly, without the parent-death signal; a warning
  (``pdeathsig_unavailable``) is logged once. The process-group kill on abort and the
  daemon's ledger still apply; a ``kill -9`` of the CLI may then leave its child running.

Every child starts in a session of its own (``start_new_session``), so its process
group id is its pid and ``killpg(pid)`` reaches it and what it started.

Observers: ``observe_children(observer)`` sets, for the current context (and so for the
tasks started from it), a ``ChildObserver`` that is told of every child started
(``ChildRecord``: pid = process group, its start time, a random token) and ended. The
child's environment then also carries ``VDISTREAM_CHILD_ID=<token>``, which its own
children inherit: the daemon's ledger (``vdistream.engines.ledger``) uses it to prove
that a survivor is one of its own. An observer's failure never fails a job (it is
logged).
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import errno
import fcntl
import os
import secrets
import select
import shlex
import shutil
import signal
import subprocess
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from pathlib import Path
from typing import Protocol, TypedDict, Unpack

import anyio
import anyio.abc
import anyio.to_thread

from vdistream import threads
from vdistream.engines.scoped import EndpointError, ScopedStream, endpoint_tasks
from vdistream.engines.streams import ByteConsumer, ByteProducer
from vdistream.log import get_logger
from vdistream.ownership import proc_stat

__all__ = (
    "CHILD_ID_VARIABLE",
    "ORPHANED_AT_START",
    "ChildObserver",
    "ChildRecord",
    "ConsumerFailedError",
    "OutputTail",
    "ProcessConsumer",
    "ProcessFailedError",
    "ProcessOptions",
    "ProcessProducer",
    "ProducerFailedError",
    "ToolFailedError",
    "ToolOutput",
    "describe_status",
    "forget_child",
    "group_alive",
    "group_members",
    "observe_children",
    "open_child",
    "pdeathsig_launcher",
    "reset_child_observer",
    "run_tool",
    "terminate",
)

#: The default bound of the captured standard error.
STDERR_LIMIT = 64 * 1024
#: How much of the captured standard error an error message repeats.
MESSAGE_STDERR_CHARS = 2000
#: After the process exited, how long to wait for its stderr to reach end of file (a
#: grandchild may still hold it open; the exit status is known, the text is a bonus).
STDERR_GRACE_SECONDS = 2.0
#: After killing what is left of a process group, how long to wait until it is empty.
GROUP_GONE_SECONDS = 2.0
#: The pipe size asked for: fewer, larger transfers than the 64 KiB default.
PIPE_SIZE = 1 << 20

_log = get_logger(__name__)


def _command_name(argv: Sequence[str]) -> str:
    return shlex.join(argv) if len(argv) <= 6 else shlex.join([*argv[:6], "..."])


def describe_status(returncode: int) -> str:
    """``"exited with status 3"`` / ``"was killed by signal SIGKILL (9)"``."""
    if returncode < 0:
        number = -returncode
        try:
            name = signal.Signals(number).name
        except ValueError:
            name = f"signal {number}"
        return f"was killed by signal {name} ({number})"
    return f"exited with status {returncode}"


class ProcessFailedError(EndpointError):
    """A process of the engine failed.

    ``command`` is its argv, ``returncode`` its exit status (negative: the signal
    number, ``None``: it could not be started or had not exited), ``stderr`` the last
    bytes of its standard error, decoded. The message names the command, says how it
    ended and repeats the trimmed end of its standard error.
    """

    def __init__(
        self,
        message: str,
        *,
        command: Sequence[str],
        returncode: int | None = None,
        stderr: str = "",
        set_name: str | None = None,
    ) -> None:
        self.command = list(command)
        self.returncode = returncode
        self.stderr = stderr
        text = stderr.strip()
        if len(text) > MESSAGE_STDERR_CHARS:
            text = "..." + text[-MESSAGE_STDERR_CHARS:]
        full = f"{_command_name(command)!s}: {message}"
        if text:
            full += f": {text}"
        super().__init__(full, set_name=set_name)


class ProducerFailedError(ProcessFailedError):
    """The process producing a backup's stream failed (module docstring)."""


class ConsumerFailedError(ProcessFailedError):
    """The process consuming a restore's stream failed (module docstring)."""


class ToolFailedError(ProcessFailedError):
    """A helper tool run by ``run_tool`` failed."""


class OutputTail:
    """The last ``limit`` bytes written to it, and how many were written in all."""

    def __init__(self, limit: int = STDERR_LIMIT) -> None:
        self.limit = limit
        self.total = 0
        self._data = bytearray()

    def append(self, chunk: bytes) -> None:
        self.total += len(chunk)
        self._data += chunk
        if len(self._data) > self.limit:
            del self._data[: len(self._data) - self.limit]

    def text(self) -> str:
        return self._data.decode("utf-8", errors="replace")


async def _collect(
    stream: anyio.abc.ByteReceiveStream | None, take: Callable[[bytes], None]
) -> None:
    """Hand what a child writes to ``stream`` to ``take``, to its end (a closed or
    broken pipe is an end too)."""
    assert stream is not None
    with contextlib.suppress(anyio.BrokenResourceError, anyio.ClosedResourceError):
        async for chunk in stream:
            take(chunk)


def _environment(env: Mapping[str, str] | None, extra: Mapping[str, str] | None) -> dict[str, str]:
    merged = dict(os.environ if env is None else env)
    if extra:
        merged.update(extra)
    return merged


def _pipe() -> tuple[int, int]:
    read, write = os.pipe2(os.O_CLOEXEC)  # the child's dup2 clears O_CLOEXEC on its end
    with contextlib.suppress(OSError):  # an optimisation only (pipe-max-size may refuse)
        fcntl.fcntl(write, fcntl.F_SETPIPE_SZ, PIPE_SIZE)
    return read, write


# --- starting a child: parent-death signal, observers (module docstring) -------------

#: The environment variable carrying a child's token when an observer watches it.
CHILD_ID_VARIABLE = "VDISTREAM_CHILD_ID"
#: The exit status of the shim when vdistream died before the parent-death signal was set.
ORPHANED_AT_START = 125
# After setpriv's prctl: exit if the parent is no longer the one that forked us (it died
# in between; nobody would signal us any more), else become the command.
_SHIM = 'test "$PPID" = "$1" || exit 125; shift; exec "$@"'
_SHIM_NAME = "vdistream-child"


@dataclasses.dataclass(frozen=True, slots=True)
class ChildRecord:
    """A child as an observer sees it: ``pid`` (also its process group id, it leads a
    session of its own), ``start_time`` (``/proc`` clock ticks since boot, None if
    unknown), ``token`` (the value of ``VDISTREAM_CHILD_ID`` in its environment) and
    its ``argv``."""

    pid: int
    start_time: int | None
    token: str
    argv: tuple[str, ...]


class ChildObserver(Protocol):
    """Told of the children started and ended in the context it was set for."""

    async def child_started(self, child: ChildRecord) -> None: ...

    async def child_ended(self, child: ChildRecord) -> None: ...


_observer: contextvars.ContextVar[ChildObserver | None] = contextvars.ContextVar(
    "vdistream_child_observer", default=None
)


def observe_children(observer: ChildObserver | None) -> contextvars.Token[ChildObserver | None]:
    """Set the observer of the children started in this context and the tasks started
    from it from now on; ``reset(token)`` through the returned token undoes it."""
    return _observer.set(observer)


def reset_child_observer(token: contextvars.Token[ChildObserver | None]) -> None:
    """Undo ``observe_children`` (in the context that set it; elsewhere a no-op)."""
    with contextlib.suppress(ValueError):
        _observer.reset(token)


_launcher: list[str] | None = None
_launcher_known = False


def _probe_launcher() -> list[str] | None:
    """The argv prefix that starts a child with the parent-death signal, or None."""
    setpriv = shutil.which("setpriv")
    if setpriv is None or not os.access("/bin/sh", os.X_OK):
        _log.warning(
            "pdeathsig_unavailable",
            reason="setpriv (util-linux) or /bin/sh not found",
            consequence="a child may outlive vdistream if vdistream is killed",
        )
        return None
    prefix = [setpriv, "--pdeathsig", "KILL", "--", "/bin/sh", "-c", _SHIM, _SHIM_NAME]
    try:
        probe = subprocess.run(
            [*prefix, str(os.getpid()), "true"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            timeout=10,
            check=False,
        )
    except (OSError, subprocess.SubprocessError) as exc:
        reason = str(exc)
    else:
        if probe.returncode == 0:
            return prefix
        reason = probe.stderr.decode(errors="replace").strip() or f"status {probe.returncode}"
    _log.warning(
        "pdeathsig_unavailable",
        reason=f"setpriv --pdeathsig does not work here: {reason}",
        consequence="a child may outlive vdistream if vdistream is killed",
    )
    return None


async def pdeathsig_launcher() -> list[str] | None:
    """The argv prefix that gives a child the parent-death signal (module docstring),
    found once per process (a probe in a worker thread); None where there is none.
    The prefix ends with the shim's name: the parent's pid and the argv follow it."""
    global _launcher, _launcher_known
    if not _launcher_known:
        # The probe's own child is short-lived and needs no parent-death signal: a
        # worker thread may start it.
        _launcher = await anyio.to_thread.run_sync(_probe_launcher)
        _launcher_known = True
    return _launcher


def _check_program(
    program: str, env: Mapping[str, str], cwd: str | os.PathLike[str] | None
) -> None:
    """Raise the ``OSError`` that exec'ing ``program`` would raise, as ``subprocess``
    looks it up (a path relative to ``cwd``, else each ``PATH`` entry of ``env``)."""
    base = Path(cwd) if cwd is not None else Path()
    if "/" in program:
        candidates = [base / program]
    else:
        candidates = [base / (entry or ".") / program for entry in os.get_exec_path(dict(env))]
    denied: OSError | None = None
    for candidate in candidates:
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return
        if candidate.exists() and denied is None:
            denied = PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(candidate))
    raise denied or FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), program)


async def open_child(
    argv: Sequence[str],
    *,
    stdin: int,
    stdout: int,
    stderr: int,
    env: Mapping[str, str] | None = None,
    extra_env: Mapping[str, str] | None = None,
    cwd: str | os.PathLike[str] | None = None,
) -> tuple[anyio.abc.Process, ChildRecord | None, ChildObserver | None]:
    """Start ``argv`` the way every child of vdistream starts (module docstring): in a
    session of its own, with the parent-death signal where available, reported to the
    context's observer. Returns the process, its record and the observer (both None
    without an observer). Raises ``OSError`` when it cannot be started."""
    environment = _environment(env, extra_env)
    observer = _observer.get()
    token = secrets.token_hex(16)
    if observer is not None:
        environment[CHILD_ID_VARIABLE] = token
    command = list(argv)
    launcher = await pdeathsig_launcher()
    if launcher is not None:
        _check_program(command[0], environment, cwd)
        command = [*launcher, str(os.getpid()), *command]
    process = await anyio.open_process(
        command,
        stdin=stdin,
        stdout=stdout,
        stderr=stderr,
        cwd=cwd,
        env=environment,
        start_new_session=True,  # its pid is its process group and session id
    )
    if observer is None:
        return process, None, None
    record = ChildRecord(process.pid, _child_start_time(process.pid), token, tuple(argv))
    with anyio.CancelScope(shield=True):
        await _tell(observer.child_started, record)
    return process, record, observer


def _child_start_time(pid: int) -> int | None:
    """The start time of our child ``pid``, or None once it is gone. asyncio's child
    watcher may already have reaped a quick child (and the pid been reused): the time
    counts only if the process read is still a child of ours (one ``/proc`` read)."""
    fields = proc_stat(pid)
    try:
        return int(fields[19]) if fields and int(fields[1]) == os.getpid() else None
    except (IndexError, ValueError):
        return None


async def _tell(method: Callable[[ChildRecord], Awaitable[None]], record: ChildRecord) -> None:
    """Call an observer; its failure is logged, never raised (module docstring)."""
    try:
        await method(record)
    except Exception as exc:
        _log.warning(
            "child_observer_failed",
            pid=record.pid,
            command=_command_name(record.argv),
            error=f"{type(exc).__name__}: {exc}",
        )


async def forget_child(record: ChildRecord | None, observer: ChildObserver | None) -> None:
    """Tell the observer that the child of ``open_child`` ended (reaped, its group
    killed); shielded: it runs in cleanup paths."""
    if record is None or observer is None:
        return
    with anyio.CancelScope(shield=True):
        await _tell(observer.child_ended, record)


def _signal_group(process: anyio.abc.Process, sig: signal.Signals) -> None:
    """Send ``sig`` to the process's group (its own session), else to the process."""
    try:
        os.killpg(process.pid, sig)
    except ProcessLookupError:
        pass
    except PermissionError:
        with contextlib.suppress(ProcessLookupError):
            process.send_signal(sig)


def group_members(pgid: int) -> list[int]:
    """The pids of the processes of group ``pgid`` that still run (zombies do not
    count), read from ``/proc`` (blocking: call it in a worker thread); ``[]``
    without ``/proc``."""
    try:
        entries = os.listdir("/proc")
    except OSError:
        return []
    members = []
    for entry in entries:
        if not entry.isdigit():
            continue
        fields = proc_stat(entry)
        if fields is None:
            continue  # it ended while we looked
        if len(fields) > 2 and int(fields[2]) == pgid and fields[0] not in (b"Z", b"X"):
            members.append(int(entry))
    return members


def group_alive(pgid: int) -> bool:
    """Whether a process of group ``pgid`` still runs (zombies do not count).

    Reads ``/proc`` (blocking: call it in a worker thread); without ``/proc``, any
    member the kernel still knows, zombie or not, counts.
    """
    if not os.path.isdir("/proc"):
        try:
            os.killpg(pgid, 0)
        except (ProcessLookupError, PermissionError):
            return False
        return True
    return bool(group_members(pgid))


async def terminate(process: anyio.abc.Process, grace: float) -> None:
    """SIGTERM the process group, SIGKILL after ``grace`` seconds, reap the process.

    Children that outlived the leader (they ignored SIGTERM, or the leader exited
    first) are SIGKILLed too, and the call waits (at most ``GROUP_GONE_SECONDS``)
    until none of them runs any more; their parent is gone, so init reaps them, not
    us. Callers shield it: it must run to its end even in a cancelled scope.
    """
    if process.returncode is None:
        _signal_group(process, signal.SIGTERM)
        with anyio.move_on_after(grace):
            await process.wait()
        if process.returncode is None:
            _signal_group(process, signal.SIGKILL)
            await process.wait()  # SIGKILL cannot be ignored: this ends
    # The group id cannot be reused while any member lives, so this reaches only them.
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        return
    with anyio.move_on_after(GROUP_GONE_SECONDS):
        # Polling: nothing signals the end of processes that are not our children.
        while await anyio.to_thread.run_sync(group_alive, process.pid):  # noqa: ASYNC110
            await anyio.sleep(0.01)


class ProcessOptions(TypedDict, total=False):
    """How a producer's or consumer's process runs (module docstring): ``env``
    (default: vdistream's own) plus ``extra_env``, ``cwd``, ``terminate_timeout``
    (SIGTERM to SIGKILL, default 5 s) and ``stderr_limit`` (the bytes of its standard
    error kept, default ``STDERR_LIMIT``)."""

    env: Mapping[str, str] | None
    extra_env: Mapping[str, str] | None
    cwd: str | os.PathLike[str] | None
    terminate_timeout: float
    stderr_limit: int


class _Subprocess(ScopedStream):
    """What producer and consumer share: start, stderr capture, end, termination."""

    error_class: type[ProcessFailedError] = ProcessFailedError

    def __init__(self, argv: Sequence[str], **options: Unpack[ProcessOptions]) -> None:
        if isinstance(argv, str | bytes):
            raise TypeError("argv must be a sequence of arguments, not a string")
        if not argv:
            raise ValueError("argv must not be empty")
        self.argv = [os.fspath(arg) for arg in argv]
        self.env = options.get("env")
        self.extra_env = dict(options.get("extra_env") or {})
        self.cwd = options.get("cwd")
        self.terminate_timeout = options.get("terminate_timeout", 5.0)
        self.stderr = OutputTail(options.get("stderr_limit", STDERR_LIMIT))
        self.process: anyio.abc.Process | None = None
        self._group: anyio.abc.TaskGroup | None = None
        self._stderr_done: anyio.Event | None = None  # made in running(): it needs a loop
        self._fd = None  # our end of the data pipe
        self._ended = False  # the process exited and its status was checked
        self._record: ChildRecord | None = None  # what the observer was told
        self._observer: ChildObserver | None = None

    # --- lifetime -----------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[None]:
        self._stderr_done = anyio.Event()
        try:
            async with endpoint_tasks(self._shutdown) as self._group:
                yield
        finally:
            self._group = None

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None

    @property
    def returncode(self) -> int | None:
        return self.process.returncode if self.process is not None else None

    async def _start(self, stdin: int, stdout: int) -> None:
        if self._group is None:
            raise RuntimeError(f"{type(self).__name__} used outside its running() scope")
        try:
            self.process, self._record, self._observer = await open_child(
                self.argv,
                stdin=stdin,
                stdout=stdout,
                stderr=subprocess.PIPE,
                env=self.env,
                extra_env=self.extra_env,
                cwd=self.cwd,
            )
        except OSError as exc:
            raise self.error_class(
                f"cannot be started: {exc.strerror or exc}", command=self.argv
            ) from exc
        _log.debug("process_started", command=_command_name(self.argv), pid=self.process.pid)
        self._group.start_soon(self._read_stderr, name=f"stderr of {self.argv[0]}")

    async def _read_stderr(self) -> None:
        assert self.process is not None
        try:
            await _collect(self.process.stderr, self.stderr.append)
        except OSError:
            pass
        finally:
            assert self._stderr_done is not None
            self._stderr_done.set()

    async def _wait_exit(self) -> int:
        """Wait for the exit (cancellable), then briefly for the rest of stderr."""
        assert self.process is not None
        returncode = await self.process.wait()
        assert self._stderr_done is not None
        with anyio.move_on_after(STDERR_GRACE_SECONDS):
            await self._stderr_done.wait()
        return returncode

    def _failure(self, what: str) -> ProcessFailedError:
        return self.error_class(
            what, command=self.argv, returncode=self.returncode, stderr=self.stderr.text()
        )

    async def _shutdown(self) -> None:
        """Terminate (if still running) and reap the process; close every pipe."""
        self._close_fd()
        process = self.process
        if process is None:
            return
        if process.returncode is None:
            _log.info("process_terminating", command=_command_name(self.argv), pid=process.pid)
        if not self._ended:
            await terminate(process, self.terminate_timeout)
        await process.aclose()
        record, self._record = self._record, None
        await forget_child(record, self._observer)


#: below this, a pipe read is cheaper on the event loop than a thread hop
_THREAD_READ = 64 * 1024
#: how long one thread call may wait for more output to fill its buffer
_FILL_WAIT = 0.02


def _read_available(fd: int, view: memoryview, patience: float = _FILL_WAIT) -> int | None:
    """Worker thread: fill ``view`` from the (non-blocking) pipe ``fd``, waiting for
    more output up to ``patience`` seconds in all (``poll``), so that one thread call
    moves a whole buffer even when the producer writes it 64-128 KiB at a time. Returns
    the count read (short: the pipe stayed empty that long, or it ended), ``None`` when
    nothing came at all (the caller waits on the loop) or ``0`` at the end. Bounded."""
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    deadline = time.monotonic() + patience
    done = 0
    while done < view.nbytes:
        try:
            with view[done:] as rest:
                count = os.readv(fd, [rest])
        except BlockingIOError:
            left = deadline - time.monotonic()
            if left <= 0 or not poller.poll(left * 1000):
                return done or None
            continue
        if not count:
            break
        done += count
    return done


class ProcessProducer(_Subprocess, ByteProducer):
    """The standard output of ``argv`` as a backup's bytes (module docstring).

    The process starts at the first ``readinto`` (after the set is configured and
    its devices are open), with ``/dev/null`` as its standard input.
    ``fail_on_stderr=True`` also fails the backup when the tool writes anything to its
    standard error (for tools that report problems there but still exit 0).
    """

    error_class = ProducerFailedError

    def __init__(
        self,
        argv: Sequence[str],
        *,
        fail_on_stderr: bool = False,
        **options: Unpack[ProcessOptions],
    ) -> None:
        super().__init__(argv, **options)
        self.fail_on_stderr = fail_on_stderr
        self.bytes_read = 0

    async def readinto(self, view: memoryview) -> int:
        if self._ended:
            return 0
        if self.process is None:
            read, write = _pipe()
            try:
                await self._start(subprocess.DEVNULL, write)
            except BaseException:
                os.close(read)
                raise
            finally:
                os.close(write)  # the child holds its copy: EOF comes when it is done
            os.set_blocking(read, False)
            self._fd = read
        if self.fail_on_stderr and self.stderr.total:
            raise self._failure("wrote to its standard error")
        while True:
            fd = self._fd
            assert fd is not None
            try:
                if view.nbytes < _THREAD_READ:
                    count: int | None = os.readv(fd, [view])
                else:  # the copy out of the pipe in a worker thread, not on the loop
                    count = await threads.run_sync(_read_available, fd, view)
            except BlockingIOError:
                count = None
            except OSError as exc:
                raise self._failure(f"reading its output failed: {exc.strerror}") from exc
            if count is None:  # nothing in the pipe yet
                await anyio.wait_readable(fd)
                continue
            break
        if count:
            self.bytes_read += count
            return count
        # End of its output. The stream is complete only if the tool says so.
        self._close_fd()
        returncode = await self._wait_exit()
        self._ended = True
        if returncode != 0:
            raise self._failure(f"{describe_status(returncode)} after {self.bytes_read} bytes")
        if self.fail_on_stderr and self.stderr.total:
            raise self._failure("wrote to its standard error")
        _log.debug("process_finished", command=_command_name(self.argv), bytes=self.bytes_read)
        return 0

    async def aclose(self) -> None:
        with anyio.CancelScope(shield=True):
            await self._shutdown()


class ProcessConsumer(_Subprocess, ByteConsumer):
    """The standard input of ``argv`` as a restore's destination (module docstring).

    The process starts at the first ``write`` (or at ``finish`` for an empty stream).
    Its standard output is captured like its standard error, into ``stdout`` (bounded
    the same way), so that a tool's chatter never mixes with vdistream's own output.
    """

    error_class = ConsumerFailedError

    def __init__(self, argv: Sequence[str], **options: Unpack[ProcessOptions]) -> None:
        super().__init__(argv, **options)
        self.stdout = OutputTail(self.stderr.limit)
        self._stdout_fd: int | None = None

    async def _ensure_started(self) -> int:
        if self.process is None:
            read, write = _pipe()
            out_read, out_write = os.pipe2(os.O_CLOEXEC)
            try:
                await self._start(read, out_write)
            except BaseException:
                os.close(write)
                os.close(out_read)
                raise
            finally:
                os.close(read)
                os.close(out_write)
            os.set_blocking(write, False)
            self._fd = write
            self._stdout_fd = out_read
            assert self._group is not None
            self._group.start_soon(self._read_stdout, out_read, name=f"stdout of {self.argv[0]}")
        if self._fd is None:
            raise self._failure("its input was already closed")
        return self._fd

    async def _read_stdout(self, fd: int) -> None:
        # Read through anyio's file-descriptor waits, like the data pipes.
        os.set_blocking(fd, False)
        buffer = bytearray(65536)
        try:
            while True:
                try:
                    count = os.readv(fd, [buffer])
                except BlockingIOError:
                    await anyio.wait_readable(fd)
                    continue
                if not count:
                    return
                self.stdout.append(bytes(buffer[:count]))
        except OSError:
            return
        finally:
            self._stdout_fd = None
            anyio.notify_closing(fd)
            os.close(fd)

    async def write(self, view: memoryview) -> None:
        fd = await self._ensure_started()
        try:
            await self._write_fd(fd, view)
        except BrokenPipeError:
            raise await self._stopped_reading() from None
        except OSError as exc:
            raise self._failure(f"writing its input failed: {exc.strerror}") from exc

    async def _stopped_reading(self) -> ProcessFailedError:
        """The tool closed its input early: how it ended (waiting a bounded time)."""
        self._close_fd()
        with anyio.move_on_after(self.terminate_timeout):
            await self._wait_exit()
        status = self.returncode
        how = describe_status(status) if status is not None else "is still running"
        return self._failure(
            f"stopped reading its input after {self.bytes_written} bytes and {how}"
        )

    async def finish(self) -> None:
        await self._ensure_started()
        self._close_fd()  # end of input: the tool finishes its work now
        returncode = await self._wait_exit()
        self._ended = True
        if returncode != 0:
            raise self._failure(describe_status(returncode))
        _log.debug("process_finished", command=_command_name(self.argv), bytes=self.bytes_written)

    async def discard(self) -> None:
        with anyio.CancelScope(shield=True):
            await self._shutdown()


# --- helper tools -------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True)
class ToolOutput:
    """What a tool run by ``run_tool`` printed: its standard output (the first
    ``stdout_limit`` bytes, decoded), how many lines and bytes it printed in all, and
    the end of its standard error."""

    stdout: str
    lines: int
    bytes: int
    stderr: str


async def run_tool(
    argv: Sequence[str],
    *,
    env: Mapping[str, str] | None = None,
    extra_env: Mapping[str, str] | None = None,
    cwd: str | os.PathLike[str] | None = None,
    timeout: float | None = None,
    what: str | None = None,
    stdout_limit: int = 16 * 1024 * 1024,
    terminate_timeout: float = 5.0,
    error_class: type[ProcessFailedError] = ToolFailedError,
) -> ToolOutput:
    """Run ``argv`` to its end (stdin ``/dev/null``, own session, env passed through).

    Returns its output if it exited with status 0; raises ``error_class`` (default
    ``ToolFailedError``) with its stderr otherwise, when it cannot be started, or when
    it runs longer than ``timeout`` seconds (it is then terminated). Cancellation
    terminates and reaps it too. ``what`` prefixes the message ("verifying ...").
    """
    command = [os.fspath(arg) for arg in argv]
    prefix = f"{what}: " if what else ""
    stderr = OutputTail()
    head = bytearray()
    counts = [0, 0]  # bytes, newlines

    try:
        process, record, observer = await open_child(
            command,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=env,
            extra_env=extra_env,
            cwd=cwd,
        )
    except OSError as exc:
        raise error_class(
            f"{prefix}cannot be started: {exc.strerror or exc}", command=command
        ) from exc

    def take_stdout(chunk: bytes) -> None:
        counts[0] += len(chunk)
        counts[1] += chunk.count(b"\n")
        if len(head) < stdout_limit:
            head.extend(chunk[: stdout_limit - len(head)])

    timed_out = False
    try:
        async with anyio.create_task_group() as group:
            group.start_soon(_collect, process.stdout, take_stdout)
            group.start_soon(_collect, process.stderr, stderr.append)
            with anyio.move_on_after(timeout) as scope:
                await process.wait()
            if scope.cancelled_caught:
                timed_out = True
                group.cancel_scope.cancel()
            else:
                # The readers end at end of file; a grandchild holding a pipe open must
                # not keep us here.
                group.cancel_scope.deadline = anyio.current_time() + STDERR_GRACE_SECONDS
    finally:
        with anyio.CancelScope(shield=True):
            await terminate(process, terminate_timeout)
            await process.aclose()
            await forget_child(record, observer)
    if timed_out:
        raise error_class(
            f"{prefix}did not finish within {timeout:g} s and was terminated",
            command=command,
            stderr=stderr.text(),
        )
    returncode = process.returncode
    assert returncode is not None
    if returncode != 0:
        raise error_class(
            f"{prefix}{describe_status(returncode)}",
            command=command,
            returncode=returncode,
            stderr=stderr.text(),
        )
    return ToolOutput(
        stdout=head.decode("utf-8", errors="replace"),
        lines=counts[1],
        bytes=counts[0],
        stderr=stderr.text(),
    )
