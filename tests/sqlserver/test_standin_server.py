"""The stand-in SQL Server: its T-SQL parser, its rules and its VDI side, by a raw ctypes client.

The client here is the stand-in ``libsqlvdi.so`` called through its C++ symbols (no vdistream
code), the statements go through the stand-in ``sqlcmd`` in a subprocess, as vdistream runs them.
"""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import pytest

from standin.mssql import tsql
from standin.mssql.control import StandinServer
from standin.mssql.rawclient import ClientResult, RawClient, ended_well
from standin.mssql.vdss import (
    NOERROR,
    VD_E_ABORT,
    VDC_COMPLETE,
    VDC_FLUSH,
    VDC_READ,
    VDC_WRITE,
    VDF_COMPLETE_ENABLED,
    VDF_READ_MEDIA,
    VDF_REQUEST_COMPLETE,
    VDF_WRITE_MEDIA,
)
from standin.sqlvdi.build import Libraries

MIB = 1 << 20
SIZES = "BLOCKSIZE = 65536, BUFFERCOUNT = 8, MAXTRANSFERSIZE = 1048576"
INJECTED = "x]; DROP DATABASE y; --"


def quotename(name: str) -> str:
    return "[" + name.replace("]", "]]") + "]"


def devices_of(set_name: str, count: int) -> list[str]:
    return [set_name] + [f"{set_name}{i}" for i in range(1, count)]


def clauses(names: list[str]) -> str:
    return ", ".join(f"VIRTUAL_DEVICE = N'{n}'" for n in names)


# ---- the parser ---------------------------------------------------------------------------


def test_parser_reads_contract_b_statements_in_any_spelling() -> None:
    (st,) = tsql.parse_batch(
        "backup   database [a b]\n to virtual_device=N'set' ,VIRTUAL_DEVICE = 'set1'"
        " with maxtransfersize=1048576, Name = N'it''s', COPY_ONLY, differential, format,"
        " blocksize = 512 -- trailing comment"
    )
    assert st == tsql.Backup(
        log=False,
        database="a b",
        devices=("set", "set1"),
        name="it's",
        differential=True,
        copy_only=True,
        block_size=512,
        max_transfer_size=1048576,
        flags=frozenset({"FORMAT"}),
    )
    (st,) = tsql.parse_batch(
        "RESTORE LOG [db] FROM VIRTUAL_DEVICE = N'r' WITH NORECOVERY, "
        "MOVE N'db' TO N'/d/x.mdf', MOVE 'db_log' TO '/d/x.ldf', STOPAT = N'2026-12-06T10:00:00'"
    )
    assert isinstance(st, tsql.Restore)
    assert (st.what, st.database, st.recovery, st.stopat) == (
        "LOG",
        "db",
        False,
        "2026-12-06T10:00:00",
    )
    assert st.moves == (("db", "/d/x.mdf"), ("db_log", "/d/x.ldf"))
    statements = tsql.parse_batch(
        "SET NOCOUNT ON; SELECT name, state_desc FROM sys.databases WHERE name = N'd' ;;"
    )
    assert statements[0] == tsql.SetOption("NOCOUNT", True)
    assert isinstance(statements[1], tsql.Select)
    assert statements[1].table == "sys.databases"


def test_quotename_injection_is_one_name() -> None:
    text = f"BACKUP DATABASE {quotename(INJECTED)} TO VIRTUAL_DEVICE = N'set' WITH FORMAT"
    (st,) = tsql.parse_batch(text)
    assert isinstance(st, tsql.Backup)
    assert st.database == INJECTED
    # the same name left unquoted would have been a batch with a DROP in it
    naive = tsql.parse_batch("SELECT 1; DROP DATABASE y; --] TO VIRTUAL_DEVICE = N'set'")
    assert naive[1] == tsql.DropDatabase(("y",))


@pytest.mark.parametrize(
    ("text", "number"),
    [
        ("FROBNICATE DATABASE x", 102),
        ("BACKUP DATABASE x TO VIRTUAL_DEVICE = N'a' WITH NONSENSE", 155),
        ("BACKUP DATABASE x TO VIRTUAL_DEVICE = N'a", 105),
        ("BACKUP DATABASE [x]; DROP DATABASE y; --] TO VIRTUAL_DEVICE = N'a'", 102),
        ("SELECT name FROM sys.nothing", 208),
    ],
)
def test_parser_refuses_what_sql_server_refuses(text: str, number: int) -> None:
    with pytest.raises(tsql.TsqlError) as caught:
        tsql.parse_batch(text)
    assert caught.value.number == number


