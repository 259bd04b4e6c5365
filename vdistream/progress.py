"""Progress of a running job: per-device bytes, command counts and throughput.

Counters are plain integers updated by the pump tasks on the event loop thread, so a
snapshot is consistent without locks. ``JobProgress.watch`` yields snapshots at an
interval for as long as the job runs.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import AsyncIterator

import anyio

__all__ = ("DeviceProgress", "DeviceSnapshot", "JobProgress", "ProgressSnapshot")


@dataclasses.dataclass(frozen=True, slots=True)
class DeviceSnapshot:
    name: str
    bytes: int
    commands: int
    rate: float  # bytes per second since the device started


@dataclasses.dataclass(frozen=True, slots=True)
class ProgressSnapshot:
    elapsed: float
    devices: tuple[DeviceSnapshot, ...]

    @property
    def bytes(self) -> int:
        return sum(d.bytes for d in self.devices)

    @property
    def rate(self) -> float:
        return self.bytes / self.elapsed if self.elapsed > 0 else 0.0


class DeviceProgress:
    __slots__ = ("bytes", "commands", "name")

    def __init__(self, name: str) -> None:
        self.name = name
        self.bytes = 0
        self.commands = 0


class JobProgress:
    def __init__(self) -> None:
        self.started = time.monotonic()
        self.devices: list[DeviceProgress] = []
        self.finished = False

    def add_device(self, name: str) -> DeviceProgress:
        device = DeviceProgress(name)
        self.devices.append(device)
        return device

    def moved(self) -> tuple[int, int]:
        """Total bytes and commands so far: what the stall watchdog compares."""
        return sum(d.bytes for d in self.devices), sum(d.commands for d in self.devices)

    def snapshot(self) -> ProgressSnapshot:
        elapsed = time.monotonic() - self.started
        return ProgressSnapshot(
            elapsed,
            tuple(
                DeviceSnapshot(d.name, d.bytes, d.commands, d.bytes / elapsed if elapsed else 0.0)
                for d in self.devices
            ),
        )

    async def watch(self, interval: float = 1.0) -> AsyncIterator[ProgressSnapshot]:
        """Snapshots every ``interval`` seconds until the job finished (then one last)."""
        while not self.finished:
            yield self.snapshot()
            await anyio.sleep(interval)
        yield self.snapshot()
