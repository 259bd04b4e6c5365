"""Review of the user-facing side of sets across processes (``vdistream feed``/``drain``,
``external:NAME``), with real processes and sockets: an abort on the other side ends a
feed waiting for its input and a drain waiting for its reader at once; ``drain`` into a
pipe whose reader went away is quiet (exit 141, as SIGPIPE); a terminal on ``feed``'s
stdin and a NAME that is no set name are usage errors (exit 2) told before anything is
published or opened; a feed's or drain's error says which side did what, and a full
disk or a runtime directory that cannot be made in plain words."""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from vdistream.cli.external import _failed
from vdistream.engines.base import EngineAbortedError, StreamFormatError

VDISTREAM = [sys.executable, "-m", "vdistream"]


def cli(*args: str | Path) -> list[str]:
    return [*VDISTREAM, *(str(a) for a in args)]


def start(*args: str | Path, **kwargs: object) -> subprocess.Popen[bytes]:
    kwargs.setdefault("stdout", subprocess.PIPE)
    kwargs.setdefault("stderr", subprocess.PIPE)
    return subprocess.Popen(cli(*args), **kwargs)  # type: ignore[call-overload, no-any-return]


def wait_for(path: Path, process: subprocess.Popen[bytes], within: float = 10.0) -> None:
    deadline = time.monotonic() + within
    while not path.exists():
        if process.poll() is not None:
            pytest.fail(f"exited {process.returncode} before publishing {path}")
        assert time.monotonic() < deadline, f"{path} did not appear"
        time.sleep(0.01)


def ended(process: subprocess.Popen[bytes], within: float) -> tuple[int, bytes, bytes]:
    try:
        out, err = process.communicate(timeout=within)
    except subprocess.TimeoutExpired:
        process.kill()
        process.communicate()
        pytest.fail(f"still running {within} s later")
    return process.returncode, out, err


