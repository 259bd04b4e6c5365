"""A restore that extracts a tar stream into an empty directory.

``TarExtractConsumer(directory)`` feeds the restored stream through a pipe to a worker
thread running Python's ``tarfile`` in stream mode (``"r|"``: read once, in order,
never seeking), which extracts it into ``directory``:

* ``directory`` must be absent (it is created, mode 0700, with missing parents) or an
  empty directory (it is set to mode 0700); anything else is refused before the set
  opens (``TargetExistsError``). 0700 is what PostgreSQL demands of a data directory.
* Extraction uses tarfile's ``"data"`` filter: no absolute paths, no ``..``, no links
  pointing outside, no device files, no setuid bits, and ownership is NOT taken from
  the archive: everything belongs to the user running vdistream. ``owner`` (a user
  name or uid; root only) then gives the whole tree to that user, e.g. ``postgres``.
* The writer never blocks the event loop (non-blocking pipe, ``wait_writable``); the
  thread ends when the pipe reaches end of file. After the archive's end marker the
  thread reads the rest of the stream (tar's padding) so that no write ever fails
  for lack of a reader.
* ``finish()`` closes the pipe, waits for the thread, applies ``owner`` and awaits the
  caller's ``verify(directory)``. ``discard()`` (any failure, abort or cancellation)
  stops the thread and removes what was extracted: the directory is left as it was
  found (empty, or absent if it was created here).
* A restore that is killed (``kill -9``) cannot clean up, so while it runs it holds an
  owner lock beside the directory, ``.<name>.vdistream-restore.lock`` (an ``flock``
  that dies with the process, ``vdistream.ownership``). The next restore into the same
  directory that finds that lock free knows the content is a dead restore's debris:
  it empties the directory (logged as ``debris_removed``) and goes on. A lock that is
  held means another restore into the directory is running: refused. Emptying happens
  while holding the lock (``OwnerLock.take``), and the lock is released as soon as the
  directory is complete and verified.

Errors are ``EndpointError``\\s naming the directory.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import tarfile
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import anyio
import anyio.abc
import anyio.to_thread

from vdistream import threads
from vdistream.engines.scoped import (
    EndpointError,
    ScopedStream,
    TargetExistsError,
    endpoint_tasks,
)
from vdistream.engines.streams import ByteConsumer
from vdistream.log import get_logger
from vdistream.ownership import OwnerLock

__all__ = (
    "TarExtractConsumer",
    "chown_tree",
    "empty_directory",
    "resolve_owner",
    "take_target_lock",
)

#: How long a failed or aborted restore waits for the extracting thread to notice the
#: end of its input (it is blocked in a read that the closed pipe ends at once).
THREAD_STOP_SECONDS = 30.0
_READ_SIZE = 1 << 20

_log = get_logger(__name__)


def resolve_owner(owner: str | int) -> tuple[int, int]:
    """(uid, gid) of a user name or uid; the gid is the user's primary group."""
    try:
        entry = pwd.getpwuid(owner) if isinstance(owner, int) else pwd.getpwnam(owner)
    except KeyError:
        raise EndpointError(f"unknown user {owner!r}") from None
    return entry.pw_uid, entry.pw_gid


def take_target_lock(lock_path: Path, target: str) -> OwnerLock:
    """The owner lock of a restore ``target`` (module docstring): held, or
    ``TargetExistsError`` when another restore holds it. Whether what it finds is a dead
    restore's debris (``lock.previous``) is the caller's business."""
    try:
        return OwnerLock.take(lock_path)
    except BlockingIOError:
        raise TargetExistsError(
            f"another restore into {target} is running (its lock {lock_path} is held)"
        ) from None
    except OSError as exc:
        raise EndpointError(f"cannot create {lock_path}: {exc.strerror}") from exc


def empty_directory(path: Path) -> None:
    """Remove what ``path`` holds, never following a symlink; the directory stays."""
    if path.is_dir():
        for entry in path.iterdir():
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                with contextlib.suppress(FileNotFoundError):
                    entry.unlink()


def chown_tree(root: Path, uid: int, gid: int) -> None:
    """Give ``root`` and everything below it to ``uid:gid`` (links themselves)."""
    os.lchown(root, uid, gid)
    for parent, dirs, files in os.walk(root):
        for name in dirs + files:
            os.lchown(os.path.join(parent, name), uid, gid)


