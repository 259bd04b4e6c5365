"""Every error vdistream raises on purpose, as one tree.

::

    Exception
     ├── VdistreamError                 base of everything vdistream raises on purpose
     │    ├── VDIError                  a VDI call failed; .hresult is the VD_E_* value
     │    │    ├── VDNotOpenError       0x80770002  device or set not open
     │    │    ├── VDTimeoutError       0x80770003  the wait's timeout passed (set unaffected)
     │    │    ├── VDAbortError         0x80770004  the set was aborted
     │    │    ├── VDSecurityError      0x80770005
     │    │    ├── VDInvalidError       0x80770006  bad argument, unknown name, foreign buffer
     │    │    ├── VDInstanceNameError  0x80770007
     │    │    ├── VDNotSupportedError  0x80770009  configuration refused by create
     │    │    ├── VDMemoryError        0x8077000A  the buffer area can never satisfy it
     │    │    ├── VDUnexpectedError    0x8077000B
     │    │    ├── VDProtocolError      0x8077000C  call not allowed in this state
     │    │    │    └── WireError    [transport.wire] a record that is not the transport's
     │    │    ├── VDOpenError          0x8077000D  devices still open / all already open
     │    │    ├── VDClosedError        0x8077000E  the server closed this device (normal end)
     │    │    └── VDBusyError          0x8077000F  (VD_E_QUEUE_FULL is the same value)
     │    ├── StorageError              a sink or source failed; .url names where
     │    │    ├── StorageURLError      the URL is malformed or its scheme unknown
     │    │    ├── StorageNotFoundError what should be read is not there
     │    │    ├── StorageExistsError   a committed object would be overwritten
     │    │    ├── StorageFullError     no space left (ENOSPC, EFBIG, quota)
     │    │    ├── StorageIntegrityError  sizes or checksums do not match
     │    │    │    └── ChangedError    [storage.s3.errors] the object's ETag changed mid-read
     │    │    ├── BackupInProgressError  [storage.base] a live process is writing this backup id
     │    │    ├── StorageProbeError    [storage.base] the destination is unreachable or unwritable
     │    │    └── OrphanUploadsError   [storage.base] the store refused to remove a job's writes
     │    ├── PipelineError             a pipeline stage (compression, encryption) failed
     │    │    ├── CorruptStreamError   stored bytes fail authentication or decoding
     │    │    ├── WrongKeyError        the key given is not the key the backup was made with
     │    │    ├── KeyMissingError      the backup is encrypted and no key was given
     │    │    └── KeyNotNeededError    a key was given for a backup that is not encrypted
     │    ├── ConfigError               a setting is invalid; names the key and where
     │    │    ├── SettingsError        [service.settings] the daemon's file or environment
     │    │    ├── CronError            [service.schedule] malformed, or never fires
     │    │    ├── StatementError       [sqlserver.tsql] a T-SQL option or name SQL Server refuses
     │    │    ├── MssqlURLError        [sqlserver.url] a bad mssql:// URL, or no password
     │    │    └── SqlcmdNotFoundError  [sqlserver.trigger] no sqlcmd on PATH or in VDISTREAM_SQLCMD
     │    ├── JobError                  a backup or restore job did not complete
     │    │    ├── JobAbortedError      it was aborted; .cause says why
     │    │    └── EngineError          [engines.base] the engine's side failed; the set was aborted
     │    │         ├── EngineAbortedError   [engines.base] the set was aborted under the engine
     │    │         ├── CommandFailedError   [engines.base] the client failed a command
     │    │         ├── StreamFormatError    [engines.base] a restore stream is not what was written
     │    │         ├── InjectedFaultError   [engines.faults] a FailPoint's failure
     │    │         ├── SqlServerStatementError  [sqlserver.engine] SQL Server failed the statement
     │    │         └── EndpointError        [engines.scoped] the producer or consumer failed
     │    │              ├── TargetExistsError   [engines.scoped] the restore target exists
     │    │              ├── PostgresError       [engines.postgres]
     │    │              ├── SQLiteError         [engines.sqlite]
     │    │              └── ProcessFailedError  [engines.process] a child process failed
     │    │                   ├── ProducerFailedError  the backup's producer
     │    │                   ├── ConsumerFailedError  the restore's consumer
     │    │                   └── ToolFailedError      a helper tool (run_tool)
     │    ├── CatalogError              [catalog.manifest] a manifest missing, malformed or altered
     │    │    └── ChainGapError        [catalog.chain] a SQL Server chain misses a backup
     │    ├── SqlVdiLibraryError        [sqlserver.library] libsqlvdi.so absent or unusable
     │    ├── SqlServerError            [sqlserver.trigger] SQL Server refused or failed a statement
     │    │    └── SqlServerConnectionError  could not connect or log in (18456)
     │    ├── ServiceError              [service.jobs] a request the daemon refuses; .status, .code
     │    │    ├── InvalidRequestError       unknown field, wrong type, missing field
     │    │    ├── UnknownDatabaseError      a database the settings do not define
     │    │    ├── UnknownJobError           no job has this id (also a LookupError)
     │    │    ├── JobFinishedError          the job ended; it cannot be aborted
     │    │    ├── QueueFullError            every slot busy, the queue full
     │    │    ├── ShuttingDownError         intake closed
     │    │    ├── _MalformedJSONError       [service.api] the body is not UTF-8 JSON
     │    │    ├── _UnsupportedMediaTypeError  [service.api] the body is not declared JSON
     │    │    └── _NotReadyError            [service.api] starting or shutting down
     │    ├── ApiStartError             [service.api] the API cannot listen where configured
     │    ├── StateError                [service.state] the state database is unusable
     │    │    └── JobNotFoundError     no job has this id (also a LookupError)
     │    └── DaemonError               [cli.client] the daemon refused a request
     │         └── DaemonUnreachableError  nothing answers at the socket or URL
     ├── CommandError                   [cli.framework] a command's own one-line failure
     ├── ShortBody                      [storage.s3.errors] a short ranged GET; retried, internal
     └── SetAbortedError                [engines.external] a wait of feed or drain ended by an abort

    click.BadParameter
     └── OptionValueError               [cli.params] a value an option does not accept

A ``[module]`` names where a class lives when it is not here: each layer keeps its own
errors, and this drawing keeps them all in one place (``tests/test_architecture.py``
checks that every exception class vdistream defines is drawn, under its real parent).

Errors cross each seam translated: an ``OSError`` from a file becomes a
``StorageError`` naming the URL (raised ``from`` the original), a VDI refusal inside a
job becomes a ``JobError`` naming the device. Messages say what failed and where; VDI
messages name the set, the device and the state it was in.
"""

