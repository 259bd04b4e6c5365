"""What the command line shows: the progress display, results, byte counts.

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
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, TextIO, TypeVar

import anyio

from vdistream.catalog import Manifest
from vdistream.coordinator import Job

__all__ = ("Progress", "byte_counts", "emit", "manifest_bytes", "with_progress")

MIB = 1024 * 1024
T = TypeVar("T")


def byte_counts(logical: int | None, stored: int | None) -> str:
    """``logical 1,234 bytes, stored 567 bytes`` (``?`` for a count not known)."""

    def count(value: int | None) -> str:
        return "?" if value is None else f"{value:,}"

    return f"logical {count(logical)} bytes, stored {count(stored)} bytes"


def manifest_bytes(manifest: Manifest) -> tuple[int, int]:
    """(logical, stored) bytes of a backup, summed over its devices."""
    return manifest.stream_bytes, manifest.stored_bytes


def emit(json_output: bool, payload: Any, text: str) -> None:
    """The result on stdout: ``payload`` as one JSON document, or ``text``."""
    if json_output:
        sys.stdout.write(json.dumps(payload, default=str) + "\n")
    elif text:
        sys.stdout.write(text if text.endswith("\n") else text + "\n")
    sys.stdout.flush()


def job_bytes(summary: Mapping[str, Any]) -> str:
    """The named byte counts of a job's result or progress, as the daemon reports it
    (``bytes`` stored and ``logical_bytes`` for a backup; ``bytes`` read otherwise)."""
    if "logical_bytes" in summary:
        return byte_counts(summary.get("logical_bytes"), summary.get("bytes"))
    size = summary.get("bytes")
    return f"{size:,} bytes" if isinstance(size, int) else ""


class Progress:
    """A refreshed line on stderr while a job runs, when stderr is a terminal."""

    def __init__(self, stream: TextIO, label: str) -> None:
        self.stream = stream
        self.label = label
        self.job: Job | None = None
        self.shown = False

    def attach(self, job: Job) -> None:
        self.job = job

    async def run(self) -> None:
        if not self.stream.isatty():
            return
        while True:
            await anyio.sleep(0.5)
            if self.job is None:
                continue
            snap = self.job.progress.snapshot()
            devices = " ".join(f"{d.bytes / MIB:.0f}" for d in snap.devices)
            self.stream.write(
                f"\r\x1b[K{self.label}: {snap.bytes / MIB:,.1f} MiB at "
                f"{snap.rate / 1e6:,.1f} MB/s (MiB per device: {devices})"
            )
            self.stream.flush()
            self.shown = True

    def done(self) -> None:
        if self.shown:
            self.stream.write("\r\x1b[K")
            self.stream.flush()


async def with_progress(label: str, work: Callable[[Callable[[Job], None]], Awaitable[T]]) -> T:
    """``await work(hook)``, showing the job ``hook`` receives while it runs."""
    progress = Progress(sys.stderr, label)
    result: list[T] = []
    failure: list[Exception] = []
    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(progress.run)
            try:
                result.append(await work(progress.attach))
            except Exception as exc:  # re-raised below, outside the group
                failure.append(exc)
            finally:
                tg.cancel_scope.cancel()
    finally:
        progress.done()
    if failure:
        raise failure[0]
    return result[0]
