"""The command line, run as a real subprocess against real files and real tools."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest


def vdistream(*args: str, check: int | None = 0) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(
        [sys.executable, "-m", "vdistream", *args],
        capture_output=True,
        text=True,
        timeout=120,
    )
    if check is not None:
        assert done.returncode == check, (done.returncode, done.stdout, done.stderr)
    return done


def make_tree(root: Path) -> None:
    rng = random.Random(7)
    for i in range(12):
        sub = root / f"dir{i % 3}" / f"sub{i % 2}"
        sub.mkdir(parents=True, exist_ok=True)
        (sub / f"file{i}.bin").write_bytes(rng.randbytes(rng.randrange(0, 300_000)))
    (root / "empty").mkdir()


def files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


@pytest.fixture
def backed_up(tmp_path: Path) -> tuple[Path, Path, str]:
    """A tar of a tree, backed up through the command line."""
    src, dest = tmp_path / "src", tmp_path / "dest"
    src.mkdir()
    make_tree(src)
    out = vdistream("backup", f"cmd:tar -C {src} -cf - .", str(dest), "--json")
    summary = json.loads(out.stdout)
    return src, dest, summary["id"]


def test_backup_list_verify_restore(tmp_path: Path, backed_up: tuple[Path, Path, str]) -> None:
    src, dest, backup_id = backed_up
    listed = json.loads(vdistream("list", str(dest), "--json").stdout)
    assert [row["id"] for row in listed] == [backup_id]
    assert listed[0]["engine"] == "cmd"
    assert listed[0]["devices"] == 4
    manifest = json.loads((dest / backup_id / "manifest.json").read_text())
    assert len(manifest["devices"]) == 4
    assert all(len(d["sha256"]) == 64 for d in manifest["devices"])

    report = json.loads(vdistream("verify", f"{dest}/{backup_id}", "--json").stdout)
    assert report["status"] == "verified"

    out = tmp_path / "out"
    out.mkdir()
    vdistream("restore", f"{dest}/{backup_id}/manifest.json", f"cmd:tar -x -C {out}")
    assert files(out) == files(src)


def test_backup_json_fields(backed_up: tuple[Path, Path, str]) -> None:
    """``backup --json``: one JSON object on stdout, its fields naming the backup made
    (id, status, the manifest's location, stored and logical bytes, the devices)."""
    src, dest, backup_id = backed_up
    manifest = dest / backup_id / "manifest.json"
    assert manifest.exists()

    done = vdistream("backup", f"cmd:tar -C {src} -cf - .", str(dest), "--json", "--devices", "3")
    assert len(done.stdout.splitlines()) == 1
    summary = json.loads(done.stdout)
    assert set(summary) == {
        "id",
        "status",
        "manifest",
        "bytes",
        "logical_bytes",
        "devices",
        "seconds",
        "error",
        "aborted_by",
        "debris_removed",
    }
    made = summary["id"]
    assert isinstance(made, str)
    assert made != backup_id
    written = json.loads((dest / made / "manifest.json").read_text())
    assert written["backup_id"] == made
    assert summary["status"] == "succeeded"
    assert summary["error"] is None
    assert summary["aborted_by"] is None
    assert summary["manifest"] == (dest / made / "manifest.json").as_uri()
    assert summary["devices"] == written["devices"]
    assert [d["index"] for d in summary["devices"]] == [0, 1, 2]
    streams = sorted((dest / made).glob("stream-*-of-03.vdi"))
    assert [d["key"] for d in summary["devices"]] == [f"{made}/{p.name}" for p in streams]
    # stored: what the destination holds; logical: what the engine wrote
    assert type(summary["bytes"]) is int
    assert summary["bytes"] == sum(p.stat().st_size for p in streams) > 0
    assert type(summary["logical_bytes"]) is int
    assert summary["logical_bytes"] == sum(d["logical_bytes"] for d in written["devices"])
    assert isinstance(summary["seconds"], int | float)
    assert summary["seconds"] >= 0
    assert f"backup {made} complete: logical {summary['logical_bytes']:,} bytes" in done.stderr


def test_wrong_url_scheme_is_a_usage_error(tmp_path: Path) -> None:
    done = vdistream("backup", "ftp://db.example/x", str(tmp_path / "d"), check=2)
    assert "ftp://db.example/x" in done.stderr
    assert "sqlite" in done.stderr
    assert not (tmp_path / "d").exists()


def test_failing_producer_leaves_no_backup(tmp_path: Path) -> None:
    dest = tmp_path / "dest"
    command = "cmd:sh -c 'head -c 3000000 /dev/urandom; echo tool exploded >&2; exit 3'"
    done = vdistream("backup", command, str(dest), "--json", check=1)
    summary = json.loads(done.stdout)
    assert summary["status"] == "failed"
    assert summary["manifest"] is None
    assert "tool exploded" in done.stderr
    assert json.loads(vdistream("list", str(dest), "--json").stdout) == []
    leftovers = [p for p in dest.rglob("*") if p.is_file()] if dest.exists() else []
    assert leftovers == []


def test_deleted_or_truncated_stream_is_named(
    tmp_path: Path, backed_up: tuple[Path, Path, str]
) -> None:
    _, dest, backup_id = backed_up
    stream = dest / backup_id / "stream-02-of-04.vdi"
    data = stream.read_bytes()
    stream.write_bytes(data[: len(data) // 2])
    out = tmp_path / "out"
    out.mkdir()
    done = vdistream("restore", f"{dest}/{backup_id}", f"cmd:tar -x -C {out}", check=1)
    assert "device 2" in done.stderr
    assert "truncated" in done.stderr
    assert "stream-02-of-04.vdi" in done.stderr
    stream.unlink()
    done = vdistream("verify", f"{dest}/{backup_id}", check=1)
    assert "device 2" in done.stdout
    assert "missing" in done.stdout


def test_corrupted_stream_fails_verify_and_restore(
    tmp_path: Path, backed_up: tuple[Path, Path, str]
) -> None:
    _, dest, backup_id = backed_up
    stream = dest / backup_id / "stream-01-of-04.vdi"
    data = bytearray(stream.read_bytes())
    data[len(data) // 2] ^= 0x40
    stream.write_bytes(bytes(data))
    done = vdistream("verify", f"{dest}/{backup_id}", check=1)
    assert "BAD device 1" in done.stdout
    out = tmp_path / "out"
    out.mkdir()
    done = vdistream("restore", f"{dest}/{backup_id}", f"cmd:tar -x -C {out}", check=1)
    assert "restore failed" in done.stderr


def test_manifest_edited_by_hand_is_refused(
    tmp_path: Path, backed_up: tuple[Path, Path, str]
) -> None:
    _, dest, backup_id = backed_up
    path = dest / backup_id / "manifest.json"
    body = json.loads(path.read_text())
    body["devices"][0]["bytes"] += 1
    path.write_text(json.dumps(body))
    done = vdistream("restore", f"{dest}/{backup_id}", f"cmd:tar -x -C {tmp_path}", check=1)
    assert "modified" in done.stderr
    assert str(path) in done.stderr
    done = vdistream("verify", f"{dest}/{backup_id}", "--json", check=1)
    assert json.loads(done.stdout)["status"] == "failed"
    listed = vdistream("list", str(dest))
    assert "modified" in listed.stderr


def test_missing_backup(tmp_path: Path) -> None:
    done = vdistream("restore", f"{tmp_path}/nope", str(tmp_path / "x.db"), check=1)
    assert "no backup 'nope'" in done.stderr


def test_sqlite_through_the_command_line(tmp_path: Path) -> None:
    import sqlite3

    db = tmp_path / "app.db"
    with sqlite3.connect(db) as conn:
        conn.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, v TEXT)")
        conn.executemany(
            "INSERT INTO t (v) VALUES (?)", ((os.urandom(20).hex(),) for _ in range(5000))
        )
    conn.close()
    dest = tmp_path / "backups"
    summary = json.loads(
        vdistream("backup", f"sqlite://{db}", str(dest), "--json", "--devices", "2").stdout
    )
    assert summary["status"] == "succeeded"
    target = tmp_path / "restored.db"
    vdistream("restore", f"{dest}/{summary['id']}", str(target))
    with sqlite3.connect(target) as a, sqlite3.connect(db) as b:
        assert (
            a.execute("SELECT * FROM t ORDER BY id").fetchall()
            == b.execute("SELECT * FROM t ORDER BY id").fetchall()
        )
    a.close()
    b.close()
    done = vdistream("restore", f"{dest}/{summary['id']}", str(target), check=1)
    assert str(target) in done.stderr


def test_demo_is_the_quick_start(tmp_path: Path) -> None:
    done = vdistream("demo", "--dir", str(tmp_path / "demo"))
    assert "identical to the original" in done.stdout
    assert "ok  content" in done.stdout
