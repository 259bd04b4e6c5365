"""SIGTERM, SIGHUP and SIGINT to a running ``vdistream backup``: the same clean abort
as Ctrl-C (nothing kept in DEST, not even a hidden temporary; the producer gone), one
line on stderr, exit 128 + the signal's number. Real subprocesses, real signals."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.daemon.conftest import SLOW_SOURCE

pytestmark = pytest.mark.timeout(120)


def _start(tmp_path: Path, *, stubborn: bool = False) -> tuple[subprocess.Popen[str], Path, Path]:
    dest, pid_file = tmp_path / "dest", tmp_path / "producer.pid"
    flag = " --stubborn" if stubborn else ""
    # sh writes its pid, then exec's the producer in its place: the pid is the producer's
    producer = (
        f"cmd:sh -c 'echo $$ > {pid_file}; "
        f"exec {sys.executable} {SLOW_SOURCE} 100000000000 20000000{flag}'"
    )
    process = subprocess.Popen(
        [sys.executable, "-m", "vdistream", "backup", producer, str(dest)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 30
    while not (pid_file.exists() and any(p.is_file() for p in dest.rglob("*"))):
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, "the backup never started writing"
        time.sleep(0.05)
    time.sleep(0.3)  # some megabytes in flight
    return process, dest, pid_file


def _gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] == "Z"  # a zombie is gone
    except FileNotFoundError:
        return True


def _assert_clean(dest: Path, pid_file: Path) -> None:
    assert sorted(str(p.relative_to(dest)) for p in dest.rglob("*")) == []
    pid = int(pid_file.read_text())
    deadline = time.monotonic() + 10
    while not _gone(pid):
        assert time.monotonic() < deadline, f"the producer {pid} outlived the backup"
        time.sleep(0.05)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP, signal.SIGINT])
def test_a_signal_aborts_the_backup_cleanly(tmp_path: Path, signum: signal.Signals) -> None:
    process, dest, pid_file = _start(tmp_path)
    process.send_signal(signum)
    stdout, stderr = process.communicate(timeout=60)
    assert process.returncode == 128 + signum, stderr
    assert stderr.splitlines() == [
        f"vdistream: interrupted by {signum.name}; the backup was aborted and nothing was kept"
    ]
    assert stdout == ""
    _assert_clean(dest, pid_file)


def test_more_signals_during_the_cleanup_change_nothing(tmp_path: Path) -> None:
    """A producer that ignores SIGTERM keeps the abort busy for the engine's grace
    (SIGKILL after 5 s); signals meanwhile neither cut it short nor print a traceback."""
    process, dest, pid_file = _start(tmp_path, stubborn=True)
    started = time.monotonic()
    process.send_signal(signal.SIGTERM)
    for again in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        time.sleep(0.4)
        if process.poll() is None:
            process.send_signal(again)
    _stdout, stderr = process.communicate(timeout=60)
    assert time.monotonic() - started > 1  # the cleanup really was under way
    assert process.returncode == 143, stderr
    assert stderr.splitlines() == [
        "vdistream: interrupted by SIGTERM; the backup was aborted and nothing was kept"
    ]
    _assert_clean(dest, pid_file)


def test_main_in_process_leaves_handlers_and_logging_as_it_found_them(tmp_path: Path) -> None:
    """The handlers (and the logging setup of ``-v``) exist only while a command runs."""
    import logging

    import structlog

    from vdistream.cli import main

    def mine(signum: int, frame: object) -> None:
        raise AssertionError("not expected")

    before = {s: signal.signal(s, mine) for s in (signal.SIGTERM, signal.SIGHUP)}
    handlers = logging.getLogger().handlers[:]
    configured = structlog.is_configured()
    try:
        assert main(["list", str(tmp_path), "-vv"]) == 0
        assert main(["list", str(tmp_path / "missing")]) == 1
        assert signal.getsignal(signal.SIGTERM) is mine
        assert signal.getsignal(signal.SIGHUP) is mine
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
        assert logging.getLogger().handlers == handlers
        assert logging.root.manager.disable == logging.NOTSET
        assert structlog.is_configured() == configured
    finally:
        for signum, handler in before.items():
            signal.signal(signum, handler)
