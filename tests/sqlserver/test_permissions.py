"""What vdistream says about SQL Server's permissions: checks at start, explained failures."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from vdistream.errors import VDAbortError, VDSecurityError, VDTimeoutError
from vdistream.sqlserver import permissions
from vdistream.sqlserver.permissions import Accounts, MssqlAccount

MSSQL = MssqlAccount(uid=999, group="mssql", groups=frozenset({"mssql"}))


def accounts(
    *,
    user: str = "backup",
    uid: int = 1001,
    group: str = "backup",
    groups: frozenset[str] = frozenset({"backup"}),
    mssql: MssqlAccount | None = MSSQL,
) -> Accounts:
    return Accounts(user, uid, group, groups, mssql)


@pytest.fixture
def library(tmp_path: Path) -> Path:
    """A file in the library's place that is no library: only the account checks vary."""
    path = tmp_path / "libsqlvdi.so"
    path.write_bytes(b"\x7fELF but not really")
    return path


def _account_problems(problems: list[str]) -> list[str]:
    return [p for p in problems if "load" not in p]


def test_all_well_when_groups_are_shared_both_ways(library: Path) -> None:
    who = accounts(groups=frozenset({"backup", "mssql"}))
    mssql = MssqlAccount(999, "mssql", frozenset({"mssql", "backup"}))
    who = Accounts(who.user, who.uid, who.group, who.groups, mssql)
    assert _account_problems(permissions.check(library, accounts=who)) == []


def test_user_not_in_group_mssql(library: Path) -> None:
    mssql = MssqlAccount(999, "mssql", frozenset({"mssql", "backup"}))
    problems = _account_problems(permissions.check(library, accounts=accounts(mssql=mssql)))
    assert problems == [
        "user backup is not in group mssql, so it cannot open SQL Server's shared memory: "
        "sudo usermod -aG mssql backup, then log in again"
    ]


def test_mssql_not_in_the_users_group(library: Path) -> None:
    who = accounts(groups=frozenset({"backup", "mssql"}))
    problems = _account_problems(permissions.check(library, accounts=who))
    assert len(problems) == 1
    assert problems[0].startswith("user mssql is not in group backup")
    assert "sudo usermod -aG backup mssql" in problems[0]
    assert "restart SQL Server" in problems[0]


def test_a_umask_without_group_write(library: Path) -> None:
    who = Accounts(
        "backup",
        1001,
        "backup",
        frozenset({"backup", "mssql"}),
        MssqlAccount(999, "mssql", frozenset({"mssql", "backup"})),
    )
    problems = _account_problems(permissions.check(library, umask=0o022, accounts=who))
    assert problems == [
        "umask 0022 removes group read/write from the sets' shared memory, so SQL Server "
        "cannot open them: create sets with a group-writable umask such as 007"
    ]
    assert _account_problems(permissions.check(library, umask=0o007, accounts=who)) == []


def test_running_as_mssql_needs_no_groups(library: Path) -> None:
    who = accounts(user="mssql", uid=999, group="mssql", groups=frozenset({"mssql"}))
    assert _account_problems(permissions.check(library, umask=0o077, accounts=who)) == []


def test_no_mssql_account_on_this_machine(library: Path) -> None:
    assert _account_problems(permissions.check(library, accounts=accounts(mssql=None))) == []


def test_library_problems(tmp_path: Path, library: Path) -> None:
    who = accounts(mssql=None)
    missing = tmp_path / "none.so"
    (problem,) = permissions.check(missing, accounts=who)
    assert str(missing) in problem
    assert "VDISTREAM_SQLVDI" in problem
    (problem,) = permissions.check(library, accounts=who)
    assert problem.startswith(f"cannot load the SQL Server VDI library {library}")


def test_the_stand_in_library_passes(sqlvdi_libs: object) -> None:
    who = accounts(mssql=None)
    assert permissions.check(sqlvdi_libs.client, accounts=who) == []  # type: ignore[attr-defined]


def test_unreadable_library(library: Path) -> None:
    if os.geteuid() == 0:
        pytest.skip("root reads every file")
    library.chmod(0)
    (problem,) = permissions.check(library, accounts=accounts(mssql=None))
    assert "cannot read" in problem


def test_current_accounts_describe_this_process() -> None:
    who = Accounts.current()
    assert who.uid == os.geteuid()
    assert who.group in who.groups


