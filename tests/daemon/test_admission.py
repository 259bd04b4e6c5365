"""``Admission`` alone: FIFO within the limits, a bounded queue, and the verification
after a backup never refused (no daemon, no I/O)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from tests.daemon.conftest import embedded_settings
from vdistream.service.admission import Admission
from vdistream.service.jobs import JobRequest, QueueFullError, UnknownDatabaseError
from vdistream.service.runners import LiveJob
from vdistream.service.settings import Settings
from vdistream.service.state import JobType


def _admit(admission: Admission, settings: Settings, database: str, **kw: bool) -> LiveJob:
    request, resolved = admission.resolve(settings, JobRequest(JobType.BACKUP, database))
    job = admission.admit(settings, request, resolved, **kw)
    job.stored = True  # as JobManager.submit does once the store has it
    return job


def test_jobs_start_fifo_within_the_limits_and_the_queue_is_bounded(tmp_path: Path) -> None:
    settings = embedded_settings(tmp_path, max_jobs=2, max_queued=2)
    admission = Admission()
    first, second = (_admit(admission, settings, "app") for _ in range(2))
    other = _admit(admission, settings, "slow")
    # databases.*.max_jobs is 1: the second job of app waits, slow's may pass it
    assert admission.startable(settings) == [first, other]
    assert admission.position(second) == 0
    assert admission.counts == {"queued": 1, "running": 2}
    waiting = _admit(admission, settings, "slow")
    with pytest.raises(QueueFullError, match=r"2 running .* and 2 queued"):
        _admit(admission, settings, "app")
    internal = _admit(admission, settings, "app", internal=True)  # never refused
    assert admission.ids() == [j.id for j in (first, second, other, waiting, internal)]
    admission.release(first)
    assert admission.startable(settings) == [second]
    internal.record = dataclasses.replace(internal.record, backup_id="app.b1")
    assert admission.backups_in_use("app", second) == {"app.b1"}
    assert admission.backups_in_use("app", internal) == set()
    assert admission.dequeue(internal)
    assert not admission.dequeue(internal)
    assert admission.position(waiting) == 0


def test_a_request_names_a_configured_database(tmp_path: Path) -> None:
    settings = embedded_settings(tmp_path)
    with pytest.raises(UnknownDatabaseError, match=r"no database 'nope'.*configured: app, slow"):
        Admission().resolve(settings, JobRequest(JobType.BACKUP, "nope"))
    source = settings.databases["app"].url
    request = JobRequest(JobType.BACKUP, "", source=source, destination="local")
    resolved, database = Admission().resolve(settings, request)
    assert (resolved.database, database.name) == ("app", "app")
