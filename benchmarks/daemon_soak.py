"""Soak the daemon: 100 small concurrent jobs for N minutes, watching memory, fds and lag.

A real ``vdistream serve`` runs in a temporary directory with two databases: a small
SQLite database (backed up into a directory, verified after each backup, retention
``keep_last = 2``, so the disk does not fill) and a ``cmd:`` source writing 4 MiB
(``head -c``, into ``null://``). The driver keeps ``--jobs`` jobs in flight through
the Unix socket (half of each), submitting more as they end, and every 5 seconds
samples, from outside the daemon:

* RSS (``/proc/PID/status`` VmRSS) and open file descriptors (``/proc/PID/fd``);
* the event-loop lag histogram the daemon measures itself
  (``vdistream_event_loop_lag_seconds`` at ``/metrics``, a 50 ms ticker).

At the end it prints: jobs finished per outcome; RSS at start and end and its growth
per minute (least-squares slope after the first minute, the warm-up); the event-loop
lag p99 (the histogram's upper bucket bound) and maximum over the run after warm-up;
open fds at start and end (after the last jobs ended) and the maximum.

Usage: python benchmarks/daemon_soak.py [--minutes 10] [--jobs 100] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import anyio

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from vdistream.service.client import ApiClient, DaemonError  # noqa: E402

MIB = 1024 * 1024
SAMPLE_EVERY = 5.0
WARMUP = 60.0


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def lag_buckets(metrics: str) -> dict[float, float]:
    out = {}
    for match in re.finditer(
        r'^vdistream_event_loop_lag_seconds_bucket\{le="([^"]+)"\} (\S+)$', metrics, re.M
    ):
        out[float(match[1])] = float(match[2])
    return out


def lag_max(metrics: str) -> float:
    match = re.search(r"^vdistream_event_loop_lag_max_seconds (\S+)$", metrics, re.M)
    return float(match[1]) if match else 0.0


def quantile(buckets_now: dict[float, float], buckets_then: dict[float, float], q: float) -> float:
    """Upper bound of the bucket holding quantile ``q`` of the observations between."""
    deltas = sorted((le, buckets_now[le] - buckets_then.get(le, 0.0)) for le in buckets_now)
    total = deltas[-1][1] if deltas else 0.0
    for le, count in deltas:
        if total and count >= q * total:
            return le
    return float("nan")


def slope(points: list[tuple[float, float]]) -> float:
    """Least-squares slope (per second) of (t, value) points."""
    if len(points) < 2:
        return 0.0
    n = len(points)
    mean_t = sum(t for t, _ in points) / n
    mean_v = sum(v for _, v in points) / n
    var = sum((t - mean_t) ** 2 for t, _ in points)
    return sum((t - mean_t) * (v - mean_v) for t, v in points) / var if var else 0.0


def write_settings(root: Path, jobs: int) -> Path:
    db = root / "app.db"
    connection = sqlite3.connect(db)
    with connection:
        connection.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, v TEXT)")
        connection.executemany(
            "INSERT INTO t (v) VALUES (?)", ((f"row {i}" * 4,) for i in range(20_000))
        )
    connection.close()
    config = root / "vdistream.toml"
    config.write_text(
        f"""
[service]
state_dir = "{root / "state"}"
max_jobs = {jobs}
max_queued = {jobs}
log_format = "json"
log_level = "warning"
grace_period = 30

[destinations.disk]
url = "{root / "backups"}"

[destinations.null]
url = "null://"

[databases.app]
url = "sqlite://{db}"
destination = "disk"
devices = 2
max_jobs = {min(jobs, 64)}
retention = {{ keep_last = 2 }}

