"""Who owns a piece of in-progress work, and whether that owner is provably gone.

Debris (temporaries, streams without a manifest, snapshot directories, partial restore
targets) may only be removed when the process that made it is gone: removing a live
job's files would destroy a running backup. Two kinds of proof, both stdlib only:

* On a local file system, :class:`OwnerLock`: a lock file held with ``flock(2)`` for as
  long as its owner lives. The kernel drops the lock when the owning process dies, even
  by ``kill -9``, so :func:`owner_gone` (a non-blocking ``flock`` that succeeds) is a
  proof, on this host or on another one sharing the file system (NFS locks are
  forwarded; a file system without locks makes the lock fail loudly at acquire).
* Where no lock can be held (object storage), :func:`owner_record` describes the owner
  (host name, machine id, boot id, PID namespace, pid, the process's start time) and
  :func:`record_owner_gone` tells whether that owner is provably gone: only on the same
  machine (``/etc/machine-id``: two machines or containers may share a host name) and
  in the same PID namespace (another container's pids are invisible here), when the
  machine rebooted since, or the pid no longer exists, or it now belongs to a process
  that started at another time (pid reuse). A record from another machine or
  namespace, or one that cannot be read, is never proof: the answer is ``False`` and
  age-based cleaning (``storage audit --clean --min-age``) is left to the operator.

``flock`` is only as good as the file system's: NFS mounted with ``local_lock=flock``,
``local_lock=all`` or ``nolock`` keeps locks local to each client, so two hosts sharing
such a mount cannot see each other's locks. Share a destination between hosts only on a
file system whose locks are shared (NFSv4 is, by default).

The lock file's content is the same record, as JSON, for the operator's eyes only.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import socket
from pathlib import Path
from typing import Any

__all__ = (
    "LOCK_NAME",
    "OwnerLock",
    "owner_gone",
    "owner_record",
    "proc_stat",
    "process_start_time",
    "record_owner_gone",
    "record_owner_state",
)

#: the usual name of an owner lock file inside the directory it protects
LOCK_NAME = ".vdistream-owner.lock"


def _boot_id() -> str | None:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return None


def proc_stat(pid: int | str) -> list[bytes] | None:
    """The fields of ``/proc/PID/stat`` after the command name: ``[0]`` the state,
    ``[1]`` the parent pid, ``[2]`` the process group, ``[19]`` the start time; None if
    there is no such process (or no ``/proc``)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as file:
            stat = file.read()
    except OSError:
        return None
    # the command name (field 2) is in parentheses and may hold spaces or ')'
    return stat[stat.rfind(b")") + 2 :].split()


def process_start_time(pid: int) -> int | None:
    """The start time of ``pid`` in clock ticks since boot (``/proc/PID/stat`` field
    22), or None if there is no such process (or no ``/proc``)."""
    fields = proc_stat(pid)
    try:
        return int(fields[19]) if fields is not None else None
    except (IndexError, ValueError):
        return None


def _machine_id() -> str | None:
    for path in ("/etc/machine-id", "/var/lib/dbus/machine-id"):
        try:
            found = Path(path).read_text().strip()
        except OSError:
            continue
        if found:
            return found
    return None


def _pid_namespace() -> int | None:
    try:
        return os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        return None


def owner_record(pid: int | None = None) -> dict[str, Any]:
    """This process (or ``pid``, of this namespace) as an owner (module docstring)."""
    pid = os.getpid() if pid is None else pid
    return {
        "host": socket.gethostname(),
        "machine_id": _machine_id(),
        "boot_id": _boot_id(),
        "pid_namespace": _pid_namespace(),
        "pid": pid,
        "start_time": process_start_time(pid),
    }


def record_owner_state(record: Any) -> bool | None:
    """False when the owner described by ``record`` provably no longer runs, True when
    it provably runs (this machine and namespace, same pid and start time), None when
    that cannot be told (another machine or container, an unreadable record)."""
    if record_owner_gone(record):
        return False
    if not isinstance(record, dict) or not isinstance(record.get("pid"), int):
        return None
    machine, namespace = _machine_id(), _pid_namespace()
    same_place = (
        machine is not None
        and namespace is not None
        and record.get("host") == socket.gethostname()
        and record.get("machine_id") == machine
        and record.get("pid_namespace") == namespace
        and record.get("boot_id") == _boot_id()
    )
    started = record.get("start_time")
    if same_place and started is not None and process_start_time(record["pid"]) == started:
        return True
    return None


