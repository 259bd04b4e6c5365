"""Private work directories that the next run removes when their owner was killed.

An engine that stages data on disk (SQLite's snapshot, ``vdistream-sqlite-*``) makes a
fresh directory with ``claim_workdir(parent, prefix)`` and removes it when its job
ends, however it ends. A ``kill -9`` gives it no chance: the directory stays. So every
directory holds an owner lock (``vdistream.ownership.OwnerLock``, the file
``LOCK_NAME`` inside it) for its whole life, and the next run that uses the same work
directory calls ``sweep_workdir(parent, prefix)`` first: every ``prefix*`` directory
whose lock file is there and held by nobody (its owner provably died, on this host or
another one sharing the file system) is removed, and logged (``debris_removed``, with
its path and size in bytes). A live job's directory, in this process or any other, is
never touched: its lock is held.

Choices where nothing else decides:

* The lock file appears under its final name only already locked: ``claim_workdir``
  writes it under a temporary name in the still private directory, locks it, writes
  the owner's record into it, and renames it into place (the ``flock`` belongs to the
  file, not the name). A sweep can never see the lock of a live owner unlocked.
* A ``prefix*`` directory without a lock file is left alone: it was made by a version
  of vdistream without locks, or its owner died in the microseconds between creating
  it and locking it (it is then empty), or it is not ours. ``vdistream storage
  audit``'s operator, or the daemon's start (which empties its own work directory under
  its state lock), deals with those.
* The owner holds the lock until its directory is removed, then releases it.
* Nothing is followed through symbolic links; directories of other users cannot be
  opened (``mkdtemp`` makes them 0700) and are left alone.

Blocking: call these in a worker thread.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import tempfile
from pathlib import Path

from vdistream.log import get_logger
from vdistream.ownership import LOCK_NAME, OwnerLock, owner_gone, owner_record

__all__ = ("claim_workdir", "release_workdir", "sweep_workdir")

_log = get_logger(__name__)
_PENDING_LOCK = ".vdistream-owner.lock.new"


def claim_workdir(parent: str | os.PathLike[str] | None, prefix: str) -> tuple[Path, OwnerLock]:
    """A new directory ``parent/prefix*`` (``parent`` None: the system's temporary
    directory, ``TMPDIR``), mode 0700, and the lock held for it (module docstring).
    Raises ``OSError`` when it cannot be made."""
    directory = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    try:
        pending = directory / _PENDING_LOCK
        fd = os.open(pending, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            os.write(fd, json.dumps(owner_record()).encode() + b"\n")
            os.rename(pending, directory / LOCK_NAME)
        except BaseException:
            os.close(fd)
            raise
    except BaseException:
        shutil.rmtree(directory, ignore_errors=True)
        raise
    return directory, OwnerLock(directory / LOCK_NAME, fd)


def release_workdir(directory: str | os.PathLike[str], lock: OwnerLock) -> None:
    """Remove a directory of ``claim_workdir`` (all of it), then give up its lock."""
    try:
        shutil.rmtree(directory, ignore_errors=True)
    finally:
        lock.release()


def _size(path: Path) -> int:
    total = 0
    for root, _dirs, files in os.walk(path):
        for name in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(root, name)).st_size
    return total


def sweep_workdir(parent: str | os.PathLike[str] | None, prefix: str) -> list[Path]:
    """Remove every ``parent/prefix*`` directory whose owner provably died (module
    docstring); the directories removed. Never raises for a directory it cannot look
    at or remove (it is skipped, and logged when it was debris)."""
    base = Path(parent) if parent is not None else Path(tempfile.gettempdir())
    removed = []
    try:
        candidates = [entry for entry in base.iterdir() if entry.name.startswith(prefix)]
    except OSError:
        return []
    for entry in sorted(candidates):
        if entry.is_symlink() or not entry.is_dir():
            continue
        if not owner_gone(entry / LOCK_NAME):
            continue
        size = _size(entry)
        shutil.rmtree(entry, ignore_errors=True)
        if entry.exists():
            _log.warning("debris_not_removed", path=str(entry), bytes=size)
            continue
        _log.info("debris_removed", path=str(entry), bytes=size)
        removed.append(entry)
    return removed
