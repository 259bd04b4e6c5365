"""Stand-ins for what cannot run here: SQL Server and its VDI client library (issue 13).

``standin.sqlvdi`` builds a ``libsqlvdi.so`` with the ABI of Microsoft's Linux library, and
the server side it talks to; ``standin.mssql`` is a stand-in SQL Server process that runs
BACKUP/RESTORE statements through it. Test and benchmark code only: not shipped.
"""
