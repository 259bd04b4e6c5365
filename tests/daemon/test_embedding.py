"""``Service`` inside a host application's event loop: the host's cancellation shuts it
down cleanly, and it touches nothing global (logging, signals, prometheus' registry)."""

from __future__ import annotations

import contextlib
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path

import anyio
import prometheus_client
import pytest
from prometheus_client import CollectorRegistry

from tests.daemon.conftest import embedded_settings, wait_for
from vdistream.service import JobRecord, JobState, JobStore, JobType, Service, runners
from vdistream.service.jobs import QueueFullError, ShuttingDownError, UnknownDatabaseError
from vdistream.storage.s3 import S3Storage

pytestmark = pytest.mark.timeout(60)


@pytest.mark.asyncio
async def test_the_hosts_cancellation_aborts_jobs_and_cleans_up(tmp_path: Path) -> None:
    """1. A host runs the service (API included) and submits a slow backup.
    2. The host cancels the block while the job runs.
    3. The job is recorded aborted, nothing of it is in the destination, the socket
       is gone and the state directory's lock is free (the service starts again)."""
    settings = embedded_settings(tmp_path)
    registry = CollectorRegistry()
    job_id = ""
    with anyio.move_on_after(30) as guard:
        async with (
            anyio.create_task_group() as host,
            Service(settings, registry=registry) as service,
        ):
            assert settings.service.socket_path.exists()
            record = await service.submit("backup", "slow")
            job_id = record.id
            await wait_for(lambda: _moved(service, job_id), timeout=20, what="the job moving bytes")
            host.cancel_scope.cancel()
            await anyio.sleep_forever()
    assert not guard.cancelled_caught
    async with await JobStore.open(settings.service.state_db) as store:
        job = await store.get(job_id)
    assert job.state.value == "aborted"
    assert not settings.service.socket_path.exists()
    backups = tmp_path / "backups"
    assert not backups.exists() or list(backups.iterdir()) == []
    assert registry.get_sample_value(
        "vdistream_jobs_total", {"kind": "backup", "outcome": "aborted"}
    )
    assert prometheus_client.REGISTRY.get_sample_value("vdistream_jobs_total") is None

    async with Service(settings, api=False) as again:
        assert again.ready
        assert (await again.jobs())[0].id == job_id


@pytest.mark.asyncio
async def test_start_cleans_what_killed_restores_and_verifications_left(
    tmp_path: Path,
) -> None:
    """A previous run died (as after kill -9) with a restore and a verification
    running: at start both are failed, the restore's temporary files beside its target
    are removed (the target's neighbours are not), and the work directory, where
    verifications and SQLite snapshots stage their data, is emptied."""
    settings = embedded_settings(tmp_path)
    target = tmp_path / "restore" / "app.db"
    target.parent.mkdir()
    partials = [
        target.with_name("app.db.partial"),
        target.with_name(".app.db.k2j3h4.vdistream-partial"),
    ]
    neighbours = [target.with_name("other.db"), target.with_name(".other.db.x.vdistream-partial")]
    for path in partials + neighbours:
        path.write_bytes(b"half a database")
    work = settings.service.work_dir
    (work / "vdistream-verify-abc").mkdir(parents=True)
    (work / "vdistream-verify-abc" / "restored.db").write_bytes(b"x" * 1000)
    async with await JobStore.open(settings.service.state_db) as store:
        restore = await store.add(
            JobRecord.new(JobType.RESTORE, "app", params={"target": str(target)})
        )
        await store.update(restore.id, state=JobState.RUNNING)
        verify = await store.add(JobRecord.new(JobType.VERIFY, "app", params={}))
        await store.update(verify.id, state=JobState.RUNNING)

    async with Service(settings, api=False) as service:
        after = {job.id: job for job in await service.jobs()}
    assert after[restore.id].state is JobState.FAILED
    assert after[verify.id].state is JobState.FAILED
    assert sorted(after[restore.id].result["cleanup"]["removed"]) == sorted(map(str, partials))
    assert not any(path.exists() for path in partials)
    assert all(path.exists() for path in neighbours)
    assert work.is_dir()
    assert list(work.iterdir()) == []


