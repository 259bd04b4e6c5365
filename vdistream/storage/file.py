"""``file:///abs/dir`` (and plain paths): one regular file per key under a directory.

Durable commit, the way pgBackRest and restic do it:

1. a sink writes ``.{name}.{16 hex}.tmp`` in its key's directory (``O_EXCL``; hidden
   from ``list``; its name can never be a key), i.e. ``DEST/<backup_id>/`` for a
   backup's streams, next to the backup's owner lock (below);
2. ``commit`` checks ``fstat`` size against the sink's size, fsyncs and closes it;
3. publishes it with ``os.link(temp, final)``: the kernel creates the final name only
   if it does not exist (``EEXIST`` otherwise, atomically), so a committed file is never
   replaced or truncated, unlike ``rename``; then unlinks the temporary name;
4. fsyncs the final file's directory and its parents up to the storage directory, so
   the new name (and any directory created for it) survives a crash.

Keys containing ``/`` become subdirectories, created when the sink opens (so a file in
the way fails ``open_sink``). The temporary file lives in the key's directory, so
``abort`` has exactly one file to remove; it also removes the directories its
``open_sink`` created, if they are empty by then. Hard links need the storage directory
and its subdirectories on one file system that supports them (any POSIX local file
system); otherwise commit fails with a ``StorageError`` and nothing is published.

Debris of killed processes
--------------------------
``in_progress(backup_id)`` holds ``DEST/<backup_id>/.vdistream-owner.lock`` with
``flock`` (``vdistream.ownership.OwnerLock``) for a backup's whole life; the kernel
releases it when the process dies, even by ``kill -9``. ``sweep()`` takes the lock of
every backup directory whose lock is not held (its owner is provably gone, on this host
or another one sharing the file system) and, holding it, removes that backup's
temporaries and, unless a committed ``manifest.json`` is there, its streams and the
directory. A directory without a lock (debris of older versions, or of a backup written
without ``in_progress``) is left to ``vdistream storage audit --clean``. Names starting
with ``.vdistream-`` (the lock, the probe file) are not keys and never listed.

File data moves with ``os.pwrite`` / ``os.preadv`` on the file's descriptor, one
worker-thread call per buffer (``Sink.blocking_writes``: the pipeline's hash, compression
and encryption run in the same call); opening and closing go through aiofiles; all of it
and fsync, link, unlink and directory work run in ``vdistream.threads``' bounded pool.
Every ``OSError`` is translated with ``vdistream.errors.translate_os_error``.

The page cache: a sink streams its writeback (``vdistream.threads.Writeback``:
``sync_file_range`` every 8 MiB, so the commit's fsync is short) and drops what it
wrote from the page cache once it is on disk (``posix_fadvise(DONTNEED)``); a source
drops what it read. A backup or a restore of N GiB therefore leaves a few MiB of its
streams cached instead of evicting N GiB of the database's own pages.
"""

from __future__ import annotations

import builtins
import contextlib
import datetime
import errno
import json
import os
import re
import secrets
import stat
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import aiofiles
import anyio
import anyio.lowlevel
from aiofiles.threadpool.binary import AsyncFileIO

from vdistream import threads
from vdistream.errors import (
    StorageExistsError,
    StorageIntegrityError,
    StorageNotFoundError,
    StorageURLError,
    translate_os_error,
)
from vdistream.log import get_logger
from vdistream.ownership import LOCK_NAME, OwnerLock, owner_gone
from vdistream.storage._common import (
    MANIFEST_NAME,
    OwnerMark,
    check_backup_id,
    check_key,
    is_internal,
    owner_text,
)
from vdistream.storage.base import (
    BackupInProgressError,
    SinkBase,
    SourceBase,
    Storage,
    StorageProbeError,
)

__all__ = ("FileSink", "FileSource", "FileStorage")

_TEMP_NAME = re.compile(r"\..*\.[0-9a-f]{16}\.tmp", re.DOTALL)
# Errors that mean "there is no object under this key" for stat, open and delete.
_MISSING = frozenset({errno.ENOENT, errno.ENOTDIR, errno.EISDIR})
#: how long ``in_progress`` retries a lock held for a moment (by a sweep)
_LOCK_PATIENCE = 2.0
_log = get_logger(__name__)


