"""A minimal client side for engine tests (not the production coordinator).

One task per device: get_command -> execute against an in-memory medium ->
complete_command, until the device is closed or the set aborted. WRITE data is kept
per device in a bytearray; READs are served from it, the short read at the end
completing with HANDLE_EOF (or ``eof_code``). FLUSH, COMPLETE and CLEAR_ERROR succeed;
SET_POSITION / GET_POSITION keep a per-device position for disk-like devices.

Knobs for tests: ``batch`` takes several commands (waiting ``delay`` after the first
one) before completing them in reverse order, so completions come out of order while
the stream order is kept; ``delay`` alone slows each command down; ``fail`` completes a chosen
command with an error code; ``abort_after`` makes the client signal abort after that
many commands;
``timeout`` is the stall watchdog (a get_command that waits longer aborts the set).
"""

from __future__ import annotations

import dataclasses
import itertools
from typing import Any

import anyio

from vdistream import (
    ClientVirtualDevice,
    ClientVirtualDeviceSet,
    Command,
    CommandCode,
    Completion,
    Features,
    Registry,
    VDAbortError,
    VDClosedError,
    VDConfig,
    VDTimeoutError,
    Whence,
)
from vdistream.engines import (
    BytesConsumer,
    Engine,
    EngineResult,
    StripedBackup,
    StripedRestore,
    StripingOptions,
    device_names,
)

_names = itertools.count()


def set_name() -> str:
    return f"engine-test-{next(_names)}"


@dataclasses.dataclass(frozen=True)
class Fail:
    """Complete the ``nth`` (0-based) command of ``code`` on ``device`` with ``completion``."""

    device: int
    code: CommandCode
    completion: int
    nth: int = 0
    bytes_transferred: int = 0


