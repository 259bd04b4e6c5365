"""The generic engine: a command's stdout as a backup, a command's stdin as a restore.

Real subprocesses; what is checked is what a user relies on: a tar of a tree comes back
file for file, a failing or killed tool fails the job with its own words and exit
status and leaves no backup behind, an abort or a cancellation leaves no process.
"""

from __future__ import annotations

import os
import random
import signal
from pathlib import Path

import anyio
import pytest

import vdistream
from tests.databases.conftest import OPTIONS, tree
from vdistream.engines import (
    BytesConsumer,
    CommandBackup,
    CommandRestore,
    ConsumerFailedError,
    ProducerFailedError,
    ScopedRestore,
    content_check,
    resolve_source,
    restore_engine,
)
from vdistream.engines.process import group_alive
from vdistream.errors import ConfigError

pytestmark = pytest.mark.asyncio

JOB = vdistream.JobOptions(devices=4)


def make_tree(root: Path, seed: int = 7) -> None:
    """Several subdirectories and files of random sizes (some empty, some > 1 MiB)."""
    rng = random.Random(seed)
    for d in range(4):
        sub = root / f"dir{d}" / ("deep" if d % 2 else "")
        sub.mkdir(parents=True, exist_ok=True)
        for f in range(5):
            size = rng.choice([0, 1, 4095, 65536, rng.randrange(1, 1_500_000)])
            (sub / f"file {f}.bin").write_bytes(rng.randbytes(size))
    (root / "top.txt").write_text("hello\n")


