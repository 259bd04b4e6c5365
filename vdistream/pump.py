"""One device's loop: take a command, do it against the device's sink or source, complete.

A pump runs in its own task, one per device (spec §1.4: devices must be served
concurrently). It executes commands one at a time in stream order; the engine keeps
several outstanding, so the next one is already queued when the pump asks.

Command handling (spec §3.3, §3.5):

============  ==============================================================
WRITE         ``sink.write`` (at ``position`` on a disk-like device)
READ          ``source.readinto``; a short read completes with HANDLE_EOF
FLUSH         ``sink.flush`` (durable); nothing to do on restore
COMPLETE      ``sink.flush``: the backup is hardened before the engine hears it
              is complete; the sinks are *published* (committed) only when
              every device finished, so a failure on another device cannot
              leave part of a backup visible
CLEAR_ERROR   success
DISCARD       success, and the job is marked abandoned by the engine
GET/SET_POSITION  disk-like devices only
anything else NOT_SUPPORTED
============  ==============================================================

A storage or pipeline failure (a corrupt or undecryptable stream) completes the command
with an error code the engine understands (DISK_FULL when the medium is full) and is
then raised, so that the coordinator
aborts the job with the storage error as its cause.

Restore: the end of a stream is reported to the engine only once the stream passed
every check. The first READ that finds the source's end calls ``at_end()`` (the
coordinator's check of the stored size and SHA-256, and of the logical ones behind
decryption and decompression) *before* completing with HANDLE_EOF; a failing check
completes that READ with a read fault instead. An engine that publishes its target only
after every device reported its end (every engine of vdistream does: the striping engine's
reassembly waits for each device's end) therefore never publishes a damaged stream.
"""

from __future__ import annotations

import enum
from collections.abc import Callable

from vdistream.errors import (
    PipelineError,
    StorageError,
    StorageFullError,
    VDClosedError,
    VDTimeoutError,
)
from vdistream.progress import DeviceProgress
from vdistream.protocol import Command, CommandCode, Completion, Whence
from vdistream.storage import Sink, Source
from vdistream.vdi import ClientVirtualDevice

__all__ = ("Pump", "PumpEnd")

ERROR_WRITE_FAULT = 29
ERROR_READ_FAULT = 30


class PumpEnd(enum.Enum):
    CLOSED = "closed"  # the engine closed the device: the normal end
    DISCARDED = "discarded"  # the engine sent DISCARD: it is abandoning the backup


class Pump:
    def __init__(
        self,
        device: ClientVirtualDevice,
        progress: DeviceProgress,
        *,
        sink: Sink | None = None,
        source: Source | None = None,
        disk_like: bool = False,
        poll: float = 1.0,
        at_end: Callable[[], None] | None = None,
    ) -> None:
        self.device = device
        self.progress = progress
        self.sink = sink
        self.source = source
        self.disk_like = disk_like
        self.poll = poll
        self.position = 0
        self.discarded = False
        #: restore: checks the whole stream once its end was read (module docstring)
        self.at_end = at_end
        self.ended = False

    async def run(self) -> PumpEnd:
        """Serve commands until the engine closes the device.

        Raises ``VDAbortError`` when the set is aborted and ``StorageError`` when the
        medium fails; every command taken is completed (or the set is aborted) first.
        """
        while True:
            try:
                command = await self.device.get_command(self.poll)
            except VDClosedError:
                return PumpEnd.DISCARDED if self.discarded else PumpEnd.CLOSED
            except VDTimeoutError:
                continue  # a bounded wait; the coordinator's stall watchdog judges silence
            completion, transferred, position = await self._execute(command)
            self.device.complete_command(command, completion, transferred, position)
            self.progress.commands += 1
            self.progress.bytes += transferred if command.code in _DATA else 0

    async def _execute(self, command: Command) -> tuple[int, int, int]:
        code = command.code
        try:
            if code is CommandCode.WRITE and self.sink is not None:
                assert command.buffer is not None
                await self.sink.write(
                    command.buffer, position=command.position if self.disk_like else None
                )
                self.position = (command.position if self.disk_like else self.position) + (
                    command.size
                )
                return Completion.SUCCESS, command.size, 0
            if code is CommandCode.READ and self.source is not None:
                assert command.buffer is not None
                got = await self.source.readinto(
                    command.buffer, position=command.position if self.disk_like else None
                )
                self.position = (command.position if self.disk_like else self.position) + got
                if got == command.size:
                    return Completion.SUCCESS, got, 0
                if not self.ended:
                    self.ended = True
                    if self.at_end is not None:
                        self.at_end()  # raises StorageError: the READ fails, not ends
                return Completion.HANDLE_EOF, got, 0
            if code in (CommandCode.FLUSH, CommandCode.COMPLETE):
                if self.sink is not None:
                    await self.sink.flush()
                return Completion.SUCCESS, 0, 0
        except StorageFullError:
            self.device.complete_command(command, Completion.DISK_FULL)
            raise
        except (StorageError, PipelineError):  # a corrupt stream too: the engine must not go on
            fault = ERROR_READ_FAULT if code is CommandCode.READ else ERROR_WRITE_FAULT
            self.device.complete_command(command, fault)
            raise
        if code is CommandCode.CLEAR_ERROR:
            return Completion.SUCCESS, 0, 0
        if code is CommandCode.DISCARD:
            self.discarded = True
            return Completion.SUCCESS, 0, 0
        if self.disk_like and code is CommandCode.GET_POSITION:
            return Completion.SUCCESS, 0, self.position
        if self.disk_like and code is CommandCode.SET_POSITION:
            return self._set_position(command)
        return Completion.NOT_SUPPORTED, 0, 0

    def _set_position(self, command: Command) -> tuple[int, int, int]:
        if command.size == Whence.BEGINNING:
            target = command.position
        elif command.size == Whence.CURRENT:
            target = self.position + command.position
        elif command.size == Whence.END:
            end = self.sink.size if self.sink is not None else None
            if end is None and self.source is not None:
                end = self.source.size
            if end is None:
                return Completion.NOT_SUPPORTED, 0, self.position
            target = end + command.position
        else:
            return Completion.NOT_SUPPORTED, 0, self.position
        if target < 0:
            return Completion.NOT_SUPPORTED, 0, self.position
        self.position = target
        return Completion.SUCCESS, 0, target


_DATA = frozenset({CommandCode.READ, CommandCode.WRITE})
