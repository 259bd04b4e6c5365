"""A restore into one file that appears complete and checked, or not at all.

``AtomicFileConsumer(path)`` writes the stream to a temporary file *next to* ``path``
(same directory, so the final step is a rename on one file system), and on
``finish()``: flushes and fsyncs it, runs the caller's ``validate(temp_path)`` (in a
worker thread; raising there fails the restore), then puts it in place and fsyncs the
directory. It never replaces an existing ``path`` unless ``overwrite=True``: without
it, the existence is checked before the set opens and again, atomically, at the end
(a hard link fails if the name exists). ``discard()`` (and leaving ``running()`` in
any other way) removes the temporary file. Errors are ``EndpointError``\\s naming the
path.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import glob
import io
import os
import tempfile
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import anyio

from vdistream import threads
from vdistream.engines.scoped import EndpointError, ScopedStream, TargetExistsError
from vdistream.engines.streams import ByteConsumer
from vdistream.log import get_logger

__all__ = (
    "PARTIAL_SUFFIX",
    "AtomicFileConsumer",
    "creation_mode",
    "lock_held_file",
    "partial_files",
    "remove_stale_partials",
)

_log = get_logger(__name__)

#: the temporary file a restore writes beside its target is ``.<name>.<random><suffix>``
PARTIAL_SUFFIX = ".vdistream-partial"


def partial_files(path: Path) -> list[Path]:
    """The temporary files that restores into ``path`` left beside it: those of a
    process that was killed, since any other end removes its own (blocking)."""
    try:
        return sorted(path.parent.glob(f".{glob.escape(path.name)}.*{PARTIAL_SUFFIX}"))
    except OSError:
        return []


def creation_mode() -> int:
    """The mode a new file gets here: ``0666`` without the process's umask.

    Read from ``/proc/self/status`` (no change of the process-wide umask, which other
    threads would see); elsewhere set and restored at once.
    """
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return 0o666 & ~int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    umask = os.umask(0o022)
    os.umask(umask)
    return 0o666 & ~umask


def lock_held_file(fd: int, path: Path) -> bool:
    """Take an exclusive ``flock`` on ``fd`` (the file just created as ``path``) without
    waiting; True when it is held AND ``path`` still names that file. False means a
    sweeper got it first (it holds the lock, or already removed the name): make another.
    """
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    try:
        mine, named = os.fstat(fd), os.stat(path, follow_symlinks=False)
    except FileNotFoundError:
        return False
    return (mine.st_dev, mine.st_ino) == (named.st_dev, named.st_ino)


def remove_stale_partials(path: Path) -> list[Path]:
    """Remove the partial files beside ``path`` whose restore is gone (nobody holds
    their lock); return them. A partial file held by a live restore is left alone.
    Blocking: run it in a worker thread."""
    removed = []
    for partial in partial_files(path):
        try:
            fd = os.open(partial, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError:
            continue  # gone meanwhile, or not ours to open
        try:
            # Locked by us, and the name still this file (not a new one): debris.
            if lock_held_file(fd, partial):
                partial.unlink()
                removed.append(partial)
        except OSError as exc:
            _log.warning("partial_not_removed", path=str(partial), error=str(exc))
        finally:
            os.close(fd)
    for partial in removed:
        _log.info("partial_removed", path=str(partial), target=str(path))
    return removed


class AtomicFileConsumer(ByteConsumer, ScopedStream):
    """A restore target that is one file (module docstring).

    ``validate(path)`` runs in a worker thread on the complete temporary file and
    raises (preferably an ``EndpointError``) when its content is not acceptable.
    ``precheck()`` runs in a worker thread before the set opens, after the target's own
    checks; ``before_place(temp_path)`` runs just before the file is put in place (for
    example to refuse or clean up stale companion files). ``mode`` is the restored
    file's mode (default: ``0666 & ~umask``, as any new file).
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        overwrite: bool = False,
        validate: Callable[[Path], object] | None = None,
        before_place: Callable[[Path], object] | None = None,
        precheck: Callable[[], object] | None = None,
        what: str = "file",
        mode: int | None = None,
    ) -> None:
        self.path = Path(path).absolute()
        self.overwrite = overwrite
        self.validate = validate
        self.before_place = before_place
        self.precheck = precheck
        self.what = what
        self.mode = mode
        self.removed_partials: list[Path] = []
        self.temp: Path | None = None
        self._lock: int | None = None
        self.bytes_written = 0
        self.placed = False
        self._file: io.BufferedWriter | None = None

    # --- lifetime -------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[None]:
        await threads.run_sync(self._prepare)
        try:
            yield
        finally:
            with anyio.CancelScope(shield=True):
                await threads.run_sync(self._drop)

    def _prepare(self) -> None:
        """Refuse early what would fail late; create the temporary file."""
        if self.path.is_dir():
            raise TargetExistsError(f"the restore target {self.path} is a directory")
        if not self.overwrite and (self.path.exists() or self.path.is_symlink()):
            raise TargetExistsError(
                f"the restore target {self.path} already exists; it is never overwritten "
                "(remove it, choose another path, or restore with overwrite)"
            )
        parent = self.path.parent
        if not parent.is_dir():
            raise EndpointError(f"cannot restore to {self.path}: {parent} is not a directory")
        if self.precheck is not None:
            self.precheck()
        self.removed_partials = remove_stale_partials(self.path)
        for _ in range(10):
            try:
                fd, name = tempfile.mkstemp(
                    prefix=f".{self.path.name}.", suffix=PARTIAL_SUFFIX, dir=parent
                )
            except OSError as exc:
                raise EndpointError(
                    f"cannot create a temporary file next to {self.path}: {exc.strerror}"
                ) from exc
            # The lock on the file itself marks it as a live restore's (module docstring).
            if lock_held_file(fd, Path(name)):
                break
            os.close(fd)  # a concurrent sweep took it for debris: make another
        else:
            raise EndpointError(f"cannot create a temporary file next to {self.path}")
        self.temp = Path(name)
        # A descriptor of its own keeps the lock while the file is checked and placed,
        # after the writer's descriptor was closed (a flock belongs to the open file).
        self._lock = os.dup(fd)
        self._file = os.fdopen(fd, "wb")

    def _drop(self) -> None:
        file, self._file = self._file, None
        if file is not None:
            with contextlib.suppress(OSError):
                file.close()
        if self.temp is not None and not self.placed:
            with contextlib.suppress(FileNotFoundError):
                self.temp.unlink()
        self._unlock()

    def _unlock(self) -> None:
        lock, self._lock = self._lock, None
        if lock is not None:
            os.close(lock)

    # --- the consumer ---------------------------------------------------------------

    def _writer(self) -> io.BufferedWriter:
        if self._file is None:
            raise RuntimeError(f"{type(self).__name__} used outside its running() scope")
        return self._file

    async def write(self, view: memoryview) -> None:
        file = self._writer()
        try:
            await threads.run_sync(file.write, view)
        except OSError as exc:
            raise EndpointError(
                f"writing the restored {self.what} next to {self.path} failed: {exc.strerror}"
            ) from exc
        self.bytes_written += view.nbytes

    async def finish(self) -> None:
        file = self._writer()
        await threads.run_sync(self._seal, file)

    def _seal(self, file: io.BufferedWriter) -> None:
        assert self.temp is not None
        try:
            file.flush()
            os.fsync(file.fileno())
        except OSError as exc:
            raise EndpointError(
                f"writing the restored {self.what} next to {self.path} failed: {exc.strerror}"
            ) from exc
        finally:
            self._file = None
            file.close()
        if self.validate is not None:
            self.validate(self.temp)
        if self.before_place is not None:
            self.before_place(self.temp)
        try:
            os.chmod(self.temp, self.mode if self.mode is not None else creation_mode())
        except OSError as exc:
            raise EndpointError(
                f"setting the mode of the restored {self.what} {self.path} failed: {exc.strerror}"
            ) from exc
        try:
            if self.overwrite:
                os.replace(self.temp, self.path)
            else:
                self._link_into_place()
        except OSError as exc:
            raise EndpointError(
                f"putting the restored {self.what} in place at {self.path} failed: {exc.strerror}"
            ) from exc
        self.placed = True
        self._unlock()
        threads.fsync_directory(self.path.parent)

    def _link_into_place(self) -> None:
        assert self.temp is not None
        try:
            os.link(self.temp, self.path)  # fails if the name exists: never overwrites
        except FileExistsError:
            raise TargetExistsError(
                f"the restore target {self.path} appeared during the restore; it is never "
                "overwritten"
            ) from None
        except OSError as exc:
            if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EXDEV, errno.EMLINK):
                raise
            # A file system without hard links: check, then rename (a small race).
            if self.path.exists():
                raise TargetExistsError(
                    f"the restore target {self.path} appeared during the restore"
                ) from None
            os.rename(self.temp, self.path)
            return
        self.temp.unlink()

    async def discard(self) -> None:
        with anyio.CancelScope(shield=True):
            await threads.run_sync(self._drop)
