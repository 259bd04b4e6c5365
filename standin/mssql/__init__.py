"""A stand-in SQL Server: runs BACKUP/RESTORE statements through the stand-in VDI library.

``server`` is the process (``python -m standin.mssql.server``), ``control`` drives it from tests,
``sqlcmd`` is the stand-in statement runner. Stdlib and ctypes only; test code, not shipped.
"""

from __future__ import annotations

__all__ = ()
