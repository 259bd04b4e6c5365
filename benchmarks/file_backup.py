"""File backup and restore through 4 devices, beside dd on the same data.

Each case runs in a child process so that its peak RSS (VmHWM) is its own; wall time
and CPU time come from the child. Cases:

* ``dd bs=1M`` of the data file to /dev/null, and to a file with ``conv=fsync``;
* vdistream: the striping engine reads the file and stripes it over 4 devices into
  ``null://`` and into a directory on the same disk (fsync, rename, as always);
* vdistream restore of that backup into a file (fsync), beside ``dd conv=fsync``;
* peak RSS of a 1 GiB and an 8 GiB backup to ``null://`` from a generated stream,
  which must stay at the buffer area plus a constant.

With ``--json`` it prints a list of case records (``_harness.py``) instead of the
table: the three file cases (group ``file``) and the peak-RSS cases (group ``rss``,
each beside ``dd if=/dev/zero of=/dev/null`` of the same size), every case repeated
``--repeat`` times. ``--rss-gib`` picks the sizes of the RSS cases (none: skip them),
``--no-files`` skips the file cases, ``--data`` the kind of the data file.
The vdistream figures are the ``backup()`` / ``restore()`` call (wall, and CPU from
``getrusage``); peak RSS and every figure of ``dd`` come from ``wait4``.

Usage: python benchmarks/file_backup.py [--gib 2] [--repeat 3] [--dir DIR]
           [--rss-gib 1 8] [--no-files] [--data mixed|random|compressible] [--json]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

from _harness import (
    MIB,
    Record,
    Timer,
    emit,
    make_data,
    measure,
    measure_child,
    missing,
    missing_tools,
    progress,
    record,
)


def child(case: str, data: str, workdir: str, gib: float) -> None:
    import anyio

    from vdistream import JobOptions, backup, restore
    from vdistream.engines import (
        CallableProducer,
        FileConsumer,
        StripedBackup,
        StripedRestore,
        StripingOptions,
    )

    options = StripingOptions(max_transfer_size=4 * MIB, buffer_count=16)
    job = JobOptions(devices=4)

    async def main() -> int:
        if case == "backup-null":
            result = await backup(StripedBackup(Path(data), options), "null://", options=job)
        elif case == "backup-file":
            result = await backup(
                StripedBackup(Path(data), options), workdir, backup_id="bench", options=job
            )
        elif case == "restore-file":
            result = await restore(
                StripedRestore(FileConsumer(Path(workdir) / "restored"), options),
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
                StripedBackup(CallableProducer(fill), options), "null://", options=job
            )
        result.raise_for_status()
        return result.bytes

    with Timer() as timer:
        moved = anyio.run(main)
    print(timer.json(bytes=moved))


def run_child(case: str, data: Path, workdir: Path, gib: float) -> dict[str, float]:
    """One case in a child: wall and CPU of the call, peak RSS (MiB) from wait4."""
    sample = measure_child(
        [sys.executable, __file__, "--child", case, str(data), str(workdir), str(gib)]
    )
    return {**sample, "rss": sample["rss"] / MIB}


def run_dd(args: list[str]) -> dict[str, float]:
    """dd with ``args``: wall, CPU and peak RSS (MiB) from wait4."""
    sample = measure(["dd", *args, "bs=1M", "status=none"])
    return {**sample, "rss": sample["rss"] / MIB}


def as_bytes(runs: list[dict[str, float]]) -> list[dict[str, float]]:
    """Samples with their RSS back in bytes, for ``record``."""
    return [{**r, "rss": r["rss"] * MIB} for r in runs]


def json_main(args: argparse.Namespace) -> None:
    records: list[Record] = []
    absent = missing_tools("dd", "cat")
    if absent:
        emit([missing("file", "file backup and restore", absent)])
        return
    root = Path(tempfile.mkdtemp(prefix="vdistream-bench-", dir=args.dir))
    try:
        data = root / "data"
        work = root / "work"
        if not args.no_files:
            progress(f"file: writing {args.gib:g} GiB of {args.data} data")
            size = make_data(data, int(args.gib * 1024 * MIB), args.data)
            cases: dict[str, list[dict[str, float]]] = {}
            for i in range(args.repeat):
                progress(f"file: round {i + 1} of {args.repeat}")
                cases.setdefault("null", []).append(run_child("backup-null", data, work, args.gib))
                cases.setdefault("dd-null", []).append(run_dd([f"if={data}", "of=/dev/null"]))
                shutil.rmtree(work, ignore_errors=True)
                work.mkdir()
                cases.setdefault("file", []).append(run_child("backup-file", data, work, args.gib))
                dd_out = work / "dd.out"
                cases.setdefault("dd-file", []).append(
                    run_dd([f"if={data}", f"of={dd_out}", "conv=fsync"])
                )
                cases.setdefault("restore", []).append(
                    run_child("restore-file", data, work, args.gib)
                )
                cases.setdefault("dd-restore", []).append(
                    run_dd([f"if={dd_out}", f"of={work / 'dd.restored'}", "conv=fsync"])
                )
            shutil.rmtree(work, ignore_errors=True)
            for label, ours, tool, base in (
                ("backup 4 dev -> null://", "null", "dd bs=1M of=/dev/null", "dd-null"),
                ("backup 4 dev -> dir (fsync)", "file", "dd bs=1M conv=fsync", "dd-file"),
                ("restore 4 dev -> file (fsync)", "restore", "dd bs=1M conv=fsync", "dd-restore"),
            ):
                records.append(
                    record(
                        "file",
                        label,
                        "vdistream",
                        "vdistream",
                        size,
                        as_bytes(cases[ours]),
                        data=args.data,
                    )
                )
                records.append(
                    record(
                        "file", label, "baseline", tool, size, as_bytes(cases[base]), data=args.data
                    )
                )
            data.unlink()
        for gib in args.rss_gib:
            progress(f"rss: {gib:g} GiB x{args.repeat}")
            size = int(gib * 1024 * MIB)
            ours = [run_child("synthetic", data, work, gib) for _ in range(args.repeat)]
            base = [
                run_dd(["if=/dev/zero", "of=/dev/null", f"count={size // MIB}"])
                for _ in range(args.repeat)
            ]
            label = f"peak RSS: backup {gib:g} GiB -> null://"
            records.append(
                record(
                    "rss", label, "vdistream", "vdistream", size, as_bytes(ours), data="generated"
                )
            )
            records.append(
                record(
                    "rss",
                    label,
                    "baseline",
                    "dd bs=1M if=/dev/zero of=/dev/null",
                    size,
                    as_bytes(base),
                    data="zeros",
                )
            )
    finally:
        shutil.rmtree(root, ignore_errors=True)
    emit(records)


def median(runs: list[dict[str, float]], key: str) -> float:
    return statistics.median(r[key] for r in runs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gib", type=float, default=2.0)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--dir", default=None, help="where the data and backups go")
    parser.add_argument("--json", action="store_true", help="print case records as JSON")
    parser.add_argument(
        "--rss-gib", type=float, nargs="*", default=[1, 8], help="sizes of the RSS cases"
    )
    parser.add_argument("--no-files", action="store_true", help="(--json) only the RSS cases")
    parser.add_argument("--data", default="mixed", choices=["mixed", "random", "compressible"])
    parser.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        case, data, workdir, gib = args.child
        child(case, data, workdir, float(gib))
        return
    if args.json:
        json_main(args)
        return

    root = Path(tempfile.mkdtemp(prefix="vdistream-bench-", dir=args.dir))
    try:
        data = root / "data"
        # half random, half compressible by default, like a database
        size = make_data(data, int(args.gib * 1024 * MIB), args.data)
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
        for gib in args.rss_gib:
            r = run_child("synthetic", data, work, gib)
            print(
                f"synthetic {gib:g} GiB -> null://: {gib * 2**30 / r['seconds'] / 1e9:.2f} GB/s, "
                f"peak RSS {r['rss']:.0f} MiB (buffer area {area} MiB)"
            )
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
