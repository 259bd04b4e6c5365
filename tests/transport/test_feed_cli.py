"""``vdistream feed`` and ``vdistream drain`` as separate processes, against ``vdistream
backup external:NAME`` and ``vdistream restore BACKUP external:NAME``: the bytes round
trip, a set nobody opens, a set nobody published, a device count that does not match,
and a feed killed with SIGKILL mid-backup (the backup fails at once, nothing kept)."""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

VDISTREAM = [sys.executable, "-m", "vdistream"]


def cli(*args: str | Path) -> list[str]:
    return [*VDISTREAM, *(str(a) for a in args)]


def start(*args: str | Path, **kwargs: object) -> subprocess.Popen[bytes]:
    return subprocess.Popen(cli(*args), stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kwargs)  # type: ignore[call-overload, no-any-return]


def wait_for(path: Path, process: subprocess.Popen[bytes], within: float = 10.0) -> None:
    """Until ``path`` (a published socket) exists; fails early if ``process`` ended."""
    deadline = time.monotonic() + within
    while not path.exists():
        if process.poll() is not None:
            _out, err = process.communicate()
            pytest.fail(f"exited {process.returncode} before publishing: {err.decode()}")
        if time.monotonic() > deadline:
            process.kill()
            pytest.fail(f"{path} did not appear within {within} s")
        time.sleep(0.01)


def finish(process: subprocess.Popen[bytes], within: float = 30.0) -> tuple[int, str, str]:
    try:
        out, err = process.communicate(timeout=within)
    except subprocess.TimeoutExpired:
        process.kill()
        out, err = process.communicate()
        pytest.fail(f"did not end within {within} s: {err.decode()}")
    return process.returncode, out.decode(), err.decode()


def stream_files(dest: Path) -> list[Path]:
    return [p for p in dest.rglob("*") if p.is_file()] if dest.exists() else []


def listed(dest: Path) -> list[dict[str, object]]:
    done = subprocess.run(cli("list", dest, "--json"), capture_output=True, text=True, check=True)
    rows: list[dict[str, object]] = json.loads(done.stdout)
    return rows


def test_feed_and_drain_round_trip_through_backup_and_restore(tmp_path: Path) -> None:
    rt, dest = tmp_path / "rt", tmp_path / "dest"
    dest.mkdir()
    backup = start(
        "backup", "external:feedme", f"file://{dest}", "--devices", "4",
        "--runtime-dir", rt, "--wait", "20",
    )  # fmt: skip
    wait_for(rt / "feedme.sock", backup)
    source = tmp_path / "source.bin"
    feed = " ".join(
        shlex.quote(a) for a in cli("feed", "feedme", "--devices", "4", "--runtime-dir", rt)
    )
    fed = subprocess.run(
        f"head -c 8M /dev/urandom | tee {shlex.quote(str(source))} | {feed}",
        shell=True,
        capture_output=True,
        timeout=60,
    )
    assert (fed.returncode, fed.stdout, fed.stderr) == (0, b"", b"")
    code, out, err = finish(backup)
    assert code == 0, err
    backup_id = out.strip()
    assert f"backup {backup_id} complete" in err
    (row,) = listed(dest)
    assert (row["id"], row["engine"], row["source"], row["devices"]) == (
        backup_id,
        "external",
        "external:feedme",
        4,
    )
    manifest = json.loads((dest / backup_id / "manifest.json").read_text())
    assert manifest["logical_bytes"] == sum(d["bytes"] for d in manifest["devices"])
    assert not (rt / "feedme.sock").exists()

    restore = start(
        "restore", dest / backup_id, "external:drainme", "--runtime-dir", rt, "--wait", "20"
    )
    wait_for(rt / "drainme.sock", restore)
    out_file = tmp_path / "restored.bin"
    with out_file.open("wb") as sink:
        drained = subprocess.run(
            cli("drain", "drainme", "--runtime-dir", rt),
            stdout=sink,
            stderr=subprocess.PIPE,
            timeout=60,
        )
    assert (drained.returncode, drained.stderr) == (0, b"")
    code, out, err = finish(restore)
    assert code == 0, err
    assert out == ""
    digest = hashlib.sha256(source.read_bytes()).hexdigest()
    assert hashlib.sha256(out_file.read_bytes()).hexdigest() == digest
    assert out_file.stat().st_size == 8 * 1024 * 1024