class FileStorage(Storage):
    """The directory ``path``; it is created when the first sink opens."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path).absolute()
        self.url = self.path.as_uri()

    @classmethod
    def from_url(cls, url: str) -> FileStorage:
        """``file:///abs/dir`` or ``file://localhost/abs/dir`` (percent-decoded)."""
        parts = urlsplit(url)
        if parts.scheme.lower() != "file":
            raise StorageURLError("expected a file:// URL", url=url)
        if parts.netloc not in ("", "localhost"):
            raise StorageURLError("a file URL must not name another host", url=url)
        if parts.query or parts.fragment:
            raise StorageURLError("a file URL takes no query or fragment", url=url)
        path = unquote(parts.path)
        if not path.startswith("/") or "\0" in path:
            raise StorageURLError("a file URL needs an absolute path", url=url)
        return cls(path)

    def __repr__(self) -> str:
        return f"<FileStorage {self.url}>"

    def _path(self, key: str) -> Path:
        check_key(key, url=self.url)
        if any(_TEMP_NAME.fullmatch(part) for part in key.split("/")):
            raise StorageURLError(f"invalid key {key!r}: reserved temporary name", url=self.url)
        return self.path.joinpath(*key.split("/"))

    async def open_sink(self, key: str, *, device: str | None = None) -> FileSink:
        final = self._path(key)
        name = final.name[:200]  # leave room for the suffix within NAME_MAX
        temp = final.parent / f".{name}.{secrets.token_hex(8)}.tmp"
        url = final.as_uri()
        await anyio.lowlevel.checkpoint_if_cancelled()
        # Shielded so that a cancellation cannot lose the handle of a file just created.
        with anyio.CancelScope(shield=True), translate_os_error("open", url=url, device=device):
            created: builtins.list[Path] = []
            for attempt in range(3):
                created += await threads.run_sync(_make_directories, final.parent)
                try:
                    file = await aiofiles.open(temp, "xb", buffering=0, executor=threads.executor())
                    break
                except FileNotFoundError:
                    if attempt == 2:  # a sweep removed the directory each time: give up
                        raise
        return FileSink(
            file,
            root=self.path,
            temp=temp,
            final=final,
            url=url,
            device=device,
            created=tuple(dict.fromkeys(created)),
        )

    async def open_source(self, key: str) -> FileSource:
        path = self._path(key)
        url = path.as_uri()
        await anyio.lowlevel.checkpoint_if_cancelled()
        with anyio.CancelScope(shield=True), _reading("open", url):
            file = await aiofiles.open(path, "rb", buffering=0, executor=threads.executor())
            try:
                info = await threads.run_sync(os.fstat, file.fileno())
                if not stat.S_ISREG(info.st_mode):
                    raise IsADirectoryError(errno.EISDIR, "not a regular file", str(path))
            except BaseException:
                await file.close()
                raise
        return FileSource(file, size=info.st_size, url=url)

    async def list(self, prefix: str = "") -> builtins.list[str]:
        with translate_os_error("list", url=self.url):
            return await threads.run_sync(_list_keys, self.path, prefix)

    async def stat(self, key: str) -> int:
        path = self._path(key)
        with _reading("stat", path.as_uri()):
            info = await threads.run_sync(os.stat, path)
        if not stat.S_ISREG(info.st_mode):
            raise StorageNotFoundError("stat failed: not a regular file", url=path.as_uri())
        return info.st_size

    async def delete(self, key: str) -> None:
        path = self._path(key)
        with anyio.CancelScope(shield=True), _reading("delete", path.as_uri()):
            await threads.run_sync(os.unlink, path)
            await threads.run_sync(threads.fsync_directory, path.parent)

    async def replace_bytes(self, key: str, data: bytes | bytearray | memoryview) -> None:
        """A temporary beside ``key`` (the sinks' naming: ``list`` never shows it, sweep
        and audit treat a leftover like theirs), written and fsynced, renamed over
        ``key``, then the directory fsynced (pgBackRest's temp-fsync-rename commit)."""
        path = self._path(key)
        body = bytes(data)  # small; the caller's buffer is not retained
        await anyio.lowlevel.checkpoint_if_cancelled()
        with anyio.CancelScope(shield=True), _reading("replace", path.as_uri()):
            await threads.run_sync(_replace_file, path, body)

    # --- debris (see the module docstring) ---

    @contextlib.asynccontextmanager
    async def in_progress(self, backup_id: str) -> AsyncIterator[None]:
        """Hold ``DEST/<backup_id>/.vdistream-owner.lock`` (see ``Storage.in_progress``).

        Creates ``DEST/<backup_id>/``; on exit removes the lock and the directory if it
        is empty by then (a failed backup whose streams were removed).
        """
        check_backup_id(backup_id, url=self.url)
        directory = self.path / backup_id
        url = directory.as_uri()
        with anyio.CancelScope(shield=True):
            lock = await self._take_lock(backup_id, directory, url)
        try:
            yield
        finally:
            with anyio.CancelScope(shield=True):
                await threads.run_sync(_drop_lock, lock, self.path)

    async def _take_lock(self, backup_id: str, directory: Path, url: str) -> OwnerLock:
        deadline = anyio.current_time() + _LOCK_PATIENCE
        while True:
            with translate_os_error("lock the backup", url=url):
                lock, holder = await threads.run_sync(_acquire, directory)
            if lock is not None:
                return lock
            if anyio.current_time() >= deadline:
                raise BackupInProgressError(
                    f"backup {backup_id} is being written by another process ({holder})",
                    url=url,
                )
            await anyio.sleep(0.05)  # held for a moment by a sweep, or really busy

    async def sweep(self) -> builtins.list[str]:
        """Remove the debris of backups whose lock's owner is gone (``Storage.sweep``)."""
        with anyio.CancelScope(shield=True):
            removed, failures = await threads.run_sync(_sweep, self.path)
        for name in removed:
            _log.info("debris_removed", storage=self.url, item=name)
        for failure in failures:
            _log.warning("debris_not_removed", storage=self.url, error=failure)
        return removed

    async def owner_marks(self) -> builtins.list[OwnerMark]:
        """The lock of every backup directory, live (held) or stale (not held)."""
        return await threads.run_sync(_owner_marks, self.path)

    async def remove_mark(self, mark: OwnerMark) -> None:
        """Remove a stale lock file (taking it first, so a live one is never removed)."""
        with translate_os_error("remove lock", url=self.url):
            await threads.run_sync(_remove_stale_lock, self.path / mark.name)

    async def probe(self) -> None:
        """Create the directory (as a backup does) and write, fsync and remove a small
        ``.vdistream-probe-<random>`` file in it (``Storage.probe``)."""
        where = str(self.path)
        try:
            await threads.run_sync(_probe, self.path)
        except OSError as exc:
            reason = (exc.strerror or str(exc)).lower()
            if isinstance(exc, NotADirectoryError | FileExistsError):
                reason = "not a directory (a file is in the way)"
            raise StorageProbeError(where, reason) from exc


