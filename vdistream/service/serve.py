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

Exit codes: 0 after a graceful shutdown, 1 after a forced one or when the service
cannot start (the state directory is locked by another daemon, the socket is in
use...), 2 for invalid settings.

Test knob: ``VDISTREAM_SCHEDULE_SPEEDUP=N`` runs the schedules' clock N times faster
(``Service(schedule_speedup=N)``), so tests see ``* * * * *`` fire every 60/N seconds.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
from collections.abc import AsyncIterator
from pathlib import Path

import anyio
import anyio.abc
import anyio.to_thread

from vdistream.errors import VdistreamError
from vdistream.log import get_logger
from vdistream.service.daemon import Service
from vdistream.service.logconfig import configure_logging
from vdistream.service.settings import (
    DEFAULT_SETTINGS_PATH,
    Settings,
    SettingsError,
    load_settings,
    settings_summary,
)

__all__ = ("CONFIG_ENV", "FORCE_EXIT_AFTER", "SPEEDUP_ENV", "config_path", "serve")

log = get_logger(__name__)

#: The settings file when ``--config`` is not given (else ``DEFAULT_SETTINGS_PATH``).
CONFIG_ENV = "VDISTREAM_CONFIG"
#: Test knob (module doc).
SPEEDUP_ENV = "VDISTREAM_SCHEDULE_SPEEDUP"
FORCE_EXIT_AFTER = 2.0
EXIT_FORCED = 1


def config_path(given: str | None) -> Path:
    """``--config``, else ``$VDISTREAM_CONFIG``, else ``/etc/vdistream/vdistream.toml``."""
    if given:
        return Path(given)
    if os.environ.get(CONFIG_ENV):
        return Path(os.environ[CONFIG_ENV])
    return DEFAULT_SETTINGS_PATH


def serve(config: str | None = None, *, check: bool = False) -> int:
    """Run the daemon until a signal stops it (module doc); its exit code."""
    path = config_path(config)
    try:
        settings = load_settings(path)
    except SettingsError as exc:
        sys.stderr.write(f"vdistream serve: {exc}\n")
        return 2
    if check:
        sys.stdout.write(json.dumps(settings_summary(settings), indent=2) + "\n")
        return 0
    speedup: float | None = None
    if os.environ.get(SPEEDUP_ENV):
        try:
            speedup = float(os.environ[SPEEDUP_ENV])
        except ValueError:
            sys.stderr.write(f"vdistream serve: {SPEEDUP_ENV} must be a number\n")
            return 2
    configure_logging(settings.service.log_format, settings.service.log_level)
    try:
        code: int = anyio.run(_serve, path, settings, speedup, backend="asyncio")
    except (VdistreamError, OSError) as exc:
        log.error("service_failed", error=str(exc))
        sys.stderr.write(f"vdistream serve: {exc}\n")
        return 1
    return code


async def _serve(path: Path, settings: Settings, speedup: float | None) -> int:
    with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
        async with Service(settings, schedule_speedup=speedup) as service:
            log.info("daemon_ready", pid=os.getpid(), config=str(path))
            timers: list[threading.Timer] = []
            async with anyio.create_task_group() as tg:
                tg.start_soon(_handle_signals, signals, service, path, tg, timers)
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