def test_drain_into_a_pipe(tmp_path: Path) -> None:
    """``drain NAME | COMMAND``: a non-blocking pipe, written from the event loop."""
    rt, dest = tmp_path / "rt", tmp_path / "dest"
    data = os.urandom(3 * 1024 * 1024 + 7)
    (tmp_path / "data.bin").write_bytes(data)
    made = subprocess.run(
        cli("backup", f"cmd:cat {tmp_path / 'data.bin'}", dest, "--devices", "2"),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert made.returncode == 0, made.stderr
    backup_id = made.stdout.strip()
    restore = start("restore", dest / backup_id, "external:piped", "--runtime-dir", rt)
    wait_for(rt / "piped.sock", restore)
    drain = " ".join(shlex.quote(a) for a in cli("drain", "piped", "--runtime-dir", rt))
    drained = subprocess.run(
        f"{drain} | sha256sum", shell=True, capture_output=True, text=True, timeout=60
    )
    assert drained.returncode == 0, drained.stderr
    assert drained.stdout.split()[0] == hashlib.sha256(data).hexdigest()
    code, _, err = finish(restore)
    assert code == 0, err


def test_a_backup_nobody_feeds_fails_after_its_wait_and_keeps_nothing(tmp_path: Path) -> None:
    rt, dest = tmp_path / "rt", tmp_path / "dest"
    started = time.monotonic()
    done = subprocess.run(
        cli("backup", "external:lonely", dest, "--runtime-dir", rt, "--wait", "1"),
        capture_output=True,
        text=True,
        timeout=30,
    )
    elapsed = time.monotonic() - started
    assert done.returncode == 1
    assert done.stdout == ""
    (line,) = done.stderr.splitlines()
    assert line.startswith("vdistream: backup failed (failed): ")
    assert "no engine opened the set 'lonely' within 1 s" in line
    assert str(rt / "lonely.sock") in line
    assert "vdistream feed lonely" in line
    assert 1.0 <= elapsed < 8.0
    assert listed(dest) == []
    assert stream_files(dest) == []
    assert sorted(os.listdir(rt)) == []  # unpublished: no socket, no lock


def test_feed_of_a_set_nobody_published_fails_in_one_line(tmp_path: Path) -> None:
    done = subprocess.run(
        cli("feed", "ghost", "--runtime-dir", tmp_path / "rt"),
        input=b"data",
        capture_output=True,
        timeout=30,
    )
    assert done.returncode == 1
    assert done.stdout == b""
    (line,) = done.stderr.decode().splitlines()
    assert line.startswith("vdistream: error: ")
    assert "ghost" in line
    assert "Traceback" not in line
    assert "VD_E_" not in line


def test_feed_refuses_a_set_with_another_device_count(tmp_path: Path) -> None:
    rt, dest = tmp_path / "rt", tmp_path / "dest"
    backup = start("backup", "external:pair", dest, "--devices", "2", "--runtime-dir", rt)
    wait_for(rt / "pair.sock", backup)
    fed = subprocess.run(
        cli("feed", "pair", "--devices", "4", "--runtime-dir", rt),
        input=b"x" * 1000,
        capture_output=True,
        timeout=30,
    )
    assert fed.returncode == 2
    (line,) = fed.stderr.decode().splitlines()
    assert (
        line
        == "vdistream: error: --devices 4: the set 'pair' has 2 devices (its backup was aborted)"
    )
    code, out, _err = finish(backup)
    assert code == 1
    assert out == ""
    assert listed(dest) == []
    assert stream_files(dest) == []


def test_kill_9_of_the_feed_fails_the_backup_at_once_and_keeps_nothing(tmp_path: Path) -> None:
    rt, dest = tmp_path / "rt", tmp_path / "dest"
    backup = start("backup", "external:victim", dest, "--devices", "2", "--runtime-dir", rt)
    wait_for(rt / "victim.sock", backup)
    feeder = subprocess.Popen(
        cli("feed", "victim", "--runtime-dir", rt),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert feeder.stdin is not None
    chunk = os.urandom(1 << 20)
    for _ in range(6):  # taken only as the backup stores it: the feed is mid-stream
        feeder.stdin.write(chunk)
        feeder.stdin.flush()
    deadline = time.monotonic() + 10
    while sum(p.stat().st_size for p in stream_files(dest)) < (2 << 20):
        assert time.monotonic() < deadline, "the backup did not start storing"
        time.sleep(0.01)
    os.kill(feeder.pid, signal.SIGKILL)
    killed = time.monotonic()
    code, out, err = finish(backup, within=10)
    ended = time.monotonic() - killed
    feeder.communicate(timeout=5)  # reaped, its pipes closed
    assert feeder.returncode == -signal.SIGKILL
    assert code == 1
    assert out == ""
    assert ended < 2.0, ended  # aborted within about a second, cleanup included
    (line,) = err.splitlines()
    assert line.startswith("vdistream: backup failed (failed): the set 'victim' was aborted: ")
    assert f"pid {feeder.pid}" in line  # the host names the engine that went away
    assert listed(dest) == []
    assert [p for p in stream_files(dest) if p.suffix in (".vdi", ".json")] == []
    assert not (rt / "victim.sock").exists()


def test_drain_with_a_larger_block_size_than_the_backups_says_what_to_give(
    tmp_path: Path,
) -> None:
    """A backup written with BLOCKSIZE 4K whose second device holds only its header
    and trailer (8 KiB), drained with the default 64K: the one line says what to do."""
    rt, dest = tmp_path / "rt", tmp_path / "dest"
    (tmp_path / "data.bin").write_bytes(os.urandom(100_000))
    made = subprocess.run(
        cli(
            "backup",
            f"cmd:cat {tmp_path / 'data.bin'}",
            dest,
            "--devices",
            "2",
            "--block-size",
            "4K",
        ),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert made.returncode == 0, made.stderr
    restore = start("restore", dest / made.stdout.strip(), "external:bs", "--runtime-dir", rt)
    wait_for(rt / "bs.sock", restore)
    drained = subprocess.run(
        cli("drain", "bs", "--runtime-dir", rt), capture_output=True, text=True, timeout=60
    )
    assert drained.returncode == 1
    (line,) = drained.stderr.splitlines()
    assert "give" in line, line
    assert "--block-size" in line, line
    code, _, err = finish(restore)
    assert code == 1, err