class TarExtractConsumer(ByteConsumer, ScopedStream):
    """Extracts the restored tar stream into ``directory`` (module docstring)."""

    def __init__(
        self,
        directory: str | os.PathLike[str],
        *,
        owner: str | int | None = None,
        verify: Callable[[Path], Awaitable[object]] | None = None,
    ) -> None:
        self.directory = Path(directory).absolute()
        self.owner = owner
        self.verify = verify
        self.members = 0
        self._created = False
        self._group: anyio.abc.TaskGroup | None = None
        self._fd = None  # the pipe's write end
        self._done: anyio.Event | None = None  # made in running(): it needs a loop
        self._thread_error: BaseException | None = None
        self._started = False
        self._finished = False
        self._lock: OwnerLock | None = None

    @property
    def lock_path(self) -> Path:
        """The owner lock held beside the directory while a restore runs."""
        return self.directory.with_name(f".{self.directory.name}.vdistream-restore.lock")

    # --- lifetime -------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[None]:
        if self.owner is not None:
            resolve_owner(self.owner)  # an unknown user fails before anything happens
        await threads.run_sync(self._prepare)
        self._done = anyio.Event()
        try:
            async with endpoint_tasks(self._stop_unless_finished) as self._group:
                yield
        finally:
            self._group = None
            self._lock_release()  # only now: the directory is complete or as found

    async def _stop_unless_finished(self) -> None:
        if not self._finished:
            await self._stop_and_clean()

    def _prepare(self) -> None:
        path = self.directory
        if path.is_symlink() or (path.exists() and not path.is_dir()):
            raise TargetExistsError(f"the restore target {path} exists and is not a directory")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise EndpointError(f"cannot create {path.parent}: {exc.strerror}") from exc
        self._take_lock()
        try:
            self._check_empty_or_create()
        except BaseException:
            self._lock_release()
            raise

    def _lock_release(self) -> None:
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def _take_lock(self) -> None:
        """Hold the lock, and remove a dead restore's debris (module docstring)."""
        path = self.directory
        lock = take_target_lock(self.lock_path, str(path))
        if lock.previous is not None and path.is_dir():
            # a record nobody holds: its restore was killed before it could clean up
            empty_directory(path)
            _log.info("debris_removed", path=str(path), what="a killed restore's files")
        self._lock = lock

    def _check_empty_or_create(self) -> None:
        path = self.directory
        if path.is_dir():
            if any(path.iterdir()):
                raise TargetExistsError(
                    f"the restore target {path} is not empty; a base backup is restored "
                    "into an empty directory only"
                )
        else:
            try:
                path.mkdir(mode=0o700)
            except OSError as exc:
                raise EndpointError(f"cannot create {path}: {exc.strerror}") from exc
            self._created = True
        try:
            path.chmod(0o700)
        except OSError as exc:
            raise EndpointError(f"cannot set the mode of {path} to 0700: {exc.strerror}") from exc

    # --- the extracting thread ------------------------------------------------------

    def _start(self) -> int:
        if self._group is None:
            raise RuntimeError("TarExtractConsumer used outside its running() scope")
        read, write = os.pipe2(os.O_CLOEXEC)
        os.set_blocking(write, False)
        self._fd = write
        self._started = True
        self._group.start_soon(self._extract_task, read, name=f"extract into {self.directory}")
        return write

    async def _extract_task(self, read: int) -> None:
        try:
            # Not vdistream.threads: this call waits on the pipe for the whole restore, and
            # the bounded pool takes only bounded work.
            self.members = await anyio.to_thread.run_sync(self._extract, read)
        except BaseException as exc:
            self._thread_error = exc
            if not isinstance(exc, Exception):
                raise
        finally:
            assert self._done is not None
            self._done.set()

    def _extract(self, read: int) -> int:
        """In the worker thread: extract everything, then read to the end of the pipe."""
        count = 0

        def counting_filter(member: tarfile.TarInfo, path: str) -> tarfile.TarInfo | None:
            nonlocal count
            count += 1
            return tarfile.data_filter(member, path)

        with os.fdopen(read, "rb", buffering=_READ_SIZE) as stream:
            with tarfile.open(fileobj=stream, mode="r|") as archive:
                archive.extractall(self.directory, filter=counting_filter)
            while stream.read(_READ_SIZE):
                pass  # tar's padding after the end marker: the writer must not see EPIPE
        return count

    def _thread_failure(self) -> EndpointError:
        exc = self._thread_error
        what = f"{type(exc).__name__}: {exc}" if exc is not None else "it stopped reading"
        error = EndpointError(f"extracting the tar stream into {self.directory} failed: {what}")
        error.__cause__ = exc
        return error

    # --- the consumer ---------------------------------------------------------------

    async def write(self, view: memoryview) -> None:
        fd = self._fd if self._started else self._start()
        if fd is None:
            raise EndpointError(f"the tar stream into {self.directory} was already closed")
        try:
            await self._write_fd(fd, view)
        except BrokenPipeError:
            self._close_fd()
            assert self._done is not None
            with anyio.move_on_after(THREAD_STOP_SECONDS):
                await self._done.wait()
            raise self._thread_failure() from self._thread_error

    async def finish(self) -> None:
        if not self._started:
            self._start()  # an empty stream: tarfile decides whether that is an archive
        self._close_fd()
        assert self._done is not None
        await self._done.wait()
        if self._thread_error is not None:
            raise self._thread_failure() from self._thread_error
        if self.owner is not None:
            uid, gid = resolve_owner(self.owner)
            try:
                await threads.run_sync(chown_tree, self.directory, uid, gid)
            except OSError as exc:
                raise EndpointError(
                    f"cannot give {self.directory} to {self.owner!r}: {exc.strerror}"
                ) from exc
        _log.info("tar_extracted", directory=str(self.directory), members=self.members)
        if self.verify is not None:
            await self.verify(self.directory)
        self._finished = True
        self._lock_release()  # at once: a complete directory is nobody's debris

    async def discard(self) -> None:
        with anyio.CancelScope(shield=True):
            await self._stop_and_clean()

    async def _stop_and_clean(self) -> None:
        """Stop the thread (end of input), then leave the directory as it was found."""
        self._close_fd()
        if self._started and self._done is not None:
            with anyio.move_on_after(THREAD_STOP_SECONDS):
                await self._done.wait()
        await threads.run_sync(self._clean)

    def _clean(self) -> None:
        path = self.directory
        if self._created:
            shutil.rmtree(path, ignore_errors=True)
            return
        empty_directory(path)
