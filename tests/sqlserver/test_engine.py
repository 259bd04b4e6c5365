"""The SQL Server engine's own decisions, with a recording trigger in SQL Server's place.

What SQL Server answers is scripted here (the statement's messages, msdb's rows, a
failing query), so that the rules that do not need the stand-in are pinned exactly:
success only on SQL Server's word, the backup kept when msdb cannot be read, times
converted with msdb's ``time_zone``, ``STOPAT`` in the server's local time.
"""

from __future__ import annotations

import datetime
from collections.abc import Callable

import pytest

from vdistream.sqlserver.engine import (
    SqlServerBackup,
    SqlServerRestore,
    SqlServerStatementError,
    Transfer,
    server_time,
)
from vdistream.sqlserver.trigger import SqlMessage, SqlServerError, StatementResult
from vdistream.sqlserver.url import MssqlURL

pytestmark = pytest.mark.asyncio

URL = MssqlURL.parse("mssql://sa@db.example:1433/sales", password_env={"SQLCMDPASSWORD": "pw"})
SUCCESS = StatementResult(
    messages=(SqlMessage(3014, 0, 1, "BACKUP DATABASE successfully processed 10 pages"),)
)
ROW = (
    "D", "0", "41000000012300001", "41000000015000001", "41000000013000001", None, None,
    "2026-12-06T11:00:00.000", "2026-12-06T11:00:05.500", "sales", "4", "SQLPROD01",
)  # fmt: skip


class Scripted:
    """A trigger whose answers are scripted per statement (first words match)."""

    def __init__(self, answer: Callable[[str], StatementResult]) -> None:
        self.answer = answer
        self.sent: list[str] = []

    async def run(self, statement: str, *, query: bool = False) -> StatementResult:
        self.sent.append(statement)
        return self.answer(statement)


def backup_engine(trigger: Scripted) -> SqlServerBackup:
    engine = SqlServerBackup(
        URL, 2, Transfer(), mode="log", backup_id="b1", trigger=trigger, library="/nowhere"
    )
    engine.history_pause = 0.01
    return engine


async def test_success_needs_sql_servers_word() -> None:
    engine = backup_engine(Scripted(lambda s: StatementResult()))  # no error, no 3014
    with pytest.raises(SqlServerStatementError, match="without reporting success"):
        await engine.run("set")


async def test_msdb_row_recorded_in_utc_with_the_servers_name() -> None:
    def answer(statement: str) -> StatementResult:
        if "msdb.dbo.backupset" in statement:
            return StatementResult(rows=(ROW,))
        if "sys.master_files" in statement:
            return StatementResult(rows=(("sales", "/var/opt/mssql/data/sales.mdf", "ROWS"),))
        return SUCCESS

    result = await backup_engine(Scripted(answer)).run("set")
    record = result.sqlserver  # type: ignore[attr-defined]
    assert record["type"] == "D"
    assert record["last_lsn"] == "41000000015000001"
    # time_zone 4 = UTC+1h: 11:00 local is 10:00 UTC
    assert record["started"] == "2026-12-06T10:00:00+00:00"
    assert record["finished"] == "2026-12-06T10:00:05.500000+00:00"
    assert record["time_zone_minutes"] == 60
    assert record["server"] == "SQLPROD01"
    assert record["files"] == [
        {"logical": "sales", "physical": "/var/opt/mssql/data/sales.mdf", "type": "ROWS"}
    ]


async def test_a_backup_sql_server_recorded_is_kept_when_msdb_cannot_be_read() -> None:
    def answer(statement: str) -> StatementResult:
        if statement.startswith("SET NOCOUNT ON"):
            raise SqlServerError("Communication link failure")
        return SUCCESS

    trigger = Scripted(answer)
    result = await backup_engine(trigger).run("set")
    record = result.sqlserver  # type: ignore[attr-defined]
    assert record["type"] == "L"  # what the statement was: a log backup
    assert "Communication link failure" in record["lsn_error"]
    assert "first_lsn" not in record
    assert sum("msdb.dbo.backupset" in s for s in trigger.sent) == 3  # retried


async def test_sql_servers_refusal_is_the_engines_error_with_its_numbers() -> None:
    def answer(statement: str) -> StatementResult:
        raise SqlServerError(
            "Database 'sales' does not exist.",
            messages=(SqlMessage(911, 16, 1, "Database 'sales' does not exist."),),
        )

    with pytest.raises(SqlServerStatementError) as caught:
        await backup_engine(Scripted(answer)).run("set")
    assert caught.value.numbers == (911,)
    assert str(caught.value).count("SQL Server") == 1


async def test_stopat_is_sent_in_the_servers_local_time() -> None:
    when = datetime.datetime(2026, 12, 6, 10, 0, 0, tzinfo=datetime.UTC)
    assert server_time(when, 60) == datetime.datetime(2026, 12, 6, 11, 0, 0)
    engine = SqlServerRestore(
        URL, 1, Transfer(), log=True, stopat=when, time_zone_minutes=-300, library="/nowhere"
    )
    assert "STOPAT = N'2026-12-06T05:00:00'" in engine.statement(["set"])
