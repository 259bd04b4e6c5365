"""What scripts rely on: stdout carries the result (``backup``: the bare id), stderr
only the final line (log events with ``-v``), byte counts named, a missing
destination is an error, ``storage audit`` exits 3 on debris it left, the demo leaves
no ``-wal``/``-shm`` files, ``restore --verify-first`` feeds nothing from a damaged
backup."""

from __future__ import annotations

import json
import re
import sqlite3
from pathlib import Path

from tests.cli.test_cli import vdistream

ID = re.compile(r"^[0-9]{8}T[0-9]{6}Z-[0-9a-f]{8}\n$")


def test_backup_prints_the_bare_id_and_the_summary_on_stderr(tmp_path: Path) -> None:
    dest = tmp_path / "dest"
    done = vdistream("backup", "cmd:head -c 2000000 /dev/urandom", str(dest), "--compress", "zstd")
    assert ID.match(done.stdout), done.stdout
    backup_id = done.stdout.strip()
    (summary,) = done.stderr.splitlines()
    manifest = json.loads((dest / backup_id / "manifest.json").read_text())
    stored = sum(d["bytes"] for d in manifest["devices"])
    logical = sum(d["logical_bytes"] for d in manifest["devices"])
    assert stored != logical
    assert f"backup {backup_id} complete: logical {logical:,} bytes, stored {stored:,} bytes" in (
        summary
    )
    assert "manifest file://" in summary

    listed = vdistream("list", str(dest))
    assert f"logical {logical:,} bytes, stored {stored:,} bytes" in listed.stdout
    (row,) = json.loads(vdistream("list", str(dest), "--json").stdout)
    assert (row["logical_bytes"], row["stored_bytes"]) == (logical, stored)

    as_json = vdistream("backup", "cmd:head -c 1000 /dev/zero", str(dest), "--json")
    assert json.loads(as_json.stdout)["status"] == "succeeded"
    assert len(as_json.stdout.splitlines()) == 1


def test_a_failing_backup_prints_one_line_and_logs_only_when_asked(tmp_path: Path) -> None:
    dest = tmp_path / "dest"
    source = 'cmd:sh -c "exit 3"'
    done = vdistream("backup", source, str(dest), check=1)
    assert done.stdout == ""
    (line,) = done.stderr.splitlines()
    assert line.startswith("vdistream: backup failed (failed): ")
    assert "exited with status 3" in line

    loud = vdistream("backup", source, str(dest), "-v", check=1)
    for event in ("abort_signalled", "job_finished"):
        assert event in loud.stderr
    last = loud.stderr.splitlines()[-1]
    assert last.startswith("vdistream: backup failed (failed): ")
    assert "exited with status 3" in last

    as_json = vdistream("-v", "--log-format", "json", "backup", source, str(dest), check=1)
    events = [json.loads(x) for x in as_json.stderr.splitlines()[:-1]]
    assert "job_finished" in {e["event"] for e in events}
    assert as_json.stdout == ""  # the logs never reach stdout
    quiet = vdistream("backup", source, str(dest), "--log-level", "error", check=1)
    assert "job_finished" not in quiet.stderr


def test_list_of_a_missing_or_non_directory_destination_fails(tmp_path: Path) -> None:
    missing = tmp_path / "typo"
    done = vdistream("list", str(missing), check=1)
    assert done.stderr == f"vdistream: error: {missing}: no such directory\n"
    assert not missing.exists()
    a_file = tmp_path / "file"
    a_file.write_text("x")
    done = vdistream("list", str(a_file), check=1)
    assert done.stderr == f"vdistream: error: {a_file}: is not a directory\n"
    done = vdistream("storage", "audit", str(missing), check=1)
    assert "no such directory" in done.stderr
    empty = tmp_path / "empty"
    empty.mkdir()
    done = vdistream("list", str(empty))
    assert done.stdout == ""
    assert done.stderr == f"no backups in {empty}\n"


def test_storage_audit_exits_3_when_it_leaves_debris(tmp_path: Path) -> None:
    dest = tmp_path / "dest"
    backup_id = vdistream("backup", "cmd:head -c 100000 /dev/urandom", str(dest)).stdout.strip()
    assert vdistream("storage", "audit", str(dest), "--min-age", "0").returncode == 0
    orphan = dest / "killed-job" / "stream-00-of-01.vdi"
    orphan.parent.mkdir()
    orphan.write_bytes(b"half a stream")

    found = vdistream("storage", "audit", str(dest), "--min-age", "0", check=3)
    assert "orphan object: killed-job/stream-00-of-01.vdi" in found.stdout
    (line,) = found.stderr.splitlines()
    assert "--clean" in line
    assert orphan.exists()
    young = vdistream("storage", "audit", str(dest), check=0)  # younger than 1h: not debris yet
    assert "too young" in young.stdout

    report = json.loads(
        vdistream("storage", "audit", str(dest), "--min-age", "0", "--clean", "--json").stdout
    )
    assert report["removed_objects"] == ["killed-job/stream-00-of-01.vdi"]
    assert not orphan.exists()
    assert vdistream("storage", "audit", str(dest), "--min-age", "0").returncode == 0
    assert (dest / backup_id / "manifest.json").exists()


def test_the_demo_leaves_no_wal_or_shm_files(tmp_path: Path) -> None:
    demo = tmp_path / "demo"
    vdistream("demo", "--dir", str(demo))
    names = sorted(p.name for p in demo.iterdir())
    assert "app.db" in names
    assert [n for n in names if n.endswith(("-wal", "-shm"))] == [], names
    restored = [n for n in names if n.startswith("restored-")]
    assert len(restored) == 1
    with sqlite3.connect(demo / restored[0]) as db:
        assert db.execute("SELECT count(*) FROM orders").fetchone() == (200_000,)
    db.close()


def test_restore_verify_first_feeds_nothing_from_a_damaged_backup(tmp_path: Path) -> None:
    dest = tmp_path / "dest"
    backup_id = vdistream(
        "backup", "cmd:head -c 3000000 /dev/urandom", str(dest), "--devices", "2"
    ).stdout.strip()
    stream = dest / backup_id / "stream-01-of-02.vdi"
    data = bytearray(stream.read_bytes())
    data[-100] ^= 0x01  # near the end: a plain restore would have fed most of it already
    stream.write_bytes(bytes(data))
    fed = tmp_path / "fed"
    consumer = f"cmd:sh -c 'cat > {fed}'"
    done = vdistream("restore", f"{dest}/{backup_id}", consumer, "--verify-first", check=1)
    assert not fed.exists()
    (line,) = done.stderr.splitlines()
    assert "device 1" in line
    # and an intact backup restores with it
    good = vdistream("backup", "cmd:head -c 300000 /dev/urandom", str(dest)).stdout.strip()
    vdistream("restore", f"{dest}/{good}", consumer, "--verify-first")
    assert fed.stat().st_size == 300000
