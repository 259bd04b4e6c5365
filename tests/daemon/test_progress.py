"""The progress ticker reads what the coordinator job publishes (``statistics()``,
``progress``) into the per-database gauges and the job's live view."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import anyio
import pytest
from prometheus_client import CollectorRegistry

from tests.daemon.conftest import wait_for
from vdistream.coordinator import JobStatus
from vdistream.progress import DeviceSnapshot, ProgressSnapshot
from vdistream.service.jobs import JobRequest
from vdistream.service.metrics import Metrics
from vdistream.service.progress import ProgressTicker
from vdistream.service.runners import LiveJob
from vdistream.service.state import JobRecord, JobStore, JobType
from vdistream.vdi.core import SetStatistics

pytestmark = pytest.mark.timeout(30)


class _Coordinator:
    """What the ticker reads of a coordinator job, nothing else."""

    kind = SimpleNamespace(value="backup")
    status = JobStatus.RUNNING

    def __init__(self, statistics: SetStatistics | None) -> None:
        self._statistics = statistics
        devices = (DeviceSnapshot("d0", 4096, 2, 100.0), DeviceSnapshot("d1", 1024, 1, 50.0))
        self.progress = SimpleNamespace(snapshot=lambda: ProgressSnapshot(2.0, devices))

    def statistics(self) -> SetStatistics | None:
        return self._statistics


@pytest.mark.asyncio
async def test_the_gauges_sum_what_each_running_job_publishes(tmp_path: Path) -> None:
    registry = CollectorRegistry()
    metrics = Metrics(registry, process=False)
    jobs = []
    for statistics in (SetStatistics(8, 3, (1, 2)), SetStatistics(8, 2, (0, 1)), None):
        job = LiveJob(JobRequest(JobType.BACKUP, "app"), JobRecord.new(JobType.BACKUP, "app"))
        job.attach(_Coordinator(statistics))  # type: ignore[arg-type]
        jobs.append(job)

    def gauge(name: str, database: str) -> float | None:
        return registry.get_sample_value(name, {"database": database})

    async with await JobStore.open(tmp_path / "state.db") as store:
        ticker = ProgressTicker(
            store=store, metrics=metrics, tick=0.01, persist_every=3600, abort_fallback=20
        )
        async with anyio.create_task_group() as tg:
            tg.start_soon(ticker.run, lambda: jobs, lambda: ["app", "idle"])
            await wait_for(lambda: gauge("vdistream_buffers_in_use", "app"), what="the gauge")
            tg.cancel_scope.cancel()
    assert gauge("vdistream_buffers_in_use", "app") == 5  # a job without a set adds 0
    assert gauge("vdistream_buffers_in_use", "idle") == 0
    assert gauge("vdistream_throughput_bytes_per_second", "idle") == 0
    live = jobs[0].progress.live
    assert live is not None
    assert (live["kind"], live["status"], live["bytes"]) == ("backup", "running", 5120)
    assert [d["bytes"] for d in live["devices"]] == [4096, 1024]
    device_bytes = {"database": "app", "device": "0"}
    assert registry.get_sample_value("vdistream_device_bytes_total", device_bytes) == 3 * 4096
