"""What the command line shows: results, byte counts, progress, the daemon's jobs.

The contract: stdout carries the result a script consumes (``backup``: the bare id;
``list``, ``verify``, ``jobs``: their rows; with ``--json`` exactly one JSON document);
stderr carries the progress display, only when stderr is a terminal, and one final
line (the summary of a success, or the error).

Byte counts are always shown both and named: *logical* is what the engine wrote into
the devices, *stored* what the destination holds after compression and encryption.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import Any, TextIO, TypeVar

import anyio

from vdistream.cli.framework import beside, say
from vdistream.coordinator import Job

__all__ = (
    "byte_counts",
    "emit",
    "job_bytes",
    "job_details",
    "job_row",
    "progress_line",
    "with_progress",
)

_MIB = 1024 * 1024
_T = TypeVar("_T")


def byte_counts(logical: int | None, stored: int | None) -> str:
    """``logical 1,234 bytes, stored 567 bytes`` (``?`` for a count not known)."""

    def count(value: int | None) -> str:
        return "?" if value is None else f"{value:,}"

    return f"logical {count(logical)} bytes, stored {count(stored)} bytes"


def emit(json_output: bool, payload: Any, text: str, *, to: TextIO | None = None) -> None:
    """The result on stdout (or ``to``): ``payload`` as one JSON document, or ``text``."""
    if json_output:
        say(json.dumps(payload, default=str), to=to)
    elif text:
        say(text, to=to)


def _rate_line(total: float, rate: float, per_device: Iterable[float]) -> str:
    """``12.0 MiB at 3.4 MB/s (MiB per device: 3 3 3 3)``."""
    devices = " ".join(f"{size / _MIB:.0f}" for size in per_device)
    return f"{total / _MIB:,.1f} MiB at {rate / 1e6:,.1f} MB/s (MiB per device: {devices})"


async def with_progress(label: str, work: Callable[[Callable[[Job], None]], Awaitable[_T]]) -> _T:
    """``await work(hook)``; while it runs, a line on stderr (when it is a terminal)
    shows the progress of the job ``hook`` receives, refreshed in place."""
    stream, jobs, shown = sys.stderr, list[Job](), False

    async def show(*, task_status: anyio.abc.TaskStatus[None]) -> None:
        nonlocal shown
        task_status.started()
        while stream.isatty():
            await anyio.sleep(0.5)
            if jobs:
                snap = jobs[-1].progress.snapshot()
                line = _rate_line(snap.bytes, snap.rate, (d.bytes for d in snap.devices))
                stream.write(f"\r\x1b[K{label}: {line}")
                stream.flush()
                shown = True

    try:
        return await beside(lambda: work(jobs.append), show)
    finally:
        if shown:
            stream.write("\r\x1b[K")
            stream.flush()


# --- the daemon's jobs, as the control API reports them ---------------------------------


def job_bytes(summary: Mapping[str, Any]) -> str:
    """The named byte counts of a job's result or progress, as the daemon reports it
    (``bytes`` stored and ``logical_bytes`` for a backup; ``bytes`` read otherwise)."""
    if "logical_bytes" in summary:
        return byte_counts(summary.get("logical_bytes"), summary.get("bytes"))
    size = summary.get("bytes")
    return f"{size:,} bytes" if isinstance(size, int) else ""


def progress_line(job: Mapping[str, Any]) -> str:
    """One line about a job: state, bytes, rate, bytes per device."""
    progress = job.get("progress") or {}
    devices = progress.get("devices") or []
    line = f"job {job['id']} ({job['kind']} {job['database']}): {job['state']}"
    if devices:
        per_device = (d["bytes"] for d in devices)
        line += ", " + _rate_line(progress.get("bytes", 0), progress.get("rate", 0), per_device)
    if job.get("queue_position") is not None:
        line += f", position {job['queue_position'] + 1} in the queue"
    if job.get("error"):
        line += f": {job['error']}"
    return line


def job_row(job: Mapping[str, Any]) -> str:
    """A job as one row of ``vdistream jobs``."""
    amount = job_bytes(job.get("result") or job.get("progress") or {})
    tail = job.get("error") or job.get("backup_id") or ""
    return (
        f"{job['id']}  {job['kind']:<7} {job['database']:<16} {job['state']:<9} "
        f"{amount or '-'}  {tail}"
    )


def job_details(job: Mapping[str, Any]) -> str:
    """A job as ``vdistream job ID`` shows it, with per-device progress."""
    lines = [
        f"job {job['id']}: {job['kind']} of {job['database']}, {job['state']}",
        f"  created {job['created']}, started {job['started']}, ended {job['ended']}",
    ]
    if job.get("backup_id"):
        lines.append(f"  backup {job['backup_id']} in {job.get('storage_url')}")
    if job.get("queue_position") is not None:
        lines.append(f"  position {job['queue_position'] + 1} in the queue")
    if job.get("max_rate") is not None:
        lines.append(f"  bandwidth limit {job['max_rate']:,} bytes/s")
    if amount := job_bytes(job.get("result") or {}):
        lines.append(f"  {amount}")
    progress = job.get("progress") or {}
    lines.extend(
        f"  device {device['index']}: {device['bytes']:,} bytes, "
        f"{device['commands']} commands, {device['rate'] / 1e6:.1f} MB/s"
        for device in progress.get("devices") or []
    )
    if job.get("error"):
        lines.append(f"  error: {job['error']}")
    return "\n".join(lines)
