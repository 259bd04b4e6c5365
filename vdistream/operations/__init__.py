"""What the command line and the daemon do: backup, restore, verify, list, prune.

``core`` holds the operations every engine shares; ``sqlserver`` SQL Server's engines
for a manifest and its target's checks; ``chains`` the restore of a SQL Server chain
(full, differential, logs) to a point in time. The SQL Server names are imported on
first access (PEP 562 ``__getattr__``): a command for another engine does not load the
SQL Server binding.
"""

import typing as _typing

from vdistream._lazy import lazy_exports as _lazy_exports
from vdistream.operations.core import VERIFY_WORKDIR_PREFIX as VERIFY_WORKDIR_PREFIX
from vdistream.operations.core import BackupOutcome as BackupOutcome
from vdistream.operations.core import BackupSettings as BackupSettings
from vdistream.operations.core import Check as Check
from vdistream.operations.core import JobHook as JobHook
from vdistream.operations.core import VerifyReport as VerifyReport
from vdistream.operations.core import list_backups as list_backups
from vdistream.operations.core import opened_storage as opened_storage
from vdistream.operations.core import run_backup as run_backup
from vdistream.operations.core import run_restore as run_restore
from vdistream.operations.core import run_verify as run_verify
from vdistream.operations.keys import KeySource as KeySource

if _typing.TYPE_CHECKING:
    from vdistream.operations.chains import ChainOutcome as ChainOutcome
    from vdistream.operations.chains import run_chain_restore as run_chain_restore
    from vdistream.operations.sqlserver import SqlRestoreOptions as SqlRestoreOptions

# Public name -> the module that defines it, imported on first access (PEP 562).
_LAZY: dict[str, str] = {
    "ChainOutcome": "vdistream.operations.chains",
    "run_chain_restore": "vdistream.operations.chains",
    "SqlRestoreOptions": "vdistream.operations.sqlserver",
}

__all__ = (
    "VERIFY_WORKDIR_PREFIX",
    "BackupOutcome",
    "BackupSettings",
    "ChainOutcome",
    "Check",
    "JobHook",
    "KeySource",
    "SqlRestoreOptions",
    "VerifyReport",
    "list_backups",
    "opened_storage",
    "run_backup",
    "run_chain_restore",
    "run_restore",
    "run_verify",
)


__getattr__, __dir__ = _lazy_exports(globals(), _LAZY, __all__)
