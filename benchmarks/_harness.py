"""What the benchmark scripts share: measuring a child process, test data, JSON records.

Every figure comes from the operating system:

* ``measure(argv)`` runs a command and takes its wall time around ``wait4``, its CPU
  time (user + system) from the ``rusage`` that ``wait4`` returns, and its peak RSS
  (``ru_maxrss``) as GNU time reports it (see ``_run``). The rusage covers the process
  and every descendant it waited for, so ``sh -c 'a | b'`` or ``vdistream backup
  cmd:cat ...`` count their children's CPU; ``ru_maxrss`` is the largest single
  process of the tree, not a sum.
* In-process cases (the library API, the VDI layer) run in a child process of their
  script that times the measured call with ``time.perf_counter`` and
  ``getrusage(RUSAGE_SELF)`` (all threads); its peak RSS is measured as above.

A *record* is one side of one case, medians over the repeats::

    {"group": "file", "case": "backup 4 dev -> dir", "side": "vdistream" | "baseline",
     "tool": "vdistream" | "dd conv=fsync", "data": "mixed", "bytes": 2147483648,
     "wall": 3.1, "cpu": 2.2, "rss": 104857600, "repeats": 3, "walls": [...],
     "ops": null}

``ops`` is set for latency cases (one record is ``ops`` round trips). A record with a
``missing`` key instead says what is needed to run that case (a tool and the Debian
package that has it). ``emit`` prints a list of records as JSON on stdout.
"""

from __future__ import annotations

import json
import os
import random
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Any

MIB = 1 << 20
GIB = 1 << 30

Sample = dict[str, float]  # seconds, cpu (seconds), rss (bytes)
Record = dict[str, Any]

#: tool -> Debian package that has it
DEBIAN_PACKAGES = {
    "dd": "coreutils",
    "cat": "coreutils",
    "zstd": "zstd",
    "lz4": "lz4",
    "openssl": "openssl",
    "pgbackrest": "pgbackrest",
    "sh": "dash",
}


#: GNU time (Debian package ``time``), used only for the peak RSS: see ``_run``.
GNU_TIME = "/usr/bin/time"


def _run(argv: Sequence[str], stdout: int | IO[Any], env: dict[str, str] | None) -> Any:
    """Run ``argv`` to its end; (wall seconds, CPU seconds, peak RSS bytes).

    Wall time is taken around ``wait4``, CPU time is from its rusage. The peak RSS is
    not: a child started from this (Python, tens of MiB) process inherits its memory
    high-water mark through ``vfork``/``fork`` and keeps it across ``exec``, so
    ``ru_maxrss`` of a ``dd`` would read as this process's size. GNU time, a small
    process, starts the command itself and writes its ``ru_maxrss`` (``%M``), which is
    the command's own; without it the peak RSS is ``wait4``'s and an upper bound.
    stderr goes to a temporary file, so that no pipe fills up.
    """
    with tempfile.TemporaryFile() as err, tempfile.NamedTemporaryFile("r") as rss:
        wrapped = list(argv)
        if os.access(GNU_TIME, os.X_OK):
            wrapped = [GNU_TIME, "-q", "-o", rss.name, "-f", "%M", *wrapped]
        start = time.perf_counter()
        process = subprocess.Popen(wrapped, stdout=stdout, stderr=err, env=env)
        _, status, usage = os.wait4(process.pid, 0)
        elapsed = time.perf_counter() - start
        process.returncode = os.waitstatus_to_exitcode(status)
        err.seek(0)
        text = err.read().decode(errors="replace")
        if process.returncode != 0:
            raise RuntimeError(
                f"{' '.join(argv)} failed ({process.returncode}): {text.strip()[-2000:]}"
            )
        reported = rss.read().strip().splitlines()
    peak = int(reported[-1]) * 1024 if reported else usage.ru_maxrss * 1024
    return elapsed, usage.ru_utime + usage.ru_stime, peak


def measure(
    argv: Sequence[str],
    *,
    stdout: int | IO[Any] = subprocess.DEVNULL,
    env: dict[str, str] | None = None,
) -> Sample:
    """Run ``argv`` to its end: wall seconds, CPU seconds and peak RSS (bytes), from
    ``wait4`` (the process and the descendants it waited for)."""
    elapsed, cpu, peak = _run(argv, stdout, env)
    return {"seconds": elapsed, "cpu": cpu, "rss": peak}