from __future__ import annotations

import contextlib
import errno
from collections.abc import Iterator
from typing import ClassVar

from vdistream.protocol.codes import HResult

__all__ = (
    "ConfigError",
    "CorruptStreamError",
    "JobAbortedError",
    "JobError",
    "KeyMissingError",
    "KeyNotNeededError",
    "PipelineError",
    "StorageError",
    "StorageExistsError",
    "StorageFullError",
    "StorageIntegrityError",
    "StorageNotFoundError",
    "StorageURLError",
    "VDAbortError",
    "VDBusyError",
    "VDClosedError",
    "VDIError",
    "VDInstanceNameError",
    "VDInvalidError",
    "VDMemoryError",
    "VDNotOpenError",
    "VDNotSupportedError",
    "VDOpenError",
    "VDProtocolError",
    "VDSecurityError",
    "VDTimeoutError",
    "VDUnexpectedError",
    "VdistreamError",
    "WrongKeyError",
    "translate_os_error",
)


class VdistreamError(Exception):
    """Base of every error vdistream raises on purpose."""


# --- VDI ---------------------------------------------------------------------------


class VDIError(VdistreamError):
    """A VDI call failed. ``hresult`` is the unsigned ``0x8077xxxx`` value."""

    code: ClassVar[int] = HResult.UNEXPECTED
    _by_hresult: ClassVar[dict[int, type[VDIError]]] = {}

    def __init__(
        self,
        message: str = "",
        *,
        set_name: str | None = None,
        device: str | None = None,
        state: object = None,
        hresult: int | None = None,
    ) -> None:
        self.hresult: int = self.code if hresult is None else hresult
        self.set_name = set_name
        self.device = device
        self.state = state
        where = []
        if set_name is not None:
            where.append(f"set {set_name!r}")
        if device is not None:
            where.append(f"device {device!r}")
        if state is not None:
            where.append(f"state {getattr(state, 'name', state)}")
        text = f"{_hresult_name(self.hresult)}: {message or type(self).__doc__ or ''}".rstrip()
        if where:
            text += f" ({', '.join(where)})"
        super().__init__(text)

    def __init_subclass__(cls, **kwargs: object) -> None:
        super().__init_subclass__(**kwargs)
        VDIError._by_hresult.setdefault(cls.code, cls)

    @staticmethod
    def from_hresult(value: int, message: str = "", **context: object) -> VDIError:
        """The subclass instance for an HRESULT given signed (Linux) or unsigned."""
        unsigned = value & 0xFFFFFFFF
        cls = VDIError._by_hresult.get(unsigned, VDIError)
        return cls(message, hresult=unsigned, **context)  # type: ignore[arg-type]


