"""The daemon's ledger of the process groups it started, and the end of their survivors.

A child of vdistream dies with it (``PR_SET_PDEATHSIG``, ``vdistream.engines.process``),
but only the direct child: what that child started itself (``sh -c 'a | b'``, a tool's
helpers) is not signalled by the kernel, and without ``setpriv`` nothing is. So the
daemon keeps a ledger: ``ChildLedger(directory)`` is a ``ChildObserver`` that writes
one small JSON file per child it is told of (``<pgid>-<token>.json``: process group id,
the leader's start time, the token in the child's ``VDISTREAM_CHILD_ID``, the argv, the
boot id, the daemon's own pid), atomically (a temporary file renamed into place; no
``fsync``: after a power loss every process of then is gone anyway), and removes it
when the child was reaped and its group killed.

At its next start, before any job runs and while it holds the state directory's lock
(so the daemon that wrote the ledger is provably gone), the daemon calls
``end_survivors()``. For each entry, a process still running is ended only with a
proof that it is one of the recorded children, never on the pid alone (pids are
reused):

* the group's leader (pid = pgid) still runs with the recorded start time: the group
  cannot have been reused while its leader lives, so the whole group is signalled
  (``killpg``);
* otherwise (the leader died, typically of its parent-death signal) each member of the
  group whose environment (``/proc/PID/environ``) holds the recorded token, which only
  that child's descendants inherit, is signalled (through a pidfd opened before the
  check, so a pid reused in between is never hit).

SIGTERM, then SIGKILL to what still runs after ``grace`` seconds; each group ended is
logged (``orphan_ended``, a warning: pgid, pids, command, the signal that was needed).
Entries of another boot, entries whose processes are gone or are not provably theirs,
and temporaries of interrupted writes are removed without signalling anything. A
member that replaced its environment (``env -i``) or runs as another user cannot be
proved: it is left alone. Blocking: call ``end_survivors`` in a worker thread.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import anyio.to_thread

from vdistream.engines.process import CHILD_ID_VARIABLE, ChildRecord, group_members
from vdistream.log import get_logger
from vdistream.ownership import owner_record, proc_stat, process_start_time

__all__ = ("LEDGER_DIR", "ChildLedger", "Survivor")

#: the ledger's directory inside the daemon's state directory
LEDGER_DIR = "children"
#: how long survivors get after SIGTERM, and after SIGKILL, to be gone
GRACE_SECONDS = 2.0

_log = get_logger(__name__)


@dataclass(frozen=True, slots=True)
class Survivor:
    """A recorded process group that was still running at start, and what ended it."""

    pgid: int
    pids: tuple[int, ...]
    argv: tuple[str, ...]
    signal: str  # "SIGTERM", or "SIGKILL" when SIGTERM was not enough
    ended: bool  # False: something of it still ran after SIGKILL and the grace


class ChildLedger:
    """One file per child in ``directory`` (module docstring); a ``ChildObserver``."""

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        self.directory = Path(directory)

    # --- the observer -------------------------------------------------------------

    async def child_started(self, child: ChildRecord) -> None:
        await anyio.to_thread.run_sync(self.record, child)

    async def child_ended(self, child: ChildRecord) -> None:
        await anyio.to_thread.run_sync(self.forget, child)

    def _path(self, pgid: int, token: str) -> Path:
        return self.directory / f"{pgid}-{token}.json"

    def record(self, child: ChildRecord) -> Path:
        """Write the entry of ``child`` (blocking)."""
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        owner = owner_record()
        entry = {
            "pgid": child.pid,
            "start_time": child.start_time,
            "token": child.token,
            "argv": list(child.argv),
            "boot_id": owner["boot_id"],
            "daemon_pid": owner["pid"],
            "started": datetime.now(UTC).isoformat(),
        }
        path = self._path(child.pid, child.token)
        temp = path.with_name(f".{path.name}.tmp")
        temp.write_text(json.dumps(entry) + "\n")
        os.replace(temp, path)
        return path

    def forget(self, child: ChildRecord) -> None:
        """Remove the entry of ``child`` (blocking; no entry is no error)."""
        self._path(child.pid, child.token).unlink(missing_ok=True)

    # --- at start -----------------------------------------------------------------

    def entries(self) -> list[tuple[Path, dict[str, Any] | None]]:
        """Every entry file and its content (None: unreadable), oldest name first."""
        try:
            paths = sorted(self.directory.glob("*.json"))
        except OSError:
            return []
        out: list[tuple[Path, dict[str, Any] | None]] = []
        for path in paths:
            try:
                content = json.loads(path.read_text())
            except (OSError, ValueError):
                content = None
            out.append((path, content if isinstance(content, dict) else None))
        return out

    def end_survivors(self, grace: float = GRACE_SECONDS) -> list[Survivor]:
        """End what the recorded children left running (module docstring); empty the
        ledger. Blocking."""
        if not self.directory.is_dir():
            return []
        for temp in self.directory.glob(".*.tmp"):
            temp.unlink(missing_ok=True)
        boot_id = owner_record()["boot_id"]
        ended = []
        for path, entry in self.entries():
            try:
                if entry is not None and entry.get("boot_id") in (None, boot_id):
                    survivor = _end_group(entry, grace)
                    if survivor is not None:
                        ended.append(survivor)
            finally:
                path.unlink(missing_ok=True)
        return ended


class _Target:
    """A process proved to be ours, held through a pidfd where the kernel has them."""

    def __init__(self, pid: int, fd: int | None) -> None:
        self.pid = pid
        self.fd = fd

    def signal(self, sig: signal.Signals) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            if self.fd is not None:
                signal.pidfd_send_signal(self.fd, sig)
            else:
                os.kill(self.pid, sig)

    def running(self) -> bool:
        """Still running (a zombie has ended)."""
        state = _state(self.pid)
        if self.fd is not None:
            # The pidfd is readable once the process it refers to has ended.
            ready, _, _ = select.select([self.fd], [], [], 0)
            return not ready and state not in (None, "Z", "X")
        return state not in (None, "Z", "X")

    def close(self) -> None:
        fd, self.fd = self.fd, None
        if fd is not None:
            os.close(fd)


def _state(pid: int) -> str | None:
    fields = proc_stat(pid)
    return fields[0].decode() if fields else None


def _has_token(pid: int, token: str) -> bool:
    try:
        environ = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return False
    return f"{CHILD_ID_VARIABLE}={token}".encode() in environ.split(b"\0")


def _open(pid: int) -> _Target | None:
    try:
        return _Target(pid, os.pidfd_open(pid))
    except ProcessLookupError:
        return None
    except (OSError, AttributeError):  # no pidfds (Linux < 5.3): check, then signal
        return _Target(pid, None)


def _end_group(entry: dict[str, Any], grace: float) -> Survivor | None:
    pgid, started, token = entry.get("pgid"), entry.get("start_time"), entry.get("token")
    if not isinstance(pgid, int) or pgid <= 1 or not isinstance(token, str) or not token:
        return None
    argv = tuple(str(arg) for arg in entry.get("argv") or ())
    if pgid == os.getpgrp():
        return None  # a reused number that is now our own group: never ours to end
    leader_ours = isinstance(started, int) and process_start_time(pgid) == started
    targets: list[_Target] = []
    for pid in group_members(pgid):
        if pid == os.getpid():
            continue
        target = _open(pid)
        if target is None:
            continue
        # Checked after the pidfd was opened: a pid reused meanwhile fails the check,
        # and the pidfd of the process checked cannot be redirected to another one.
        leader = pid == pgid and leader_ours and process_start_time(pid) == started
        if leader or _has_token(pid, token):
            targets.append(target)
        else:
            target.close()
    if not targets:
        return None
    pids = tuple(target.pid for target in targets)
    try:
        used = signal.SIGTERM
        _signal_all(targets, pgid, leader_ours, used)
        gone = _wait_gone(targets, pgid, leader_ours, grace)
        if not gone:
            used = signal.SIGKILL
            _signal_all(targets, pgid, leader_ours, used)
            gone = _wait_gone(targets, pgid, leader_ours, grace)
    finally:
        for target in targets:
            target.close()
    _log.warning(
        "orphan_ended" if gone else "orphan_not_ended",
        pgid=pgid,
        pids=list(pids),
        command=" ".join(argv),
        signal=used.name,
        started=entry.get("started"),
    )
    return Survivor(pgid, pids, argv, used.name, gone)


def _signal_all(targets: list[_Target], pgid: int, whole_group: bool, sig: signal.Signals) -> None:
    if whole_group:
        # The leader was alive when checked: the group id is still this group's.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, sig)
    for target in targets:
        target.signal(sig)


def _wait_gone(targets: list[_Target], pgid: int, whole_group: bool, grace: float) -> bool:
    deadline = time.monotonic() + grace
    while True:
        alive = any(target.running() for target in targets) or (
            whole_group and bool(group_members(pgid))
        )
        if not alive:
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.02)
