"""SQL Server through Microsoft's Virtual Device Interface on Linux (``libsqlvdi.so``).

``library`` binds ``libsqlvdi.so`` with ctypes; ``device_set`` is its client set, which
the coordinator drives like our own; ``tsql`` writes the statements; ``trigger`` runs
them (python-tds or ``sqlcmd``); ``url`` parses ``mssql://``; ``engine`` makes the
statement a job's engine; ``source`` a backup source; ``permissions`` explains the
shared-memory permissions SQL Server needs.
Every name is imported on first access (``vdistream._lazy``): parsing an ``mssql://``
URL does not load the binding.
"""

import typing as _typing

from vdistream._lazy import lazy_exports as _lazy_exports

if _typing.TYPE_CHECKING:
    from vdistream.sqlserver.device_set import SqlVdiDevice as SqlVdiDevice
    from vdistream.sqlserver.device_set import SqlVdiDeviceSet as SqlVdiDeviceSet
    from vdistream.sqlserver.engine import SqlServerBackup as SqlServerBackup
    from vdistream.sqlserver.engine import SqlServerRestore as SqlServerRestore
    from vdistream.sqlserver.engine import SqlServerStatementError as SqlServerStatementError
    from vdistream.sqlserver.engine import SqlServerVerify as SqlServerVerify
    from vdistream.sqlserver.engine import Transfer as Transfer
    from vdistream.sqlserver.library import SqlVdiLibraryError as SqlVdiLibraryError
    from vdistream.sqlserver.library import library_path as library_path
    from vdistream.sqlserver.library import load as load
    from vdistream.sqlserver.source import SqlServerSource as SqlServerSource
    from vdistream.sqlserver.trigger import SqlcmdTrigger as SqlcmdTrigger
    from vdistream.sqlserver.trigger import SqlServerError as SqlServerError
    from vdistream.sqlserver.trigger import TdsTrigger as TdsTrigger
    from vdistream.sqlserver.url import MssqlURL as MssqlURL

# Public name -> the module that defines it.
_LAZY: dict[str, str] = {
    "SqlVdiDevice": "vdistream.sqlserver.device_set",
    "SqlVdiDeviceSet": "vdistream.sqlserver.device_set",
    "SqlServerBackup": "vdistream.sqlserver.engine",
    "SqlServerRestore": "vdistream.sqlserver.engine",
    "SqlServerStatementError": "vdistream.sqlserver.engine",
    "SqlServerVerify": "vdistream.sqlserver.engine",
    "Transfer": "vdistream.sqlserver.engine",
    "SqlVdiLibraryError": "vdistream.sqlserver.library",
    "library_path": "vdistream.sqlserver.library",
    "load": "vdistream.sqlserver.library",
    "SqlServerSource": "vdistream.sqlserver.source",
    "SqlcmdTrigger": "vdistream.sqlserver.trigger",
    "SqlServerError": "vdistream.sqlserver.trigger",
    "TdsTrigger": "vdistream.sqlserver.trigger",
    "MssqlURL": "vdistream.sqlserver.url",
}

__all__ = (
    "MssqlURL",
    "SqlServerBackup",
    "SqlServerError",
    "SqlServerRestore",
    "SqlServerSource",
    "SqlServerStatementError",
    "SqlServerVerify",
    "SqlVdiDevice",
    "SqlVdiDeviceSet",
    "SqlVdiLibraryError",
    "SqlcmdTrigger",
    "TdsTrigger",
    "Transfer",
    "library_path",
    "load",
)

__getattr__, __dir__ = _lazy_exports(globals(), _LAZY, __all__)
