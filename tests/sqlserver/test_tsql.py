"""The T-SQL text of Contract B, asserted character for character."""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from typing import Any, TypedDict

import pytest

from vdistream.errors import ConfigError
from vdistream.sqlserver.tsql import (
    BackupKind,
    StatementError,
    backup_statement,
    backupset_query,
    database_query,
    device_names,
    filelistonly_statement,
    files_query,
    format_stopat,
    headeronly_statement,
    quote_name,
    quote_string,
    restore_statement,
    verifyonly_statement,
    version_query,
)

EVIL = "x]; DROP DATABASE y; --"
DEVICES = ("set", "set1")


class Sizes(TypedDict):
    block_size: int
    buffer_count: int
    max_transfer_size: int


SIZES: Sizes = {"block_size": 65536, "buffer_count": 8, "max_transfer_size": 1048576}
TAIL = "BLOCKSIZE = 65536, BUFFERCOUNT = 8, MAXTRANSFERSIZE = 1048576"
TO = "VIRTUAL_DEVICE = N'set', VIRTUAL_DEVICE = N'set1'"


# --- quoting --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "quoted"),
    [
        ("db", "[db]"),
        ("", "[]"),
        ("a]b", "[a]]b]"),
        ("]]", "[]]]]]"),
        ("[x", "[[x]"),
        ("it's", "[it's]"),
        (EVIL, "[x]]; DROP DATABASE y; --]"),
        ("x" * 128, "[" + "x" * 128 + "]"),
        ("Ünïcødé db", "[Ünïcødé db]"),
    ],
)
def test_quote_name_is_quotename(name: str, quoted: str) -> None:
    assert quote_name(name) == quoted


def test_quote_name_refuses_what_quotename_makes_null() -> None:
    with pytest.raises(ValueError, match="NULL"):
        quote_name(None)
    with pytest.raises(ValueError, match="longer than 128"):
        quote_name("x" * 129)
    # 128 characters, but one outside the BMP is two UTF-16 code units: 129 > 128
    with pytest.raises(StatementError, match="longer than 128"):
        quote_name("x" * 127 + "\N{GRINNING FACE}")
    with pytest.raises(StatementError, match="NUL"):
        quote_name("a\x00b")


def test_quote_string() -> None:
    assert quote_string("set") == "N'set'"
    assert quote_string("it's") == "N'it''s'"
    assert quote_string("''") == "N''''''"
    assert quote_string("") == "N''"
    with pytest.raises(StatementError, match="NUL"):
        quote_string("\x00")


def test_statement_errors_are_config_and_value_errors() -> None:
    assert issubclass(StatementError, ConfigError)
    assert issubclass(StatementError, ValueError)


def test_device_names() -> None:
    assert device_names("vdi-abc", 1) == ("vdi-abc",)
    assert device_names("vdi-abc", 3) == ("vdi-abc", "vdi-abc1", "vdi-abc2")
    with pytest.raises(StatementError, match=r"0 is not in 1\.\.64"):
        device_names("s", 0)
    with pytest.raises(StatementError, match=r"65 is not in 1\.\.64"):
        device_names("s", 65)


# --- BACKUP ---------------------------------------------------------------------------


def test_backup_full() -> None:
    text = backup_statement("db", DEVICES, kind=BackupKind.FULL, name="b-1", checksum=True, **SIZES)
    assert text == (f"BACKUP DATABASE [db] TO {TO} WITH FORMAT, NAME = N'b-1', CHECKSUM, {TAIL}")


def test_backup_full_without_checksum_one_device() -> None:
    text = backup_statement(
        "db", ["s"], kind="full", name="b", block_size=512, buffer_count=1, max_transfer_size=65536
    )
    assert text == (
        "BACKUP DATABASE [db] TO VIRTUAL_DEVICE = N's' WITH FORMAT, NAME = N'b', "
        "BLOCKSIZE = 512, BUFFERCOUNT = 1, MAXTRANSFERSIZE = 65536"
    )


def test_backup_differential_copy_only() -> None:
    text = backup_statement(
        "db", DEVICES, kind=BackupKind.DIFF, name="b", copy_only=True, checksum=True, **SIZES
    )
    assert text == (
        f"BACKUP DATABASE [db] TO {TO} WITH FORMAT, DIFFERENTIAL, NAME = N'b', COPY_ONLY, "
        f"CHECKSUM, {TAIL}"
    )


