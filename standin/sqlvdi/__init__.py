"""Stand-in of Microsoft's ``libsqlvdi.so``, SQL Server's VDI client library on Linux.

SQL Server cannot run here, so tests and benchmarks compile (with g++, see ``build``) two
shared libraries from the C++ sources in this directory:

* ``libsqlvdi.so``: the client library with the ABI of ``/opt/mssql/lib/libsqlvdi.so``, i.e.
  the classes ``ClientVirtualDeviceSet`` and ``ClientVirtualDevice`` exporting exactly the
  12 Itanium-mangled members listed in the research note ``sqlvdi-linux.md``, with the
  struct layouts of the public header (``VDConfig`` 44 bytes, ``VDC_Command`` 24 bytes).
* ``libsqlvdi_standin_server.so``: the server side (flat ``vdss_*`` C API, ``vdss.h``) that
  the stand-in SQL Server (``standin.mssql``) drives from another process.

The declarations in ``vdi.h`` and ``vdierror.h`` are written from Microsoft's public Linux
header and sample (``samples/features/sqlvdi-linux/{vdi.h,vdierror.h,vdipipesample.cpp}`` in
github.com/microsoft/sql-server-samples); the behaviour follows the VDI specification as
summarised in the project's spec (vdi.md sections 3-5 and 8). The transport, POSIX shared
memory and process-shared POSIX semaphores, is our own design (``standin.h``), since
Microsoft's implementation is not public.
"""

from __future__ import annotations

import sys

# `python -m standin.sqlvdi.build` imports this package while sys.argv[0] is still "-m";
# importing build.py then would make runpy warn that it runs an already imported module.
if sys.argv[:1] != ["-m"]:
    from standin.sqlvdi.build import Libraries, build

__all__ = ("Libraries", "build")