[databases.stream]
url = "cmd:head -c {4 * MIB} /dev/zero"
destination = "null"
devices = 4
max_jobs = {min(jobs, 64)}
verify_after_backup = false
"""
    )
    return config


async def drive(socket: Path, pid: int, minutes: float, jobs: int) -> dict[str, Any]:
    outcomes: dict[str, int] = {}
    refused = 0
    samples: list[dict[str, Any]] = []
    start = time.monotonic()
    end = start + minutes * 60
    next_sample = start
    warm: dict[float, float] | None = None
    lag_peak = 0.0
    idle_fds = open_fds(pid)
    idle_rss = rss_mib(pid)
    async with ApiClient(socket, timeout=60) as client:
        turn = 0
        while time.monotonic() < end:
            live = await client.jobs(state="queued,running", limit="1000")
            for _ in range(max(0, jobs - len(live))):
                database = "app" if turn % 2 else "stream"
                turn += 1
                try:
                    await client.submit({"kind": "backup", "database": database})
                except DaemonError as exc:
                    if exc.code != "queue_full":
                        raise
                    refused += 1
            now = time.monotonic()
            if now >= next_sample:
                metrics = await client.metrics()
                buckets = lag_buckets(metrics)
                if warm is None and now - start >= min(WARMUP, minutes * 60 / 5):
                    warm = buckets
                if warm is not None:
                    lag_peak = max(lag_peak, lag_max(metrics))
                else:
                    lag_max(metrics)  # the gauge resets at each scrape
                samples.append(
                    {
                        "t": now - start,
                        "rss_mib": rss_mib(pid),
                        "fds": open_fds(pid),
                        "live": len(live),
                        "buckets": buckets,
                    }
                )
                next_sample = now + SAMPLE_EVERY
            await anyio.sleep(0.2)
        # let the last jobs end, then count what finished
        with anyio.move_on_after(120):
            while await client.jobs(state="queued,running", limit="1000"):  # noqa: ASYNC110 -- polling the daemon over HTTP
                await anyio.sleep(0.5)
        await anyio.sleep(1.5)  # let the fds of the last jobs close
        final_fds = open_fds(pid)
        final_metrics = await client.metrics()
        for line in final_metrics.splitlines():
            match = re.match(r'vdistream_jobs_total\{kind="(\w+)",outcome="(\w+)"\} (\S+)', line)
            if match:
                key = f"{match[1]}/{match[2]}"
                outcomes[key] = outcomes.get(key, 0) + int(float(match[3]))
    after_warmup = [s for s in samples if s["t"] >= min(WARMUP, minutes * 60 / 5)]
    growth = slope([(s["t"], s["rss_mib"]) for s in after_warmup]) * 60
    last = samples[-1]["buckets"] if samples else {}
    return {
        "minutes": minutes,
        "jobs_in_flight": jobs,
        "outcomes": outcomes,
        "refused": refused,
        "rss_mib_idle": idle_rss,
        "rss_mib_start": samples[0]["rss_mib"] if samples else None,
        "rss_mib_end": rss_mib(pid),
        "rss_mib_max": max(s["rss_mib"] for s in samples) if samples else None,
        "rss_growth_mib_per_minute": round(growth, 3),
        "lag_p99_s": quantile(last, warm or {}, 0.99) if last else None,
        "lag_max_s": round(lag_peak, 4),
        "fds_start": idle_fds,
        "fds_max": max(s["fds"] for s in samples) if samples else None,
        "fds_end": final_fds,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--jobs", type=int, default=100)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="vdistream-soak-") as tmp:
        root = Path(tmp)
        config = write_settings(root, args.jobs)
        log = (root / "daemon.log").open("wb")
        daemon = subprocess.Popen(
            [sys.executable, "-m", "vdistream", "serve", "--config", str(config)],
            stdout=log,
            stderr=subprocess.STDOUT,
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
            report = anyio.run(drive, socket, daemon.pid, args.minutes, args.jobs)
        finally:
            daemon.send_signal(signal.SIGTERM)
            try:
                code = daemon.wait(60)
            except subprocess.TimeoutExpired:
                daemon.kill()
                code = daemon.wait()
            log.close()
        report["daemon_exit_code"] = code
    if args.json:
        print(json.dumps(report))
        return 0
    print(f"soak: {args.jobs} jobs in flight for {args.minutes:g} min (SQLite + cmd:)")
    print(f"  jobs finished: {report['outcomes']}, refused (queue full): {report['refused']}")
    print(
        f"  RSS: {report['rss_mib_idle']:.1f} MiB idle, {report['rss_mib_start']:.1f} with the "
        f"first jobs, {report['rss_mib_end']:.1f} at the end, "
        f"max {report['rss_mib_max']:.1f}; growth {report['rss_growth_mib_per_minute']:+.3f} "
        "MiB/min after warm-up"
    )
    print(
        f"  event-loop lag: p99 <= {report['lag_p99_s']} s, max {report['lag_max_s']} s "
        "(after warm-up, measured in the daemon)"
    )
    print(
        f"  open fds: {report['fds_start']} idle at start, {report['fds_end']} idle at the end "
        f"(max {report['fds_max']} while running)"
    )
    print(f"  daemon exit code after SIGTERM: {report['daemon_exit_code']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
