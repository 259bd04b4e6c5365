"""The engine contract: the server side of one virtual device set, for one job.

An *engine* plays the database's part of VDI (spec §1.3, §6.2-6.4): it opens the set a
client created, configures it, opens every device, sends the commands of one BACKUP or
RESTORE, closes the devices and finally the set. The client side (the coordinator and
its pumps) executes those commands against storage; the engine owns the format of the
bytes on the devices, the client owns the media.

Contract of ``Engine.run(set_name, *, registry=None) -> EngineResult``:

* It serves exactly one job on the set named ``set_name`` (looked up in ``registry``,
  the process-wide default when ``None``): open, configure, open every device (device 0
  is named like the set, device *i* is the set name followed by *i*, see
  ``device_names``), drive each device to its ``close_device``, then ``close`` the set.
  It returns an ``EngineResult`` only if all of that succeeded.
* On any failure (a command completing with an error, the set aborted by the client
  or its watchdog, a malformed stream, a failing producer or consumer, an injected
  fault) it stops sending, calls ``signal_abort()`` on the set, closes it and raises an
  ``EngineError``: ``EngineAbortedError`` when the set was aborted from outside,
  ``CommandFailedError`` naming the device and completion code when the client failed
  a command, ``StreamFormatError`` when a restore stream is not what the backup wrote.
  Any other exception (for example a ``StorageError`` from a consumer) is raised as an
  ``EngineError`` whose ``__cause__`` is the original.
* Cancelling the task running ``run`` aborts and closes the set the same way, then lets
  the cancellation propagate.
* It owns every task it starts (one task group, closed before ``run`` returns), every
  wait it makes is bounded or cancellable, and it never touches a buffer whose command
  the client still holds or which completed with ``OPERATION_ABORTED``.
* A restore engine publishes its target (renames a file into place, hands the end of
  the data to a consumer that cannot be undone) only after EVERY device reported the
  end of its stream (HANDLE_EOF or NO_DATA_DETECTED): the client reports a stream's end
  only once the whole stream passed every check (stored size and SHA-256,
  authentication tags, the logical SHA-256), so a damaged stream fails the restore
  before anything is published.
* ``client_set(registry)`` is the client side the job must create for it: our own
  set by default; an engine whose server side is outside vdistream (SQL Server) gives
  the client set that meets it (``libsqlvdi.so``'s).
* ``direction`` says whether the job is a backup (the engine WRITEs) or a restore (the
  engine READs); it is fixed when the engine is built.
* ``set_name`` (optional, ``None`` by default) is a hint: the name the job's client set
  must have, when the engine's side needs a particular one (an engine in another
  process opens the set by the name the user gave it: ``vdistream.engines.external``).
  The job then creates its set under that name instead of a generated one, and its
  device names follow it (``device_names``). With ``None`` the job names the set.
* ``configuration_wait`` (optional, ``None``): seconds the engine may take before it
  configures the set, when that can be longer than the job's configuration timeout
  (an engine in another process must first arrive); the job waits the longer of both.
"""

from __future__ import annotations

import abc
import dataclasses
import enum
from collections.abc import Mapping
from types import MappingProxyType

from vdistream.errors import JobError
from vdistream.protocol import CommandCode, Completion
from vdistream.vdi import ClientSet, ClientVirtualDeviceSet, Registry

__all__ = (
    "CommandFailedError",
    "DeviceStats",
    "Direction",
    "Engine",
    "EngineAbortedError",
    "EngineError",
    "EngineResult",
    "StreamFormatError",
    "completion_name",
    "device_names",
    "freeze_counts",
)


class Direction(enum.Enum):
    """What the engine does with the set's devices."""

    BACKUP = "backup"  # the engine writes (WRITE_MEDIA)
    RESTORE = "restore"  # the engine reads (READ_MEDIA)


def device_names(set_name: str, count: int) -> list[str]:
    """The device names of a set: the set's own name, then ``set_name + "1"``, ...

    Device 0 must carry the set's name (spec §1.2); the others follow the Microsoft
    samples' convention, which engines and coordinators share so they meet by name.
    """
    return [set_name] + [f"{set_name}{i}" for i in range(1, count)]


def completion_name(code: int) -> str:
    """``"DISK_FULL (112)"`` for a known Win32 completion code, else the number."""
    try:
        return f"{Completion(code).name} ({code})"
    except ValueError:
        return str(code)


