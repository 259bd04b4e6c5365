"""SQL Server end to end through the command line, against the stand-in.

Real processes throughout: ``vdistream`` as a subprocess, the stand-in SQL Server as
another process sharing the buffer area through POSIX shared memory with the stand-in
``libsqlvdi.so`` that vdistream loads through ctypes, and the stand-in ``sqlcmd``
(``?trigger=sqlcmd``) carrying each statement. The stand-in checks what SQL Server
checks (LSN chains, REPLACE, MOVE, the streams' bytes against what the backup wrote),
and its database checksums say whether a restore reproduced the data.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from standin.mssql.control import StandinServer

pytestmark = pytest.mark.timeout(180)

MiB = 1024 * 1024


def run_cli(
    env: dict[str, str], *args: str, check: int | None = 0
) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(
        [sys.executable, "-m", "vdistream", *args],
        capture_output=True,
        text=True,
        timeout=150,
        env=env,
    )
    if check is not None:
        assert done.returncode == check, (done.returncode, done.stdout, done.stderr)
    return done


@pytest.fixture
def env(standin: StandinServer, sqlvdi_libs: Any) -> dict[str, str]:
    """What a user sets: the library, sqlcmd, the password (never in the URL)."""
    return {
        **os.environ,
        "VDISTREAM_SQLVDI": str(sqlvdi_libs.client),
        "VDISTREAM_SQLCMD": str(standin.sqlcmd),
        "VDISTREAM_MSSQL_PASSWORD": standin.password,
    }


def url(standin: StandinServer, database: str) -> str:
    return standin.url(database) + "?trigger=sqlcmd"


def backup(
    env: dict[str, str], standin: StandinServer, database: str, dest: Path, *extra: str
) -> dict[str, Any]:
    done = run_cli(env, "backup", url(standin, database), str(dest), "--json", *extra)
    summary: dict[str, Any] = json.loads(done.stdout)
    assert summary["status"] == "succeeded", summary
    return summary


def manifest(dest: Path, backup_id: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((dest / backup_id / "manifest.json").read_text())
    return data


def published(dest: Path) -> list[str]:
    return sorted(str(p.relative_to(dest)) for p in dest.rglob("*") if p.is_file())


def shm_debris(standin: StandinServer) -> list[str]:
    """What is left in /dev/shm of the sets this server met (other test runs may share
    the machine: only ours count)."""
    ours = {f"sqlvdi-standin.{name}" for name in standin.sets_seen()}
    found = (p.name for p in Path("/dev/shm").glob("sqlvdi-standin.*"))
    return sorted(n for n in found if n.removesuffix(".buffers") in ours)


# --- backup -------------------------------------------------------------------------------


@pytest.mark.parametrize("devices", [1, 3])
def test_full_backup_then_restore_elsewhere_reproduces_the_database(
    standin: StandinServer, env: dict[str, str], tmp_path: Path, devices: int
) -> None:
    standin.create_database("sales", 24 * MiB, seed=3)
    dest = tmp_path / "dest"
    summary = backup(env, standin, "sales", dest, "--devices", str(devices))
    record = manifest(dest, summary["id"])
    assert record["engine"] == "mssql"
    assert record["mode"] == "full"
    assert record["sqlserver"]["type"] == "D"
    assert record["sqlserver"]["database"] == "sales"
    assert int(record["sqlserver"]["last_lsn"]) > int(record["sqlserver"]["first_lsn"]) > 0
    assert len(record["devices"]) == devices
    assert standin.password not in json.dumps(record)
    # the statement SQL Server got: one VIRTUAL_DEVICE clause per device, the set first
    statement = next(s for s in standin.statements() if s.startswith("BACKUP DATABASE"))
    assert statement.count("VIRTUAL_DEVICE = N'") == devices
    assert f"NAME = N'{summary['id']}'" in statement

    run_cli(env, "restore", str(dest / summary["id"]), url(standin, "sales_copy"))
    assert standin.state("sales_copy") == "ONLINE"
    assert standin.checksum("sales_copy") == standin.checksum("sales")
    restore = next(s for s in standin.statements() if s.startswith("RESTORE DATABASE"))
    # files moved beside the originals under the new name: the source's stay untouched
    assert "MOVE N'sales' TO N'" in restore
    assert "sales_copy.mdf'" in restore
    assert shm_debris(standin) == []


def test_diff_log_and_copy_only_are_recorded_as_sql_server_says(
    standin: StandinServer, env: dict[str, str], tmp_path: Path
) -> None:
    standin.create_database("orders", 8 * MiB)
    dest = tmp_path / "dest"
    full_id = backup(env, standin, "orders", dest)["id"]
    full = manifest(dest, full_id)["sqlserver"]
    standin.write("orders", pages=32)
    diff = manifest(dest, backup(env, standin, "orders", dest, "--mode", "diff")["id"])
    standin.write("orders", pages=8)
    log = manifest(dest, backup(env, standin, "orders", dest, "--mode", "log")["id"])
    copy = manifest(dest, backup(env, standin, "orders", dest, "--mode", "copy-only")["id"])
    assert (diff["mode"], diff["sqlserver"]["type"]) == ("diff", "I")
    assert diff["sqlserver"]["differential_base_lsn"] == full["checkpoint_lsn"]
    assert (log["mode"], log["sqlserver"]["type"]) == ("log", "L")
    assert copy["sqlserver"]["type"] == "D"
    assert copy["sqlserver"]["copy_only"] is True
    # a diff is smaller than the full it is based on (ids made in one second sort by
    # their random part: the full is not always the first)
    assert diff["logical_bytes"] < manifest(dest, full_id)["logical_bytes"]
    # list shows where each backup sits in its chain
    listing = run_cli(env, "list", str(dest)).stdout.splitlines()
    labels = {line.split()[0]: line.rsplit("[", 1)[-1].rstrip("]") for line in listing}
    assert labels[full_id] == "full"
    assert labels[diff["backup_id"]] == f"diff of {full_id}"
    assert labels[log["backup_id"]].startswith("log 1/1 of ")
    assert labels[copy["backup_id"]] == "full (copy-only)"
    assert "mssql/log" in next(line for line in listing if line.startswith(log["backup_id"]))


def _ids(dest: Path) -> list[str]:
    return sorted(p.name for p in dest.iterdir() if (p / "manifest.json").exists())


# --- chains -------------------------------------------------------------------------------


def test_chain_restore_latest_and_point_in_time(
    standin: StandinServer, env: dict[str, str], tmp_path: Path
) -> None:
    standin.create_database("ledger", 8 * MiB, seed=5)
    dest = tmp_path / "dest"
    backup(env, standin, "ledger", dest)
    standin.write("ledger", pages=10)
    backup(env, standin, "ledger", dest, "--mode", "log")
    standin.write("ledger", pages=10)
    backup(env, standin, "ledger", dest, "--mode", "diff")
    standin.write("ledger", pages=10)
    time.sleep(1.1)  # STOPAT has seconds: the point lies between two writes
    point = datetime.now(UTC).replace(microsecond=0)
    expected_at_point = standin.checksum("ledger")
    time.sleep(1.1)
    standin.write("ledger", pages=10)
    backup(env, standin, "ledger", dest, "--mode", "log")

    done = run_cli(
        env,
        "restore",
        str(dest),
        url(standin, "ledger_latest"),
        "--to",
        "latest",
        "--database",
        "ledger",
        "--json",
    )
    steps = [s["kind"] for s in json.loads(done.stdout)["steps"]]
    assert steps == ["full", "diff", "log"]  # the diff supersedes the first log
    assert standin.checksum("ledger_latest") == standin.checksum("ledger")

    run_cli(
        env,
        "restore",
        str(dest),
        url(standin, "ledger_then"),
        "--to",
        point.isoformat(),
        "--database",
        "ledger",
    )
    assert standin.checksum("ledger_then") == expected_at_point
    assert standin.checksum_at("ledger", point) == expected_at_point
    stopat = [s for s in standin.statements() if "STOPAT" in s]
    assert stopat
    assert point.strftime("%Y-%m-%dT%H:%M:%S") in stopat[-1]


def test_a_chain_with_a_gap_is_refused_and_leaves_no_database(
    standin: StandinServer, env: dict[str, str], tmp_path: Path
) -> None:
    standin.create_database("gappy", 4 * MiB)
    dest = tmp_path / "dest"
    backup(env, standin, "gappy", dest)
    standin.write("gappy")
    lost = backup(env, standin, "gappy", dest, "--mode", "log")["id"]
    standin.write("gappy")
    backup(env, standin, "gappy", dest, "--mode", "log")
    # the middle log goes missing: the chain has a gap
    for path in sorted((dest / lost).iterdir()):
        path.unlink()
    (dest / lost).rmdir()
    done = run_cli(
        env,
        "restore",
        str(dest),
        url(standin, "gappy2"),
        "--to",
        "latest",
        "--database",
        "gappy",
        check=1,
    )
    assert "gap" in done.stderr
    assert "Traceback" not in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1
    assert standin.state("gappy2") is None


# --- verify -------------------------------------------------------------------------------


def test_verify_ours_then_sql_servers_verifyonly(
    standin: StandinServer, env: dict[str, str], tmp_path: Path
) -> None:
    standin.create_database("checked", 6 * MiB)
    dest = tmp_path / "dest"
    backup_id = backup(env, standin, "checked", dest, "--devices", "2")["id"]
    done = run_cli(
        env, "verify", str(dest / backup_id), "--engine", "--server", url(standin, "master")
    )
    assert "ok  sqlserver: RESTORE VERIFYONLY" in done.stdout
    assert any(s.startswith("RESTORE VERIFYONLY") for s in standin.statements())
    # a damaged stream fails our own check before SQL Server is asked
    stream = sorted((dest / backup_id).glob("stream-*"))[1]
    data = bytearray(stream.read_bytes())
    data[len(data) // 2] ^= 0xFF
    stream.write_bytes(bytes(data))
    before = len(standin.statements())
    done = run_cli(
        env,
        "verify",
        str(dest / backup_id),
        "--engine",
        "--server",
        url(standin, "master"),
        check=1,
    )
    assert "BAD device 1" in done.stdout
    assert not any(s.startswith("RESTORE VERIFYONLY") for s in standin.statements()[before:])


# --- aborts, timeouts, death ------------------------------------------------------------------


def _start_backup(
    env: dict[str, str], standin: StandinServer, database: str, dest: Path
) -> subprocess.Popen[str]:
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "vdistream",
            "backup",
            url(standin, database),
            str(dest),
            "--devices",
            "2",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    deadline = time.monotonic() + 30
    while not standin.running():
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, "SQL Server never started the backup"
        time.sleep(0.05)
    time.sleep(0.5)  # some megabytes in flight
    return process


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_abort_from_our_side_leaves_nothing_and_sql_server_fails_the_backup(
    standin: StandinServer, env: dict[str, str], tmp_path: Path, signum: int
) -> None:
    standin.create_database("big", 64 * MiB)
    standin.set_pace(8 * MiB)
    dest = tmp_path / "dest"
    process = _start_backup(env, standin, "big", dest)
    process.send_signal(signum)
    out, err = process.communicate(timeout=60)
    assert process.returncode == 128 + signum, (out, err)
    assert "Traceback" not in err
    assert published(dest) == []
    deadline = time.monotonic() + 10
    while standin.running():
        assert time.monotonic() < deadline, "SQL Server's statement outlived the abort"
        time.sleep(0.05)
    assert shm_debris(standin) == []
    assert not [row for row in standin.history("big") if row.get("name")]


def test_abort_from_sql_servers_side_fails_with_its_message(
    standin: StandinServer, env: dict[str, str], tmp_path: Path
) -> None:
    standin.create_database("flaky", 16 * MiB)
    standin.fail_next_backup("flaky", after_bytes=4 * MiB)
    dest = tmp_path / "dest"
    done = run_cli(env, "backup", url(standin, "flaky"), str(dest), check=1)
    assert "terminating abnormally" in done.stderr
    assert "Traceback" not in done.stderr
    assert published(dest) == []
    assert shm_debris(standin) == []


def test_server_death_mid_backup_fails_promptly_and_leaves_nothing(
    standin: StandinServer, env: dict[str, str], tmp_path: Path
) -> None:
    standin.create_database("doomed", 64 * MiB)
    standin.set_pace(8 * MiB)
    dest = tmp_path / "dest"
    process = _start_backup(env, standin, "doomed", dest)
    started = time.monotonic()
    standin.kill()
    out, err = process.communicate(timeout=60)
    assert process.returncode == 1, (out, err)
    assert time.monotonic() - started < 20
    assert "Traceback" not in err
    assert published(dest) == []


# --- bad input ----------------------------------------------------------------------------


def test_no_library_names_the_path_and_the_variable(
    standin: StandinServer, env: dict[str, str], tmp_path: Path
) -> None:
    standin.create_database("db1", 1 * MiB)
    env = {**env, "VDISTREAM_SQLVDI": str(tmp_path / "nowhere" / "libsqlvdi.so")}
    done = run_cli(env, "backup", url(standin, "db1"), str(tmp_path / "dest"), check=1)
    assert str(tmp_path / "nowhere" / "libsqlvdi.so") in done.stderr
    assert "VDISTREAM_SQLVDI" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "dest").exists() or published(tmp_path / "dest") == []


def test_a_database_that_does_not_exist(
    standin: StandinServer, env: dict[str, str], tmp_path: Path
) -> None:
    done = run_cli(env, "backup", url(standin, "nosuchdb"), str(tmp_path / "dest"), check=1)
    assert "does not exist" in done.stderr
    assert "Traceback" not in done.stderr
    assert published(tmp_path / "dest") == [] if (tmp_path / "dest").exists() else True
    assert shm_debris(standin) == []


def test_a_wrong_password_is_sql_servers_refusal_without_the_password(
    standin: StandinServer, env: dict[str, str], tmp_path: Path
) -> None:
    standin.create_database("db2", 1 * MiB)
    env = {**env, "VDISTREAM_MSSQL_PASSWORD": "not-the-password-42"}
    done = run_cli(env, "backup", url(standin, "db2"), str(tmp_path / "dest"), check=1)
    assert "Login failed" in done.stderr
    assert "not-the-password-42" not in done.stderr + done.stdout


def test_restore_over_an_existing_database_needs_replace(
    standin: StandinServer, env: dict[str, str], tmp_path: Path
) -> None:
    standin.create_database("keep", 2 * MiB, seed=1)
    standin.create_database("other", 2 * MiB, seed=2)
    dest = tmp_path / "dest"
    backup_id = backup(env, standin, "keep", dest)["id"]
    before = standin.checksum("other")
    done = run_cli(env, "restore", str(dest / backup_id), url(standin, "other"), check=1)
    assert "--replace" in done.stderr
    assert "Traceback" not in done.stderr
    assert standin.checksum("other") == before
    run_cli(env, "restore", str(dest / backup_id), url(standin, "other"), "--replace")
    assert standin.checksum("other") == standin.checksum("keep")


def test_a_hostile_database_name_backs_up_that_database_and_nothing_else(
    standin: StandinServer, env: dict[str, str], tmp_path: Path
) -> None:
    hostile = "x]; DROP DATABASE victim; --"
    standin.create_database(hostile, 1 * MiB)
    standin.create_database("victim", 1 * MiB)
    from urllib.parse import quote

    target = standin.url("") + quote(hostile, safe="") + "?trigger=sqlcmd"
    done = run_cli(env, "backup", target, str(tmp_path / "dest"), "--json")
    assert json.loads(done.stdout)["status"] == "succeeded"
    assert standin.state("victim") == "ONLINE"
    assert "[x]]; DROP DATABASE victim; --]" in standin.statements()[-3:][0] or any(
        "[x]]; DROP DATABASE victim; --]" in s for s in standin.statements()
    )


def test_a_failed_restore_leaves_no_database(
    standin: StandinServer, env: dict[str, str], tmp_path: Path
) -> None:
    standin.create_database("src", 4 * MiB)
    dest = tmp_path / "dest"
    backup_id = backup(env, standin, "src", dest)["id"]
    # damage the stream so that SQL Server's restore fails on it after vdistream read it
    # (we check the stored SHA-256 only at the end of a stream: our check fails the READ)
    stream = sorted((dest / backup_id).glob("stream-*"))[0]
    data = bytearray(stream.read_bytes())
    data[-10] ^= 0x01
    stream.write_bytes(bytes(data))
    done = run_cli(env, "restore", str(dest / backup_id), url(standin, "src_restored"), check=1)
    assert "Traceback" not in done.stderr
    assert standin.state("src_restored") is None


# --- restores step by step, options, secrets ----------------------------------------------------


def test_step_by_step_norecovery_then_log_then_recovery(
    standin: StandinServer, env: dict[str, str], tmp_path: Path
) -> None:
    standin.create_database("steps", 4 * MiB, seed=9)
    dest = tmp_path / "dest"
    full = backup(env, standin, "steps", dest)["id"]
    standin.write("steps", pages=12)
    log = backup(env, standin, "steps", dest, "--mode", "log")["id"]
    target = url(standin, "steps_copy")
    # a log cannot go first: refused before anything runs, in DBA terms
    done = run_cli(env, "restore", str(dest / log), target, check=1)
    assert "does not exist" in done.stderr
    assert "--norecovery" in done.stderr
    run_cli(env, "restore", str(dest / full), target, "--norecovery")
    assert standin.state("steps_copy") == "RESTORING"
    # onto a RESTORING database a log needs no --replace
    run_cli(env, "restore", str(dest / log), target)
    assert standin.state("steps_copy") == "ONLINE"
    assert standin.checksum("steps_copy") == standin.checksum("steps")
    # and once it is ONLINE, another log is refused at once
    done = run_cli(env, "restore", str(dest / log), target, check=1)
    assert "not RESTORING" in done.stderr


def test_chain_with_norecovery_leaves_the_database_restoring(
    standin: StandinServer, env: dict[str, str], tmp_path: Path
) -> None:
    standin.create_database("more", 4 * MiB)
    dest = tmp_path / "dest"
    backup(env, standin, "more", dest)
    standin.write("more")
    backup(env, standin, "more", dest, "--mode", "log")
    target = url(standin, "more_copy")
    run_cli(
        env, "restore", str(dest), target, "--to", "latest", "--database", "more", "--norecovery"
    )
    assert standin.state("more_copy") == "RESTORING"


def test_explicit_move_and_a_password_in_the_url_never_shown(
    standin: StandinServer, env: dict[str, str], tmp_path: Path
) -> None:
    standin.create_database("moved", 2 * MiB)
    dest = tmp_path / "dest"
    backup_id = backup(env, standin, "moved", dest)["id"]
    files = tmp_path / "files"
    files.mkdir()
    secret = standin.url("moved2").replace("sa@", f"sa:{standin.password}@") + "?trigger=sqlcmd"
    env = {k: v for k, v in env.items() if k != "VDISTREAM_MSSQL_PASSWORD"}
    done = run_cli(
        env,
        "restore",
        str(dest / backup_id),
        secret,
        "--json",
        "--move",
        f"moved={files}/m.mdf",
        "--move",
        f"moved_log={files}/m.ldf",
    )
    assert standin.password not in done.stdout + done.stderr
    assert json.loads(done.stdout)["status"] == "succeeded"
    statement = [s for s in standin.statements() if s.startswith("RESTORE DATABASE")][-1]
    assert f"MOVE N'moved' TO N'{files}/m.mdf'" in statement
    assert f"MOVE N'moved_log' TO N'{files}/m.ldf'" in statement
    assert standin.checksum("moved2") == standin.checksum("moved")


def test_options_that_would_be_ignored_are_refused(
    standin: StandinServer, env: dict[str, str], tmp_path: Path
) -> None:
    target = url(standin, "any")
    for args in (
        ["--overwrite"],
        ["--to", "latest", "--stopat", "2026-12-06T10:00:00"],
        ["--database", "x"],
    ):
        done = run_cli(env, "restore", str(tmp_path / "d" / "id"), target, *args, check=2)
        assert "Traceback" not in done.stderr
        assert len(done.stderr.strip().splitlines()) == 1


def test_kill_9_of_vdistream_mid_backup_leaves_nothing_the_next_run_keeps(
    standin: StandinServer, env: dict[str, str], tmp_path: Path
) -> None:
    """vdistream killed outright: SQL Server sees its client gone and fails the
    statement; the sqlcmd it started dies with it (parent-death signal); the next backup
    into the same destination sweeps the debris and is the only backup there."""
    standin.create_database("killed", 64 * MiB)
    standin.set_pace(8 * MiB)
    dest = tmp_path / "dest"
    process = _start_backup(env, standin, "killed", dest)
    process.kill()
    process.communicate(timeout=30)
    deadline = time.monotonic() + 15
    while standin.running():
        assert time.monotonic() < deadline, "SQL Server's statement outlived its client"
        time.sleep(0.05)
    leftover = subprocess.run(
        ["pgrep", "-f", f"{standin.sqlcmd}.*killed"], capture_output=True, text=True
    )
    assert leftover.stdout == "", leftover.stdout
    standin.set_pace(None)
    kept = backup(env, standin, "killed", dest, "--devices", "2")["id"]
    assert _ids(dest) == [kept]
    assert sorted(p.name for p in dest.iterdir()) == [kept]
    assert shm_debris(standin) == []
