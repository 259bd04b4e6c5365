"""A slow backup producer for the daemon tests: ``slow_source.py BYTES RATE [--stubborn]``.

Writes BYTES random bytes to standard output at RATE bytes per second (the first
chunk at once), so a job stays running long enough to be aborted, signalled or
killed. ``--stubborn`` ignores SIGTERM and, after the first megabyte, stops writing
(so no broken pipe ends it either): aborting it takes the engine's whole terminate
grace (SIGKILL after 5 s).
"""

from __future__ import annotations

import os
import signal
import sys
import time

CHUNK = 64 * 1024


def main() -> None:
    total, rate = int(sys.argv[1]), int(sys.argv[2])
    stubborn = "--stubborn" in sys.argv[3:]
    if stubborn:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    out = sys.stdout.buffer
    sent = 0
    start = time.monotonic()
    while sent < total:
        size = min(CHUNK, total - sent)
        out.write(os.urandom(size))
        out.flush()
        sent += size
        if stubborn and sent >= 1024 * 1024:
            time.sleep(3600)
        delay = sent / rate - (time.monotonic() - start)
        if delay > 0:
            time.sleep(delay)


if __name__ == "__main__":
    main()
