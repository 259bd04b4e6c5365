"""The data directory a files-mode restore writes: its rules, its paths, its cleanup.

``RestoreTarget(directory, delta=..., records=..., owner=...)``:

* ``prepare()`` (a worker thread, before the set opens) checks the preconditions and
  raises ``TargetExistsError``/``EndpointError`` when they fail:

  - fresh restore: ``directory`` is absent (created, mode 0700, with its parents) or an
    empty directory (set to 0700), as ``tarstream.TarExtractConsumer`` demands; the
    owner lock ``.<name>.vdistream-restore.lock`` beside it is held for the whole
    restore, and a free lock with a record in it means a killed restore's debris,
    which is removed first (logged ``debris_removed``); a held one means another
    restore runs (refused); a record is only ever written after the directory was found
    empty (or was such debris);
  - delta restore: ``directory`` holds a data directory (``PG_VERSION``) whose server
    is not running (``postmaster.pid`` absent or naming a dead process); without
    ``owner``, root gives what it writes to the directory's owner. Its own lock
    ``.<name>.vdistream-delta.lock`` is held too (a killed delta restore's leftovers
    are what the next delta restore corrects, never debris a fresh one sweeps).
    ``global/pg_control`` is removed durably FIRST, so that a delta restore that fails
    leaves a cluster PostgreSQL refuses to start; every listed directory is made a
    real directory (a file or symlink in its place is removed).

  Tablespaces (the SYMLINK records ``pg_tblspc/<oid>`` of ``records``, whose targets
  are absolute) are created at their locations (or at ``<tablespaces_under>/<oid>``
  when given: a verification's restore, whose ``tablespace_map`` still names the
  recorded locations, so it is not one to start a server on) under the same rules (absent or empty
  for a fresh restore, each with its own owner lock beside it, so that a killed
  restore's files there are swept too); without ``records``, a backup with
  tablespaces is refused when its first tablespace entry arrives.
* ``resolve(path)`` maps an entry's raw path to the absolute path to write, refusing
  anything absolute, with ``.``/``..``/empty components, or a NUL; a path below
  ``pg_tblspc/<oid>/`` lands in that tablespace's location.
* ``finish(pg_control)`` (a worker thread, after every file is written and synced)
  removes what a delta restore must remove, gives the tree to ``owner``, fsyncs every
  directory, then writes ``global/pg_control`` (held back by the writers) LAST,
  fsyncs it and its directory, and only then sets the directories' modes and times.
* ``discard()`` (a worker thread, on any failure) leaves a fresh restore's directory
  and tablespace locations as they were found (removed if created here, else
  emptied); a delta restore's target stays as it is (without ``pg_control``).
* ``release()`` drops the owner locks (idempotent); the engine calls it last.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import stat
import threading
from collections.abc import Iterable, Sequence
from pathlib import Path

from vdistream.engines.pgfiles.layout import EntryKind, FileRecord
from vdistream.engines.scoped import EndpointError, TargetExistsError
from vdistream.engines.tarstream import (
    chown_tree,
    empty_directory,
    resolve_owner,
    take_target_lock,
)
from vdistream.log import get_logger
from vdistream.ownership import OwnerLock
from vdistream.threads import fsync_directory

__all__ = ("PG_CONTROL", "RestoreTarget", "server_running", "unsafe_path")

PG_CONTROL = b"global/pg_control"
TABLESPACES = b"pg_tblspc"

_log = get_logger(__name__)


def unsafe_path(raw: bytes) -> str | None:
    """Why ``raw`` (an entry's path) may not be written, or None if it is safe."""
    if not raw:
        return "an empty path"
    if raw.startswith(b"/"):
        return "an absolute path"
    if b"\0" in raw:
        return "a NUL byte in the path"
    if any(part in (b"", b".", b"..") for part in raw.split(b"/")):
        return "'.', '..' or an empty component in the path"
    return None


def server_running(directory: Path) -> int | None:
    """The pid in ``directory/postmaster.pid`` if that process is alive, else None."""
    try:
        first = (directory / "postmaster.pid").read_text().split("\n", 1)[0].strip()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise EndpointError(f"cannot read {directory / 'postmaster.pid'}: {exc.strerror}") from exc
    try:
        pid = int(first)
    except ValueError:
        return None  # a torn file: no server wrote it completely
    if pid <= 0:
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:
        return pid  # alive, someone else's
    return pid


def _remove(path: bytes) -> None:
    """Remove whatever is at ``path`` (a directory with its content; never following a
    symlink)."""
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
    else:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


def _lock_path(directory: Path, *, delta: bool = False) -> Path:
    """The owner lock of a restore into ``directory``: beside it. A delta restore's has
    its own name: a killed delta restore's lock must never let a fresh restore sweep
    the cluster it was correcting (or other clusters' files in a tablespace location)
    as debris; the fresh restore finds the directory not empty and refuses."""
    kind = "delta" if delta else "restore"
    return directory.with_name(f".{directory.name}.vdistream-{kind}.lock")


def _prune(top: bytes, keep: set[bytes]) -> int:
    """Remove what below ``top`` is not in ``keep`` (not following symlinks); how many
    paths were removed."""
    removed = 0
    for parent, dirs, files in os.walk(top):
        for name in list(dirs):
            path = os.path.join(parent, name)
            if path in keep and not os.path.islink(path):
                continue
            dirs.remove(name)
            if path not in keep:
                _remove(path)
                removed += 1
        for name in files:
            path = os.path.join(parent, name)
            if path not in keep:
                _remove(path)
                removed += 1
    return removed


class RestoreTarget:
    """The data directory (and tablespace locations) of one restore (module docstring)."""

    def __init__(
        self,
        directory: str | os.PathLike[str],
        *,
        delta: bool = False,
        records: Sequence[FileRecord] | None = None,
        owner: str | int | None = None,
        tablespaces_under: str | os.PathLike[str] | None = None,
    ) -> None:
        self.directory = Path(directory).absolute()
        self.root = os.fsencode(self.directory)
        self.delta = delta
        self.records = records
        self.owner = owner
        #: oid -> absolute location, from the records' ``pg_tblspc/<oid>`` symlinks
        self.tablespaces: dict[bytes, bytes] = {}
        for record in records or ():
            parts = os.fsencode(record.path).split(b"/")
            if record.kind is EntryKind.SYMLINK and len(parts) == 2 and parts[0] == TABLESPACES:
                target = os.fsencode(record.target or "")
                if not parts[1].isdigit():
                    raise EndpointError(f"the manifest lists a tablespace {record.path!r}")
                if not target.startswith(b"/") or unsafe_path(target[1:]) is not None:
                    raise EndpointError(
                        f"the tablespace {record.path} points to {record.target!r}, which is "
                        "not a clean absolute path"
                    )
                self.tablespaces[parts[1]] = target
        #: oid -> the location the backup recorded (its pg_tblspc link's target)
        self.recorded_tablespaces = dict(self.tablespaces)
        if tablespaces_under is not None:
            under = os.fsencode(Path(tablespaces_under).absolute())
            self.tablespaces = {oid: os.path.join(under, oid) for oid in self.tablespaces}
        self.removed_paths = 0
        self._created: list[Path] = []  # directories made here (removed on failure)
        #: directories found empty, with their mode (emptied and given it back on failure)
        self._found_empty: list[tuple[Path, int]] = []
        self._dirs: set[bytes] = set()  # directories known to exist
        self._dir_meta: dict[bytes, tuple[int, int]] = {}  # path -> (mode, mtime_ns)
        self._dirs_lock = threading.Lock()
        self._lock: OwnerLock | None = None
        self._location_locks: list[OwnerLock] = []
        self._owner_ids: tuple[int, int] | None = None  # (uid, gid) the tree goes to

    @property
    def lock_path(self) -> Path:
        return _lock_path(self.directory, delta=self.delta)

    # --- before the set opens ---------------------------------------------------------

    def prepare(self) -> None:
        if self.owner is not None:
            # an unknown user, or one only root may give files to, fails before anything
            self._owner_ids = resolve_owner(self.owner)
            if os.geteuid() not in (0, self._owner_ids[0]):
                raise EndpointError(
                    f"only root can give the restored files to user {self.owner!r}: run the "
                    "restore as root, or as that user without --owner"
                )
        path = self.directory
        if path.is_symlink() or (path.exists() and not path.is_dir()):
            raise TargetExistsError(f"the restore target {path} exists and is not a directory")
        if self.delta:
            self._check_delta()
            if self._owner_ids is None and os.geteuid() == 0:
                # root writing into a cluster of another user's: the files it rewrites
                # are that user's too, or the server could not read them and not start
                info = path.stat()
                if info.st_uid != 0:
                    self._owner_ids = (info.st_uid, info.st_gid)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise EndpointError(f"cannot create {path.parent}: {exc.strerror}") from exc
        if not self.delta and not self.lock_path.exists():
            self._refuse_unless_empty(path)
        self._take_lock()
        try:
            if not self.delta:
                self._empty_or_create(path)
            for raw in self.tablespaces.values():
                location = Path(os.fsdecode(raw))
                self._take_location_lock(location)
                if not self.delta:
                    self._empty_or_create(location, tablespace=True)
            if self.delta:
                self._prepare_delta()
        except BaseException:
            self.discard()
            self.release()
            raise
        self._dirs.add(self.root)

    def _check_delta(self) -> None:
        path = self.directory
        if self.records is None:
            raise EndpointError("a delta restore needs the backup's file list (its manifest)")
        if not (path / "PG_VERSION").is_file():
            raise EndpointError(
                f"the delta restore target {path} is not a PostgreSQL data directory "
                "(no PG_VERSION)"
            )
        pid = server_running(path)
        if pid is not None:
            raise EndpointError(
                f"a server is running on {path} (postmaster.pid names the live process "
                f"{pid}): stop it before a delta restore"
            )

    def _take_lock(self) -> None:
        path = self.directory
        lock = take_target_lock(self.lock_path, str(path))
        if lock.previous is not None and path.is_dir() and not self.delta:
            empty_directory(path)  # a record nobody holds: its restore was killed
            _log.info("debris_removed", path=str(path), what="a killed restore's files")
        self._lock = lock

    def _take_location_lock(self, location: Path) -> None:
        """A tablespace location's own owner lock, beside it, as the directory's: a
        killed fresh restore's files in it are swept by the next one (found by its
        lock, free with a record), and two restores never fill one location."""
        lock_path = _lock_path(location, delta=self.delta)
        if not self.delta and not lock_path.exists():
            self._refuse_unless_empty(location, tablespace=True)
        try:
            location.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise EndpointError(f"cannot create {lock_path}: {exc.strerror}") from exc
        lock = take_target_lock(lock_path, f"the tablespace location {location}")
        self._location_locks.append(lock)
        stale = lock.previous is not None and not self.delta
        if stale and location.is_dir() and not location.is_symlink():
            empty_directory(location)
            _log.info("debris_removed", path=str(location), what="a killed restore's files")

    @staticmethod
    def _refuse_unless_empty(path: Path, *, tablespace: bool = False) -> None:
        """``TargetExistsError`` unless ``path`` is absent or an empty directory. Checked
        BEFORE the lock is taken too (when no lock file is there): a lock's record then
        proves that what is in the directory is a restore's, never someone's files that
        a restore killed between its lock and its check would have let be swept."""
        what = "tablespace location" if tablespace else "restore target"
        if path.is_symlink() or (path.exists() and not path.is_dir()):
            raise TargetExistsError(f"the {what} {path} exists and is not a directory")
        if path.is_dir() and any(path.iterdir()):
            raise TargetExistsError(
                f"the {what} {path} is not empty; a fresh restore writes into an empty "
                "directory only (or use a delta restore)"
            )

    def _empty_or_create(self, path: Path, *, tablespace: bool = False) -> None:
        self._refuse_unless_empty(path, tablespace=tablespace)
        if path.is_dir():
            self._found_empty.append((path, stat.S_IMODE(path.stat().st_mode)))
        else:
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                path.mkdir(mode=0o700)
            except OSError as exc:
                raise EndpointError(f"cannot create {path}: {exc.strerror}") from exc
            self._created.append(path)
        try:
            path.chmod(0o700)
        except OSError as exc:
            raise EndpointError(f"cannot set the mode of {path} to 0700: {exc.strerror}") from exc

    def _prepare_delta(self) -> None:
        control = os.path.join(self.root, PG_CONTROL)
        try:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(control)
            fsync_directory(os.path.dirname(control))
        except OSError as exc:
            raise EndpointError(f"cannot remove {os.fsdecode(control)}: {exc.strerror}") from exc
        for location in self.tablespaces.values():
            if os.path.islink(location) or not os.path.isdir(location):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(location)
                os.makedirs(location, 0o700, exist_ok=True)
        assert self.records is not None
        directories = sorted(
            (r for r in self.records if r.kind is EntryKind.DIRECTORY), key=lambda r: r.path
        )
        for record in directories:  # parents sort before their children
            raw = os.fsencode(record.path)
            problem = unsafe_path(raw)
            if problem is not None:
                raise EndpointError(f"the manifest lists {record.path!r}: {problem}")
            path = self.resolve(raw)
            try:
                if os.path.islink(path) or (os.path.lexists(path) and not os.path.isdir(path)):
                    os.unlink(path)
                    self.removed_paths += 1
                os.makedirs(path, 0o700, exist_ok=True)
            except OSError as exc:
                raise EndpointError(
                    f"cannot make {os.fsdecode(path)} a directory: {exc.strerror}"
                ) from exc
            self._dirs.add(path)

    # --- during the restore (worker threads) ---------------------------------------------

    def resolve(self, raw: bytes) -> bytes:
        """The absolute path of the entry path ``raw`` (already checked by ``unsafe_path``)."""
        if raw.startswith(b"pg_tblspc/"):
            parts = raw.split(b"/", 2)
            if len(parts) == 3 and parts[1] in self.tablespaces:
                return os.path.join(self.tablespaces[parts[1]], parts[2])
        return os.path.join(self.root, raw)

    def ensure_parent(self, path: bytes) -> None:
        """Make sure the directory ``path`` goes into exists (0700 until ``finish``)."""
        parent = os.path.dirname(path)
        if parent in self._dirs:
            return
        os.makedirs(parent, 0o700, exist_ok=True)  # exist_ok: another device's thread raced
        with self._dirs_lock:
            self._dirs.add(parent)

    def directory_entry(self, path: bytes, mode: int, mtime_ns: int) -> None:
        """A DIRECTORY entry: create it now, set its mode and time in ``finish``."""
        if path != self.root:
            if os.path.islink(path):
                os.unlink(path)
            os.makedirs(path, 0o700, exist_ok=True)
        with self._dirs_lock:
            self._dirs.add(path)
            self._dir_meta[path] = (mode, mtime_ns)

    def tablespace_location(self, oid: bytes) -> bytes | None:
        """Where tablespace ``oid`` is restored (None: not in the manifest)."""
        return self.tablespaces.get(oid)

    def recorded_location(self, oid: bytes) -> bytes | None:
        """Where the backup found tablespace ``oid`` (None: not in the manifest)."""
        return self.recorded_tablespaces.get(oid)

    # --- the end --------------------------------------------------------------------------

    def remove_extras(self, listed: Iterable[str]) -> int:
        """Delta: remove every path the backup does not list (not following symlinks);
        how many were removed. In a tablespace location only the directories the backup
        lists (its version directory) are corrected: the location may hold other
        clusters' version directories (``PG_<major>_<catversion>``), never ours to
        remove."""
        keep = {self.resolve(os.fsencode(path)) for path in listed}
        keep.add(self.root)
        removed = _prune(self.root, keep)
        for location in self.tablespaces.values():
            with os.scandir(location) as scan:
                ours = [entry.path for entry in scan if entry.path in keep]
            for path in ours:
                if os.path.isdir(path) and not os.path.islink(path):
                    removed += _prune(path, keep)
        self.removed_paths += removed
        return removed

    def finish(self, pg_control: tuple[bytes, int, int] | None) -> None:
        """Own, sync, write ``pg_control`` (data, mode, mtime_ns) last, then set the
        directories' modes and times (module docstring)."""
        owner = self._owner_ids
        if owner is not None:
            chown_tree(Path(os.fsdecode(self.root)), *owner)
            for location in self.tablespaces.values():
                # the location and what the backup put in it: other clusters' version
                # directories there keep their owners
                os.lchown(location, *owner)
                for directory in self._dirs:
                    if os.path.dirname(directory) == location:
                        chown_tree(Path(os.fsdecode(directory)), *owner)
        directories = sorted(self._dirs, key=len, reverse=True)
        for directory in directories:
            fsync_directory(directory)
        if self.tablespaces:
            for top in self.tablespaces.values():
                fsync_directory(os.path.dirname(top))
        fsync_directory(os.path.dirname(self.root))
        if pg_control is not None:
            data, mode, mtime_ns = pg_control
            path = os.path.join(self.root, PG_CONTROL)
            self.ensure_parent(path)
            flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC
            fd = os.open(path, flags, 0o600)
            try:
                view = memoryview(data)
                while view.nbytes:
                    view = view[os.write(fd, view) :]
                os.fchmod(fd, mode)
                if owner is not None:
                    os.fchown(fd, *owner)
                os.utime(fd, ns=(mtime_ns, mtime_ns))
                os.fsync(fd)
            finally:
                os.close(fd)
            fsync_directory(os.path.dirname(path))
        for directory in directories:
            meta = self._dir_meta.get(directory)
            if meta is not None:
                mode, mtime_ns = meta
                os.chmod(directory, mode)
                os.utime(directory, ns=(mtime_ns, mtime_ns))

    def discard(self) -> None:
        """Leave a fresh restore's directories as they were found (module docstring)."""
        if self.delta:
            return
        for path in self._created:
            shutil.rmtree(path, ignore_errors=True)
        for path, mode in self._found_empty:
            empty_directory(path)
            with contextlib.suppress(OSError):
                path.chmod(mode)
        self._created.clear()
        self._found_empty.clear()

    def release(self) -> None:
        for lock in self._location_locks:
            lock.release()
        self._location_locks.clear()
        if self._lock is not None:
            self._lock.release()
            self._lock = None