def gone(pid: int) -> bool:
    """The process was reaped and nothing of its group runs any more (a zombie that
    init has not reaped yet is dead, not running)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return not group_alive(pid)
    return False


async def test_tar_of_a_tree_comes_back_file_for_file(tmp_path: Path) -> None:
    source = tmp_path / "source"
    make_tree(source)
    store = tmp_path / "store"
    backup = resolve_source(f"cmd:tar -C '{source}' -cf - .").backup_engine(OPTIONS)
    result = await vdistream.backup(backup, str(store), backup_id="t", options=JOB)
    assert result.ok, result.error
    assert all(device.bytes > 0 for device in result.devices)

    target = tmp_path / "restored dir"
    target.mkdir()
    restore = restore_engine("cmd", None, f"tar -x -C '{target}'", OPTIONS)
    restored = await vdistream.restore(restore, str(store), "t", options=JOB)
    assert restored.ok, restored.error
    assert tree(target) == tree(source)
    assert len(tree(source)) == 21


async def test_producer_failing_halfway_fails_the_job(tmp_path: Path) -> None:
    command = "sh -c 'head -c 3000000 /dev/urandom; echo \"disk on fire\" >&2; exit 3'"
    engine = resolve_source(f"cmd:{command}").backup_engine(OPTIONS)
    result = await vdistream.backup(engine, str(tmp_path), options=JOB)
    assert result.status is vdistream.JobStatus.FAILED
    assert isinstance(result.error, ProducerFailedError)
    assert result.error.returncode == 3
    message = str(result.error)
    assert "exited with status 3 after 3000000 bytes" in message
    assert "disk on fire" in message
    assert result.error.set_name is not None
    assert result.error.set_name not in message  # an internal name, never shown
    assert tree(tmp_path) == {}  # nothing committed, nothing temporary left
    assert gone(engine.process.pid)  # type: ignore[attr-defined]


async def test_producer_killed_by_a_signal_fails_the_job(tmp_path: Path) -> None:
    engine = CommandBackup("sh -c 'head -c 2000000 /dev/urandom; kill -KILL $$'", OPTIONS)
    result = await vdistream.backup(engine, str(tmp_path), options=JOB)
    assert not result.ok
    assert isinstance(result.error, ProducerFailedError)
    assert result.error.returncode == -signal.SIGKILL
    assert "was killed by signal SIGKILL (9)" in str(result.error)
    assert tree(tmp_path) == {}


async def test_fail_on_stderr(tmp_path: Path) -> None:
    command = "sh -c 'echo \"warning: something odd\" >&2; sleep 0.2; head -c 600000 /dev/zero'"
    result = await vdistream.backup(
        CommandBackup(command, OPTIONS, fail_on_stderr=True), str(tmp_path), options=JOB
    )
    assert not result.ok
    assert isinstance(result.error, ProducerFailedError)
    assert "wrote to its standard error: warning: something odd" in str(result.error)
    assert tree(tmp_path) == {}
    # By default stderr is only reported, and an exit status of 0 is a success.
    result = await vdistream.backup(CommandBackup(command, OPTIONS), str(tmp_path), options=JOB)
    assert result.ok, result.error


async def test_program_that_does_not_exist(tmp_path: Path) -> None:
    result = await vdistream.backup(
        resolve_source("cmd:no-such-program-vdistream --flag").backup_engine(OPTIONS),
        str(tmp_path),
        options=JOB,
    )
    assert isinstance(result.error, ProducerFailedError)
    assert "no-such-program-vdistream --flag: cannot be started: No such file" in str(result.error)


@pytest.mark.parametrize(
    ("command", "returncode"),
    [
        ("sh -c 'while :; do head -c 65536 /dev/zero; sleep 0.01; done'", -signal.SIGTERM),
        # It ignores SIGTERM (so do its children): SIGKILL after terminate_timeout.
        ("sh -c 'trap \"\" TERM; while :; do head -c 65536 /dev/zero; sleep 0.01; done'", -9),
    ],
    ids=["sigterm", "sigkill"],
)
async def test_abort_terminates_and_reaps_the_process(
    tmp_path: Path, command: str, returncode: int
) -> None:
    engine = CommandBackup(command, OPTIONS, terminate_timeout=0.5)
    job = vdistream.Job(vdistream.JobKind.BACKUP, engine, str(tmp_path), options=JOB)
    async with anyio.create_task_group() as tg:

        async def abort_when_flowing() -> None:
            # Polling: the producer offers no event for "this many bytes read".
            while engine.process.bytes_read < 300_000:  # noqa: ASYNC110
                await anyio.sleep(0.02)
            job.abort("the operator changed their mind")

        tg.start_soon(abort_when_flowing)
        # The producer never ends by itself: only the abort and its terminate (SIGTERM,
        # SIGKILL 0.5 s later) end the job. Wait for that, bounded.
        with anyio.fail_after(20, reason="the aborted producer was not terminated"):
            result = await job.run()
    assert result.status is vdistream.JobStatus.ABORTED
    assert engine.process.returncode == returncode
    assert engine.process.pid is not None
    assert gone(engine.process.pid)
    assert tree(tmp_path) == {}


async def test_cancellation_terminates_and_reaps_the_process(tmp_path: Path) -> None:
    engine = CommandBackup("sh -c 'while :; do head -c 65536 /dev/zero; sleep 0.01; done'", OPTIONS)
    with anyio.move_on_after(0.5) as scope:
        await vdistream.backup(engine, str(tmp_path), options=JOB)
    assert scope.cancelled_caught
    assert engine.process.pid is not None
    assert engine.process.returncode == -signal.SIGTERM
    assert gone(engine.process.pid)
    assert tree(tmp_path) == {}


async def test_environment_passes_through_and_nothing_can_prompt(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("VDISTREAM_TEST_SETTING", "from the environment")
    script = (
        'printf "%s|" "$VDISTREAM_TEST_SETTING"; '
        "if [ -t 0 ]; then printf tty-stdin; else printf no-tty-stdin; fi; printf '|'; "
        "if (exec 3</dev/tty) 2>/dev/null; then printf terminal; else printf no-terminal; fi; "
        "printf '|'; cat"  # stdin is /dev/null: cat ends at once instead of waiting
    )
    result = await vdistream.backup(
        CommandBackup(["sh", "-c", script], OPTIONS), str(tmp_path), backup_id="env", options=JOB
    )
    assert result.ok, result.error
    got = BytesConsumer()
    restored = await vdistream.restore(
        ScopedRestore(got, OPTIONS), str(tmp_path), "env", options=JOB
    )
    assert restored.ok, restored.error
    assert got.getvalue() == b"from the environment|no-tty-stdin|no-terminal|"


async def test_consumer_failures_fail_the_restore(tmp_path: Path) -> None:
    data = resolve_source("cmd:head -c 2000000 /dev/urandom").backup_engine(OPTIONS)
    assert (await vdistream.backup(data, str(tmp_path), backup_id="d", options=JOB)).ok

    stops_early = CommandRestore(
        "sh -c 'head -c 1000 >/dev/null; echo \"bad input\" >&2; exit 4'", OPTIONS
    )
    result = await vdistream.restore(stops_early, str(tmp_path), "d", options=JOB)
    assert not result.ok
    assert isinstance(result.error, ConsumerFailedError)
    assert "stopped reading its input" in str(result.error)
    assert "exited with status 4" in str(result.error)
    assert "bad input" in str(result.error)

    fails_at_end = CommandRestore("sh -c 'cat >/dev/null; echo late >&2; exit 5'", OPTIONS)
    result = await vdistream.restore(fails_at_end, str(tmp_path), "d", options=JOB)
    assert isinstance(result.error, ConsumerFailedError)
    assert result.error.returncode == 5
    assert "exited with status 5: late" in str(result.error)

    ok = CommandRestore(["sh", "-c", f"cat > '{tmp_path}/out.bin'"], OPTIONS)
    result = await vdistream.restore(ok, str(tmp_path), "d", options=JOB)
    assert result.ok, result.error
    assert (tmp_path / "out.bin").stat().st_size == 2_000_000


async def test_stderr_is_bounded_and_the_message_trimmed(tmp_path: Path) -> None:
    command = "sh -c 'head -c 200000 /dev/zero | tr \"\\0\" x >&2; echo THE-END >&2; exit 1'"
    result = await vdistream.backup(CommandBackup(command, OPTIONS), str(tmp_path), options=JOB)
    error = result.error
    assert isinstance(error, ProducerFailedError)
    assert len(error.stderr) == 64 * 1024
    assert error.stderr.endswith("THE-END\n")
    assert len(str(error)) < 3000
    assert "THE-END" in str(error)


async def test_content_check_of_a_command_backup(tmp_path: Path) -> None:
    data = resolve_source("cmd:head -c 500000 /dev/urandom").backup_engine(OPTIONS)
    assert (await vdistream.backup(data, str(tmp_path / "s"), backup_id="c", options=JOB)).ok
    target, check = await content_check("cmd", None, tmp_path / "work")
    result = await vdistream.restore(
        restore_engine("cmd", None, target, OPTIONS), str(tmp_path / "s"), "c", options=JOB
    )
    assert result.ok, result.error
    assert result.engine_result.logical_bytes == 500_000  # type: ignore[attr-defined]
    assert await check() == "stream reassembled and verified"


async def test_command_lines_are_split_not_interpreted(tmp_path: Path) -> None:
    source = resolve_source("cmd:printf '%s;%s' 'a b' '$HOME > x'")
    engine = source.backup_engine(OPTIONS)
    assert engine.argv == ["printf", "%s;%s", "a b", "$HOME > x"]  # type: ignore[attr-defined]
    assert (await vdistream.backup(engine, str(tmp_path), backup_id="p", options=JOB)).ok
    got = BytesConsumer()
    restored = await vdistream.restore(ScopedRestore(got, OPTIONS), str(tmp_path), "p", options=JOB)
    assert restored.ok, restored.error
    assert got.getvalue() == b"a b;$HOME > x"
    assert not (tmp_path / "x").exists()
    with pytest.raises(ConfigError, match="shell=True"):
        CommandBackup(["sh"], shell=True)
    assert CommandBackup("echo $HOME", shell=True).argv == ["/bin/sh", "-c", "echo $HOME"]