def _hresult_name(value: int) -> str:
    try:
        return f"VD_E_{HResult(value).name}"
    except ValueError:
        return f"HRESULT 0x{value:08X}"


class VDNotOpenError(VDIError):
    """device or set not open"""

    code = HResult.NOTOPEN


class VDTimeoutError(VDIError):
    """the wait interval elapsed"""

    code = HResult.TIMEOUT


class VDAbortError(VDIError):
    """the set was aborted; only close() is still useful"""

    code = HResult.ABORT


class VDSecurityError(VDIError):
    """could not set up the security environment"""

    code = HResult.SECURITY


class VDInvalidError(VDIError):
    """invalid parameter"""

    code = HResult.INVALID


class VDInstanceNameError(VDIError):
    """instance name not recognized"""

    code = HResult.INSTANCE_NAME


class VDNotSupportedError(VDIError):
    """the requested configuration is invalid or unsupported"""

    code = HResult.NOTSUPPORTED


class VDMemoryError(VDIError):
    """not enough buffer memory"""

    code = HResult.MEMORY


class VDUnexpectedError(VDIError):
    """internal error"""

    code = HResult.UNEXPECTED


class VDProtocolError(VDIError):
    """call not allowed in the current state"""

    code = HResult.PROTOCOL


class VDOpenError(VDIError):
    """devices are open"""

    code = HResult.OPEN


class VDClosedError(VDIError):
    """the device was closed"""

    code = HResult.CLOSE


class VDBusyError(VDIError):
    """resource busy (VD_E_QUEUE_FULL)"""

    code = HResult.BUSY


# --- storage -----------------------------------------------------------------------


class StorageError(VdistreamError):
    """A sink or source failed. ``url`` names the object, ``device`` the stream if known."""

    def __init__(self, message: str, *, url: str | None = None, device: str | None = None):
        self.url = url
        self.device = device
        where = []
        if device is not None:
            where.append(f"device {device!r}")
        if url is not None:
            where.append(url)
        super().__init__(f"{message} ({', '.join(where)})" if where else message)


class StorageURLError(StorageError):
    """The storage URL is malformed or names an unknown scheme."""


class StorageNotFoundError(StorageError):
    """The object to read does not exist."""


class StorageExistsError(StorageError):
    """Committing would overwrite an object that is already committed."""


class StorageFullError(StorageError):
    """The medium is full or a size limit was reached."""


class StorageIntegrityError(StorageError):
    """A size or checksum does not match what was expected."""


_ERRNO_CLASSES: dict[int, type[StorageError]] = {
    errno.ENOSPC: StorageFullError,
    errno.EFBIG: StorageFullError,
    errno.EDQUOT: StorageFullError,
    errno.ENOENT: StorageNotFoundError,
    errno.EEXIST: StorageExistsError,
}


@contextlib.contextmanager
def translate_os_error(what: str, *, url: str, device: str | None = None) -> Iterator[None]:
    """Turn an ``OSError`` raised inside into the matching ``StorageError``.

    ``what`` is the operation in words ("write", "commit", ...); the message gains the
    operating system's own words and the URL.
    """
    try:
        yield
    except OSError as exc:
        cls = _ERRNO_CLASSES.get(exc.errno or 0, StorageError)
        reason = exc.strerror or str(exc)
        raise cls(f"{what} failed: {reason}", url=url, device=device) from exc


# --- pipeline ----------------------------------------------------------------------


class PipelineError(VdistreamError):
    """A per-device stage (compression, encryption) failed; names the device stream."""


class CorruptStreamError(PipelineError):
    """Stored bytes failed authentication or decoding: flipped, truncated, reordered,
    dropped, or swapped with another device's stream."""


class WrongKeyError(PipelineError):
    """The key given is not the one the backup was encrypted with."""


class KeyMissingError(PipelineError):
    """The backup is encrypted and no key was given."""


class KeyNotNeededError(PipelineError):
    """A key was given for a backup that is not encrypted: the user meant another
    backup, or believes this one is protected when it is not; refused rather than
    ignored."""


# --- configuration and jobs --------------------------------------------------------


class ConfigError(VdistreamError):
    """A setting is invalid; the message names the key and where it came from."""


class JobError(VdistreamError):
    """A backup, restore or verify job did not complete."""


class JobAbortedError(JobError):
    """The job was aborted. ``cause`` says why (``by`` who: user, engine, sink, ...)."""

    def __init__(self, message: str, *, by: str, cause: BaseException | None = None):
        self.by = by
        self.cause = cause
        super().__init__(message)