class FakeClient:
    def __init__(
        self,
        registry: Registry,
        devices: int,
        *,
        features: int = 0,
        streams: list[bytes] | None = None,
        eof_code: int = Completion.HANDLE_EOF,
        timeout: float = 5.0,
        config_timeout: float | None = None,
        batch: int = 1,
        delay: float = 0.0,
        fail: Fail | None = None,
        abort_after: int | None = None,
        name: str | None = None,
    ) -> None:
        self.name = name or set_name()
        self.devices = devices
        self.media = [bytearray(s) for s in streams] if streams else []
        self.media += [bytearray() for _ in range(devices - len(self.media))]
        self.positions = [0] * devices
        self.eof_code = eof_code
        self.timeout = timeout
        self.config_timeout = timeout if config_timeout is None else config_timeout
        self.batch = batch
        self.delay = delay
        self.fail = fail
        self.abort_after = abort_after
        self.seen: list[list[Command]] = [[] for _ in range(devices)]
        self.codes: list[list[CommandCode]] = [[] for _ in range(devices)]
        self.max_held = [0] * devices
        self.closed = [False] * devices
        self.aborted = False
        self.timed_out = False
        self.config: VDConfig | None = None
        self.vds = ClientVirtualDeviceSet(registry=registry)
        self.vds.create(self.name, VDConfig(device_count=devices, features=features))

    @property
    def streams(self) -> list[bytes]:
        return [bytes(m) for m in self.media]

    def sizes(self, device: int, code: CommandCode) -> list[int]:
        return [c.size for c in self.seen[device] if c.code is code]

    async def run(self) -> None:
        try:
            try:
                self.config = await self.vds.get_configuration(self.config_timeout)
            except VDAbortError:
                self.aborted = True
                return
            except VDTimeoutError:
                self.timed_out = True
                self.vds.signal_abort()
                return
            try:
                devs = [self.vds.open_device(n) for n in device_names(self.name, self.devices)]
            except VDAbortError:
                self.aborted = True
                return
            async with anyio.create_task_group() as tg:
                for index, dev in enumerate(devs):
                    tg.start_soon(self._serve, index, dev)
        finally:
            self.vds.close()

    async def _serve(self, index: int, dev: ClientVirtualDevice) -> None:
        while True:
            held: list[Command] = []
            try:
                held.append(await dev.get_command(self.timeout))
                if self.batch > 1:
                    await anyio.sleep(self.delay)  # let the engine queue more
                while len(held) < self.batch:
                    try:
                        held.append(await dev.get_command(0))
                    except (VDTimeoutError, VDClosedError):
                        break
            except VDClosedError:
                self.closed[index] = True
                return
            except VDAbortError:
                self.aborted = True
                return
            except VDTimeoutError:
                # the stall watchdog: nothing arrived for too long
                self.timed_out = True
                self.vds.signal_abort()
                return
            self.max_held[index] = max(self.max_held[index], len(held))
            results = [self._execute(index, cmd) for cmd in held]
            if self.delay and self.batch == 1:
                await anyio.sleep(self.delay)
            for cmd, result in reversed(list(zip(held, results, strict=True))):
                try:
                    dev.complete_command(cmd, *result)
                except VDAbortError:
                    self.aborted = True
                    return

    def _execute(self, index: int, cmd: Command) -> tuple[int, int, int]:
        self.seen[index].append(cmd)
        self.codes[index].append(cmd.code)
        if self.abort_after is not None and sum(map(len, self.seen)) >= self.abort_after:
            self.vds.signal_abort()  # the client gives up (its own abort)
        fail = self.fail
        if fail is not None and fail.device == index and fail.code is cmd.code:
            nth = sum(1 for c in self.seen[index] if c.code is cmd.code) - 1
            if nth == fail.nth:
                return fail.completion, fail.bytes_transferred, 0
        medium = self.media[index]
        disk = self.config is not None and bool(self.config.features & Features.RANDOM_ACCESS)
        if cmd.code is CommandCode.WRITE:
            assert cmd.buffer is not None
            start = cmd.position if disk else self.positions[index]
            if len(medium) < start:
                medium.extend(bytes(start - len(medium)))
            medium[start : start + cmd.size] = cmd.buffer
            self.positions[index] = start + cmd.size
            return Completion.SUCCESS, cmd.size, 0
        if cmd.code is CommandCode.READ:
            assert cmd.buffer is not None
            start = cmd.position if disk else self.positions[index]
            count = max(0, min(cmd.size, len(medium) - start))
            cmd.buffer[:count] = medium[start : start + count]
            self.positions[index] = start + count
            return (Completion.SUCCESS if count == cmd.size else self.eof_code), count, 0
        if cmd.code is CommandCode.SET_POSITION:
            base = {Whence.BEGINNING: 0, Whence.CURRENT: self.positions[index]}.get(
                Whence(cmd.size), len(medium)
            )
            self.positions[index] = base + cmd.position
            return Completion.SUCCESS, 0, self.positions[index]
        if cmd.code is CommandCode.GET_POSITION:
            return Completion.SUCCESS, 0, self.positions[index]
        if cmd.code in (CommandCode.FLUSH, CommandCode.COMPLETE, CommandCode.CLEAR_ERROR):
            return Completion.SUCCESS, 0, 0
        return Completion.NOT_SUPPORTED, 0, 0


# --- running an engine against the fake client -----------------------------------------

#: Small sizes so that many-chunk, many-device tests stay fast.
BLOCK = 4096
CHUNK = 65536
OPTIONS = StripingOptions(block_size=BLOCK, max_transfer_size=CHUNK)


async def run_job(
    engine: Engine, client: FakeClient, registry: Registry, *, limit: float = 20.0
) -> EngineResult:
    """Run ``engine`` against ``client``; the engine's error is raised once the client
    has finished too (so that the test can look at what the client saw)."""
    outcome: list[EngineResult | Exception] = []
    with anyio.fail_after(limit):
        async with anyio.create_task_group() as tg:
            tg.start_soon(client.run)
            try:
                outcome.append(await engine.run(client.name, registry=registry))
            except Exception as exc:
                outcome.append(exc)
    (result,) = outcome
    if isinstance(result, Exception):
        raise result
    return result


async def backup(
    registry: Registry,
    data: bytes,
    devices: int,
    *,
    features: int = 0,
    options: StripingOptions = OPTIONS,
    **client: Any,
) -> tuple[FakeClient, EngineResult]:
    fake = FakeClient(registry, devices, features=features, **client)
    result = await run_job(StripedBackup(data, options), fake, registry)
    return fake, result


async def restore(
    registry: Registry,
    streams: list[bytes],
    *,
    features: int = 0,
    options: StripingOptions = OPTIONS,
    **client: Any,
) -> tuple[bytes, FakeClient, EngineResult]:
    fake = FakeClient(registry, len(streams), features=features, streams=streams, **client)
    target = BytesConsumer()
    result = await run_job(StripedRestore(target, options), fake, registry)
    assert target.finished
    return target.getvalue(), fake, result
