"""No child of vdistream outlives it, even after ``kill -9``; the daemon's ledger ends
what survived a previous run, and only what is provably its own.

Real processes throughout: the CLI as a subprocess killed with SIGKILL, producers and
consumers that write their pid to a file, process groups made with ``setsid``.
"""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import anyio
import pytest

import vdistream
from vdistream.engines.ledger import ChildLedger
from vdistream.engines.process import (
    CHILD_ID_VARIABLE,
    ORPHANED_AT_START,
    ChildRecord,
    ProcessProducer,
    group_members,
    observe_children,
    pdeathsig_launcher,
    reset_child_observer,
    run_tool,
)
from vdistream.ownership import process_start_time

REPO = Path(__file__).resolve().parents[2]
SLOW_SOURCE = REPO / "tests" / "daemon" / "slow_source.py"
JOB = vdistream.JobOptions(devices=2)


def running(pid: int, start_time: int | None) -> bool:
    """``pid`` is still the process that started at ``start_time`` and not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    state = stat[stat.rindex(")") + 2 :].split()[0]
    return state not in ("Z", "X") and process_start_time(pid) == start_time


def wait_pidfile(path: Path, proc: subprocess.Popen[bytes], timeout: float = 20.0) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = path.read_text().strip() if path.exists() else ""
        if text.isdigit():
            return int(text)
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else b""
        time.sleep(0.02)
    raise AssertionError(f"no pid in {path} after {timeout} s")


def wait_gone(pid: int, start_time: int | None, timeout: float = 2.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not running(pid, start_time):
            return True
        time.sleep(0.02)
    return not running(pid, start_time)


@pytest.fixture
def reaper() -> Iterator[list[int]]:
    """Pids to SIGKILL at the end of the test, whatever happened (nothing left behind)."""
    pids: list[int] = []
    yield pids
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "vdistream", *args],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        cwd=REPO,
        env={**os.environ, **(env or {})},
    )


def kill9(proc: subprocess.Popen[bytes]) -> None:
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)
    if proc.stderr is not None:
        proc.stderr.close()


# --- kill -9 of the command line -----------------------------------------------------


def test_kill_9_of_a_cli_backup_leaves_no_producer(tmp_path: Path, reaper: list[int]) -> None:
    pidfile = tmp_path / "producer.pid"
    script = f"echo $$ > {pidfile}; exec {sys.executable} {SLOW_SOURCE} 10000000000 2000000"
    producer = f"sh -c {shlex.quote(script)}"
    proc = cli("backup", f"cmd:{producer}", str(tmp_path / "dest"))
    pid = wait_pidfile(pidfile, proc)
    reaper.append(pid)
    started = process_start_time(pid)
    assert running(pid, started)
    time.sleep(0.3)  # bytes flow
    kill9(proc)
    assert wait_gone(pid, started), "the producer outlived the killed CLI"


def test_kill_9_of_a_cli_restore_leaves_no_consumer(tmp_path: Path, reaper: list[int]) -> None:
    store = tmp_path / "store"
    source = "cmd:head -c 12000000 /dev/urandom"
    made = subprocess.run(
        [sys.executable, "-m", "vdistream", "backup", "--id", "big", source, str(store)],
        capture_output=True,
        cwd=REPO,
        check=False,
    )
    assert made.returncode == 0, made.stderr
    pidfile = tmp_path / "consumer.pid"
    # It never reads: the restore blocks on the full pipe, the consumer waits forever.
    consumer = f"sh -c {shlex.quote(f'echo $$ > {pidfile}; exec sleep 1000')}"
    proc = cli("restore", str(store / "big"), f"cmd:{consumer}")
    pid = wait_pidfile(pidfile, proc)
    reaper.append(pid)
    started = process_start_time(pid)
    time.sleep(0.3)
    assert proc.poll() is None
    kill9(proc)
    assert wait_gone(pid, started), "the consumer outlived the killed CLI"


# --- how children are started --------------------------------------------------------


@pytest.mark.asyncio
async def test_children_lead_their_own_process_group_and_keep_their_pid(tmp_path: Path) -> None:
    producer = ProcessProducer(
        ["sh", "-c", "echo $$; cut -d' ' -f5 /proc/$$/stat; exec cat /dev/null"]
    )
    buffer = bytearray(1024)
    got = b""
    async with producer.running():
        while count := await producer.readinto(memoryview(buffer)):
            got += bytes(buffer[:count])
    pid_seen, pgid_seen = (int(line) for line in got.split())
    assert producer.pid == pid_seen == pgid_seen  # the shim exec'd, no extra process


def test_the_parent_death_signal_is_set_and_the_shim_checks_its_parent(tmp_path: Path) -> None:
    launcher = anyio.run(pdeathsig_launcher)
    assert launcher is not None, "setpriv (util-linux) is expected on the test machine"
    # The shim's parent is not the pid it was given (vdistream died before prctl):
    # the command never runs.
    probe = subprocess.run(
        [*launcher, "1", "sh", "-c", "echo ran"], capture_output=True, check=False
    )
    assert probe.returncode == ORPHANED_AT_START
    assert probe.stdout == b""
    # The real thing: a child of a process that dies by SIGKILL dies with it.
    pidfile = tmp_path / "tool.pid"
    script = (
        "import anyio, sys\n"
        "from vdistream.engines.process import run_tool\n"
        f"argv = ['sh', '-c', 'echo $$ > {pidfile}; exec sleep 1000']\n"
        "anyio.run(lambda: run_tool(argv))\n"
    )
    parent = subprocess.Popen([sys.executable, "-c", script], stderr=subprocess.PIPE, cwd=REPO)
    pid = wait_pidfile(pidfile, parent)
    started = process_start_time(pid)
    try:
        kill9(parent)
        assert wait_gone(pid, started), "run_tool's child outlived its killed parent"
    finally:
        if running(pid, started):
            os.kill(pid, signal.SIGKILL)


@pytest.mark.asyncio
async def test_a_missing_program_still_cannot_be_started(tmp_path: Path) -> None:
    from vdistream.engines.process import ToolFailedError

    with pytest.raises(ToolFailedError, match="cannot be started: No such file or directory"):
        await run_tool(["no-such-program-vdistream"])
    script = tmp_path / "not-executable"
    script.write_text("#!/bin/sh\n")
    with pytest.raises(ToolFailedError, match="cannot be started: Permission denied"):
        await run_tool([str(script)])
    # Found relative to the child's working directory, as subprocess does.
    script.chmod(0o755)
    assert (await run_tool(["./not-executable"], cwd=tmp_path)).bytes == 0


class Recorder:
    def __init__(self) -> None:
        self.started: list[ChildRecord] = []
        self.ended: list[ChildRecord] = []

    async def child_started(self, child: ChildRecord) -> None:
        self.started.append(child)

    async def child_ended(self, child: ChildRecord) -> None:
        self.ended.append(child)


@pytest.mark.asyncio
async def test_an_observer_sees_every_child_start_and_end_with_its_token() -> None:
    recorder = Recorder()
    token = observe_children(recorder)
    try:
        # (It lives a moment: the start time of a child gone at once is unknown.)
        output = await run_tool(["sh", "-c", f'printf %s "${CHILD_ID_VARIABLE}"; sleep 0.3'])
    finally:
        reset_child_observer(token)
    (child,) = recorder.started
    assert recorder.ended == [child]
    assert output.stdout == child.token
    assert child.start_time is not None
    # Without an observer the environment stays the caller's.
    output = await run_tool(["sh", "-c", f'printf %s "${CHILD_ID_VARIABLE}"'])
    assert output.stdout == ""


# --- the ledger --------------------------------------------------------------------


def setsid_process(argv: list[str], env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    """A process leading a group of its own, without any parent-death signal."""
    return subprocess.Popen(
        argv,
        start_new_session=True,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        env={**os.environ, **(env or {})},
    )


def test_ledger_ends_a_recorded_group_whose_leader_still_runs(tmp_path: Path) -> None:
    ledger = ChildLedger(tmp_path / "children")
    leader = setsid_process(["sh", "-c", "sleep 1000 & sleep 1000; wait"])
    try:
        record = ChildRecord(leader.pid, process_start_time(leader.pid), "t" * 32, ("sh",))
        ledger.record(record)
        deadline = time.monotonic() + 5
        while len(group_members(leader.pid)) < 3 and time.monotonic() < deadline:
            time.sleep(0.02)
        members = group_members(leader.pid)
        assert len(members) == 3
        (survivor,) = ledger.end_survivors()
        assert survivor.pgid == leader.pid
        assert survivor.ended
        assert leader.wait(5) == -signal.SIGTERM
        assert group_members(leader.pid) == []  # the whole group, not only the leader
        assert list((tmp_path / "children").iterdir()) == []
    finally:
        if leader.poll() is None:
            os.killpg(leader.pid, signal.SIGKILL)
            leader.wait()


def test_ledger_ends_members_carrying_the_token_when_the_leader_is_gone(tmp_path: Path) -> None:
    ledger = ChildLedger(tmp_path / "children")
    token = "a" * 32
    pidfile = tmp_path / "pid"
    # The leader starts a stubborn grandchild and exits (as after its parent-death
    # signal): a group without its leader.
    leader = setsid_process(
        ["sh", "-c", f"sh -c 'trap \"\" TERM; sleep 1000' & echo $! > {pidfile}"],
        env={CHILD_ID_VARIABLE: token},
    )
    started = process_start_time(leader.pid)
    assert leader.wait(5) == 0
    grandchild = int(pidfile.read_text())
    grandchild_started = process_start_time(grandchild)
    try:
        deadline = time.monotonic() + 5  # the trap is set once sleep runs
        while len(group_members(leader.pid)) < 2 and time.monotonic() < deadline:
            time.sleep(0.02)
        ledger.record(ChildRecord(leader.pid, started, token, ("sh", "-c", "...")))
        (survivor,) = ledger.end_survivors(grace=0.5)
        assert grandchild in survivor.pids
        assert survivor.signal == "SIGKILL"  # it ignored SIGTERM
        assert survivor.ended
        assert not running(grandchild, grandchild_started)
    finally:
        for pid in group_members(leader.pid):
            os.kill(pid, signal.SIGKILL)


def test_ledger_never_ends_a_process_that_only_reuses_a_recorded_pid(tmp_path: Path) -> None:
    ledger = ChildLedger(tmp_path / "children")
    # A live group leader that is not ours: the recorded start time is another one
    # (the pid was reused), and it does not carry the recorded token.
    stranger = setsid_process(["sleep", "1000"], env={CHILD_ID_VARIABLE: "other"})
    try:
        started = process_start_time(stranger.pid)
        assert started is not None
        ledger.record(ChildRecord(stranger.pid, started - 1, "b" * 32, ("sleep", "1000")))
        assert ledger.end_survivors(grace=0.2) == []
        time.sleep(0.2)
        assert stranger.poll() is None
        assert list((tmp_path / "children").iterdir()) == []  # the stale entry is gone
    finally:
        stranger.kill()
        stranger.wait()


@pytest.mark.asyncio
async def test_ledger_records_a_running_child_and_forgets_it_when_it_ends(tmp_path: Path) -> None:
    ledger = ChildLedger(tmp_path / "children")
    token = observe_children(ledger)
    seen: list[str] = []
    try:
        producer = ProcessProducer(["sh", "-c", "head -c 1000 /dev/zero"])
        buffer = bytearray(4096)
        async with producer.running():
            await producer.readinto(memoryview(buffer))
            seen = [p.name for p in (tmp_path / "children").iterdir()]
            while await producer.readinto(memoryview(buffer)):
                pass
    finally:
        reset_child_observer(token)
    assert len(seen) == 1
    assert seen[0].startswith(f"{producer.pid}-")
    assert list((tmp_path / "children").iterdir()) == []
