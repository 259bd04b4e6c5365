"""An engine's silent end, after every device closed, is not a stall.

SQL Server writes its backup history, and a restore WITH RECOVERY runs redo and undo,
after closing every device: no byte moves for a while, and the job must wait for the
engine's word rather than abort a backup the engine is about to report complete.
"""

from __future__ import annotations

from pathlib import Path

import anyio
import pytest

from tests.coordinator.conftest import SMALL
from vdistream.coordinator import JobOptions, JobStatus, backup
from vdistream.engines import EngineResult, StripedBackup
from vdistream.vdi import Registry

pytestmark = pytest.mark.asyncio


class SlowToFinish(StripedBackup):
    """Closes every device and the set, then takes a while to return."""

    async def run(self, set_name: str, *, registry: Registry | None = None) -> EngineResult:
        result = await super().run(set_name, registry=registry)
        await anyio.sleep(2.5)
        return result


async def test_the_stall_watchdog_waits_for_an_engine_whose_devices_all_closed(
    tmp_path: Path, data: bytes
) -> None:
    options = JobOptions(devices=2, stall_timeout=1.0)
    result = await backup(SlowToFinish(data, SMALL), str(tmp_path), options=options)
    assert result.status is JobStatus.SUCCEEDED, result.error
    assert result.bytes > 0


class SilentBeforeClosing(StripedBackup):
    """Never sends a command: the watchdog must still fire while devices are open."""

    async def run(self, set_name: str, *, registry: Registry | None = None) -> EngineResult:
        await anyio.sleep(30)
        raise AssertionError("not reached")


async def test_the_stall_watchdog_still_fires_while_a_device_is_open(
    tmp_path: Path, data: bytes
) -> None:
    options = JobOptions(devices=2, stall_timeout=1.0, configuration_timeout=20, drain_timeout=1)
    with anyio.fail_after(15):
        result = await backup(SilentBeforeClosing(data, SMALL), str(tmp_path), options=options)
    assert result.status is JobStatus.ABORTED
    assert result.aborted_by is not None
    assert result.aborted_by.value == "watchdog"
