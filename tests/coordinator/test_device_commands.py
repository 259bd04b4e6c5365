"""Commands through a job's device, as an engine sees them.

GET_POSITION and SET_POSITION (spec §3.5): a disk-like device reports and moves its
position as the engine asks, relative to the beginning, the current position or the end
of what was written; anything it cannot do completes NOT_SUPPORTED and leaves the
position where it was; a WRITE lands at the position it names, in any order. A
pipe-like device supports no position command. A device the engine leaves idle for a
while is still served when the engine comes back. The job counts every command.
"""

from __future__ import annotations

from pathlib import Path

import anyio
import pytest

from vdistream.coordinator import ExpectedStream, Job, JobKind, JobOptions, backup
from vdistream.engines import Direction, Engine, EngineResult, device_names
from vdistream.protocol import CommandCode, Completion, Features, Whence
from vdistream.storage import FileStorage
from vdistream.vdi import Registry, ServerVirtualDeviceSet

pytestmark = pytest.mark.asyncio

BLOCK = 65536
A, B = b"\xaa" * BLOCK, b"\xbb" * BLOCK

#: (command, whence or size, offset) -> the expected (completion, position), in order,
#: after device 0 of a disk-like set wrote B at BLOCK, then A at 0.
SCRIPT: list[tuple[CommandCode, int, int, Completion, int]] = [
    (CommandCode.GET_POSITION, 0, 0, Completion.SUCCESS, BLOCK),  # just after A
    (CommandCode.SET_POSITION, Whence.BEGINNING, 4096, Completion.SUCCESS, 4096),
    (CommandCode.GET_POSITION, 0, 0, Completion.SUCCESS, 4096),
    (CommandCode.SET_POSITION, Whence.CURRENT, 8192, Completion.SUCCESS, 12288),
    (CommandCode.SET_POSITION, Whence.CURRENT, -4096, Completion.SUCCESS, 8192),
    (CommandCode.SET_POSITION, Whence.END, -512, Completion.SUCCESS, 2 * BLOCK - 512),
    (CommandCode.SET_POSITION, Whence.END, 0, Completion.SUCCESS, 2 * BLOCK),
    # refused: before the beginning, or an unknown origin; the position stays
    (CommandCode.SET_POSITION, Whence.CURRENT, -3 * BLOCK, Completion.NOT_SUPPORTED, 2 * BLOCK),
    (CommandCode.SET_POSITION, Whence.BEGINNING, -1, Completion.NOT_SUPPORTED, 2 * BLOCK),
    (CommandCode.SET_POSITION, 7, 0, Completion.NOT_SUPPORTED, 2 * BLOCK),
    (CommandCode.GET_POSITION, 0, 0, Completion.SUCCESS, 2 * BLOCK),
]


class _Positioning(Engine):
    """Writes two blocks on each device (B at BLOCK then A at 0 when ``backwards``, else
    A then B), waits ``pause`` seconds, then sends ``script`` on device 0, clearing the
    error after each command that fails. Counts the commands sent to each device."""

    direction = Direction.BACKUP

    def __init__(
        self,
        script: list[tuple[CommandCode, int, int]],
        *,
        backwards: bool = False,
        pause: float = 0,
    ) -> None:
        self.script = script
        self.backwards = backwards
        self.pause = pause
        self.results: list[tuple[Completion, int]] = []
        self.sent: list[int] = []

    async def run(self, set_name: str, *, registry: Registry | None = None) -> EngineResult:
        sds = ServerVirtualDeviceSet(registry=registry)
        sds.open(None, set_name)
        count = sds.get_configuration().device_count
        sds.begin_configuration(Features.WRITE_MEDIA, 4096, 0, BLOCK)
        sds.request_buffers(BLOCK, 0, count)
        sds.end_configuration()
        devices = [sds.open_device(name) for name in device_names(set_name, count)]
        self.sent = [0] * count
        await sds.wait_active(5)
        blocks = [(BLOCK, B), (0, A)] if self.backwards else [(0, A), (BLOCK, B)]
        for index, device in enumerate(devices):
            for offset, content in blocks:
                buffer = await sds.allocate_buffer(BLOCK)
                buffer[:] = content
                written = await device.send_command(CommandCode.WRITE, BLOCK, offset, buffer)
                self.sent[index] += 1
                assert (written.completion, written.bytes_transferred) == (
                    Completion.SUCCESS,
                    BLOCK,
                )
                assert written.position == 0  # a WRITE reports no position
                sds.free_buffer(buffer)
        await anyio.sleep(self.pause)
        for code, size, position in self.script:
            result = await devices[0].send_command(code, size, position)
            self.sent[0] += 1
            self.results.append((Completion(result.completion), result.position))
            assert result.bytes_transferred == 0  # none of them moves data
            if not result.succeeded:  # the device holds the error until it is cleared
                cleared = await devices[0].send_command(CommandCode.CLEAR_ERROR)
                self.sent[0] += 1
                assert (cleared.completion, cleared.bytes_transferred, cleared.position) == (
                    Completion.SUCCESS,
                    0,
                    0,
                )
        for device in devices:
            device.close_device()
        sds.close()
        return EngineResult(Direction.BACKUP, set_name, (), 2 * BLOCK * count)


