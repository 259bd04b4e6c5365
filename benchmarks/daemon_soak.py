"""Soak the daemon: a mixed backup/verify/restore load for N minutes, watching its memory.

A real ``vdistream serve`` runs in a temporary directory with three SQLite databases of
a few MiB each (``--db-mib``), each backed up by a schedule every minute
(``* * * * *``) into a directory, verified after each backup, with retention
``keep_last = 3`` so that the disk does not fill. Three client loops drive it through
the control API (the Unix socket, ``vdistream.cli.client.ApiClient``), each one
submitting, in turn, a backup, a verify (``content = true``) and a restore (into a file
of its own, ``overwrite = true``) and waiting for each to end, rotating over the
databases, following each job's event stream as ``vdistream submit --wait`` does. The
databases use the three pipelines: plain, zstd, zstd with AES. Every ``--sample``
seconds the driver reads, from outside the daemon:

* RSS (``/proc/PID/status`` VmRSS) and the thread count (``Threads``);
* open file descriptors (``/proc/PID/fd``);
* glibc's arena heaps (``/proc/PID/smaps``: anonymous mappings aligned on 64 MiB, the
  ``HEAP_MAX_SIZE`` of a non-main arena on 64-bit Linux) and their resident size, which
  tells memory held by per-thread arenas from the rest.

At the end it prints: jobs finished per kind and outcome, failures (a job that did not
succeed, a refused submission), RSS at start, after warm-up, at the end and its range,
the growth in MiB per minute (least-squares slope of the samples after ``--warmup``
seconds), the thread-count range, the arena heaps, and open fds. Exit status 1 when a
job failed, a submission was refused or the daemon did not exit 0 after SIGTERM.

``--tracemalloc`` makes the daemon trace Python allocations (``VDISTREAM_TRACEMALLOC``,
a debug knob of ``vdistream serve``: a snapshot every 30 s into a directory) and adds
the traced total's growth per minute and the lines whose allocations grew most between
the first snapshot after warm-up and the last one: RSS growing while the traced total
stays flat is the allocator's (arenas, fragmentation), not leaked Python objects.
``--env NAME=VALUE`` passes variables to the daemon (``MALLOC_ARENA_MAX=2``,
``VDISTREAM_MALLOC_TUNING=0`` to measure without the daemon's allocator settings).

Usage: python benchmarks/daemon_soak.py [--minutes 5] [--warmup 60] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import platform
import re
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path
from typing import Any

import anyio

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from vdistream.cli.client import ApiClient, DaemonError  # noqa: E402

MIB = 1024 * 1024
HEAP_MAX = 64 * MIB
TERMINAL = frozenset({"succeeded", "failed", "aborted"})
DATABASES = ("app", "crm", "wiki")


# ------------------------------------------------------------------------- sampling


def proc_status(pid: int) -> dict[str, int]:
    out: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM", "Threads"):
            out[key] = int(value.split()[0])
    return out


def arena_heaps(pid: int) -> tuple[int, float]:
    """(count, resident MiB) of glibc's non-main arena heaps in ``pid``.

    A heap is a 64 MiB reservation aligned on 64 MiB (``HEAP_MAX_SIZE`` on 64-bit):
    an anonymous read-write mapping at an aligned address, followed by the rest of
    the reservation (``---p``) unless the heap is full. Both conditions together keep
    out the other anonymous mappings that happen to start at such an address.
    """
    maps: list[tuple[int, int, str, bool, int]] = []  # start, end, perms, anonymous, rss
    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        head = line.split()
        if re.match(r"^[0-9a-f]+-[0-9a-f]+ ", line):
            start, end = (int(x, 16) for x in head[0].split("-"))
            maps.append((start, end, head[1], len(head) == 5, 0))
        elif head[0] == "Rss:" and maps:
            start, end, perms, anonymous, _ = maps[-1]
            maps[-1] = (start, end, perms, anonymous, int(head[1]))
    count, rss_kib = 0, 0
    for i, (start, end, perms, anonymous, rss) in enumerate(maps):
        if not (anonymous and perms.startswith("rw") and start % HEAP_MAX == 0):
            continue
        span = end - start
        if i + 1 < len(maps) and maps[i + 1][0] == end and maps[i + 1][2] == "---p":
            span += maps[i + 1][1] - maps[i + 1][0]
        if span == HEAP_MAX:
            count += 1
            rss_kib += rss
    return count, rss_kib / 1024


def sample(pid: int, t: float) -> dict[str, Any]:
    status = proc_status(pid)
    heaps, heap_rss = arena_heaps(pid)
    return {
        "t": round(t, 2),
        "rss_mib": round(status["VmRSS"] / 1024, 2),
        "threads": status["Threads"],
        "fds": len(os.listdir(f"/proc/{pid}/fd")),
        "arena_heaps": heaps,
        "arena_rss_mib": round(heap_rss, 2),
    }


def slope(points: list[tuple[float, float]]) -> float:
    """Least-squares slope (per second) of (t, value) points."""
    if len(points) < 2:
        return 0.0
    n = len(points)
    mean_t = sum(t for t, _ in points) / n
    mean_v = sum(v for _, v in points) / n
    var = sum((t - mean_t) ** 2 for t, _ in points)
    return sum((t - mean_t) * (v - mean_v) for t, v in points) / var if var else 0.0


# -------------------------------------------------------------------------- set-up


def make_database(path: Path, mib: float) -> None:
    connection = sqlite3.connect(path)
    rows = int(mib * MIB / 120)
    with connection:
        connection.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, v TEXT)")
        connection.executemany(
            "INSERT INTO t (v) VALUES (?)",
            ((f"{i:08d} " + os.urandom(40).hex(),) for i in range(rows)),
        )
    connection.close()


def write_settings(root: Path, db_mib: float) -> Path:
    lines = [
        "[service]",
        f'state_dir = "{root / "state"}"',
        "max_jobs = 3",
        "max_queued = 32",
        'log_format = "json"',
        'log_level = "warning"',
        "grace_period = 30",
        'timezone = "UTC"',
        "[destinations.disk]",
        f'url = "{root / "backups"}"',
    ]
    key = root / "soak.key"
    key.write_text(os.urandom(32).hex() + "\n")
    key.chmod(0o600)
    extra = {  # the three pipelines users pick: plain, zstd, zstd + AES
        "app": [],
        "crm": ['compress = "zstd"'],
        "wiki": ['compress = "zstd"', f'encrypt_key_file = "{key}"'],
    }
    for name in DATABASES:
        make_database(root / f"{name}.db", db_mib)
        lines += [
            f"[databases.{name}]",
            f'url = "sqlite://{root / name}.db"',
            'destination = "disk"',
            "devices = 2",
            'schedule = "* * * * *"',
            "retention = { keep_last = 3 }",
            *extra[name],
        ]
    config = root / "vdistream.toml"
    config.write_text("\n".join(lines) + "\n")
    return config


# --------------------------------------------------------------------------- load


class Counts:
    def __init__(self) -> None:
        self.jobs: dict[str, int] = {}
        self.failures: list[str] = []
        self.refused = 0

    def record(self, job: dict[str, Any]) -> None:
        key = f"{job['kind']}/{job['state']}"
        self.jobs[key] = self.jobs.get(key, 0) + 1
        if job["state"] != "succeeded" and len(self.failures) < 20:
            self.failures.append(f"{job['kind']} {job['database']}: {job.get('error')}")


async def wait_job(client: ApiClient, job_id: str) -> dict[str, Any]:
    # As `vdistream submit --wait` does: follow the job's event stream to its end.
    with anyio.fail_after(300):
        job = await client.wait(job_id, interval=0.5)
    if job["state"] not in TERMINAL:
        job = await client.job(job_id)
    return job


async def client_loop(socket: Path, index: int, root: Path, end: float, counts: Counts) -> None:
    target = root / "restored" / f"client-{index}.db"
    turn = index
    async with ApiClient(socket, timeout=60) as client:
        while time.monotonic() < end:
            database = DATABASES[turn % len(DATABASES)]
            turn += 1
            for body in (
                {"kind": "backup", "database": database},
                {"kind": "verify", "database": database, "backup_id": "latest", "content": True},
                {
                    "kind": "restore",
                    "database": database,
                    "backup_id": "latest",
                    "target": str(target),
                    "overwrite": True,
                },
            ):
                if time.monotonic() >= end:
                    return
                try:
                    job = await client.submit(body)
                except DaemonError as exc:
                    counts.refused += 1
                    if len(counts.failures) < 20:
                        counts.failures.append(f"submit {body['kind']}: {exc.code}: {exc}")
                    await anyio.sleep(1)
                    continue
                counts.record(await wait_job(client, job["id"]))


async def sampler(pid: int, start: float, end: float, every: float, out: list[Any]) -> None:
    while time.monotonic() < end:
        out.append(sample(pid, time.monotonic() - start))
        await anyio.sleep(every)


async def drive(
    socket: Path, pid: int, root: Path, minutes: float, every: float
) -> tuple[list[dict[str, Any]], Counts, dict[str, Any]]:
    counts = Counts()
    samples: list[dict[str, Any]] = []
    idle = sample(pid, 0.0)
    start = time.monotonic()
    end = start + minutes * 60
    async with anyio.create_task_group() as tg:
        tg.start_soon(sampler, pid, start, end, every, samples)
        for index in range(3):
            tg.start_soon(client_loop, socket, index, root, end, counts)
    samples.append(sample(pid, time.monotonic() - start))
    return samples, counts, idle


# ----------------------------------------------------------------------- tracemalloc


def tracemalloc_report(directory: Path, warmup: float, start_wall: float) -> dict[str, Any]:
    files = sorted(directory.glob("snapshot-*.pickle"))
    points: list[tuple[float, float]] = []
    first: tracemalloc.Snapshot | None = None
    first_t = 0.0
    last: tracemalloc.Snapshot | None = None
    for file in files:
        t = int(file.stem.split("-")[1]) / 1000 - start_wall
        with file.open("rb") as f:
            snapshot = pickle.load(f)
        total = sum(s.size for s in snapshot.statistics("filename")) / MIB
        if t >= warmup:
            points.append((t, total))
            if first is None:
                first, first_t = snapshot, t
            last = snapshot
    report: dict[str, Any] = {
        "snapshots": len(files),
        "traced_mib": [round(v, 2) for _, v in points],
        "traced_growth_mib_per_minute": round(slope(points) * 60, 3),
    }
    if first is not None and last is not None and last is not first:
        top = last.compare_to(first, "lineno")[:12]
        report["top_growth"] = [
            f"{s.size_diff / 1024:+.1f} KiB ({s.count_diff:+d} blocks) {s.traceback[0]}"
            for s in top
        ]
        report["compared_from_s"] = round(first_t, 1)
    return report


# --------------------------------------------------------------------------- main


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=5.0, help="how long the load runs")
    parser.add_argument(
        "--warmup", type=float, default=60.0, help="seconds left out of the slope (default 60)"
    )
    parser.add_argument("--sample", type=float, default=5.0, help="seconds between samples")
    parser.add_argument("--db-mib", type=float, default=3.0, help="size of each database")
    parser.add_argument("--tracemalloc", action="store_true", help="trace Python allocations")
    parser.add_argument(
        "--env", action="append", default=[], metavar="NAME=VALUE", help="for the daemon"
    )
    parser.add_argument("--json", action="store_true", help="one JSON object on stdout")
    args = parser.parse_args()
    env = {k: v for k, v in os.environ.items() if not k.startswith("VDISTREAM_")}
    for item in args.env:
        name, sep, value = item.partition("=")
        if not sep:
            parser.error(f"--env {item}: expected NAME=VALUE")
        env[name] = value
    with tempfile.TemporaryDirectory(prefix="vdistream-soak-") as tmp:
        root = Path(tmp)
        (root / "restored").mkdir()
        config = write_settings(root, args.db_mib)
        traces = root / "tracemalloc"
        if args.tracemalloc:
            traces.mkdir()
            env["VDISTREAM_TRACEMALLOC"] = str(traces)
        log = (root / "daemon.log").open("wb")
        daemon = subprocess.Popen(
            [sys.executable, "-m", "vdistream", "serve", "--config", str(config)],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            cwd=REPO,
        )
        socket = root / "state" / "vdistream.sock"
        try:
            deadline = time.monotonic() + 30
            while not socket.exists():
                if daemon.poll() is not None or time.monotonic() > deadline:
                    print((root / "daemon.log").read_text(), file=sys.stderr)
                    return 1
                time.sleep(0.1)
            time.sleep(0.5)
            start_wall = time.time()
            samples, counts, idle = anyio.run(
                drive, socket, daemon.pid, root, args.minutes, args.sample
            )
            traced = tracemalloc_report(traces, args.warmup, start_wall) if args.tracemalloc else {}
        finally:
            daemon.send_signal(signal.SIGTERM)
            try:
                code = daemon.wait(60)
            except subprocess.TimeoutExpired:
                daemon.kill()
                code = daemon.wait()
            log.close()
    after = [s for s in samples if s["t"] >= args.warmup] or samples
    rss = [s["rss_mib"] for s in samples]
    threads = [s["threads"] for s in samples]
    report = {
        "minutes": args.minutes,
        "warmup_s": args.warmup,
        "env": args.env,
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, Linux {platform.release()}, "
        f"{' '.join(platform.libc_ver())}, Python {platform.python_version()}",
        "jobs": counts.jobs,
        "jobs_total": sum(counts.jobs.values()),
        "failed": sum(v for k, v in counts.jobs.items() if not k.endswith("/succeeded")),
        "refused": counts.refused,
        "failures": counts.failures,
        "rss_mib_idle": idle["rss_mib"],
        "rss_mib_after_warmup": after[0]["rss_mib"],
        "rss_mib_end": samples[-1]["rss_mib"],
        "rss_mib_min": min(rss),
        "rss_mib_max": max(rss),
        "rss_growth_mib_per_minute": round(slope([(s["t"], s["rss_mib"]) for s in after]) * 60, 3),
        "threads_idle": idle["threads"],
        "threads_min": min(threads),
        "threads_max": max(threads),
        "arena_heaps_max": max(s["arena_heaps"] for s in samples),
        "arena_rss_mib_end": samples[-1]["arena_rss_mib"],
        "arena_rss_growth_mib_per_minute": round(
            slope([(s["t"], s["arena_rss_mib"]) for s in after]) * 60, 3
        ),
        "fds_idle": idle["fds"],
        "fds_max": max(s["fds"] for s in samples),
        "daemon_exit_code": code,
        "tracemalloc": traced,
        "samples": samples,
    }
    ok = not report["failed"] and not counts.refused and code == 0
    if args.json:
        print(json.dumps(report))
        return 0 if ok else 1
    print(
        f"daemon soak: {args.minutes:g} min, 3 clients, 3 SQLite databases of {args.db_mib:g} MiB"
    )
    print(f"  machine: {report['machine']}; daemon env: {' '.join(args.env) or '-'}")
    print(
        f"  jobs: {report['jobs_total']} {counts.jobs}; failed {report['failed']}, "
        f"refused {counts.refused}"
    )
    for failure in counts.failures[:5]:
        print(f"    {failure}")
    print(
        f"  RSS: {report['rss_mib_idle']:.1f} MiB idle, {report['rss_mib_after_warmup']:.1f} "
        f"after warm-up ({args.warmup:g} s), {report['rss_mib_end']:.1f} at the end, range "
        f"{report['rss_mib_min']:.1f}-{report['rss_mib_max']:.1f}"
    )
    print(f"  RSS growth after warm-up: {report['rss_growth_mib_per_minute']:+.3f} MiB/min")
    print(
        f"  threads: {report['threads_idle']} idle, {report['threads_min']}-"
        f"{report['threads_max']} under load"
    )
    print(
        f"  arena heaps: up to {report['arena_heaps_max']}, {report['arena_rss_mib_end']:.1f} "
        f"MiB resident at the end, {report['arena_rss_growth_mib_per_minute']:+.3f} MiB/min"
    )
    print(f"  open fds: {report['fds_idle']} idle, max {report['fds_max']}")
    if traced:
        print(
            f"  tracemalloc: {traced['snapshots']} snapshots, traced "
            f"{traced['traced_mib'][:1]}..{traced['traced_mib'][-1:]} MiB, "
            f"{traced['traced_growth_mib_per_minute']:+.3f} MiB/min after warm-up"
        )
        for line in traced.get("top_growth", []):
            print(f"    {line}")
    print(f"  daemon exit code after SIGTERM: {code}")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
