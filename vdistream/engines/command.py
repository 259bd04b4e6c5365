"""The generic engine: any command's standard output as a backup, its input as a restore.

``CommandBackup(command)`` stripes what ``command`` writes to its standard output over
the devices (``tar -C dir -cf - .``, ``mysqldump ...``, ``zfs send ...``);
``CommandRestore(command)`` feeds the reassembled, verified stream to ``command``'s
standard input (``tar -x -C dir``). The stream on the devices is the striping engine's, so
the two meet like ``StripedBackup`` and ``StripedRestore`` do.

``command`` is an argv list, or a string split with ``shlex`` (quotes work, nothing
else of a shell does: no pipes, no redirections, no variables). ``shell=True`` runs a
string with ``/bin/sh -c`` instead; only then is it a shell's command line.

Failure semantics are those of ``vdistream.engines.process``: a backup fails with
``ProducerFailedError`` (exit status and the tool's stderr in the message) unless the
command exits 0 after its output ended; a restore fails with ``ConsumerFailedError``
when the command exits non-zero or stops reading. A restore command sees end of input
only once the whole stream was verified; what it did with the bytes before a failure
(files ``tar`` already extracted, for example) is its own and stays.
"""

from __future__ import annotations

import os
import shlex
import uuid
from collections.abc import Sequence
from typing import Unpack

import anyio.lowlevel

from vdistream.engines.faults import FailPoint
from vdistream.engines.process import ProcessConsumer, ProcessOptions, ProcessProducer
from vdistream.engines.scoped import ScopedBackup, ScopedRestore
from vdistream.engines.streams import ByteConsumer
from vdistream.engines.striping import StripingOptions
from vdistream.errors import ConfigError

__all__ = ("CommandBackup", "CommandRestore", "DiscardConsumer", "parse_command")


def parse_command(command: str | Sequence[str], *, shell: bool = False) -> list[str]:
    """The argv for ``command`` (module docstring); ``ConfigError`` if it is unusable."""
    if isinstance(command, str):
        if shell:
            if not command.strip():
                raise ConfigError("the shell command line is empty")
            return ["/bin/sh", "-c", command]
        try:
            argv = shlex.split(command)
        except ValueError as exc:
            raise ConfigError(f"cannot parse the command line {command!r}: {exc}") from exc
    else:
        if shell:
            raise ConfigError("shell=True needs the command as one string")
        argv = [os.fspath(arg) for arg in command]
    if not argv:
        raise ConfigError(f"the command line {command!r} names no program")
    return argv


class CommandBackup(ScopedBackup):
    """A backup of what ``command`` writes to its standard output (module docstring).

    ``fail_on_stderr`` and the ``ProcessOptions`` (``env``, ``extra_env``, ``cwd``,
    ``terminate_timeout``, ...) are those of ``ProcessProducer``; the process starts
    once the set is configured.
    """

    def __init__(
        self,
        command: str | Sequence[str],
        options: StripingOptions | None = None,
        *,
        shell: bool = False,
        fail_on_stderr: bool = False,
        fail_at: FailPoint | None = None,
        backup_id: uuid.UUID | None = None,
        **process: Unpack[ProcessOptions],
    ) -> None:
        self.argv = parse_command(command, shell=shell)
        self.process = ProcessProducer(self.argv, fail_on_stderr=fail_on_stderr, **process)
        super().__init__(self.process, options, fail_at=fail_at, backup_id=backup_id)


class CommandRestore(ScopedRestore):
    """A restore into ``command``'s standard input (module docstring); the
    ``ProcessOptions`` are those of ``ProcessConsumer``."""

    def __init__(
        self,
        command: str | Sequence[str],
        options: StripingOptions | None = None,
        *,
        shell: bool = False,
        fail_at: FailPoint | None = None,
        **process: Unpack[ProcessOptions],
    ) -> None:
        self.argv = parse_command(command, shell=shell)
        self.process = ProcessConsumer(self.argv, **process)
        super().__init__(self.process, options, fail_at=fail_at)


class DiscardConsumer(ByteConsumer):
    """Takes every byte and keeps none; counts them (``bytes_written``).

    The restore still reassembles and verifies the whole stream (lengths, order,
    SHA-256 of every device's payload): this is how a stream is checked when there is
    nothing to check its content with.
    """

    def __init__(self) -> None:
        self.bytes_written = 0
        self.finished = False

    async def write(self, view: memoryview) -> None:
        await anyio.lowlevel.checkpoint()
        self.bytes_written += view.nbytes

    async def finish(self) -> None:
        self.finished = True