def measure_child(argv: Sequence[str], *, env: dict[str, str] | None = None) -> Sample:
    """Run a Python child that prints ``{"seconds", "cpu", ...}`` of its measured call
    (``Timer.json``) as its last stdout line; its peak RSS from ``wait4``."""
    with tempfile.TemporaryFile() as out:
        elapsed, cpu, peak = _run(argv, out, env)
        out.seek(0)
        inner = json.loads(out.read().decode().strip().splitlines()[-1])
    return {
        **inner,
        "seconds": float(inner.get("seconds", elapsed)),
        "cpu": float(inner.get("cpu", cpu)),
        "rss": peak,
    }


class Timer:
    """Wall and CPU time (``getrusage(RUSAGE_SELF)``, every thread) of a block."""

    def __enter__(self) -> Timer:
        self._usage = resource.getrusage(resource.RUSAGE_SELF)
        self._start = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self.seconds = time.perf_counter() - self._start
        usage = resource.getrusage(resource.RUSAGE_SELF)
        self.cpu = (usage.ru_utime + usage.ru_stime) - (self._usage.ru_utime + self._usage.ru_stime)

    def json(self, **extra: object) -> str:
        return json.dumps({"seconds": self.seconds, "cpu": self.cpu, **extra})


def make_data(path: Path, size: int, kind: str) -> int:
    """Write ``size`` bytes of ``kind`` data to ``path``; the size written.

    * ``random``: ``os.urandom``, incompressible;
    * ``compressible``: SQL-ish words and numbers, about 4:1 with ``zstd -3``;
    * ``mixed``: 8 MiB chunks, alternately zeros and random, like a database file.
    """
    with path.open("wb") as f:
        if kind == "random":
            for _ in range(size // (8 * MIB)):
                f.write(os.urandom(8 * MIB))
            if size % (8 * MIB):
                f.write(os.urandom(size % (8 * MIB)))
        elif kind == "mixed":
            chunk = os.urandom(8 * MIB)
            zeros = bytes(8 * MIB)
            for i in range(size // (8 * MIB)):
                f.write(chunk if i % 2 else zeros)
        elif kind == "compressible":
            rng = random.Random(5)
            words = [
                w.encode()
                for w in ["select", "from", "where", "order", "by", "group", "vacuum", "index"]
            ]
            block = b" ".join(
                rng.choice(words) + str(rng.randrange(10**6)).encode() for _ in range(200_000)
            )
            written = 0
            while written < size:
                piece = block[: size - written]
                f.write(piece)
                written += len(piece)
        else:
            raise ValueError(f"unknown data kind {kind!r}")
    # read it once so that every case finds it in the page cache
    subprocess.run(["cat", str(path)], stdout=subprocess.DEVNULL, check=True)
    return path.stat().st_size


def record(
    group: str,
    case: str,
    side: str,
    tool: str,
    size: int,
    samples: Sequence[Sample],
    *,
    data: str = "",
    ops: int | None = None,
) -> Record:
    """One side of one case: the medians of ``samples`` (each key on its own)."""
    return {
        "group": group,
        "case": case,
        "side": side,
        "tool": tool,
        "data": data,
        "bytes": size,
        "ops": ops,
        "wall": statistics.median(s["seconds"] for s in samples),
        "cpu": statistics.median(s["cpu"] for s in samples),
        "rss": int(statistics.median(s["rss"] for s in samples)),
        "repeats": len(samples),
        "walls": [round(s["seconds"], 6) for s in samples],
    }


def missing(group: str, case: str, what: str) -> Record:
    """A case that could not run, and why."""
    return {"group": group, "case": case, "missing": what}


def missing_tools(*tools: str) -> str | None:
    """``None`` when every tool is on PATH, else what to install."""
    absent = [t for t in tools if shutil.which(t) is None]
    if not absent:
        return None
    return ", ".join(
        f"{t} (Debian package {DEBIAN_PACKAGES[t]})" if t in DEBIAN_PACKAGES else t for t in absent
    )


def emit(records: Sequence[Record]) -> None:
    """The records, as JSON on stdout (the last line of the script's output)."""
    sys.stdout.write(json.dumps(list(records)) + "\n")
    sys.stdout.flush()


def progress(message: str) -> None:
    """A progress line on stderr (stdout carries the JSON)."""
    print(message, file=sys.stderr, flush=True)