# --- results -------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True)
class DeviceStats:
    """What one device carried during the job.

    ``bytes`` counts the stream bytes the client reported transferred by successful
    READ/WRITE commands (header and trailer blocks included); ``commands`` counts every
    command sent on the device by code, including refused ones.
    """

    index: int
    name: str
    bytes: int
    commands: Mapping[CommandCode, int]

    @property
    def total_commands(self) -> int:
        return sum(self.commands.values())

    def count(self, code: CommandCode) -> int:
        return self.commands.get(code, 0)


@dataclasses.dataclass(frozen=True, slots=True)
class EngineResult:
    """The outcome of a successful ``Engine.run``.

    ``logical_bytes`` is the size of the database image: bytes taken from the producer
    (backup) or handed to the consumer (restore). ``features`` is the set's final
    configuration feature mask, ``backup_id`` the identifier the stream format carries.
    """

    direction: Direction
    set_name: str
    devices: tuple[DeviceStats, ...]
    logical_bytes: int
    features: int = 0
    backup_id: str | None = None

    @property
    def stream_bytes(self) -> int:
        return sum(device.bytes for device in self.devices)

    def commands(self, code: CommandCode) -> list[int]:
        """How many commands of ``code`` each device got, in device order."""
        return [device.count(code) for device in self.devices]


def freeze_counts(counts: Mapping[CommandCode, int]) -> Mapping[CommandCode, int]:
    return MappingProxyType(dict(counts))


# --- errors --------------------------------------------------------------------------


class EngineError(JobError):
    """The engine's side of a job failed; the set was aborted and closed.

    ``set_name`` and ``device`` say where (``device`` is ``None`` for set-wide
    failures); the message repeats both.
    """

    def __init__(
        self, message: str, *, set_name: str | None = None, device: str | None = None
    ) -> None:
        self.set_name = set_name
        self.device = device
        #: the message without the place
        self.detail = message
        where = []
        if set_name is not None:
            where.append(f"set {set_name!r}")
        if device is not None:
            where.append(f"device {device!r}")
        super().__init__(f"{message} ({', '.join(where)})" if where else message)

    def relocate(self, where: str | None) -> None:
        """Restate the place in the user's terms (in place, keeping the traceback):
        ``where`` replaces the set's and device's internal names (``None``: no place).
        The client calls it with the device's index and the stream's location."""
        self.args = (f"{self.detail} ({where})" if where else self.detail,)


class EngineAbortedError(EngineError):
    """The set was aborted (by the client, its watchdog or an injected fault).

    ``reason`` is the set's own record of why, when it has one.
    """

    def __init__(
        self,
        message: str,
        *,
        set_name: str | None = None,
        device: str | None = None,
        reason: str | None = None,
    ) -> None:
        self.reason = reason
        if reason:
            message = f"{message}: {reason}"
        super().__init__(message, set_name=set_name, device=device)


class CommandFailedError(EngineError):
    """The client completed a command with a failure code (``completion``)."""

    def __init__(
        self,
        message: str,
        *,
        code: CommandCode,
        completion: int,
        set_name: str | None = None,
        device: str | None = None,
    ) -> None:
        self.code = code
        self.completion = completion
        super().__init__(
            f"{message}: {code.name} completed with {completion_name(completion)}",
            set_name=set_name,
            device=device,
        )


class StreamFormatError(EngineError):
    """A restore stream is not what the backup wrote: missing, truncated, swapped,
    from another backup, or corrupted."""


# --- the contract --------------------------------------------------------------------


class Engine(abc.ABC):
    """The server side of one job on one virtual device set (see the module docstring)."""

    _busy: bool = False
    #: The name the job's set must have (module docstring); ``None``: the job chooses.
    set_name: str | None = None
    #: How long the engine may take to configure the set (module docstring).
    configuration_wait: float | None = None

    @property
    def busy(self) -> bool:
        """True while the engine does silent work it vouches for (taking a snapshot,
        verifying a restored image): the coordinator's stall watchdog waits meanwhile."""
        return self._busy

    @property
    @abc.abstractmethod
    def direction(self) -> Direction:
        """``Direction.BACKUP`` or ``Direction.RESTORE``; fixed at construction."""

    def client_set(self, registry: Registry | None = None) -> ClientSet:
        """The client set a job serving this engine creates: our own, met through
        ``registry``; SQL Server's engine gives ``libsqlvdi.so``'s instead."""
        return ClientVirtualDeviceSet(registry=registry)

    @abc.abstractmethod
    async def run(self, set_name: str, *, registry: Registry | None = None) -> EngineResult:
        """Serve the job on the set ``set_name`` from open to close (module docstring)."""
