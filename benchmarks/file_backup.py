"""File backup and restore through 4 devices, beside dd on the same data.

Each case runs in a child process so that its peak RSS (VmHWM) is its own; wall time
and CPU time come from the child. Cases:

* ``dd bs=1M`` of the data file to /dev/null, and to a file with ``conv=fsync``;
* vdistream: the simulated engine reads the file and stripes it over 4 devices into
  ``null://`` and into a directory on the same disk (fsync, rename, as always);
* vdistream restore of that backup into a file (fsync), beside ``dd conv=fsync``;
* peak RSS of a 1 GiB and an 8 GiB backup to ``null://`` from a generated stream,
  which must stay at the buffer area plus a constant.

Usage: python benchmarks/file_backup.py [--gib 2] [--repeat 3] [--dir DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MIB = 1024 * 1024


def peak_rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child(case: str, data: str, workdir: str, gib: float) -> None:
    import anyio

    from vdistream import JobOptions, backup, restore
    from vdistream.engines import (
        CallableProducer,
        FileConsumer,
        SimulatedBackup,
        SimulatedRestore,
        SimulatorOptions,
    )

    options = SimulatorOptions(max_transfer_size=4 * MIB, buffer_count=16)
    job = JobOptions(devices=4)

    async def main() -> int:
        if case == "backup-null":
            result = await backup(SimulatedBackup(Path(data), options), "null://", options=job)
        elif case == "backup-file":
            result = await backup(
                SimulatedBackup(Path(data), options), workdir, backup_id="bench", options=job
            )
        elif case == "restore-file":
            result = await restore(
                SimulatedRestore(FileConsumer(Path(workdir) / "restored"), options),
                workdir,
                "bench",
                options=job,
            )
        else:  # synthetic-N: N GiB generated on the fly, nothing read from disk
            remaining = int(gib * 1024 * MIB)

            async def fill(view: memoryview) -> int:
                nonlocal remaining
                n = min(remaining, view.nbytes)
                view[:n] = bytes(n) if n < MIB else view[:n]  # content does not matter
                remaining -= n
                return n

            result = await backup(
                SimulatedBackup(CallableProducer(fill), options), "null://", options=job
            )
        result.raise_for_status()
        return result.bytes

    start = time.perf_counter()
    moved = anyio.run(main)
    elapsed = time.perf_counter() - start
    usage = resource.getrusage(resource.RUSAGE_SELF)
    print(
        json.dumps(
            {
                "seconds": elapsed,
                "cpu": usage.ru_utime + usage.ru_stime,
                "rss": peak_rss_mib(),
                "bytes": moved,
            }
        )
    )


def run_child(case: str, data: Path, workdir: Path, gib: float) -> dict[str, float]:
    out = subprocess.run(
        [sys.executable, __file__, "--child", case, str(data), str(workdir), str(gib)],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    return dict(json.loads(out.strip().splitlines()[-1]))


def run_dd(args: list[str]) -> dict[str, float]:
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    subprocess.run(["dd", *args, "bs=1M", "status=none"], check=True)
    elapsed = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    return {"seconds": elapsed, "cpu": cpu, "rss": after.ru_maxrss / 1024}


def median(runs: list[dict[str, float]], key: str) -> float:
    return statistics.median(r[key] for r in runs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gib", type=float, default=2.0)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--dir", default=None, help="where the data and backups go")
    parser.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        case, data, workdir, gib = args.child
        child(case, data, workdir, float(gib))
        return

    root = Path(tempfile.mkdtemp(prefix="vdistream-bench-", dir=args.dir))
    try:
        data = root / "data"
        size = int(args.gib * 1024 * MIB)
        with data.open("wb") as f:  # half random, half compressible, like a database
            chunk = os.urandom(8 * MIB)
            for i in range(size // (8 * MIB)):
                f.write(chunk if i % 2 else bytes(8 * MIB))
        subprocess.run(["cat", str(data)], stdout=subprocess.DEVNULL, check=True)  # cache it
        rows: list[tuple[str, float, float, float, float, float]] = []

        def compare(label: str, ours: list[dict[str, float]], base: list[dict[str, float]]) -> None:
            gb = size / 1e9
            rows.append(
                (
                    label,
                    gb / median(ours, "seconds"),
                    gb / median(base, "seconds"),
                    median(ours, "cpu") / (size / 2**30),
                    median(base, "cpu") / (size / 2**30),
                    median(ours, "rss"),
                )
            )

        work = root / "work"
        ours, base = [], []
        for _ in range(args.repeat):
            ours.append(run_child("backup-null", data, work, args.gib))
            base.append(run_dd([f"if={data}", "of=/dev/null"]))
        compare("backup 4 dev -> null:// vs dd of=/dev/null", ours, base)

        ours, base, rest, rbase = [], [], [], []
        for _ in range(args.repeat):
            shutil.rmtree(work, ignore_errors=True)
            work.mkdir()
            ours.append(run_child("backup-file", data, work, args.gib))
            base.append(run_dd([f"if={data}", f"of={work / 'dd.out'}", "conv=fsync"]))
            (work / "dd.out").unlink()
            rest.append(run_child("restore-file", data, work, args.gib))
            rbase.append(run_dd([f"if={data}", f"of={work / 'dd.out'}", "conv=fsync"]))
        compare("backup 4 dev -> file vs dd conv=fsync", ours, base)
        compare("restore 4 dev -> file vs dd conv=fsync", rest, rbase)
        shutil.rmtree(work, ignore_errors=True)

        print(f"{args.gib:g} GiB, median of {args.repeat}; GB/s, CPU seconds per GiB")
        print(
            f"{'case':<42}{'ours':>8}{'dd':>8}{'ratio':>7}{'cpu/GiB':>9}{'dd cpu':>8}{'RSS MiB':>9}"
        )
        for label, mine, theirs, cpu, dd_cpu, rss in rows:
            print(
                f"{label:<42}{mine:>9.2f}{theirs:>9.2f}{mine / theirs:>9.2f}"
                f"{cpu:>9.2f}{dd_cpu:>9.2f}{rss:>9.0f}"
            )
        area = 16 * 4
        for gib in (1, 8):
            r = run_child("synthetic", data, work, gib)
            print(
                f"synthetic {gib} GiB -> null://: {gib * 2**30 / r['seconds'] / 1e9:.2f} GB/s, "
                f"peak RSS {r['rss']:.0f} MiB (buffer area {area} MiB)"
            )
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