def test_process_umask_is_read_without_changing_it() -> None:
    previous = os.umask(0o027)
    try:
        assert permissions.process_umask() == 0o027
        assert os.umask(0o027) == 0o027
    finally:
        os.umask(previous)


def test_open_failure_explained() -> None:
    error = VDAbortError("open_device failed", set_name="s1", device="s1")
    text = permissions.explain_open_failure("s1", error, accounts=accounts())
    assert "\n" not in text
    assert text == (
        "SQL Server and vdistream could not open each other's shared memory of virtual "
        "device set 's1' (VD_E_ABORT): SQL Server's objects belong to mssql:mssql; add user "
        "backup to group mssql (sudo usermod -aG mssql backup) and mssql to group backup "
        "(sudo usermod -aG backup mssql), restart SQL Server (sudo systemctl restart "
        "mssql-server), and create the set with a group-writable umask such as 007; or run "
        "vdistream as mssql"
    )


def test_open_failure_when_running_as_mssql() -> None:
    who = accounts(user="mssql", uid=999, group="mssql", groups=frozenset({"mssql"}))
    error = OSError(errno.EACCES, "Permission denied")
    text = permissions.explain_open_failure("s1", error, accounts=who)
    assert "(EACCES: Permission denied)" in text
    assert "although vdistream runs as mssql" in text
    assert "KB5008996" in text


@pytest.mark.parametrize(
    ("call", "error", "expected"),
    [
        ("open_device", VDAbortError("x"), True),
        ("get_command", VDAbortError("x"), False),
        ("create", VDSecurityError("x"), True),
        ("get_configuration", VDSecurityError("x"), True),
        ("create", PermissionError(errno.EACCES, "denied"), True),
        ("create", OSError(errno.ENOSPC, "full"), False),
        ("get_configuration", VDTimeoutError("x"), False),
    ],
)
def test_which_failures_are_open_failures(call: str, error: Exception, expected: bool) -> None:
    assert permissions.is_open_failure(call, error) is expected


def test_open_abort_names_a_problem_found_as_the_cause() -> None:
    error = VDAbortError("open_device failed", set_name="s1", device="s1")
    who = accounts(mssql=MssqlAccount(999, "mssql", frozenset({"mssql", "backup"})))
    text = permissions.explain_open_abort(error, umask=0o007, accounts=who)
    assert "\n" not in text
    assert text == (
        "SQL Server aborted the set as it was being opened (VD_E_ABORT), and its shared "
        "memory cannot be shared: user backup is not in group mssql, so it cannot open SQL "
        "Server's shared memory: sudo usermod -aG mssql backup, then log in again"
    )


def test_open_abort_without_a_problem_gives_the_fix_as_a_condition() -> None:
    error = VDAbortError("open_device failed", set_name="s1", device="s1")
    shared = Accounts(
        "backup",
        1001,
        "backup",
        frozenset({"backup", "mssql"}),
        MssqlAccount(999, "mssql", frozenset({"mssql", "backup"})),
    )
    text = permissions.explain_open_abort(error, umask=0o007, accounts=shared)
    assert "\n" not in text
    assert text.startswith(
        "SQL Server aborted the set as it was being opened (VD_E_ABORT): its statement failed "
        "(see SQL Server's error), or the shared memory could not be opened; if SQL Server's "
        "error says it could not open the shared memory, or this process's stderr shows "
        "'Open(hBufferMemory): error <errno>': SQL Server's objects belong to mssql:mssql"
    )
    # the same accounts with a umask that strips the group: now a known cause
    text = permissions.explain_open_abort(error, umask=0o022, accounts=shared)
    assert "umask 0022 removes group read/write" in text
    assert "if SQL Server's error" not in text
    who = accounts(user="mssql", uid=999, group="mssql", groups=frozenset({"mssql"}))
    text = permissions.explain_open_abort(error, accounts=who)
    assert "if SQL Server's error says" in text
    assert "KB5008996" in text


def test_account_problems_leave_the_library_alone() -> None:
    who = accounts(mssql=MssqlAccount(999, "mssql", frozenset({"mssql", "backup"})))
    assert permissions.account_problems(accounts=who) == [
        "user backup is not in group mssql, so it cannot open SQL Server's shared memory: "
        "sudo usermod -aG mssql backup, then log in again"
    ]