class FileSink(SinkBase):
    """Writes a temporary file; ``commit`` links it under the key (see module doc)."""

    BLOCKING_WRITES = True

    def __init__(
        self,
        file: AsyncFileIO,
        *,
        root: Path,
        temp: Path,
        final: Path,
        url: str,
        device: str | None,
        created: tuple[Path, ...] = (),
    ) -> None:
        super().__init__(url, device)
        self.temp_path = temp
        self.final_path = final
        self._root = root
        self._created = created  # directories open_sink made, removed by abort if empty
        self._file = file
        self._writeback = threads.Writeback(file.fileno())

    def _errors(self, what: str) -> contextlib.AbstractContextManager[object]:
        return translate_os_error(what, url=self.url, device=self.device)

    async def _write(self, view: memoryview, start: int) -> None:
        await threads.run_sync(self._write_blocking, view, start)

    def _write_blocking(self, view: memoryview, start: int) -> None:
        fd = self._file.fileno()
        done = 0
        while done < view.nbytes:  # writes may be short
            with view[done:] as rest:
                done += os.pwrite(fd, rest, start + done)
        if start == self._position:  # front to back: stream the writeback
            self._writeback.wrote(start + done)

    async def _flush(self) -> None:
        await threads.run_sync(os.fsync, self._file.fileno())

    async def _seal(self) -> None:
        """Check the byte count, fsync and close: the data is final from here on."""
        fd = self._file.fileno()
        actual = (await threads.run_sync(os.fstat, fd)).st_size
        if actual != self._size:
            raise StorageIntegrityError(
                f"commit refused: the file holds {actual} bytes, the sink wrote {self._size}",
                url=self.url,
                device=self.device,
            )
        await threads.run_sync(os.fsync, fd)
        await threads.run_sync(self._writeback.finish)
        await self._file.close()

    async def _publish(self) -> None:
        if not await threads.run_sync(_link_durably, self._root, self.temp_path, self.final_path):
            raise StorageExistsError(
                "commit refused: an object is already committed under this key",
                url=self.url,
                device=self.device,
            )

    async def _discard(self) -> None:
        try:
            await self._file.close()  # idempotent
        finally:
            await threads.run_sync(_unlink_if_present, self.temp_path)
            await threads.run_sync(_remove_empty, self._created)