# ---- helpers driving a server --------------------------------------------------------------


@dataclass
class Ran:
    rc: int
    out: str
    client: ClientResult | None
    config_rc: int
    features: int


def sqlcmd(
    server: StandinServer,
    statement: str,
    *query: str,
    password: str | None = None,
    shebang: bool = False,
) -> subprocess.Popen[str]:
    """The stand-in sqlcmd in a subprocess; by this interpreter unless ``shebang`` (faster
    here, where ``python3`` on PATH is a slow pyenv shim)."""
    env = dict(os.environ, SQLCMDPASSWORD=password or server.password)
    cmd = [] if shebang else [sys.executable]
    cmd += [str(server.sqlcmd), "-S", f"{server.host},{server.port}", "-U", server.user]
    cmd += ["-d", "master", "-b", *query, "-Q", statement]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, text=True)


def query(server: StandinServer, statement: str) -> list[list[str]]:
    proc = sqlcmd(server, statement, "-h", "-1", "-W", "-s", "|")
    out, _ = proc.communicate(timeout=20)
    assert proc.returncode == 0, out
    return [line.split("|") for line in out.splitlines() if line]


def through_vdi(
    server: StandinServer,
    libs: Libraries,
    statement: Callable[[str], str],
    *,
    devices: int = 1,
    features: int = 0,
    timeout_ms: int = 0,
    feed: list[bytes] | None = None,
    serve: Callable[[RawClient, list[str]], ClientResult] | None = None,
    shebang: bool = False,
) -> Ran:
    client = RawClient(libs.client)
    set_name = f"t{os.getpid()}x{time.monotonic_ns() % 10**9}"
    client.create(set_name, devices, features=features, timeout_ms=timeout_ms)
    names = devices_of(set_name, devices)
    proc = sqlcmd(server, statement(clauses(names)), shebang=shebang)
    try:
        config_rc = client.get_configuration(15000)
        result = None
        if config_rc == NOERROR:
            serving = serve or (lambda c, n: c.run(n, feed=feed))
            result = serving(client, names)
        out, _ = proc.communicate(timeout=30)
    finally:
        client.close()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return Ran(proc.returncode, out, result, config_rc, client.config.features)


def backup(
    server: StandinServer, libs: Libraries, db: str, name: str, options: str = "", **kw: object
) -> Ran:
    kind = "LOG" if options.startswith("LOG") else "DATABASE"
    opts = options.removeprefix("LOG").strip(", ")
    ran = through_vdi(
        server,
        libs,
        lambda c: (
            f"BACKUP {kind} {quotename(db)} TO {c} WITH FORMAT, NAME = N'{name}', "
            + (f"{opts}, " if opts else "")
            + SIZES
        ),
        **kw,  # type: ignore[arg-type]
    )
    return ran


def restore(
    server: StandinServer,
    libs: Libraries,
    db: str,
    streams: list[bytearray],
    options: str,
    kind: str = "DATABASE",
) -> Ran:
    return through_vdi(
        server,
        libs,
        lambda c: f"RESTORE {kind} {quotename(db)} FROM {c} WITH {options}, {SIZES}",
        devices=len(streams),
        feed=[bytes(s) for s in streams],
    )


def moved(db: str, target: str, tmp: Path) -> str:
    return f"MOVE N'{db}' TO N'{tmp / target}.mdf', MOVE N'{db}_log' TO N'{tmp / target}.ldf'"


# ---- round trips ----------------------------------------------------------------------------


