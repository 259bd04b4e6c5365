"""Backup writers in child processes, for the debris tests: they hold
``in_progress`` locks that only their death releases."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

#: A backup writer in a child process: it holds in_progress(ID), commits the streams
#: named in COMMIT, leaves one sink open with data in its temporary, says "ready" and
#: waits to be killed.
_WRITER = textwrap.dedent(
    """
    import sys, anyio
    from vdistream.storage import FileStorage

    async def main(dest, backup_id, commit):
        storage = FileStorage(dest)
        async with storage.in_progress(backup_id):
            for key in commit:
                await storage.write_bytes(key, b"committed stream")
            sink = await storage.open_sink(f"{backup_id}/stream-01-of-02.vdi")
            await sink.write(memoryview(b"half a stream" * 1000))
            await sink.flush()
            print("ready", flush=True)
            await anyio.sleep(120)

    anyio.run(main, sys.argv[1], sys.argv[2], sys.argv[3:])
    """
)


@pytest.fixture
def writers() -> Iterator[list[subprocess.Popen[str]]]:
    started: list[subprocess.Popen[str]] = []
    yield started
    for process in started:
        if process.poll() is None:
            process.kill()
        process.wait()
        if process.stdout is not None:
            process.stdout.close()


def start_writer(
    writers: list[subprocess.Popen[str]], dest: Path, backup_id: str, *commit: str
) -> subprocess.Popen[str]:
    process = subprocess.Popen(
        [sys.executable, "-c", _WRITER, str(dest), backup_id, *commit],
        stdout=subprocess.PIPE,
        text=True,
    )
    writers.append(process)
    assert process.stdout is not None
    assert process.stdout.readline().strip() == "ready"
    return process


def kill_9(process: subprocess.Popen[str]) -> None:
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
