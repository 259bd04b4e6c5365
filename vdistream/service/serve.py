"""``vdistream serve``: the daemon process around ``Service``.

Only here are signal handlers installed and logging configured (``logconfig``):

* **SIGTERM or SIGINT**: ``Service.shutdown`` (stop intake, abort running jobs through
  ``Job.abort``, drain, close every set, stop the API) within
  ``service.grace_period``; then exit 0. The grace period is a promise: a timer thread
  started with the signal ends the process when it runs out (at least 1 s) (``_exit_now``: SIGKILL
  to the process groups of the engines' tools, then ``os._exit(1)``), for the case
  that a job's cleanup is stuck where cancellation cannot reach (a thread in a
  blocking call, a tool ignoring SIGTERM). The next start marks such jobs failed and
  removes their partial backups, as after kill -9.
* **A second SIGTERM or SIGINT**: ``Service.force_stop`` cancels every job at once;
  exit 1. If the process has still not ended ``FORCE_EXIT_AFTER`` seconds later (an
  engine's tool ignoring SIGTERM, a thread stuck in I/O), it SIGKILLs the process
  groups of its child processes (the engines' tools: no orphan keeps running) and
  leaves with ``os._exit(1)``; the next start marks the unfinished jobs failed and
  removes their partial backups.
* **SIGHUP**: the settings file is read again and applied (``Service.reload``);
  running jobs go on. An invalid file is logged (``reload_failed``) and ignored.

The receiver is opened before the service starts, so a signal that arrives while it
starts (cleaning up after a crash, say) is handled as soon as it runs.

systemd (``contrib/systemd/vdistream.service``, ``Type=notify``): when ``NOTIFY_SOCKET``
is set, ``serve`` takes it and ``WATCHDOG_USEC``/``WATCHDOG_PID`` out of the
environment (the engines' tools do not inherit them) and hands a
``sdnotify.SystemdNotifier`` to the service: ``READY=1`` once the control socket
listens after the recovery, ``STATUS=`` lines, ``RELOADING=1``/``READY=1`` around a
SIGHUP, ``STOPPING=1`` when the shutdown starts (``Service`` module doc). With
``WatchdogSec=``, ``WATCHDOG=1`` is sent from the event loop every half
``WATCHDOG_USEC``, from before the recovery to the end: a loop that is stuck stops
pinging, and systemd kills and restarts the daemon. A service that cannot start says
why in ``STATUS=`` before the exit. Without ``NOTIFY_SOCKET`` nothing of this happens.

Exit codes: 0 after a graceful shutdown, 1 after a forced one or when the service
cannot start (the state directory is locked by another daemon, the socket is in
use...), 2 for invalid settings.

Memory: before anything starts a thread, ``serve`` limits glibc's malloc arenas to
``ARENA_MAX`` and then returns free heap pages once a minute (``tune_malloc``, below),
so that the worker threads' arenas do not each keep their own high-water mark;
importing vdistream, embedding ``Service`` or the CLI's other commands change nothing.

Test knob: ``VDISTREAM_SCHEDULE_SPEEDUP=N`` runs the schedules' clock N times faster
(``Service(schedule_speedup=N)``), so tests see ``* * * * *`` fire every 60/N seconds.

Debug knobs (benchmarks/daemon_soak.py): ``VDISTREAM_TRACEMALLOC=DIR`` traces Python
allocations (``tracemalloc``, one frame) and writes a snapshot every 30 s to
``DIR/snapshot-<epoch ms>.pickle``; ``VDISTREAM_MALLOC_TUNING=0`` skips ``tune_malloc``
(to measure without it).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import json
import os
import pickle
import signal
import sys
import threading
import time
import tracemalloc
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import anyio
import anyio.abc
import anyio.to_thread

from vdistream.errors import VdistreamError
from vdistream.log import get_logger
from vdistream.service.daemon import Service
from vdistream.service.logconfig import configure_logging
from vdistream.service.sdnotify import SystemdNotifier
from vdistream.service.settings import (
    DEFAULT_SETTINGS_PATH,
    Settings,
    SettingsError,
    load_settings,
    settings_summary,
)
from vdistream.sqlserver import permissions
from vdistream.sqlserver.library import library_path

__all__ = (
    "CONFIG_ENV",
    "FORCE_EXIT_AFTER",
    "MALLOC_ENV",
    "SPEEDUP_ENV",
    "TRACEMALLOC_ENV",
    "config_path",
    "serve",
    "sqlserver_problems",
    "tune_malloc",
)

log = get_logger(__name__)

#: The settings file when ``--config`` is not given (else ``DEFAULT_SETTINGS_PATH``).
CONFIG_ENV = "VDISTREAM_CONFIG"
#: Test knob (module doc).
SPEEDUP_ENV = "VDISTREAM_SCHEDULE_SPEEDUP"
#: Debug knobs (module doc).
TRACEMALLOC_ENV = "VDISTREAM_TRACEMALLOC"
MALLOC_ENV = "VDISTREAM_MALLOC_TUNING"
TRACEMALLOC_EVERY = 30.0
FORCE_EXIT_AFTER = 2.0
EXIT_FORCED = 1


def config_path(given: str | None) -> Path:
    """``--config``, else ``$VDISTREAM_CONFIG``, else ``/etc/vdistream/vdistream.toml``."""
    if given:
        return Path(given)
    if os.environ.get(CONFIG_ENV):
        return Path(os.environ[CONFIG_ENV])
    return DEFAULT_SETTINGS_PATH


def sqlserver_problems(settings: Settings) -> list[str]:
    """What would keep the SQL Server databases' backups from running on this host (the
    library missing or unloadable, the user's groups, the umask), one line each, named
    by database; checked at start, as the backups would only fail later."""
    problems: list[str] = []
    for name, database in settings.databases.items():
        if database.kind != "mssql":
            continue
        setting = None if database.sqlvdi is None else str(database.sqlvdi)
        problems += [f"[databases.{name}]: {p}" for p in permissions.check(library_path(setting))]
    return problems


def serve(config: str | None = None, *, check: bool = False) -> int:
    """Run the daemon until a signal stops it (module doc); its exit code."""
    path = config_path(config)
    try:
        settings = load_settings(path)
    except SettingsError as exc:
        sys.stderr.write(f"vdistream serve: {exc}\n")
        return 2
    problems = sqlserver_problems(settings)
    if check:
        sys.stdout.write(json.dumps(settings_summary(settings), indent=2) + "\n")
        for problem in problems:  # the settings are valid; the host may not be ready
            sys.stderr.write(f"vdistream serve: warning: {problem}\n")
        return 0
    speedup: float | None = None
    if os.environ.get(SPEEDUP_ENV):
        try:
            speedup = float(os.environ[SPEEDUP_ENV])
        except ValueError:
            sys.stderr.write(f"vdistream serve: {SPEEDUP_ENV} must be a number\n")
            return 2
    trim = tune_malloc() if os.environ.get(MALLOC_ENV) != "0" else None
    if os.environ.get(TRACEMALLOC_ENV):
        tracemalloc.start()
    configure_logging(settings.service.log_format, settings.service.log_level)
    notifier = SystemdNotifier.from_environment()
    for problem in problems:
        log.warning("sqlserver_not_ready", problem=problem)
    try:
        code: int = anyio.run(_serve, path, settings, speedup, trim, notifier, backend="asyncio")
    except (VdistreamError, OSError) as exc:
        log.error("service_failed", error=str(exc))
        sys.stderr.write(f"vdistream serve: {exc}\n")
        if notifier is not None:
            notifier.status(f"failed: {exc}")
        return 1
    finally:
        if notifier is not None:
            notifier.close()
    return code


async def _serve(
    path: Path,
    settings: Settings,
    speedup: float | None,
    trim: Callable[[], object] | None,
    notifier: SystemdNotifier | None,
) -> int:
    if notifier is None:
        return await _run_service(path, settings, speedup, trim, notifier)
    failure: VdistreamError | OSError | None = None
    code = EXIT_FORCED
    # The watchdog pings from the start (recovery may take a while) to the end.
    async with anyio.create_task_group() as watchdog:
        watchdog.start_soon(notifier.run_watchdog, name="vdistream systemd watchdog")
        try:
            code = await _run_service(path, settings, speedup, trim, notifier)
        except (VdistreamError, OSError) as exc:
            failure = exc  # raised outside the group, so ``serve`` sees it unwrapped
        watchdog.cancel_scope.cancel()
    if failure is not None:
        raise failure
    return code


async def _run_service(
    path: Path,
    settings: Settings,
    speedup: float | None,
    trim: Callable[[], object] | None,
    notifier: SystemdNotifier | None,
) -> int:
    with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
        async with Service(settings, schedule_speedup=speedup, notify=notifier) as service:
            log.info("daemon_ready", pid=os.getpid(), config=str(path))
            timers: list[threading.Timer] = []
            async with anyio.create_task_group() as tg:
                tg.start_soon(_handle_signals, signals, service, path, tg, timers)
                if trim is not None:
                    tg.start_soon(_every, TRIM_EVERY, trim, False)
                if tracemalloc.is_tracing():
                    dump = functools.partial(_dump_snapshot, Path(os.environ[TRACEMALLOC_ENV]))
                    tg.start_soon(_every, TRACEMALLOC_EVERY, dump, True)
                await service.wait_shutdown()
                tg.cancel_scope.cancel()
        for timer in timers:
            timer.cancel()  # the service ended in time: no forced exit
    return EXIT_FORCED if service.forced else 0


async def _handle_signals(
    signals: AsyncIterator[signal.Signals],
    service: Service,
    path: Path,
    tg: anyio.abc.TaskGroup,
    timers: list[threading.Timer],
) -> None:
    stops = 0
    async for signum in signals:
        name = signal.Signals(signum).name
        if signum == signal.SIGHUP:
            await _reload(service, path)
            continue
        stops += 1
        if stops == 1:
            grace = service.settings.service.grace_period
            log.info(
                "shutdown_requested",
                signal=name,
                grace_period=grace,
                hint="send the signal again to cancel every job at once",
            )
            # At least a second, so that grace_period = 0 still lets the aborts record.
            timers.append(_start_exit_timer(max(grace, 1.0)))
            tg.start_soon(service.shutdown, f"the daemon received {name}")
        else:
            log.warning("shutdown_forced", signal=name)
            service.force_stop(f"forced shutdown: the daemon received {name} twice")
            timers.append(_start_exit_timer(FORCE_EXIT_AFTER))


def _dump_snapshot(directory: Path) -> None:
    """Debug knob: a ``tracemalloc`` snapshot (every ``TRACEMALLOC_EVERY`` seconds)."""
    snapshot = tracemalloc.take_snapshot().filter_traces(
        (tracemalloc.Filter(False, tracemalloc.__file__),)
    )
    target = directory / f"snapshot-{int(time.time() * 1000)}.pickle"
    with target.open("wb") as f:
        pickle.dump(snapshot, f, pickle.HIGHEST_PROTOCOL)


async def _every(seconds: float, work: Callable[[], object], first: bool) -> None:
    """Run ``work`` in a worker thread every ``seconds`` (``first``: at once, too)."""
    if not first:
        await anyio.sleep(seconds)
    while True:
        await anyio.to_thread.run_sync(work)
        await anyio.sleep(seconds)


async def _reload(service: Service, path: Path) -> None:
    try:
        settings = await anyio.to_thread.run_sync(load_settings, path)
    except SettingsError as exc:
        log.error("reload_failed", error=str(exc), config=str(path))
        return
    await service.reload(settings)


def _start_exit_timer(seconds: float) -> threading.Timer:
    # A thread, not a task: it must fire even if the loop is stuck in cleanup.
    timer = threading.Timer(seconds, _exit_now, args=(seconds,))
    timer.daemon = True
    timer.start()
    return timer


def _exit_now(after: float) -> None:
    killed = _kill_child_groups()
    log.error("forced_exit", after_seconds=after, killed_process_groups=killed)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(EXIT_FORCED)


def _kill_child_groups() -> list[int]:
    """SIGKILL the process group of every child of this process (Linux ``/proc``)."""
    me = os.getpid()
    killed: list[int] = []
    try:
        entries = os.listdir("/proc")
    except OSError:
        return killed
    for entry in entries:
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                fields = f.read().rsplit(b")", 1)[1].split()
        except OSError:
            continue
        ppid, pgid = int(fields[1]), int(fields[2])
        if ppid != me:
            continue
        try:
            if pgid != os.getpgid(0):
                os.killpg(pgid, signal.SIGKILL)
            else:
                os.kill(int(entry), signal.SIGKILL)
            killed.append(pgid)
        except OSError:
            continue
    return killed


# --------------------------------------------------------------------------- memory

#: glibc's ``mallopt`` parameter number for the arena limit (malloc.h).
M_ARENA_MAX = -8
#: The arenas the daemon's threads share (``tune_malloc``).
ARENA_MAX = 2
#: Seconds between two ``malloc_trim(0)`` calls of the daemon.
TRIM_EVERY = 60.0


def tune_malloc() -> Callable[[], object] | None:
    """Tune glibc's allocator for the daemon; its ``malloc_trim(0)``, or None (not glibc).

    Why: glibc gives each new thread that allocates an arena of its own until there
    are 8 per core, and an arena keeps the memory freed in it for reuse by its own
    threads. The daemon's blocking work (file I/O, zstd, AES, hashing) runs
    in anyio's worker threads, which come and go with the load (up to its 40-token
    limiter, about 15 in the soak), so 15 arenas each kept the high-water mark of
    whichever jobs passed through them: the soak's RSS rose from 59 to 160 MiB, 86 MiB
    of it in those arenas, while Python's traced memory stayed at 4 MiB
    (docs/benchmarks.md, "Daemon soak"). With at most ``ARENA_MAX`` arenas the threads
    share what is freed. Called once, before the event loop starts its first worker
    thread (a limit does not shrink arenas that exist).

    ``MALLOC_ARENA_MAX`` set in the environment wins (glibc read it at start). The
    returned function is ``malloc_trim(0)``, which hands the free pages inside every
    arena back to the kernel; ``serve`` calls it every ``TRIM_EVERY`` seconds in a
    worker thread. Only ``vdistream serve`` calls this: importing vdistream, embedding
    ``Service`` or the CLI's one-shot commands leave the allocator alone.
    """
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"))
        mallopt = libc.mallopt
        malloc_trim = libc.malloc_trim
        libc.gnu_get_libc_version  # noqa: B018 -- glibc only: musl has mallopt as a stub
    except (OSError, AttributeError, TypeError):
        return None
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    malloc_trim.argtypes = (ctypes.c_size_t,)
    malloc_trim.restype = ctypes.c_int
    if not os.environ.get("MALLOC_ARENA_MAX"):
        mallopt(M_ARENA_MAX, ARENA_MAX)
    trim: Callable[[], object] = functools.partial(malloc_trim, 0)
    return trim