class FileSource(SourceBase):
    """Reads an open regular file at positions (``os.preadv``), in one worker-thread
    call per buffer; what was read is dropped from the page cache (module doc)."""

    BLOCKING_READS = True

    def __init__(self, file: AsyncFileIO, *, size: int, url: str) -> None:
        super().__init__(url, size)
        self._file = file

    async def _readinto(self, view: memoryview, start: int) -> int:
        return await threads.run_sync(self._readinto_blocking, view, start)

    def _readinto_blocking(self, view: memoryview, start: int) -> int:
        fd = self._file.fileno()
        done = 0
        with translate_os_error("read", url=self.url):
            while done < view.nbytes:
                with view[done:] as rest:
                    count = os.preadv(fd, [rest], start + done)
                if not count:
                    break
                done += count
        threads.drop_cached(fd, start, done)  # read once: not worth the cache
        return done

    async def _close(self) -> None:
        with translate_os_error("close", url=self.url):
            await self._file.close()


# --- blocking helpers, run in worker threads ----------------------------------------


@contextlib.contextmanager
def _reading(what: str, url: str) -> Iterator[None]:
    """Like translate_os_error, but every "no such file" flavour means not found."""
    try:
        yield
    except OSError as exc:
        if exc.errno in _MISSING:
            raise StorageNotFoundError(f"{what} failed: no such object", url=url) from exc
        with translate_os_error(what, url=url):
            raise


def _replace_file(final: Path, data: bytes) -> None:
    """Worker thread: ``FileStorage.replace_bytes``; the old file's mode is kept."""
    info = os.stat(final)  # FileNotFoundError: nothing to replace
    if not stat.S_ISREG(info.st_mode):
        raise IsADirectoryError(errno.EISDIR, "not a regular file", str(final))
    mode = info.st_mode & 0o777
    temp = final.parent / f".{final.name[:200]}.{secrets.token_hex(8)}.tmp"
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
    try:
        try:
            os.fchmod(fd, mode)  # not narrowed by the umask
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(temp, final)
    except BaseException:
        _unlink_if_present(temp)
        raise
    threads.fsync_directory(final.parent)


def _make_directories(directory: Path) -> builtins.list[Path]:
    """Create ``directory`` and its parents; return those created, deepest first. A file
    in the way is an error, not 'exists'."""
    missing: builtins.list[Path] = []
    probe = directory
    while not probe.is_dir() and probe != probe.parent:
        missing.append(probe)
        probe = probe.parent
    try:
        os.makedirs(directory, exist_ok=True)
    except FileExistsError as exc:
        # makedirs reports "a file is where a directory must go" as EEXIST, which
        # would otherwise read as "object already committed".
        raise NotADirectoryError(
            errno.ENOTDIR, "a file is in the way of this directory", str(directory)
        ) from exc
    return missing


def _remove_empty(directories: tuple[Path, ...]) -> None:
    """Remove each of ``directories`` (deepest first) that is empty; the rest stay."""
    for directory in directories:
        try:
            os.rmdir(directory)
        except OSError:
            return  # not empty (or gone): so are its parents, or they are someone's


def _read_holder(path: Path) -> dict[str, Any] | None:
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def _acquire(directory: Path) -> tuple[OwnerLock | None, str]:
    """Take ``directory``'s owner lock (creating the directory): (lock, "") or, when a
    live process holds it, (None, "host, pid N")."""
    path = directory / LOCK_NAME
    for _ in range(10):
        _make_directories(directory)
        try:
            return OwnerLock.take(path), ""
        except FileNotFoundError:
            continue  # a sweep removed the directory just now
        except BlockingIOError:
            return None, owner_text(_read_holder(path))
    raise OSError(errno.EAGAIN, "the lock file keeps disappearing", str(path))


def _drop_lock(lock: OwnerLock, root: Path) -> None:
    directory = lock.path.parent
    lock.release()
    with contextlib.suppress(OSError):
        os.rmdir(directory)  # only if empty: a failed backup whose streams were removed
        threads.fsync_directory(root)


def _owner_marks(root: Path) -> builtins.list[OwnerMark]:
    marks: builtins.list[OwnerMark] = []
    for directory in _backup_directories(root):
        path = directory / LOCK_NAME
        try:
            mtime = path.stat().st_mtime
        except OSError:
            continue
        alive = not owner_gone(path) and path.exists()
        marks.append(
            OwnerMark(
                backup_id=directory.name,
                name=f"{directory.name}/{LOCK_NAME}",
                alive=alive,
                modified=datetime.datetime.fromtimestamp(mtime, datetime.UTC),
                record=_read_holder(path),
            )
        )
    return marks


def _remove_stale_lock(path: Path) -> None:
    try:
        lock = OwnerLock.take(path) if path.exists() else None
    except (BlockingIOError, FileNotFoundError):
        return  # held after all (or gone): not ours to remove
    if lock is not None:
        lock.release()


