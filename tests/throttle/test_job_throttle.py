"""The coordinator's job under limits: its own (``JobOptions.max_rate``, ``job.throttle``),
shared ones (``JobOptions.limits``, ``throttle.sharing``), a live change, an abort that
does not wait for tokens, and a slow limit that is no stall. Real jobs: the striping
engine, file sinks and sources, SHA-256 of what comes back."""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path

import anyio
import pytest

from tests.coordinator.conftest import SMALL, tree
from vdistream.coordinator import (
    AbortCause,
    Job,
    JobKind,
    JobOptions,
    JobStatus,
    restore,
)
from vdistream.engines import BytesConsumer, StripedBackup, StripedRestore
from vdistream.throttle import RateLimit, sharing

pytestmark = [pytest.mark.asyncio, pytest.mark.timeout(60)]

KIB, MIB = 1024, 1024 * 1024


async def test_a_backup_and_its_restore_move_at_the_limit(tmp_path: Path) -> None:
    data = os.urandom(2 * MIB)
    job = Job(
        JobKind.BACKUP,
        StripedBackup(data, SMALL),
        str(tmp_path),
        backup_id="b",
        options=JobOptions(devices=4, max_rate=2 * MIB),
    )
    assert job.throttle.rate == 2 * MIB
    assert job.limits == (job.throttle,)
    started = time.monotonic()
    result = await job.run()
    took = time.monotonic() - started
    assert result.ok, result.error
    assert took > 0.6, took  # 2 MiB at 2 MiB/s: ~1 s (unlimited: a few ms)

    target = BytesConsumer()
    started = time.monotonic()
    back = await restore(
        StripedRestore(target, SMALL),
        str(tmp_path),
        "b",
        options=JobOptions(devices=4, max_rate=4 * MIB),
    )
    assert back.ok, back.error
    assert time.monotonic() - started > 0.3
    assert hashlib.sha256(target.getvalue()).digest() == hashlib.sha256(data).digest()


async def test_shared_limits_and_a_live_change(tmp_path: Path) -> None:
    """The global limit of a ``sharing`` block caps the job; raising the job's own limit
    does not lift it; lifting the global one lets the job finish at once."""
    glob = RateLimit(256 * KIB, name="global")
    extra = RateLimit(None, name="extra")
    with sharing(glob):
        job = Job(
            JobKind.BACKUP,
            StripedBackup(os.urandom(8 * MIB), SMALL),
            str(tmp_path),
            options=JobOptions(devices=4, max_rate=8 * MIB, limits=(extra,)),
        )
    assert job.limits == (job.throttle, extra, glob)
    results = []

    async def run() -> None:
        results.append(await job.run())

    with anyio.fail_after(15):
        async with anyio.create_task_group() as tg:
            tg.start_soon(run)
            await anyio.sleep(1.0)
            moved = sum(d.bytes for d in job.progress.devices)
            assert moved < 1 * MIB, moved  # ~256 KiB/s, not 8 MiB/s
            job.throttle.set_rate(64 * MIB)
            await anyio.sleep(0.5)
            assert sum(d.bytes for d in job.progress.devices) < 2 * MIB
            glob.set_rate(None)  # the job runs to its end at once
    assert results[0].ok, results[0].error


async def test_an_abort_does_not_wait_for_tokens(tmp_path: Path) -> None:
    """Devices waiting on a limit of 1 KiB/s are let go at the abort: the job ends well
    before its drain timeout, and nothing of it stays."""
    job = Job(
        JobKind.BACKUP,
        StripedBackup(os.urandom(4 * MIB), SMALL),
        str(tmp_path),
        options=JobOptions(devices=4, max_rate=KIB, drain_timeout=30),
    )
    results = []

    async def run() -> None:
        results.append(await job.run())

    with anyio.fail_after(8):  # the drain timeout is 30 s; a waiting device ~60 s
        async with anyio.create_task_group() as tg:
            tg.start_soon(run)
            await anyio.sleep(0.5)
            job.abort("enough")
    assert results[0].status is JobStatus.ABORTED
    assert tree(tmp_path) == {}  # no file of the aborted backup


async def test_a_slow_limit_is_not_a_stall(tmp_path: Path) -> None:
    """One device at 48 KiB/s waits over a second for each 64 KiB transfer, more than
    the stall timeout: the watchdog does not count a wait on a limit as a stall."""
    data = os.urandom(160 * KIB)
    job = Job(
        JobKind.BACKUP,
        StripedBackup(data, SMALL),
        str(tmp_path),
        options=JobOptions(devices=1, max_rate=48 * KIB, stall_timeout=0.8),
    )
    result = await job.run()
    assert result.ok, result.error
    assert result.aborted_by is not AbortCause.WATCHDOG
