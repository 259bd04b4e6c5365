"""A ``cmd:`` backup source for tests/ops: ``env_probe.py MARKER [BYTES [RATE]]``.

Writes the values of systemd's notify variables as it sees them to MARKER (so a test
can check that the daemon did not pass them on to its engines' tools), then BYTES
bytes (default 1 MiB) to standard output, at RATE bytes per second if given.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

CHUNK = 64 * 1024


def main() -> None:
    marker = Path(sys.argv[1])
    total = int(sys.argv[2]) if len(sys.argv) > 2 else 1024 * 1024
    rate = int(sys.argv[3]) if len(sys.argv) > 3 else 0
    names = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")
    marker.write_text(" ".join(f"{n}={os.environ.get(n, '')}" for n in names) + "\n")
    out = sys.stdout.buffer
    sent, start = 0, time.monotonic()
    while sent < total:
        size = min(CHUNK, total - sent)
        out.write(os.urandom(size))
        out.flush()
        sent += size
        if rate and (delay := sent / rate - (time.monotonic() - start)) > 0:
            time.sleep(delay)


if __name__ == "__main__":
    main()