async def _run(tmp_path: Path, engine: _Positioning, *, disk_like: bool) -> None:
    job = Job(
        JobKind.BACKUP,
        engine,
        FileStorage(tmp_path),
        backup_id="positions",
        options=JobOptions(devices=2, disk_like=disk_like),
    )
    with anyio.fail_after(30, reason="the job with position commands did not end"):
        result = await job.run()
    assert result.ok, result.error
    # the job counts every command and the bytes of the WRITEs, per device
    assert [(d.commands, d.bytes) for d in result.devices] == [
        (sent, 2 * BLOCK) for sent in engine.sent
    ]
    # moving the position wrote nothing; every WRITE landed where it said
    for device in result.devices:
        assert (tmp_path / device.key).read_bytes() == A + B


async def test_a_disk_like_device_reports_and_moves_its_position(tmp_path: Path) -> None:
    engine = _Positioning(
        [(code, size, position) for code, size, position, _, _ in SCRIPT], backwards=True
    )
    await _run(tmp_path, engine, disk_like=True)
    expected = [(completion, position) for _, _, _, completion, position in SCRIPT]
    for step, (got, want) in enumerate(zip(engine.results, expected, strict=True)):
        assert got == want, (step, SCRIPT[step])


async def test_a_pipe_like_device_supports_no_position_command(tmp_path: Path) -> None:
    engine = _Positioning(
        [(CommandCode.GET_POSITION, 0, 0), (CommandCode.SET_POSITION, Whence.BEGINNING, 0)]
    )
    await _run(tmp_path, engine, disk_like=False)
    assert engine.results == [(Completion.NOT_SUPPORTED, 0)] * 2


async def test_a_device_left_idle_is_still_served(tmp_path: Path) -> None:
    # Longer than any internal poll of the pump: silence alone must not end a device.
    engine = _Positioning([(CommandCode.FLUSH, 0, 0)], pause=1.5)
    await _run(tmp_path, engine, disk_like=False)
    assert engine.results == [(Completion.SUCCESS, 0)]


class _Seeking(Engine):
    """Restores one disk-like device: reads its second block, then its first, then
    moves relative to the end; records (completion, bytes, position, data read)."""

    direction = Direction.RESTORE

    def __init__(self) -> None:
        self.results: list[tuple[Completion, int, int, bytes]] = []

    async def run(self, set_name: str, *, registry: Registry | None = None) -> EngineResult:
        sds = ServerVirtualDeviceSet(registry=registry)
        sds.open(None, set_name)
        sds.begin_configuration(Features.READ_MEDIA, 4096, 0, BLOCK)
        sds.request_buffers(BLOCK, 0, 1)
        sds.end_configuration()
        (device,) = [sds.open_device(name) for name in device_names(set_name, 1)]
        await sds.wait_active(5)
        buffer = await sds.allocate_buffer(BLOCK)
        for code, size, position in [
            (CommandCode.READ, BLOCK, BLOCK),
            (CommandCode.READ, BLOCK, 0),
            (CommandCode.GET_POSITION, 0, 0),
            (CommandCode.SET_POSITION, Whence.END, -100),
            (CommandCode.GET_POSITION, 0, 0),
        ]:
            data = buffer if code is CommandCode.READ else None
            result = await device.send_command(code, size, position, data)
            read = bytes(buffer[: result.bytes_transferred]) if data is not None else b""
            self.results.append(
                (Completion(result.completion), result.bytes_transferred, result.position, read)
            )
        sds.free_buffer(buffer)
        device.close_device()
        sds.close()
        return EngineResult(Direction.RESTORE, set_name, (), 2 * BLOCK)


async def test_a_disk_like_restore_reads_and_moves_where_its_engine_says(
    tmp_path: Path,
) -> None:
    written = _Positioning([], backwards=False)
    options = JobOptions(devices=1, disk_like=True)
    with anyio.fail_after(30, reason="the backup did not end"):
        stored = await backup(written, str(tmp_path), backup_id="p", options=options)
    assert stored.ok, stored.error
    (device,) = stored.devices
    assert device.stored_bytes == 2 * BLOCK
    engine = _Seeking()
    expected = [ExpectedStream(2 * BLOCK, device.stored_sha256 or "")]
    job = Job(
        JobKind.RESTORE, engine, str(tmp_path), backup_id="p", options=options, expected=expected
    )
    with anyio.fail_after(30, reason="the restore did not end"):
        await job.run()  # it reads out of order: its checksum is not the point
    assert engine.results == [
        (Completion.SUCCESS, BLOCK, 0, B),  # the READ at BLOCK got the second block
        (Completion.SUCCESS, BLOCK, 0, A),
        (Completion.SUCCESS, 0, BLOCK, b""),  # just after the first block
        (Completion.SUCCESS, 0, 2 * BLOCK - 100, b""),
        (Completion.SUCCESS, 0, 2 * BLOCK - 100, b""),
    ]
