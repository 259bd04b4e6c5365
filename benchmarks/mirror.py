"""A mirrored backup to two local directories beside the same backup to one.

The target of issue 16: ``--mirror`` to two directories at >= 0.8x the speed of a
single one (the engine produces once, the stages run once, the stored bytes are teed
and both sides written at once, see ``vdistream.storage.mirror``). Both cases are the
whole operation (``run_backup``: preflight, the job, fsync and rename of every stream,
the manifests) of ``cmd:cat DATA`` through 4 devices, in a child process each; wall
and CPU come from the child (``Timer``), peak RSS from ``wait4``. The directories are
on the disk that holds ``--dir``, the data file is in the page cache.

With ``--json`` it prints two records of group ``mirror``: side ``vdistream`` is the
mirrored backup, side ``baseline`` the single-destination one (the table's ratio is
then mirrored speed / single speed). Without it, a short table and the ratio.

Usage: python benchmarks/mirror.py [--gib 1] [--repeat 3] [--dir DIR] [--devices 4]
           [--data mixed|random|compressible] [--json]
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
    Sample,
    Timer,
    emit,
    make_data,
    measure_child,
    missing,
    missing_tools,
    progress,
    record,
)

CASE = "backup 4 dev -> 2 dirs (--mirror) vs 1 dir"


def child(case: str, data: str, workdir: str, devices: int) -> None:
    """One backup of ``data`` into ``workdir/one`` (and ``workdir/two`` when mirrored)."""
    import anyio

    from vdistream.operations import BackupSettings, run_backup

    work = Path(workdir)
    settings = BackupSettings(
        devices=devices,
        backup_id="bench",
        max_transfer_size=4 * MIB,
        buffer_count=4 * devices,
        mirror=str(work / "two") if case == "mirrored" else None,
    )

    async def main() -> int:
        outcome = await run_backup(f"cmd:cat {data}", str(work / "one"), settings)
        if not outcome.ok:
            raise SystemExit(f"the backup failed: {outcome.result.error}")
        return outcome.result.bytes

    with Timer() as timer:
        moved = anyio.run(main)
    print(timer.json(bytes=moved))


def run_child(case: str, data: Path, work: Path, devices: int) -> Sample:
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir()
    try:
        return measure_child(
            [sys.executable, __file__, "--child", case, str(data), str(work), str(devices)]
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)


def measure_both(args: argparse.Namespace, root: Path) -> tuple[int, list[Sample], list[Sample]]:
    """(size, mirrored samples, single samples), the cases alternating per round."""
    data = root / "data"
    progress(f"mirror: writing {args.gib:g} GiB of {args.data} data")
    size = make_data(data, int(args.gib * 1024 * MIB), args.data)
    mirrored: list[Sample] = []
    single: list[Sample] = []
    for i in range(args.repeat):
        progress(f"mirror: round {i + 1} of {args.repeat}")
        single.append(run_child("single", data, root / "work", args.devices))
        mirrored.append(run_child("mirrored", data, root / "work", args.devices))
    data.unlink()
    return size, mirrored, single


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gib", type=float, default=1.0)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--devices", type=int, default=4)
    parser.add_argument("--dir", default=None, help="where the data and backups go")
    parser.add_argument("--data", default="mixed", choices=["mixed", "random", "compressible"])
    parser.add_argument("--json", action="store_true", help="print case records as JSON")
    parser.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        case, data, workdir, devices = args.child
        child(case, data, workdir, int(devices))
        return
    absent = missing_tools("cat")
    if absent:
        if args.json:
            emit([missing("mirror", CASE, absent)])
            return
        raise SystemExit(f"missing: {absent}")
    root = Path(tempfile.mkdtemp(prefix="vdistream-bench-mirror-", dir=args.dir))
    try:
        size, mirrored, single = measure_both(args, root)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    if args.json:
        emit(
            [
                record("mirror", CASE, "vdistream", "vdistream --mirror", size, mirrored),
                record("mirror", CASE, "baseline", "vdistream, one dir", size, single),
            ]
        )
        return
    walls = {
        name: statistics.median(s["seconds"] for s in samples)
        for name, samples in (("mirrored", mirrored), ("single", single))
    }
    for name, wall in walls.items():
        print(f"{name:>8}: {size / wall / 1e6:8.0f} MB/s  ({wall:.2f} s, {size / 2**30:g} GiB)")
    print(f"   ratio: {walls['single'] / walls['mirrored']:.2f}x (target >= 0.8x)")


if __name__ == "__main__":
    main()