@pytest.mark.asyncio
async def test_a_jobs_storage_retries_are_counted_through_the_s3_hook(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A job submitted by the host (its task starts in the host's context) still reports
    its S3 retries to ``vdistream_retries_total``: 3 attempts, 2 retries."""

    async def unreachable_backup(*args: object, **kwargs: object) -> object:
        storage = S3Storage(
            "bucket", endpoint_url="http://127.0.0.1:9", max_attempts=3, backoff_base=0.01
        )
        async with storage:
            await storage.list()
        raise AssertionError("the endpoint answered")

    monkeypatch.setattr(runners, "run_backup", unreachable_backup)
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.setenv(name, "testing")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    registry = CollectorRegistry()
    async with Service(embedded_settings(tmp_path), registry=registry, api=False) as service:
        record = await service.submit("backup", "app", verify=False)
        ended = await service.wait(record.id)
    assert ended.state is JobState.FAILED
    assert "after 3 attempts" in (ended.error or "")
    retries = [
        sample
        for metric in registry.collect()
        if metric.name == "vdistream_retries"
        for sample in metric.samples
        if sample.name == "vdistream_retries_total"
    ]
    assert sum(sample.value for sample in retries) == 2


async def _moved(service: Service, job_id: str) -> bool:
    return bool((await service.job(job_id))["progress"].get("bytes", 0))


@pytest.mark.asyncio
async def test_embedding_api_submit_wait_abort_and_refusals(tmp_path: Path) -> None:
    """``submit``, ``wait``, ``jobs``, ``abort`` from the host; an unknown database,
    a full queue and a stopped intake are refused with their errors."""
    settings = embedded_settings(tmp_path, max_jobs=1, max_queued=0)
    async with Service(settings, api=False) as service:
        record = await service.submit("backup", "app", verify=False)
        done = await service.wait(record.id)
        assert done.state.value == "succeeded"
        assert done.backup_id is not None
        assert done.backup_id.startswith("app.")
        with pytest.raises(UnknownDatabaseError, match="no database 'nope'"):
            await service.submit("backup", "nope")

        slow = await service.submit("backup", "slow")
        with pytest.raises(QueueFullError, match=r"service.max_queued = 0"):
            await service.submit("backup", "app")
        await service.abort(slow.id, "host says stop")
        aborted = await service.wait(slow.id)
        assert aborted.state.value == "aborted"
        assert aborted.error is not None
        assert "host says stop" in aborted.error
        assert [j.id for j in await service.jobs()] == [slow.id, record.id]

        await service.shutdown()
        assert not service.ready
        with pytest.raises(ShuttingDownError):
            await service.submit("backup", "app")
    with pytest.raises(RuntimeError, match="not running"):
        await service.submit("backup", "app")


def test_importing_the_daemon_modules_configures_nothing() -> None:
    code = textwrap.dedent(
        """
        import logging, signal
        handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)}
        import prometheus_client, structlog
        before = set(prometheus_client.REGISTRY._names_to_collectors)
        import vdistream.service
        from vdistream.service import Service
        from vdistream.service import admission, api, daemon, manager, metrics, serve
        from vdistream.service import progress, recovery, runners
        from vdistream.cli import client, daemon as commands
        metrics.Metrics()
        assert {s: signal.getsignal(s) for s in handlers} == handlers
        assert logging.getLogger().handlers == []
        assert logging.getLogger("vdistream").handlers == []
        assert not structlog.is_configured()
        assert set(prometheus_client.REGISTRY._names_to_collectors) == before
        print("clean")
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "clean"


def test_the_command_line_does_not_load_the_daemon_for_other_commands() -> None:
    code = (
        "import sys, vdistream.cli; vdistream.cli.build_parser(); "
        "print('aiohttp.web' in sys.modules)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"


@pytest.mark.asyncio
async def test_a_hosts_error_comes_out_through_the_services_task_group(tmp_path: Path) -> None:
    """As ever: the host's own error leaves ``async with Service`` in an ExceptionGroup,
    after the shutdown (the state database closed: a new Service starts at once)."""
    settings = embedded_settings(tmp_path)
    with pytest.RaisesGroup(pytest.RaisesExc(ValueError, match="^host error$")):
        async with Service(settings, registry=CollectorRegistry(), api=False):
            raise ValueError("host error")
    async with Service(settings, registry=CollectorRegistry(), api=False) as service:
        assert service.manager.accepting


@pytest.mark.asyncio
async def test_jobs_queued_when_the_start_fails_are_recorded_aborted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A start that fails after jobs were queued: they end aborted, none stays queued."""
    from vdistream.service import api
    from vdistream.service.jobs import JobRequest

    services: list[Service] = []

    async def failing_start(self: object) -> None:
        manager = services[0].manager
        for _ in range(2):
            await manager.submit(JobRequest(JobType.BACKUP, "slow"))
        await anyio.sleep(0.2)
        raise api.ApiStartError("cannot listen (test)")

    monkeypatch.setattr(api.ApiServer, "start", failing_start)
    settings = embedded_settings(tmp_path)
    services.append(Service(settings, registry=CollectorRegistry()))
    with pytest.raises(BaseException) as caught:
        async with services[0]:
            pass
    assert caught.group_contains(api.ApiStartError) or isinstance(caught.value, api.ApiStartError)
    with contextlib.closing(sqlite3.connect(settings.service.state_db)) as db:
        states = [row[0] for row in db.execute("SELECT state FROM jobs")]
    assert states == ["aborted", "aborted"]
