"""What SQL Server on Linux needs of the backup user's permissions, checked and explained.

SQL Server's VDI objects are POSIX shared memory: the set's control segment is created by
the client (owner: its user and primary group, mode filtered by its umask), the buffer
memory by SQL Server (``mssql:mssql``). Each side must open the other's, so (research
note, "Pitfalls"; spec §8): run as ``mssql``, or put the backup user in group ``mssql``
*and* ``mssql`` in the backup user's primary group, restart SQL Server so it gains the
group, and create the set with a group-writable umask (Microsoft's sample calls
``umask(0)``; ``SqlVdiDeviceSet`` uses 007). When this is wrong, ``OpenDevice`` returns
``VD_E_ABORT`` at once and the library logs ``Open(hBufferMemory): error <errno>``.
"""

from __future__ import annotations

import dataclasses
import errno
import grp
import os
import pwd
from pathlib import Path

from vdistream.errors import VDAbortError, VDIError, VDSecurityError
from vdistream.protocol import HResult
from vdistream.sqlserver import library as lib

__all__ = (
    "MSSQL",
    "Accounts",
    "MssqlAccount",
    "account_problems",
    "check",
    "explain_open_abort",
    "explain_open_failure",
    "is_open_failure",
    "process_umask",
)

#: SQL Server's service account on Linux.
MSSQL = "mssql"
_E_ACCESSDENIED = 0x80070005
_RESTART = "sudo systemctl restart mssql-server"


@dataclasses.dataclass(frozen=True)
class MssqlAccount:
    uid: int
    group: str  # its primary group
    groups: frozenset[str]  # every group it is in, primary included


@dataclasses.dataclass(frozen=True)
class Accounts:
    """The process's user and groups, and the ``mssql`` account if this machine has one."""

    user: str
    uid: int
    group: str  # the primary (effective) group: the group of the shared memory we create
    groups: frozenset[str]  # every group the process is in
    mssql: MssqlAccount | None

    @classmethod
    def current(cls) -> Accounts:
        uid, gid = os.geteuid(), os.getegid()
        try:
            user = pwd.getpwuid(uid).pw_name
        except KeyError:
            user = str(uid)
        groups = frozenset(_group_name(g) for g in {gid, *os.getgroups()})
        mssql = None
        try:
            entry = pwd.getpwnam(MSSQL)
        except KeyError:
            pass
        else:
            gids = os.getgrouplist(MSSQL, entry.pw_gid)
            mssql = MssqlAccount(
                entry.pw_uid, _group_name(entry.pw_gid), frozenset(map(_group_name, gids))
            )
        return cls(user, uid, _group_name(gid), groups, mssql)

    @property
    def is_mssql(self) -> bool:
        return self.mssql is not None and self.uid == self.mssql.uid


def _group_name(gid: int) -> str:
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return str(gid)