def test_backup_log() -> None:
    text = backup_statement("db", DEVICES, kind=BackupKind.LOG, name="b", **SIZES)
    assert text == f"BACKUP LOG [db] TO {TO} WITH FORMAT, NAME = N'b', {TAIL}"
    text = backup_statement("db", DEVICES, kind="LOG", name="b", copy_only=True, **SIZES)
    assert text == f"BACKUP LOG [db] TO {TO} WITH FORMAT, NAME = N'b', COPY_ONLY, {TAIL}"
    assert "DIFFERENTIAL" not in text


def test_backup_of_a_hostile_name_backs_up_that_name_only() -> None:
    text = backup_statement(EVIL, ["it's"], kind=BackupKind.FULL, name="o'neil", **SIZES)
    assert text == (
        "BACKUP DATABASE [x]]; DROP DATABASE y; --] TO VIRTUAL_DEVICE = N'it''s' "
        f"WITH FORMAT, NAME = N'o''neil', {TAIL}"
    )


def test_backup_defaults_are_the_contracts_example() -> None:
    assert backup_statement("db", DEVICES, kind=BackupKind.FULL, name="b") == (
        f"BACKUP DATABASE [db] TO {TO} WITH FORMAT, NAME = N'b', {TAIL}"
    )


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"block_size": 1024 + 512}, r"BLOCKSIZE = 1536 is not a power of 2"),
        ({"block_size": 256}, r"BLOCKSIZE = 256 is not a power of 2 between 512 and 65536"),
        ({"block_size": 131072}, r"BLOCKSIZE = 131072"),
        ({"buffer_count": 0}, r"BUFFERCOUNT = 0 is less than 1"),
        ({"max_transfer_size": 65536 + 512}, r"MAXTRANSFERSIZE = 66048 is not a multiple"),
        ({"max_transfer_size": 8 * 1048576}, r"MAXTRANSFERSIZE = 8388608"),
        ({"max_transfer_size": 0}, r"MAXTRANSFERSIZE = 0"),
        ({"block_size": True}, r"BLOCKSIZE = True is not an integer"),
        ({"buffer_count": 2.0}, r"BUFFERCOUNT = 2.0 is not an integer"),
    ],
)
def test_transfer_options_validated(options: dict[str, object], message: str) -> None:
    sizes: dict[str, Any] = {**SIZES, **options}
    builders: list[Callable[[], str]] = [
        lambda: backup_statement("db", DEVICES, kind="FULL", name="b", **sizes),
        lambda: restore_statement("db", DEVICES, **sizes),
        lambda: verifyonly_statement(DEVICES, **sizes),
        lambda: headeronly_statement(DEVICES, **sizes),
    ]
    for build in builders:
        with pytest.raises(StatementError, match=message) as caught:
            build()
        assert "\n" not in str(caught.value)


@pytest.mark.parametrize("size", [512, 1024, 4096, 65536])
def test_every_power_of_two_block_size_is_accepted(size: int) -> None:
    assert f"BLOCKSIZE = {size}," in verifyonly_statement(["s"], block_size=size)


def test_backup_refusals() -> None:
    with pytest.raises(StatementError, match="backup kind 'INCREMENTAL' is not one of"):
        backup_statement("db", DEVICES, kind="INCREMENTAL", name="b")
    with pytest.raises(StatementError, match="database name is empty"):
        backup_statement("", DEVICES, kind="FULL", name="b")
    with pytest.raises(StatementError, match="0 devices"):
        backup_statement("db", [], kind="FULL", name="b")
    with pytest.raises(StatementError, match="not the string"):
        backup_statement("db", "set", kind="FULL", name="b")
    with pytest.raises(StatementError, match="'set' is named twice"):
        backup_statement("db", ["set", "set"], kind="FULL", name="b")
    with pytest.raises(StatementError, match="longer than 128"):
        backup_statement("d" * 129, DEVICES, kind="FULL", name="b")


# --- RESTORE --------------------------------------------------------------------------


def test_restore_database_plain() -> None:
    assert restore_statement("db", DEVICES, **SIZES) == (
        f"RESTORE DATABASE [db] FROM {TO} WITH RECOVERY, {TAIL}"
    )