def test_backup_and_restore_round_trip(
    standin: StandinServer, sqlvdi_libs: Libraries, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    log = tmp_path / "sqlcmd.log"
    monkeypatch.setenv("STANDIN_SQLCMD_LOG", str(log))
    standin.create_database("src", 12 * MIB, seed=5)
    standin.write("src", 40)
    ran = backup(
        standin, sqlvdi_libs, "src", "b1", devices=2, features=VDF_REQUEST_COMPLETE, shebang=True
    )
    assert ran.rc == 0, ran.out
    assert ran.features & (VDF_WRITE_MEDIA | VDF_COMPLETE_ENABLED) == (
        VDF_WRITE_MEDIA | VDF_COMPLETE_ENABLED
    )
    assert ran.client is not None
    assert ended_well(ran.client)
    for commands in ran.client.commands:
        assert commands[-2:] == [VDC_FLUSH, VDC_COMPLETE]
        assert set(commands[:-2]) == {VDC_WRITE}
    assert "BACKUP DATABASE successfully processed 1536 pages" in ran.out
    (row,) = standin.history("src")
    assert row["stream_sha256"] == [hashlib.sha256(s).hexdigest() for s in ran.client.streams]

    back = restore(
        standin, sqlvdi_libs, "copy", ran.client.streams, f"RECOVERY, {moved('src', 'c', tmp_path)}"
    )
    assert back.rc == 0, back.out
    assert back.features & VDF_READ_MEDIA
    assert back.client is not None
    assert ended_well(back.client)
    assert all(VDC_READ in c for c in back.client.commands)
    assert standin.checksum("copy") == standin.checksum("src")
    assert standin.state("copy") == "ONLINE"
    files = query(
        standin,
        "SET NOCOUNT ON; SELECT name, physical_name, type_desc FROM sys.master_files "
        "WHERE database_id = DB_ID(N'copy') ORDER BY file_id",
    )
    assert files == [["src", f"{tmp_path}/c.mdf", "ROWS"], ["src_log", f"{tmp_path}/c.ldf", "LOG"]]
    statements = standin.statements()
    assert statements[0].startswith("BACKUP DATABASE [src] TO VIRTUAL_DEVICE = N't")
    assert log.read_text().splitlines() == statements


def test_quotename_injection_backs_up_that_database_only(
    standin: StandinServer, sqlvdi_libs: Libraries
) -> None:
    standin.create_database(INJECTED, MIB, seed=1)
    standin.create_database("y", MIB, seed=2)
    ran = backup(standin, sqlvdi_libs, INJECTED, "inj")
    assert ran.rc == 0, ran.out
    assert standin.state("y") == "ONLINE"
    assert [r["database_name"] for r in standin.history(INJECTED)] == [INJECTED]
    # DROP DATABASE is real here: the same text unquoted would have dropped y
    proc = sqlcmd(standin, "SELECT 1; DROP DATABASE y; --] TO VIRTUAL_DEVICE = N'x'")
    proc.communicate(timeout=20)
    assert standin.state("y") is None


def test_msdb_row_and_queries(standin: StandinServer, sqlvdi_libs: Libraries) -> None:
    standin.create_database("q", MIB)
    assert backup(standin, sqlvdi_libs, "q", "full-1").rc == 0
    standin.write("q")
    assert backup(standin, sqlvdi_libs, "q", "log-1", "LOG").rc == 0
    (full,) = query(
        standin,
        "SET NOCOUNT ON; SELECT TOP (1) type, is_copy_only, first_lsn, last_lsn, checkpoint_lsn, "
        "database_backup_lsn, differential_base_lsn, CONVERT(varchar(33), backup_start_date, 126),"
        " CONVERT(varchar(33), backup_finish_date, 126), database_name FROM msdb.dbo.backupset "
        "WHERE database_name = N'q' AND name = N'full-1' ORDER BY backup_set_id DESC",
    )
    assert full[:2] == ["D", "0"]
    assert full[6] == "NULL"
    assert full[9] == "q"
    assert full[2] == full[4]  # first = checkpoint (no open transaction)
    datetime.fromisoformat(full[7])
    (log,) = query(
        standin,
        "SET NOCOUNT ON; SELECT TOP (1) type, first_lsn, last_lsn, database_backup_lsn "
        "FROM msdb.dbo.backupset WHERE database_name = N'q' AND name = N'log-1' "
        "ORDER BY backup_set_id DESC",
    )
    assert log[0] == "L"
    assert log[1] == full[2]  # the chain starts at the full
    assert int(log[2]) > int(full[3])
    assert log[3] == full[4]
    assert query(standin, "SET NOCOUNT ON; SELECT name, state_desc FROM sys.databases ") == [
        ["q", "ONLINE"]
    ]
    (version,) = query(
        standin, "SET NOCOUNT ON; SELECT CAST(SERVERPROPERTY('ProductVersion') AS nvarchar(128))"
    )
    assert version[0].startswith("16.")


# ---- chains ---------------------------------------------------------------------------------


def test_chain_rules_and_lsns(
    standin: StandinServer, sqlvdi_libs: Libraries, tmp_path: Path
) -> None:
    standin.create_database("c", 2 * MIB, seed=9)
    full = backup(standin, sqlvdi_libs, "c", "full")
    standin.write("c")
    copy = backup(standin, sqlvdi_libs, "c", "copy", "COPY_ONLY")
    log1 = backup(standin, sqlvdi_libs, "c", "log1", "LOG")
    standin.write("c")
    diff = backup(standin, sqlvdi_libs, "c", "diff", "DIFFERENTIAL")
    standin.write("c")
    log2 = backup(standin, sqlvdi_libs, "c", "log2", "LOG")
    assert all(r.rc == 0 for r in (full, copy, log1, diff, log2))
    rows = {r["name"]: r for r in standin.history("c")}
    # COPY_ONLY moves neither the differential base nor the log chain
    assert rows["diff"]["differential_base_lsn"] == rows["full"]["checkpoint_lsn"]
    assert rows["log1"]["first_lsn"] == rows["full"]["first_lsn"]
    assert rows["log2"]["first_lsn"] == rows["log1"]["last_lsn"]
    assert rows["copy"]["is_copy_only"] == 1

    def streams(r: Ran) -> list[bytearray]:
        assert r.client is not None
        return r.client.streams

    target = "r"
    where = moved("c", "r", tmp_path)
    ok = restore(standin, sqlvdi_libs, target, streams(full), f"NORECOVERY, {where}")
    assert ok.rc == 0, ok.out
    assert standin.state(target) == "RESTORING"
    too_recent = restore(standin, sqlvdi_libs, target, streams(log2), "NORECOVERY", "LOG")
    assert "Msg 4305" in too_recent.out
    assert "Msg 3013" in too_recent.out
    assert too_recent.rc == 1
    wrong_base = restore(standin, sqlvdi_libs, target, streams(copy), f"NORECOVERY, {where}")
    assert "Msg 3159" not in wrong_base.out  # RESTORING: no tail-log check
    assert wrong_base.rc == 0
    base_mismatch = restore(standin, sqlvdi_libs, target, streams(diff), "NORECOVERY")
    assert "Msg 3136" in base_mismatch.out
    assert restore(standin, sqlvdi_libs, target, streams(full), f"NORECOVERY, {where}").rc == 0
    assert restore(standin, sqlvdi_libs, target, streams(log1), "NORECOVERY", "LOG").rc == 0
    too_early = restore(standin, sqlvdi_libs, target, streams(log1), "NORECOVERY", "LOG")
    assert "Msg 4326" in too_early.out
    assert restore(standin, sqlvdi_libs, target, streams(log2), "RECOVERY", "LOG").rc == 0
    assert standin.state(target) == "ONLINE"
    assert standin.checksum(target) == standin.checksum("c")

    # full + differential + the last log gives the same content
    again = f"REPLACE, NORECOVERY, {moved('c', 'r2', tmp_path)}"
    assert restore(standin, sqlvdi_libs, "r2", streams(full), again).rc == 0
    assert restore(standin, sqlvdi_libs, "r2", streams(diff), "NORECOVERY").rc == 0
    assert restore(standin, sqlvdi_libs, "r2", streams(log2), "RECOVERY", "LOG").rc == 0
    assert standin.checksum("r2") == standin.checksum("c")


def test_stopat_restores_the_content_of_that_time(
    standin: StandinServer, sqlvdi_libs: Libraries, tmp_path: Path
) -> None:
    standin.create_database("s", MIB, seed=4)
    full = backup(standin, sqlvdi_libs, "s", "full")
    standin.write("s")
    time.sleep(1.1)  # STOPAT has seconds precision: the activity must straddle a second
    stop = datetime.now(UTC).replace(microsecond=0, tzinfo=None)
    time.sleep(1.1)
    standin.write("s")
    log = backup(standin, sqlvdi_libs, "s", "log", "LOG")
    assert full.client is not None
    assert log.client is not None
    where = moved("s", "p", tmp_path)
    assert restore(standin, sqlvdi_libs, "p", full.client.streams, f"NORECOVERY, {where}").rc == 0
    at = f"RECOVERY, STOPAT = N'{stop.isoformat()}'"
    assert restore(standin, sqlvdi_libs, "p", log.client.streams, at, "LOG").rc == 0
    assert standin.state("p") == "ONLINE"
    assert standin.checksum("p") == standin.checksum_at("s", stop)
    assert standin.checksum("p") != standin.checksum("s")


# ---- refusals -------------------------------------------------------------------------------


def test_missing_database_aborts_the_clients_set(
    standin: StandinServer, sqlvdi_libs: Libraries
) -> None:
    ran = backup(standin, sqlvdi_libs, "nope", "b")
    assert ran.rc == 1
    assert ran.config_rc == VD_E_ABORT
    lines = ran.out.splitlines()
    assert lines[0].startswith("Msg 911, Level 16, State 1, Server ")
    assert (
        lines[1] == "Database 'nope' does not exist. Make sure that the name is entered correctly."
    )
    assert lines[2].startswith("Msg 3013, Level 16")
    assert lines[3] == "BACKUP DATABASE is terminating abnormally."


def test_restore_refusals_change_nothing(
    standin: StandinServer, sqlvdi_libs: Libraries, tmp_path: Path
) -> None:
    standin.create_database("a", MIB, seed=1)
    standin.create_database("b", MIB, seed=2)
    full = backup(standin, sqlvdi_libs, "a", "full")
    assert full.client is not None
    streams = full.client.streams
    before = standin.checksum("b")
    assert "Msg 3159" in restore(standin, sqlvdi_libs, "a", streams, "RECOVERY").out
    assert "Msg 3154" in restore(standin, sqlvdi_libs, "b", streams, "RECOVERY").out
    in_use = restore(standin, sqlvdi_libs, "new", streams, "RECOVERY")
    assert "Msg 1834" in in_use.out
    assert "Msg 3119" in in_use.out
    assert standin.state("new") is None
    damaged = [bytearray(streams[0])]
    damaged[0][-100000] ^= 1
    bad = restore(standin, sqlvdi_libs, "new", damaged, f"RECOVERY, {moved('a', 'n', tmp_path)}")
    assert "Msg 3183" in bad.out
    assert bad.rc == 1
    assert standin.state("new") is None
    assert standin.checksum("b") == before
    foreign = restore(
        standin, sqlvdi_libs, "new", [bytearray(b"\0" * 65536)], "RECOVERY", "DATABASE"
    )
    assert "Msg 3241" in foreign.out
    # VERIFYONLY reads it all and changes nothing; HEADERONLY answers from the header
    verify = through_vdi(
        standin,
        sqlvdi_libs,
        lambda c: f"RESTORE VERIFYONLY FROM {c} WITH CHECKSUM, {SIZES}",
        feed=[bytes(streams[0])],
    )
    assert verify.rc == 0
    assert "The backup set on file 1 is valid." in verify.out
    header = through_vdi(
        standin,
        sqlvdi_libs,
        lambda c: f"RESTORE HEADERONLY FROM {c} WITH {SIZES}",
        feed=[bytes(streams[0])],
    )
    assert header.rc == 0
    lines = header.out.splitlines()
    names = lines[0].split()
    values = dict(zip(names, lines[2].split(), strict=False))
    assert values["BackupType"] == "1"
    assert values["DatabaseName"] == "a"


def test_login_and_syntax_errors(standin: StandinServer) -> None:
    proc = sqlcmd(standin, "SELECT 1", password="wrong")
    out, _ = proc.communicate(timeout=20)
    assert proc.returncode == 1
    assert out.splitlines()[1] == "Login failed for user 'sa'."
    assert out.startswith("Msg 18456, Level 14")
    proc = sqlcmd(standin, "BACKUP DATABSE x TO VIRTUAL_DEVICE = N'a'")
    out, _ = proc.communicate(timeout=20)
    assert proc.returncode == 1
    assert out.splitlines()[1] == "Incorrect syntax near 'DATABSE'."


def test_connection_failure_message(standin: StandinServer) -> None:
    env = dict(os.environ, SQLCMDPASSWORD="x")
    cmd = [str(standin.sqlcmd), "-S", "127.0.0.1,1", "-U", "sa", "-b", "-Q", "SELECT 1"]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=20, check=False)
    assert done.returncode == 1
    assert done.stdout.strip() == (
        "Sqlcmd: Error: Microsoft ODBC Driver 18 for SQL Server : Login timeout expired."
    )


