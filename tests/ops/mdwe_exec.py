"""``mdwe_exec.py PROGRAM ARGS...``: run PROGRAM under "memory deny write execute",
as systemd's ``MemoryDenyWriteExecute=yes`` does (here through Linux's
``prctl(PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN)``, 6.3+, kept across ``execve``).

Checks first that it bites: a writable and executable mapping must be refused.
Exits 3 if the kernel cannot do it.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import sys

PR_SET_MDWE, PR_GET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN = 65, 66, 1


def main() -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN, 0, 0, 0) != 0:
        sys.exit(f"prctl(PR_SET_MDWE) failed: errno {ctypes.get_errno()}")
    if libc.prctl(PR_GET_MDWE, 0, 0, 0, 0) != PR_MDWE_REFUSE_EXEC_GAIN:
        sys.exit("PR_GET_MDWE does not report PR_MDWE_REFUSE_EXEC_GAIN")
    try:
        mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
    except OSError:
        pass
    else:
        sys.exit("a writable and executable mapping was allowed under MDWE")
    os.execv(sys.argv[1], sys.argv[1:])


if __name__ == "__main__":
    main()
