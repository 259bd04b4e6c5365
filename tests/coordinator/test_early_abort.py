"""An abort that comes before ``Job.run()`` starts ends the job at once.

A daemon may abort a job it has created but whose task has not started yet (a stop
request, a shutdown). That abort must not be lost: ``run()`` returns the aborted result
promptly, writes nothing and leaves no set behind, instead of running the whole backup
and then waiting for the stall watchdog.
"""

from __future__ import annotations

import os
from pathlib import Path

import anyio
import pytest

from tests.coordinator.conftest import SMALL
from vdistream.coordinator import AbortCause, Job, JobKind, JobOptions, JobStatus
from vdistream.engines import StripedBackup
from vdistream.errors import JobAbortedError
from vdistream.storage import FileStorage

pytestmark = pytest.mark.asyncio


@pytest.mark.parametrize("cause", [AbortCause.USER, AbortCause.SHUTDOWN])
async def test_an_abort_before_run_ends_the_job_at_once(tmp_path: Path, cause: AbortCause) -> None:
    job = Job(
        JobKind.BACKUP,
        StripedBackup(os.urandom(1024 * 1024), SMALL),
        FileStorage(tmp_path),
        backup_id="early",
        options=JobOptions(devices=2),  # the default 60 s stall watchdog
    )
    job.abort("stopped before it started", cause=cause)
    with anyio.fail_after(10, reason="run() ignored an abort made before it started"):
        result = await job.run()
    assert result.status is JobStatus.ABORTED
    assert result.aborted_by is cause
    assert result.reason == "stopped before it started"
    assert isinstance(result.error, JobAbortedError)
    assert [p for p in tmp_path.rglob("*") if p.is_file()] == []  # noqa: ASYNC240
    assert job.registry.names() == []