# ---- failures mid-stream --------------------------------------------------------------------


def test_error_completion_and_client_abort(standin: StandinServer, sqlvdi_libs: Libraries) -> None:
    standin.create_database("f", 4 * MIB)
    full = backup(
        standin,
        sqlvdi_libs,
        "f",
        "disk-full",
        serve=lambda c, names: c.run(names, fail_write_with=112),
    )
    assert full.rc == 1
    assert 'Write on "' in full.out
    assert "failed: 112(There is not enough space on the disk.)" in full.out
    assert "BACKUP DATABASE is terminating abnormally." in full.out

    def abort_early(client: RawClient, names: list[str]) -> ClientResult:
        client.signal_abort()
        return ClientResult()

    aborted = backup(standin, sqlvdi_libs, "f", "aborted", serve=abort_early)
    assert aborted.rc == 1
    assert "failed: 995(The I/O operation has been aborted" in aborted.out
    assert standin.history("f") == []


def test_server_side_failure_and_timeout(standin: StandinServer, sqlvdi_libs: Libraries) -> None:
    standin.create_database("g", 8 * MIB)
    standin.fail_next_backup("g", after_bytes=2 * MIB)
    failed = backup(standin, sqlvdi_libs, "g", "x")
    assert failed.rc == 1
    assert "Msg 3202" in failed.out
    assert failed.client is not None
    assert failed.client.ends == [VD_E_ABORT]

    def stall(client: RawClient, names: list[str]) -> ClientResult:
        # opens the device and never takes a command: the watchdog must fire
        deadline = time.monotonic() + 10
        while not standin.history("g") and time.monotonic() < deadline:
            if client.get_configuration(0) != NOERROR:
                break
            time.sleep(0.05)
        return ClientResult()

    started = time.monotonic()
    stalled = backup(standin, sqlvdi_libs, "g", "y", timeout_ms=200, serve=stall)
    assert stalled.rc == 1
    assert "1460(This operation returned because the timeout period expired.)" in stalled.out
    assert time.monotonic() - started < 8


