"""A mirrored backup to two local directories beside the same backup to one.

The target of issue 16: ``--mirror`` to two directories at >= 0.8x the speed of a
single one (the engine produces once, the stages run once, the stored bytes are teed
and both sides written at once, see ``vdistream.storage.mirror``). Both cases are the
whole operation (``run_backup``: preflight, the job, fsync and rename of every stream,
the manifests) of ``cmd:cat DATA`` through 4 devices, in a child process each; wall
and CPU come from the child (``Timer``), peak RSS from ``wait4``. The directories are
on the disk that holds ``--dir``, the data file is in the page cache.

With ``--json`` it prints the records of group ``mirror``, two cases whose side
``baseline`` is the single-destination backup (the table's ratio is then mirrored
speed / single speed): the case of the target, side ``vdistream`` mirrored to a second
directory; and a control, side ``vdistream`` mirrored to ``null://``, which costs the
tee's own work (the second sink, its task, its thread hop) without a second medium, so
the gap between the two cases is what the second directory itself costs (the kernel's
second copy into the page cache and its writeback). Without ``--json``, a short table.

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
CONTROL = "backup 4 dev -> dir + null:// (--mirror null://) vs 1 dir"
#: case -> the --mirror of the child (None: no mirror)
MIRRORS = {"single": None, "mirrored": "two", "control": "null://"}


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
        mirror=str(work / "two") if case == "mirrored" else MIRRORS[case],
    )

    async def main() -> int:
        outcome = await run_backup(f"cmd:cat {data}", str(work / "one"), settings)
        if not outcome.ok:
            raise SystemExit(f"the backup failed: {outcome.result.error}")
        if case == "mirrored" and not (work / "two" / "bench" / "manifest.json").is_file():
            raise SystemExit("the mirror holds no backup: nothing was mirrored")
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


def measure_all(args: argparse.Namespace, root: Path) -> tuple[int, dict[str, list[Sample]]]:
    """(size, case -> samples), the cases alternating in each round."""
    data = root / "data"
    progress(f"mirror: writing {args.gib:g} GiB of {args.data} data")
    size = make_data(data, int(args.gib * 1024 * MIB), args.data)
    samples: dict[str, list[Sample]] = {case: [] for case in MIRRORS}
    for i in range(args.repeat):
        progress(f"mirror: round {i + 1} of {args.repeat}")
        for case, runs in samples.items():
            runs.append(run_child(case, data, root / "work", args.devices))
    data.unlink()
    return size, samples


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
        size, samples = measure_all(args, root)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    single = samples["single"]
    if args.json:
        emit(
            [
                record(
                    "mirror", CASE, "vdistream", "vdistream --mirror", size, samples["mirrored"]
                ),
                record("mirror", CASE, "baseline", "vdistream, one dir", size, single),
                record(
                    "mirror",
                    CONTROL,
                    "vdistream",
                    "vdistream --mirror null://",
                    size,
                    samples["control"],
                ),
                record("mirror", CONTROL, "baseline", "vdistream, one dir", size, single),
            ]
        )
        return
    base = statistics.median(s["seconds"] for s in single)
    for case, runs in samples.items():
        wall = statistics.median(s["seconds"] for s in runs)
        cpu = statistics.median(s["cpu"] for s in runs) / (size / 2**30)
        print(
            f"{case:>8}: {size / wall / 1e6:6.0f} MB/s, {cpu:.2f} CPU s/GiB, "
            f"{base / wall:.2f}x of one dir"
        )
    print("target: mirrored >= 0.8x of one dir")


if __name__ == "__main__":
    main()