def test_restore_database_every_option() -> None:
    stopat = dt.datetime(2026, 12, 6, 11, 0, 0, 999999, tzinfo=dt.timezone(dt.timedelta(hours=1)))
    text = restore_statement(
        EVIL,
        DEVICES,
        replace=True,
        recovery=False,
        moves=[("data", "/var/opt/mssql/data/it's.mdf"), ("log", "/l/x.ldf")],
        stopat=stopat,
        checksum=True,
        **SIZES,
    )
    assert text == (
        f"RESTORE DATABASE [x]]; DROP DATABASE y; --] FROM {TO} WITH REPLACE, NORECOVERY, "
        "MOVE N'data' TO N'/var/opt/mssql/data/it''s.mdf', MOVE N'log' TO N'/l/x.ldf', "
        f"STOPAT = N'2026-12-06T10:00:00', CHECKSUM, {TAIL}"
    )


def test_restore_log() -> None:
    text = restore_statement("db", DEVICES, log=True, recovery=False, **SIZES)
    assert text == f"RESTORE LOG [db] FROM {TO} WITH NORECOVERY, {TAIL}"
    naive = dt.datetime(2026, 12, 6, 10, 0, 0)
    text = restore_statement("db", ["s"], log=True, stopat=naive, **SIZES)
    assert text == (
        "RESTORE LOG [db] FROM VIRTUAL_DEVICE = N's' WITH RECOVERY, "
        f"STOPAT = N'2026-12-06T10:00:00', {TAIL}"
    )


def test_stopat_is_utc_to_the_second() -> None:
    utc = dt.datetime(2026, 1, 1, 0, 30, 5, 500000, tzinfo=dt.UTC)
    assert format_stopat(utc) == "2026-01-01T00:30:05"
    minus = dt.datetime(2025, 12, 31, 19, 30, 5, tzinfo=dt.timezone(dt.timedelta(hours=-5)))
    assert format_stopat(minus) == "2026-01-01T00:30:05"
    with pytest.raises(StatementError, match="not a date and time"):
        format_stopat("2026-01-01")  # type: ignore[arg-type]


def test_restore_refusals() -> None:
    with pytest.raises(StatementError, match="logical file 'a' twice"):
        restore_statement("db", DEVICES, moves=[("a", "/x"), ("a", "/y")])
    with pytest.raises(StatementError, match="both must be given"):
        restore_statement("db", DEVICES, moves=[("a", "")])
    with pytest.raises(StatementError, match=r"not a \(logical name, path\) pair"):
        restore_statement("db", DEVICES, moves=[("a", "/x", "/y")])  # type: ignore[list-item]


def test_verifyonly_headeronly_filelistonly() -> None:
    assert verifyonly_statement(DEVICES, checksum=True, **SIZES) == (
        f"RESTORE VERIFYONLY FROM {TO} WITH CHECKSUM, {TAIL}"
    )
    assert verifyonly_statement(DEVICES, **SIZES) == (f"RESTORE VERIFYONLY FROM {TO} WITH {TAIL}")
    assert headeronly_statement(DEVICES, **SIZES) == (f"RESTORE HEADERONLY FROM {TO} WITH {TAIL}")
    assert filelistonly_statement(["a'b"], **SIZES) == (
        f"RESTORE FILELISTONLY FROM VIRTUAL_DEVICE = N'a''b' WITH {TAIL}"
    )


# --- queries --------------------------------------------------------------------------


def test_queries() -> None:
    assert backupset_query("it's", "b'1") == (
        "SET NOCOUNT ON; SELECT TOP (1) type, is_copy_only, first_lsn, last_lsn, "
        "checkpoint_lsn, database_backup_lsn, differential_base_lsn, "
        "CONVERT(varchar(33), backup_start_date, 126), "
        "CONVERT(varchar(33), backup_finish_date, 126), database_name, time_zone, "
        "server_name "
        "FROM msdb.dbo.backupset WHERE database_name = N'it''s' AND name = N'b''1' "
        "ORDER BY backup_set_id DESC"
    )
    assert files_query(EVIL) == (
        "SET NOCOUNT ON; SELECT name, physical_name, type_desc FROM sys.master_files "
        "WHERE database_id = DB_ID(N'x]; DROP DATABASE y; --') ORDER BY file_id"
    )
    assert database_query("o'db") == (
        "SET NOCOUNT ON; SELECT name, state_desc FROM sys.databases WHERE name = N'o''db'"
    )
    assert version_query() == (
        "SET NOCOUNT ON; SELECT CAST(SERVERPROPERTY('ProductVersion') AS nvarchar(128))"
    )
    with pytest.raises(StatementError):
        files_query("")