def record_owner_gone(record: Any) -> bool:
    """True only when the owner described by ``record`` provably no longer runs."""
    if not isinstance(record, dict):
        return False
    pid, started = record.get("pid"), record.get("start_time")
    if record.get("host") != socket.gethostname() or not isinstance(pid, int):
        return False
    machine = _machine_id()
    if machine is None or record.get("machine_id") != machine:
        return False  # another machine (or no way to tell) that may share our host name
    boot = record.get("boot_id")
    if boot is not None and boot != _boot_id():
        return True  # this machine rebooted since: every process of then is gone
    namespace = _pid_namespace()
    if namespace is None or record.get("pid_namespace") != namespace:
        return False  # another container's pids cannot be seen from here
    now = process_start_time(pid)
    if now is None:
        return not _pid_exists(pid)  # without /proc a live pid proves nothing either way
    return started is not None and now != started


def _pid_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class OwnerLock:
    """A lock file held with ``flock`` while its owner lives (module docstring).

    ``OwnerLock.acquire(path)`` creates ``path`` (and no directories), takes an
    exclusive lock without waiting and writes the owner record into it; it raises
    ``BlockingIOError`` when another live process holds it. ``release()`` removes the
    file first and then drops the lock, so that nobody can see an unlocked lock file of
    a live owner. The descriptor is close-on-exec: children never inherit the lock, so
    an orphaned child cannot keep its parent's debris alive.
    """

    def __init__(self, path: Path, fd: int, previous: dict[str, Any] | None = None) -> None:
        self.path = path
        self._fd: int | None = fd
        #: the record a dead owner left in the file (``None``: the file was new)
        self.previous = previous

    @classmethod
    def acquire(cls, path: str | os.PathLike[str]) -> OwnerLock:
        target = Path(path)
        fd = os.open(target, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            previous = _read_record(fd)
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(owner_record()).encode() + b"\n", 0)
        except BaseException:
            os.close(fd)
            raise
        return cls(target, fd, previous)

    @classmethod
    def take(cls, path: str | os.PathLike[str], *, attempts: int = 10) -> OwnerLock:
        """``acquire``, and make sure the file locked is still the one named ``path``:
        whoever removes a lock file does so holding its lock, so between our open and
        our lock it may have gone; then we try again. ``BlockingIOError``: held."""
        for _ in range(attempts):
            lock = cls.acquire(path)
            if lock.linked():
                return lock
            lock.release(remove=False)
        raise OSError(errno.EAGAIN, "the lock file keeps disappearing", str(path))

    def linked(self) -> bool:
        """Whether the file locked is still the one at ``path``."""
        if self._fd is None:
            return False
        try:
            return os.stat(self.path).st_ino == os.fstat(self._fd).st_ino
        except FileNotFoundError:
            return False

    @property
    def held(self) -> bool:
        return self._fd is not None

    def release(self, *, remove: bool = True) -> None:
        """Give the lock up (idempotent); ``remove`` unlinks the file first."""
        fd, self._fd = self._fd, None
        if fd is None:
            return
        try:
            if remove:
                with contextlib.suppress(FileNotFoundError):
                    self.path.unlink()
        finally:
            os.close(fd)

    def __enter__(self) -> OwnerLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def _read_record(fd: int) -> dict[str, Any] | None:
    try:
        record = json.loads(os.pread(fd, 4096, 0) or b"null")
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def owner_gone(path: str | os.PathLike[str]) -> bool:
    """True when the lock file ``path`` exists and nobody holds it: its owner died
    (or released it without removing it). A missing file is no proof: False."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return False  # held: the owner lives
    else:
        fcntl.flock(fd, fcntl.LOCK_UN)
        return True
    finally:
        os.close(fd)
