"""SQL Server jobs from the library: the coordinator over ``libsqlvdi.so``'s set.

The stand-in SQL Server runs in its own process; the job in this one creates the set
through the stand-in ``libsqlvdi.so`` (ctypes) and runs the statement with the stand-in
``sqlcmd``. What the command line cannot easily provoke is tested here: SQL Server's
serverTimeOut watchdog against a stalled sink, and cancelling the task that runs a job.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import anyio
import pytest

from standin.mssql.control import StandinServer
from tests.coordinator.faults import Faults, FaultyStorage
from vdistream.coordinator import AbortCause, Job, JobKind, JobOptions, JobStatus
from vdistream.engines.base import EngineError
from vdistream.sqlserver.engine import SqlServerBackup, SqlServerStatementError, Transfer
from vdistream.sqlserver.url import MssqlURL
from vdistream.storage import open_storage

pytestmark = [pytest.mark.asyncio, pytest.mark.timeout(120)]

MiB = 1024 * 1024


def shm_debris(standin: StandinServer) -> list[str]:
    """What is left in /dev/shm of the sets this server met (other test runs may share
    the machine: only ours count)."""
    ours = {f"sqlvdi-standin.{name}" for name in standin.sets_seen()}
    found = (p.name for p in Path("/dev/shm").glob("sqlvdi-standin.*"))
    return sorted(n for n in found if n.removesuffix(".buffers") in ours)


def engine(standin: StandinServer, libs: Any, database: str, devices: int) -> SqlServerBackup:
    url = MssqlURL.parse(
        standin.url(database) + "?trigger=sqlcmd",
        password_env={"VDISTREAM_MSSQL_PASSWORD": standin.password},
    )
    return SqlServerBackup(
        url,
        devices,
        Transfer(65536, 1024 * 1024, 4),
        mode="full",
        backup_id="lib-test",
        library=str(libs.client),
    )


async def test_a_stalled_sink_trips_sql_servers_server_timeout(
    standin: StandinServer, sqlvdi_libs: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("VDISTREAM_SQLCMD", str(standin.sqlcmd))
    standin.create_database("slow", 16 * MiB)
    faults = Faults(hang_write_after_bytes=2 * MiB)
    storage = FaultyStorage(open_storage("memory://stall"), faults)
    job = Job(
        JobKind.BACKUP,
        engine(standin, sqlvdi_libs, "slow", 2),
        storage,
        options=JobOptions(devices=2, server_timeout_ms=500, stall_timeout=60, drain_timeout=3),
    )
    with anyio.fail_after(60):
        result = await job.run()
    assert result.status is JobStatus.FAILED
    assert result.aborted_by is AbortCause.ENGINE
    assert isinstance(result.error, EngineError)
    assert "terminating abnormally" in str(result.error)
    assert await storage.list() == []
    assert shm_debris(standin) == []
    assert standin.running() == []


async def test_cancelling_the_task_aborts_the_statement_and_closes_the_set(
    standin: StandinServer, sqlvdi_libs: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("VDISTREAM_SQLCMD", str(standin.sqlcmd))
    standin.create_database("cancelme", 64 * MiB)
    standin.set_pace(4 * MiB)
    storage = open_storage("memory://cancel")
    job = Job(
        JobKind.BACKUP,
        engine(standin, sqlvdi_libs, "cancelme", 2),
        storage,
        options=JobOptions(devices=2, drain_timeout=5),
    )
    with anyio.move_on_after(2):
        await job.run()
    assert job.status is JobStatus.ABORTED
    assert await storage.list() == []
    with anyio.fail_after(10):
        while standin.running():  # noqa: ASYNC110 (another process's state: polled)
            await anyio.sleep(0.05)
    assert shm_debris(standin) == []


async def test_sql_server_refusing_the_statement_aborts_the_set_at_once(
    standin: StandinServer, sqlvdi_libs: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("VDISTREAM_SQLCMD", str(standin.sqlcmd))
    storage = open_storage("memory://refused")
    job = Job(
        JobKind.BACKUP,
        engine(standin, sqlvdi_libs, "missing", 3),
        storage,
        options=JobOptions(devices=3, configuration_timeout=60),
    )
    with anyio.fail_after(20):  # far less than the configuration timeout
        result = await job.run()
    assert result.status is JobStatus.FAILED
    assert isinstance(result.error, SqlServerStatementError)
    assert 911 in result.error.numbers
    assert "does not exist" in str(result.error)
    assert shm_debris(standin) == []


async def test_a_full_disk_fails_the_job_and_sql_server_hears_of_it(
    standin: StandinServer, sqlvdi_libs: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("VDISTREAM_SQLCMD", str(standin.sqlcmd))
    standin.create_database("full_disk", 16 * MiB)
    faults = Faults(fail_after_bytes=3 * MiB)
    storage = FaultyStorage(open_storage("memory://full"), faults)
    job = Job(
        JobKind.BACKUP,
        engine(standin, sqlvdi_libs, "full_disk", 2),
        storage,
        options=JobOptions(devices=2, drain_timeout=5),
    )
    with anyio.fail_after(60):
        result = await job.run()
    assert result.status is JobStatus.FAILED
    assert result.aborted_by is AbortCause.SINK
    assert await storage.list() == []
    assert shm_debris(standin) == []
    assert standin.running() == []
    # SQL Server saw the backup fail: no history row names it
    assert not [row for row in standin.history("full_disk") if row.get("name") == "lib-test"]
