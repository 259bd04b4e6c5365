"""The daemon's memory stays flat: ``vdistream serve`` limits glibc's malloc arenas.

The cause of the soak's growth (docs/benchmarks.md, "Daemon soak"): every worker thread
that allocates gets a glibc arena of its own (up to 8 per core), and each arena keeps
the memory freed in it. These tests count the arena heaps in ``/proc/PID/smaps`` of a
real daemon after concurrent jobs (compression and hashing in worker threads): at most
``ARENA_MAX - 1`` besides the main arena. The same load with the tuning switched off
(``VDISTREAM_MALLOC_TUNING=0``) shows the per-thread arenas, which proves the load
reaches them. Importing vdistream leaves the allocator alone (library manners).
"""

from __future__ import annotations

import platform
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.daemon.conftest import REPO, Daemon, make_sqlite, wait_job
from vdistream.service.serve import ARENA_MAX

pytestmark = [
    pytest.mark.timeout(120),
    pytest.mark.skipif(
        platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
        reason="glibc's arenas, read from /proc",
    ),
]

HEAP_MAX = 64 << 20


def arena_heaps(pid: int) -> int:
    """The non-main arenas of glibc in ``pid``, counted by their first heap: 64 MiB
    reservations aligned on 64 MiB (an anonymous read-write part, then the ``---p``
    rest unless full) whose ``heap_info.ar_ptr`` (its first word) points into the heap
    itself. An arena that outgrew 64 MiB has further heaps; theirs point back to the
    first one, so an arena counts once however large it grew (reads /proc/PID/mem)."""
    maps: list[tuple[int, int, str, bool]] = []
    for line in Path(f"/proc/{pid}/maps").read_text().splitlines():
        fields = line.split()
        start, end = (int(x, 16) for x in fields[0].split("-"))
        maps.append((start, end, fields[1], len(fields) == 5))
    count = 0
    with open(f"/proc/{pid}/mem", "rb", buffering=0) as memory:
        for i, (start, end, perms, anonymous) in enumerate(maps):
            if not (anonymous and perms.startswith("rw") and start % HEAP_MAX == 0):
                continue
            span = end - start
            if i + 1 < len(maps) and maps[i + 1][0] == end and maps[i + 1][2] == "---p":
                span += maps[i + 1][1] - maps[i + 1][0]
            if span != HEAP_MAX:
                continue
            memory.seek(start)
            arena = int.from_bytes(memory.read(8), sys.byteorder)
            count += start <= arena < start + HEAP_MAX
    return count


async def _concurrent_jobs(daemon: Daemon, rounds: int = 3) -> None:
    """``rounds`` times: three backups at once, then a verify of each."""
    async with daemon.client() as client:
        for _ in range(rounds):
            for kind in ("backup", "verify"):
                jobs = []
                for database in ("a", "b", "c"):
                    body = {"kind": kind, "database": database}
                    if kind == "verify":
                        body |= {"backup_id": "latest", "content": True}
                    jobs.append(await client.submit(body))
                for job in jobs:
                    done = await wait_job(client, job["id"], timeout=60)
                    assert done["state"] == "succeeded", done.get("error")


def _daemon(factory: Callable[..., Daemon], tmp_path: Path, env: dict[str, str]) -> Daemon:
    databases = {}
    for name in ("a", "b", "c"):
        source = make_sqlite(tmp_path / f"{name}-{len(env)}.db", rows=60_000)
        databases[name] = {"url": f"sqlite://{source}", "devices": 4, "compress": "zstd"}
    clean = {"MALLOC_ARENA_MAX": "", **env}  # glibc ignores an empty value
    return factory(databases, service={"max_jobs": 3}, env=clean).start()


@pytest.mark.asyncio
async def test_serve_limits_the_malloc_arenas_of_its_worker_threads(
    daemon_factory: Callable[..., Daemon], tmp_path: Path
) -> None:
    """1. A daemon runs three backups at once (4 devices each, zstd), then three
       verifies, three times: blocking work in many worker threads.
    2. Its non-main arena heaps number at most ``ARENA_MAX - 1`` (tune_malloc).
    3. The same load in a daemon started with ``VDISTREAM_MALLOC_TUNING=0`` has more:
       the load does reach per-thread arenas, so step 2 is not vacuous."""
    tuned = _daemon(daemon_factory, tmp_path, {})
    await _concurrent_jobs(tuned)
    tuned_heaps = arena_heaps(tuned.pid)
    assert tuned.stop() == 0

    untuned = _daemon(daemon_factory, tmp_path, {"VDISTREAM_MALLOC_TUNING": "0"})
    await _concurrent_jobs(untuned)
    untuned_heaps = arena_heaps(untuned.pid)
    assert untuned.stop() == 0

    assert tuned_heaps <= ARENA_MAX - 1, f"{tuned_heaps} arena heaps with the tuning"
    assert untuned_heaps > ARENA_MAX - 1, (
        f"only {untuned_heaps} arena heaps without the tuning: the load used too few threads"
    )


def test_importing_vdistream_leaves_the_allocator_alone(tmp_path: Path) -> None:
    """Importing vdistream (and ``vdistream serve``'s module) changes no malloc setting:
    8 threads allocating at once in such a process still get arenas of their own."""
    script = tmp_path / "threads.py"
    script.write_text(
        """
import os, threading, vdistream, vdistream.service, vdistream.service.serve
barrier = threading.Barrier(8)
kept = []
def work():
    kept.append(bytearray(200_000))  # above the small-object allocator: malloc
    barrier.wait()
threads = [threading.Thread(target=work) for _ in range(8)]
for t in threads: t.start()
for t in threads: t.join()
print(os.getpid(), flush=True)
input()
"""
    )
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO)}
    with subprocess.Popen(
        [sys.executable, str(script)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=env,
        cwd=REPO,
    ) as child:
        assert child.stdout is not None
        assert child.stdin is not None
        pid = int(child.stdout.readline())
        heaps = arena_heaps(pid)
        child.stdin.write("\n")
        child.stdin.close()
        assert child.wait(10) == 0
    assert heaps > ARENA_MAX - 1, f"only {heaps} arena heaps: importing vdistream tuned malloc"