def a_backup(tmp_path: Path, size: int) -> Path:
    """A backup of ``size`` random bytes made by the cmd: engine; its location."""
    data = tmp_path / "data.bin"
    data.write_bytes(os.urandom(size))
    dest = tmp_path / "dest"
    made = subprocess.run(
        cli("backup", f"cmd:cat {data}", dest, "--devices", "2"),
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert made.returncode == 0, made.stderr
    return dest / made.stdout.strip()


def test_feed_waiting_for_silent_input_ends_at_once_when_the_backup_is_interrupted(
    tmp_path: Path,
) -> None:
    rt, dest = tmp_path / "rt", tmp_path / "dest"
    backup = start("backup", "external:quiet", dest, "--runtime-dir", rt)
    wait_for(rt / "quiet.sock", backup)
    feeder = start("feed", "quiet", "--runtime-dir", rt, stdin=subprocess.PIPE)
    assert feeder.stdin is not None
    feeder.stdin.write(os.urandom(1 << 20))  # then nothing, the pipe left open
    feeder.stdin.flush()
    deadline = time.monotonic() + 10
    while not any(p.name.startswith(".stream-") for p in dest.rglob("*")):
        assert time.monotonic() < deadline, "the backup did not start"
        time.sleep(0.01)
    time.sleep(0.2)
    backup.send_signal(signal.SIGTERM)
    code, out, err = ended(backup, 10)
    assert (code, out) == (143, b"")
    stopped = time.monotonic()
    code, _, err = ended(feeder, 5)
    assert time.monotonic() - stopped < 1.0  # not when its writer next writes
    feeder.stdin.close()
    assert code == 1
    (line,) = err.decode().splitlines()
    assert line.startswith("vdistream: error: the set was aborted: the backup that published")
    assert "client" not in line
    assert sorted(os.listdir(rt)) == []
    assert [p for p in dest.rglob("*") if p.is_file()] == []


def test_drain_to_a_reader_that_stopped_reading_ends_at_once_when_the_restore_is_interrupted(
    tmp_path: Path,
) -> None:
    backup = a_backup(tmp_path, 6 << 20)
    rt = tmp_path / "rt"
    restore = start("restore", backup, "external:stalled", "--runtime-dir", rt)
    wait_for(rt / "stalled.sock", restore)
    read_end, write_end = os.pipe()  # nobody reads: drain fills it and waits
    try:
        drainer = start("drain", "stalled", "--runtime-dir", rt, stdout=write_end)
        os.close(write_end)
        time.sleep(0.8)
        assert drainer.poll() is None
        restore.send_signal(signal.SIGTERM)
        code, _, _ = ended(restore, 10)
        assert code == 143
        stopped = time.monotonic()
        code, _, err = ended(drainer, 5)
        assert time.monotonic() - stopped < 1.0  # not when its reader next reads
    finally:
        os.close(read_end)
    assert code == 1
    (line,) = err.decode().splitlines()
    assert line.startswith("vdistream: error: the set was aborted: the restore that published")
    assert sorted(os.listdir(rt)) == []


def test_drain_into_a_pipe_closed_early_is_quiet_like_a_unix_tool(tmp_path: Path) -> None:
    backup = a_backup(tmp_path, 3 << 20)
    rt = tmp_path / "rt"
    restore = start("restore", backup, "external:headed", "--runtime-dir", rt)
    wait_for(rt / "headed.sock", restore)
    drain = shlex.join(cli("drain", "headed", "--runtime-dir", rt))
    piped = subprocess.run(
        [
            "bash",
            "-c",
            f"{drain} 2>{tmp_path / 'err'} | head -c 10 | wc -c; echo ${{PIPESTATUS[0]}}",
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert piped.stdout.split() == ["10", "141"]  # exit 141 as if SIGPIPE killed it
    assert (tmp_path / "err").read_text() == ""  # and nothing said: the reader chose
    code, out, err = ended(restore, 10)
    assert (code, out) == (1, b"")
    (line,) = err.decode().splitlines()  # the restore did not complete: it says so
    assert line == (
        "vdistream: restore failed: the set 'headed' was aborted: the engine in the other "
        "process aborted it (its own output says why)"
    )
    assert sorted(os.listdir(rt)) == []


def test_feed_from_a_terminal_is_a_usage_error(tmp_path: Path) -> None:
    primary, secondary = os.openpty()
    try:
        done = subprocess.run(
            cli("feed", "tty", "--runtime-dir", tmp_path / "rt"),
            stdin=secondary,
            capture_output=True,
            timeout=30,
        )
    finally:
        os.close(secondary)
        os.close(primary)
    assert done.returncode == 2
    (line,) = done.stderr.decode().splitlines()
    assert line.startswith("vdistream: error: standard input is a terminal")
    assert not (tmp_path / "rt").exists()


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (("backup", "external:a/b", "DEST"), "'a/b' must not contain '/'"),
        (("backup", "external:.x", "DEST"), "'.x' must not contain '/', '\\' or NUL, nor start"),
        (("restore", "DEST/x", "external:" + "n" * 101), "must be 1..100 bytes of UTF-8"),
        (("backup", "external:" + "n" * 100, "DEST"), "more than a Unix socket address holds"),
        (("feed", "a/b"), "'a/b' must not contain '/'"),
        (("drain", "n" * 100), "more than a Unix socket address holds"),
    ],
)
def test_a_name_that_cannot_be_published_is_a_usage_error(
    tmp_path: Path, args: tuple[str, ...], words: str
) -> None:
    rt, dest = tmp_path / "rt", tmp_path / "dest"
    argv = [a.replace("DEST", str(dest)) for a in args]
    done = subprocess.run(
        cli(*argv, "--runtime-dir", rt),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        timeout=30,
    )
    assert done.returncode == 2
    (line,) = done.stderr.decode().splitlines()
    assert line.startswith("vdistream: error: ")
    assert words in line
    assert not rt.exists()
    assert not dest.exists()


def test_feed_and_drain_errors_say_which_side_did_what() -> None:
    aborted = EngineAbortedError(
        "the set was aborted", set_name="s", reason="the client signalled abort"
    )
    assert str(_failed("s", aborted, "backup")) == (
        "the set was aborted: the backup that published it aborted it (its output says why) "
        "(set 's')"
    )
    wrong = StreamFormatError(
        "the backup was written with BLOCKSIZE=4096, this restore uses 65536",
        set_name="r",
        device="r",
    )
    text = str(_failed("r", wrong, "restore"))
    assert "this restore uses 65536 (give --block-size 4096)" in text


def test_a_runtime_dir_that_cannot_be_made_is_one_line_in_plain_words(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    rt, dest = tmp_path / "file" / "rt", tmp_path / "dest"
    done = subprocess.run(
        cli("backup", "external:here", dest, "--runtime-dir", rt, "--wait", "1"),
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert (done.returncode, done.stdout) == (1, "")
    (line,) = done.stderr.splitlines()
    assert line == (
        f"vdistream: backup failed (failed): cannot publish the set 'here' at "
        f"{rt / 'here.sock'}: {rt}: Not a directory"
    )


def test_drain_to_a_full_disk_says_so_in_plain_words(tmp_path: Path) -> None:
    backup = a_backup(tmp_path, 1 << 20)
    rt = tmp_path / "rt"
    restore = start("restore", backup, "external:full", "--runtime-dir", rt)
    wait_for(rt / "full.sock", restore)
    with open("/dev/full", "wb") as full:
        drained = subprocess.run(
            cli("drain", "full", "--runtime-dir", rt), stdout=full, stderr=subprocess.PIPE
        )
    assert drained.returncode == 1
    assert drained.stderr.decode().splitlines() == [
        "vdistream: error: cannot write to standard output: No space left on device "
        "(set 'full'; the restore was aborted)"
    ]
    code, _, _ = ended(restore, 10)
    assert code == 1
    assert sorted(os.listdir(rt)) == []


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_backup_interrupted_while_it_waits_for_its_engine_leaves_nothing(
    tmp_path: Path, signum: signal.Signals
) -> None:
    rt, dest = tmp_path / "rt", tmp_path / "dest"
    backup = start("backup", "external:waiting", dest, "--runtime-dir", rt)
    wait_for(rt / "waiting.sock", backup)
    backup.send_signal(signum)
    code, out, err = ended(backup, 10)
    assert (code, out) == (128 + signum, b"")
    assert err.decode().splitlines() == [
        f"vdistream: interrupted by {signum.name}; the backup was aborted and nothing was kept"
    ]
    assert sorted(os.listdir(rt)) == []  # no socket, no lock
    assert [p for p in dest.rglob("*")] == []  # no backup directory, no temporaries
    # and the name is free at once
    again = start("backup", "external:waiting", dest, "--runtime-dir", rt, "--wait", "1")
    code, _, err = ended(again, 10)
    assert code == 1
    assert "no engine opened the set 'waiting' within 1 s" in err.decode()