def test_killed_sqlcmd_aborts_the_statement(standin: StandinServer, sqlvdi_libs: Libraries) -> None:
    standin.create_database("k", 8 * MIB)
    standin.set_pace(2 * MIB)
    client = RawClient(sqlvdi_libs.client)
    client.create("killset", 1)
    proc = sqlcmd(standin, f"BACKUP DATABASE [k] TO VIRTUAL_DEVICE = N'killset' WITH {SIZES}")
    try:
        assert client.get_configuration(15000) == NOERROR
        assert standin.running() == ["killset"]
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=10)
        result = client.run(["killset"])
        assert result.ends == [VD_E_ABORT]
    finally:
        client.close()
        standin.set_pace(None)
    deadline = time.monotonic() + 5
    while standin.running() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert standin.running() == []
    assert standin.history("k") == []


def test_a_restarted_server_knows_its_databases(
    tmp_path: Path, sqlvdi_libs: Libraries, standin: StandinServer
) -> None:
    standin.create_database("keep", MIB, seed=8)
    standin.write("keep")
    assert backup(standin, sqlvdi_libs, "keep", "b").rc == 0
    checksum = standin.checksum("keep")
    standin.stop()
    with StandinServer.start(standin.workdir, libs=sqlvdi_libs) as again:
        assert again.checksum("keep") == checksum
        assert [r["name"] for r in again.history("keep")] == ["b"]


def test_server_death_aborts_the_clients_set(
    standin: StandinServer, sqlvdi_libs: Libraries
) -> None:
    standin.create_database("d", 8 * MIB)
    standin.set_pace(2 * MIB)
    client = RawClient(sqlvdi_libs.client)
    client.create("deathset", 1)
    proc = sqlcmd(standin, f"BACKUP DATABASE [d] TO VIRTUAL_DEVICE = N'deathset' WITH {SIZES}")
    try:
        assert client.get_configuration(15000) == NOERROR
        standin.kill()
        result = client.run(["deathset"])
        assert result.ends == [VD_E_ABORT]
        out, _ = proc.communicate(timeout=10)
    finally:
        client.close()
    assert proc.returncode == 1
    assert "Communication link failure." in out