def process_umask() -> int:
    """The process's umask, read without changing it where Linux allows."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    current = os.umask(0o022)  # older kernels: the only way is to set it and set it back
    os.umask(current)
    return current


def check(
    library_path: Path | str,
    *,
    umask: int | None = 0o007,
    accounts: Accounts | None = None,
) -> list[str]:
    """Problems found before any set exists, one line each; empty when all is well.

    ``umask`` is the one sets are created with (``None``: the process's own).
    """
    problems: list[str] = []
    path = Path(library_path)
    who = accounts if accounts is not None else Accounts.current()
    if not path.is_file():
        problems.append(
            f"no SQL Server VDI library at {path}: install SQL Server there, or name the path "
            f"of libsqlvdi.so in {lib.ENV_VAR} or the {lib.SETTING!r} setting"
        )
    elif not os.access(path, os.R_OK):
        problems.append(f"user {who.user} cannot read the SQL Server VDI library {path}")
    else:
        try:
            lib.load(path)
        except lib.SqlVdiLibraryError as exc:
            problems.append(str(exc))
    return problems + account_problems(umask=umask, accounts=who)


def account_problems(*, umask: int | None = 0o007, accounts: Accounts | None = None) -> list[str]:
    """What keeps this user and ``mssql`` from opening each other's shared memory, one
    line each (groups both ways, the umask sets are created with); empty when all is well."""
    problems: list[str] = []
    who = accounts if accounts is not None else Accounts.current()
    mssql = who.mssql
    if mssql is None or who.is_mssql:
        return problems  # no SQL Server account here to share with, or we are it
    if mssql.group not in who.groups:
        problems.append(
            f"user {who.user} is not in group {mssql.group}, so it cannot open SQL Server's "
            f"shared memory: sudo usermod -aG {mssql.group} {who.user}, then log in again"
        )
    if who.group not in mssql.groups:
        problems.append(
            f"user {MSSQL} is not in group {who.group} (the group of the sets {who.user} "
            f"creates), so SQL Server cannot open them: sudo usermod -aG {who.group} {MSSQL}, "
            f"then restart SQL Server ({_RESTART})"
        )
    mask = process_umask() if umask is None else umask
    if mask & 0o060:
        problems.append(
            f"umask {mask:04o} removes group read/write from the sets' shared memory, so SQL "
            "Server cannot open them: create sets with a group-writable umask such as 007"
        )
    return problems


def is_open_failure(call: str, error: BaseException) -> bool:
    """Whether ``call`` (``create``, ``get_configuration``, ``open_device``) failed the
    way it does when the shared memory cannot be opened."""
    if isinstance(error, OSError):
        return error.errno in (errno.EACCES, errno.EPERM)
    if isinstance(error, VDSecurityError):
        return True
    if isinstance(error, VDIError) and error.hresult == _E_ACCESSDENIED:
        return True
    return call == "open_device" and isinstance(error, VDAbortError)


def _what(error: BaseException) -> str:
    if isinstance(error, VDIError):
        try:
            return f"VD_E_{HResult(error.hresult).name}"
        except ValueError:
            return f"HRESULT 0x{error.hresult:08X}"
    if isinstance(error, OSError) and error.errno is not None:
        return f"{errno.errorcode.get(error.errno, error.errno)}: {os.strerror(error.errno)}"
    return type(error).__name__


def _remedy(who: Accounts) -> str:
    """What makes the shared memory openable both ways, for this user."""
    if who.is_mssql:
        return (
            "run vdistream where SQL Server runs (same host or container, same /dev/shm); in "
            "Docker, SQL Server 2019 needs CU15 or later (KB5008996)"
        )
    group = who.mssql.group if who.mssql is not None else MSSQL
    return (
        f"SQL Server's objects belong to {MSSQL}:{group}; add user {who.user} to group "
        f"{group} (sudo usermod -aG {group} {who.user}) and {MSSQL} to group {who.group} "
        f"(sudo usermod -aG {who.group} {MSSQL}), restart SQL Server ({_RESTART}), and create "
        f"the set with a group-writable umask such as 007; or run vdistream as {MSSQL}"
    )


def explain_open_failure(
    set_name: str, error: BaseException, *, accounts: Accounts | None = None
) -> str:
    """One line: the shared memory of ``set_name`` could not be opened, and what to fix."""
    who = accounts if accounts is not None else Accounts.current()
    head = (
        f"SQL Server and vdistream could not open each other's shared memory of virtual "
        f"device set {set_name!r} ({_what(error)})"
    )
    if who.is_mssql:
        return f"{head} although vdistream runs as {MSSQL}: {_remedy(who)}"
    return f"{head}: {_remedy(who)}"


def explain_open_abort(
    error: BaseException, *, umask: int | None = 0o007, accounts: Accounts | None = None
) -> str:
    """One line for ``VD_E_ABORT`` from ``OpenDevice``.

    SQL Server aborts the set there both when the client cannot map its buffer memory
    (the library then logs ``Open(hBufferMemory): error <errno>`` on stderr, which we
    cannot read) and when its statement failed after configuring the set. A problem
    :func:`account_problems` finds is named as the cause; otherwise the permissions fix
    is given only on the condition that SQL Server's error points at the shared memory.
    """
    who = accounts if accounts is not None else Accounts.current()
    head = f"SQL Server aborted the set as it was being opened ({_what(error)})"
    problems = account_problems(umask=umask, accounts=who)
    if problems:
        return f"{head}, and its shared memory cannot be shared: {'; '.join(problems)}"
    return (
        f"{head}: its statement failed (see SQL Server's error), or the shared memory could "
        f"not be opened; if SQL Server's error says it could not open the shared memory, or "
        f"this process's stderr shows 'Open(hBufferMemory): error <errno>': {_remedy(who)}"
    )
