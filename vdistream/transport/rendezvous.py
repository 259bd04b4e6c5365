"""Rendezvous by name: where a client publishes a set and an engine in another process
finds it (docs/transport.md §1).

A set ``NAME`` of the default instance is the socket ``DIR/NAME.sock``; of a named
instance, ``DIR/<instance, lower-cased>/NAME.sock``. Beside it, ``NAME.lock`` is held
with ``flock(LOCK_EX)`` by the publisher for the whole life of the set and holds its
pid. Choices:

* **The lock decides, not the socket.** A socket whose lock nobody holds belongs to a
  dead process: the next publisher takes the lock, removes the socket and binds its
  own. Holding the lock is what makes removing someone's socket safe: every publisher
  follows the same protocol, so no live set can lose its socket. A lock file removed
  between our ``open`` and our ``flock`` (its publisher closed meanwhile) is detected
  by comparing inodes, and we start over.
* **Close order**: socket unlinked, lock file unlinked, then the lock released; a
  publisher waiting on the old lock file then sees that it was unlinked.
* **Permissions**: the directory is created 0700 (0710 with a group) and must be owned
  by the publishing user (``VDSecurityError`` otherwise: someone else could swap our
  sockets); the socket is chmod-ed 0600 (0660 and chgrp-ed with a group) right after
  ``bind``, which is safe because the directory already keeps everyone else out.
* **Who may open** (``may_open``, applied to ``SO_PEERCRED``): the same uid, uid 0, or,
  with a group, a peer whose gid is the group or a user who is a member of it.
* All of it is blocking file-system work (``publish`` and ``connect`` are quick local
  calls; ``may_open`` may ask NSS): a caller on an event loop runs the slow parts in
  ``vdistream.threads`` (the host does, for ``may_open`` of a foreign uid).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import grp
import os
import pwd
import socket
import stat
import struct
from pathlib import Path
from types import TracebackType

from vdistream.errors import VDIError, VDInstanceNameError, VDInvalidError, VDSecurityError

__all__ = (
    "DAEMON_RUNTIME_DIR",
    "MAX_NAME_BYTES",
    "Publication",
    "RuntimeDirectory",
    "default_runtime_dir",
    "peer_credentials",
)

#: Where the daemon publishes its sets (configurable in its settings).
DAEMON_RUNTIME_DIR = Path("/run/vdistream")

MAX_NAME_BYTES = 100
_SUN_PATH = 107  # sizeof(sun_path) - 1 for the terminating NUL
_BACKLOG = 16
_CRED = struct.Struct("3i")  # struct ucred: pid, uid, gid


def default_runtime_dir() -> Path:
    """``$VDISTREAM_RUNTIME_DIR``, else ``$XDG_RUNTIME_DIR/vdistream``, else
    ``/tmp/vdistream-<uid>`` (docs/transport.md §1)."""
    explicit = os.environ.get("VDISTREAM_RUNTIME_DIR")
    if explicit:
        return Path(explicit)
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    if xdg:
        return Path(xdg) / "vdistream"
    return Path(f"/tmp/vdistream-{os.geteuid()}")


def peer_credentials(sock: socket.socket) -> tuple[int, int, int]:
    """``(pid, uid, gid)`` of the process that connected ``sock`` (``SO_PEERCRED``:
    recorded by the kernel at ``connect``, so the peer cannot lie about it)."""
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _CRED.size)
    pid, uid, gid = _CRED.unpack(raw)
    return pid, uid, gid


def _check_component(value: object, what: str, error: type[VDIError]) -> str:
    if not isinstance(value, str):
        raise error(f"the {what} must be a string, not {type(value).__name__}")
    try:
        size = len(value.encode("utf-8"))
    except UnicodeEncodeError:
        raise error(f"the {what} {value!r} is not valid UTF-8") from None
    if not 1 <= size <= MAX_NAME_BYTES:
        raise error(f"the {what} {value!r} must be 1..{MAX_NAME_BYTES} bytes of UTF-8")
    bad = [c for c in ("/", "\\", "\0") if c in value]
    if bad or value.startswith("."):
        raise error(f"the {what} {value!r} must not contain '/', '\\' or NUL, nor start with '.'")
    return value


def _resolve_group(group: int | str | None) -> int | None:
    if group is None:
        return None
    if isinstance(group, bool) or not isinstance(group, int | str):
        raise VDInvalidError(f"group {group!r} must be a group name or a gid")
    if isinstance(group, int):
        return group
    if group.isdigit():
        return int(group)
    try:
        return grp.getgrnam(group).gr_gid
    except KeyError:
        raise VDInvalidError(f"no group named {group!r} exists") from None


class Publication:
    """One published set: the listening socket (non-blocking) and the held lock.

    ``close()`` unpublishes: removes the socket and the lock file, then releases the
    lock and closes the socket; idempotent. Also a context manager.
    """

    def __init__(self, name: str, path: Path, lock_path: Path, lock_fd: int, sock: socket.socket):
        self.name = name
        self.path = path
        self.lock_path = lock_path
        self.socket = sock
        self._lock_fd = lock_fd

    def __repr__(self) -> str:
        state = "closed" if self._lock_fd < 0 else "published"
        return f"<Publication {self.name!r} at {str(self.path)!r} {state}>"

    @property
    def closed(self) -> bool:
        return self._lock_fd < 0

    def close(self) -> None:
        if self._lock_fd < 0:
            return
        lock_fd, self._lock_fd = self._lock_fd, -1
        try:
            # We still hold the lock: both files are ours to remove.
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()
            with contextlib.suppress(FileNotFoundError):
                self.lock_path.unlink()
        finally:
            os.close(lock_fd)
            self.socket.close()

    def __enter__(self) -> Publication:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class RuntimeDirectory:
    """The directory where sets are published, and who may open them.

    ``path`` defaults to ``default_runtime_dir()``; ``group`` (a name or a gid) lets
    the members of that group open the sets published here (sockets 0660, directory
    0710), otherwise only the same user and root may (0600, 0700).
    """

    def __init__(self, path: str | Path | None = None, *, group: int | str | None = None):
        self.path = Path(path) if path is not None else default_runtime_dir()
        self.group: int | None = _resolve_group(group)

    def __repr__(self) -> str:
        return f"<RuntimeDirectory {str(self.path)!r} group={self.group}>"

    # --- names ---------------------------------------------------------------------

    def socket_path(self, instance: str | None, name: str) -> Path:
        """``DIR/NAME.sock`` or ``DIR/<instance lower-cased>/NAME.sock``; checks the
        name (``VDInvalidError`` naming it), the instance (``VDInstanceNameError``) and
        that the path fits in ``sun_path``."""
        _check_component(name, "set name", VDInvalidError)
        folder = self.path
        if instance is not None:
            instance = _check_component(instance, "instance name", VDInstanceNameError)
            folder = folder / instance.lower()
        path = folder / f"{name}.sock"
        size = len(os.fsencode(path))
        if size > _SUN_PATH:
            raise VDInvalidError(
                f"the socket path of set {name!r}, {str(path)!r}, is {size} bytes: more "
                f"than a Unix socket address holds ({_SUN_PATH}); use a shorter name or "
                "runtime directory",
                set_name=name,
            )
        return path

    def may_open(self, uid: int, gid: int) -> bool:
        """Whether a peer with this uid and gid may open the sets published here."""
        if uid in (os.geteuid(), 0):
            return True
        if self.group is None:
            return False
        if gid == self.group:
            return True
        try:
            user = pwd.getpwuid(uid)
        except KeyError:
            return False
        if user.pw_gid == self.group:
            return True
        try:
            return user.pw_name in grp.getgrgid(self.group).gr_mem
        except KeyError:
            return False

    # --- publishing ----------------------------------------------------------------

    def publish(self, instance: str | None, name: str) -> Publication:
        """Publish ``name``: take its lock, take over a stale socket, bind, listen.

        ``VDInvalidError`` ("a set named X is already published by pid N") when a live
        process holds the name; ``VDSecurityError`` when the directory is not ours.
        """
        path = self.socket_path(instance, name)
        self._prepare(path.parent)
        lock_path = path.with_suffix(".lock")
        lock_fd = self._lock(lock_path, name)
        try:
            os.ftruncate(lock_fd, 0)
            os.pwrite(lock_fd, f"{os.getpid()}\n".encode(), 0)
            # Whatever socket is there belongs to a process that no longer holds the
            # lock, so it is dead (or closing): take the name over.
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
            try:
                sock.bind(os.fsencode(path))
                os.chmod(path, 0o600 if self.group is None else 0o660)
                if self.group is not None:
                    os.chown(path, -1, self.group)
                sock.listen(_BACKLOG)
                sock.setblocking(False)
            except BaseException:
                sock.close()
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
                raise
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                lock_path.unlink()
            os.close(lock_fd)
            raise
        return Publication(name, path, lock_path, lock_fd, sock)

    def _prepare(self, folder: Path) -> None:
        """Create ``folder`` (and the runtime directory above it) with our mode; check
        that it is ours."""
        mode = 0o700 if self.group is None else 0o710
        for directory in (self.path, folder) if folder != self.path else (self.path,):
            try:
                directory.mkdir(mode=mode, parents=directory == self.path)
            except FileExistsError:
                pass
            else:
                os.chmod(directory, mode)  # mkdir's mode is filtered by the umask
                if self.group is not None:
                    os.chown(directory, -1, self.group)
            info = os.stat(directory, follow_symlinks=False)
            if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.geteuid():
                raise VDSecurityError(
                    f"the runtime directory {str(directory)!r} is not a directory owned by "
                    f"uid {os.geteuid()}: refusing to publish sets in it"
                )
            if info.st_mode & 0o022:
                raise VDSecurityError(
                    f"the runtime directory {str(directory)!r} is writable by others "
                    f"(mode {stat.S_IMODE(info.st_mode):o}): refusing to publish sets in it"
                )

    def _lock(self, lock_path: Path, name: str) -> int:
        """An fd of ``lock_path`` holding ``flock(LOCK_EX)``, or ``VDInvalidError``."""
        flags = os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW
        while True:
            fd = os.open(lock_path, flags, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                pid = _read_pid(fd)
                os.close(fd)
                raise VDInvalidError(
                    f"a set named {name!r} is already published by pid {pid} "
                    f"(in {str(lock_path.parent)!r})",
                    set_name=name,
                ) from None
            except BaseException:
                os.close(fd)
                raise
            try:
                current = os.stat(lock_path, follow_symlinks=False)
            except FileNotFoundError:
                current = None
            mine = os.fstat(fd)
            if current is not None and (current.st_dev, current.st_ino) == (
                mine.st_dev,
                mine.st_ino,
            ):
                return fd
            # Its publisher unlinked it between our open and our flock: start over.
            os.close(fd)

    # --- connecting ----------------------------------------------------------------

    def connect(
        self, instance: str | None, name: str, *, timeout: float | None = 10.0
    ) -> socket.socket:
        """A blocking ``SOCK_SEQPACKET`` socket connected to the set ``name``.

        ``VDInvalidError`` ("no virtual device set named X is published in DIR") when
        nothing listens there (absent, or the stale socket of a dead process);
        ``VDSecurityError`` when the socket is not ours to open, or when someone else
        could have published it (``_check_trusted``: the data we would send is the
        client's to keep). ``timeout`` bounds the connect (a full backlog); the socket
        returned is blocking.
        """
        path = self.socket_path(instance, name)
        for directory in dict.fromkeys((self.path, path.parent)):
            _check_trusted(directory, name)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        try:
            sock.settimeout(timeout)
            sock.connect(os.fsencode(path))
            sock.settimeout(None)
        except (FileNotFoundError, ConnectionRefusedError, NotADirectoryError):
            sock.close()
            raise VDInvalidError(
                f"no virtual device set named {name!r} is published in {str(path.parent)!r}",
                set_name=name,
            ) from None
        except PermissionError as exc:
            sock.close()
            raise VDSecurityError(
                f"may not open the set {name!r} at {str(path)!r}: {exc.strerror}",
                set_name=name,
            ) from exc
        except OSError as exc:
            sock.close()
            if exc.errno == errno.EAGAIN or isinstance(exc, TimeoutError):
                raise VDInvalidError(
                    f"the set {name!r} at {str(path)!r} accepts no connection now",
                    set_name=name,
                ) from exc
            raise
        return sock


def _check_trusted(directory: Path, name: str) -> None:
    """``VDSecurityError`` when a user we do not trust could have put a socket in
    ``directory``: it is writable by others, or it belongs to another user (not root)
    and lies in a directory others may write to (``/tmp/vdistream-<our uid>``, made
    by someone else before we ever published). A publisher refuses such directories
    too (``RuntimeDirectory._prepare``), so no set of ours is ever there. Absent or not
    a directory: ``connect`` says that nothing is published."""
    try:
        info = os.stat(directory)
    except OSError:
        return
    if not stat.S_ISDIR(info.st_mode):
        return
    if info.st_mode & 0o022:
        raise VDSecurityError(
            f"the runtime directory {str(directory)!r} is writable by others (mode "
            f"{stat.S_IMODE(info.st_mode):o}): anyone could have published {name!r} "
            "there; refusing to open it",
            set_name=name,
        )
    if info.st_uid in (os.geteuid(), 0):
        return
    try:
        parent = os.stat(directory.parent)
    except OSError:
        return
    if parent.st_mode & 0o022:
        raise VDSecurityError(
            f"the runtime directory {str(directory)!r} belongs to uid {info.st_uid} and "
            f"lies in {str(directory.parent)!r}, which others may write to: anyone could "
            f"have made it and published {name!r} there; refusing to open it",
            set_name=name,
        )


def _read_pid(fd: int) -> str:
    try:
        text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
    except OSError:
        return "?"
    return text if text.isdigit() else "?"