def _backup_directories(root: Path) -> builtins.list[Path]:
    try:
        entries = builtins.list(os.scandir(root))
    except (FileNotFoundError, NotADirectoryError):
        return []
    return sorted(
        Path(entry.path)
        for entry in entries
        if entry.is_dir(follow_symlinks=False) and not is_internal(entry.name)
    )


def _sweep(root: Path) -> tuple[builtins.list[str], builtins.list[str]]:
    """The blocking part of ``FileStorage.sweep``: (removed names, failures)."""
    removed: builtins.list[str] = []
    failures: builtins.list[str] = []
    for directory in _backup_directories(root):
        path = directory / LOCK_NAME
        if not path.is_file():
            continue  # no lock: not provably anyone's debris (storage audit's case)
        try:
            lock = OwnerLock.take(path)
        except OSError:
            continue  # held: its owner lives (or the lock is unusable: leave it)
        try:
            if not lock.linked():
                continue
            committed = (directory / MANIFEST_NAME).is_file()
            _remove_debris(root, directory, committed, removed, failures)
            removed.append(f"{directory.name}/{LOCK_NAME}")
        finally:
            lock.release(remove=lock.linked())
        if not committed:
            try:
                os.rmdir(directory)
            except FileNotFoundError:
                pass
            except OSError as exc:
                failures.append(f"cannot remove {directory}: {exc.strerror or exc}")
            else:
                threads.fsync_directory(root)
    return removed, failures


def _remove_debris(
    root: Path,
    directory: Path,
    committed: bool,
    removed: builtins.list[str],
    failures: builtins.list[str],
) -> None:
    """Everything under ``directory`` but the lock, or only temporaries if committed."""
    for current, subdirectories, names in os.walk(directory, topdown=False):
        here = Path(current)
        for name in sorted(names):
            if name == LOCK_NAME and here == directory:
                continue
            if committed and not _TEMP_NAME.fullmatch(name):
                continue
            path = here / name
            try:
                os.unlink(path)
            except FileNotFoundError:
                continue
            except OSError as exc:
                failures.append(f"cannot remove {path}: {exc.strerror or exc}")
                continue
            removed.append(path.relative_to(root).as_posix())
        if not committed:
            for name in subdirectories:
                with contextlib.suppress(OSError):
                    os.rmdir(here / name)
    with contextlib.suppress(OSError):
        threads.fsync_directory(directory)


def _probe(root: Path) -> None:
    _make_directories(root)
    path = root / f".vdistream-probe-{secrets.token_hex(8)}"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        try:
            os.write(fd, b"vdistream probe\n")
            os.fsync(fd)
        finally:
            os.close(fd)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
    threads.fsync_directory(root)


def _link_durably(root: Path, temp: Path, final: Path) -> bool:
    """Give ``temp`` the name ``final`` unless that name exists (then False), drop the
    temporary name and make the new one durable; undo on failure.

    link(2) fails with EEXIST instead of replacing, atomically; rename(2) would replace.
    """
    _make_directories(final.parent)
    try:
        os.link(temp, final)
    except FileExistsError:
        return False
    inode = os.stat(temp).st_ino
    try:
        os.unlink(temp)
        directory = final.parent
        while True:  # the key's directory and every parent up to the root may be new
            threads.fsync_directory(directory)
            if directory == root:
                break
            directory = directory.parent
    except BaseException:
        # Not durable means not committed: take our name back (only if it is still
        # our file) so nothing is published that the caller was told failed.
        with contextlib.suppress(OSError):
            if os.stat(final).st_ino == inode:
                os.unlink(final)
        _unlink_if_present(temp)
        raise
    return True


def _unlink_if_present(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


def _list_keys(root: Path, prefix: str) -> builtins.list[str]:
    """Committed keys under ``root`` starting with ``prefix``; skips temporaries and
    directories that cannot hold a match. A missing root holds no keys."""
    keys: builtins.list[str] = []
    pending = [""]  # directories to scan, relative to root, each ending with "/"
    while pending:
        relative = pending.pop()
        try:
            entries = os.scandir(root / relative)
        except (FileNotFoundError, NotADirectoryError):
            continue
        with entries:
            for entry in entries:
                key = relative + entry.name
                if entry.is_dir(follow_symlinks=False):
                    sub = key + "/"
                    if sub.startswith(prefix) or prefix.startswith(sub):
                        pending.append(sub)
                elif (
                    key.startswith(prefix)
                    and not _TEMP_NAME.fullmatch(entry.name)
                    and not is_internal(entry.name)
                    and entry.is_file()
                ):
                    keys.append(key)
    return sorted(keys)
