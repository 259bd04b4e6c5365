"""PostgreSQL's ``files`` mode: the data directory read by vdistream itself, in
parallel across the devices, and restored the same way.

``layout`` is the stream format; ``backup`` the engine that writes it (``pgsession``
its libpq session, ``walk`` what it copies); ``restore`` the engine that reads it
(``restore_parse``, ``restore_writer``, ``restore_check``, ``target``). The engines are
imported on first access (``vdistream._lazy``): the backup loads psycopg.
"""

import typing as _typing

from vdistream._lazy import lazy_exports as _lazy_exports
from vdistream.engines.pgfiles.layout import BackupIndex as BackupIndex
from vdistream.engines.pgfiles.layout import EntryHeader as EntryHeader
from vdistream.engines.pgfiles.layout import EntryKind as EntryKind
from vdistream.engines.pgfiles.layout import FileRecord as FileRecord

if _typing.TYPE_CHECKING:
    from vdistream.engines.pgfiles.backup import PgFilesBackup as PgFilesBackup
    from vdistream.engines.pgfiles.backup import PgFilesResult as PgFilesResult
    from vdistream.engines.pgfiles.restore import PgFilesRestore as PgFilesRestore
    from vdistream.engines.pgfiles.restore import PgFilesRestoreResult as PgFilesRestoreResult

_LAZY: dict[str, str] = {
    "PgFilesBackup": "vdistream.engines.pgfiles.backup",
    "PgFilesResult": "vdistream.engines.pgfiles.backup",
    "PgFilesRestore": "vdistream.engines.pgfiles.restore",
    "PgFilesRestoreResult": "vdistream.engines.pgfiles.restore",
}

__all__ = (
    "BackupIndex",
    "EntryHeader",
    "EntryKind",
    "FileRecord",
    "PgFilesBackup",
    "PgFilesRestore",
    "PgFilesRestoreResult",
    "PgFilesResult",
)

__getattr__, __dir__ = _lazy_exports(globals(), _LAZY, __all__)
