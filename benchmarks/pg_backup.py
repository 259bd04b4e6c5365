"""PostgreSQL base backup: vdistream (1 and 4 devices) beside pg_basebackup and pgBackRest.

On one pgbench cluster started for the run (Debian's PostgreSQL 15, as the postgres
user, Unix socket only), each case backs up the whole cluster to files on the same
disk, repeated, median shown:

* ``pg_basebackup -Ft -X fetch --checkpoint=fast -D dir`` (the tool vdistream drives);
* ``vdistream backup postgresql://... DEST --mode basebackup --devices 1`` and ``4``
  (pg_basebackup's tar stream, striped into virtual devices, hashed, committed, manifest);
* ``vdistream backup postgresql://... DEST --mode files --devices 4``: the data
  directory read by vdistream itself, in parallel over the devices;
* ``pgbackrest backup --type=full`` with ``compress-type=none`` into a local repository
  (Debian's pgbackrest 2.45; WAL archiving through pgbackrest, as it requires).

Restores of the last backups, each into a new empty directory on the same disk:
``vdistream restore`` of the files-mode backup (4 devices, every file checked against its
CRC-32 while it is written, fsynced) and of the basebackup-mode backup (``tarfile`` then
``pg_verifybackup``), beside ``pgbackrest restore`` (fsyncs) and GNU ``tar -xf`` of
``pg_basebackup``'s ``base.tar`` (no fsync, no check).

Wall time, throughput of the database size, CPU seconds and peak RSS of each process
tree (``wait4``). Usage: python benchmarks/pg_backup.py [--scale 70] [--repeat 3]
[--compressed] [--json] (scale 70 is about 1 GB of pgbench data).

``--compressed`` adds ``vdistream ... --devices 4 --compress zstd:3`` (basebackup and
files modes) beside
``pg_basebackup -Ft --compress=client-zstd:3`` and ``pgbackrest backup
--compress-type=zst --compress-level=3``. ``--json`` prints a list of case records
(``_harness.py``) instead of the table; when pgBackRest or the PostgreSQL binaries are
missing it says so in records rather than failing.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from _harness import Record, emit, measure, missing, missing_tools, progress, record

from tests.databases.pgserver import (
    PG_BINDIR,
    PgCluster,
    as_server_user,
    give_to_server_user,
    run,
)
from tests.databases.pgserver import (
    missing_tools as missing_pg_tools,
)

VDISTREAM = [sys.executable, "-m", "vdistream"]
MIB = 1 << 20

BASEBACKUP = "pg_basebackup -Ft -X fetch"
PGBACKREST = "pgbackrest full, no compression"
BASEBACKUP_ZSTD = "pg_basebackup -Ft -Z client-zstd:3"
PGBACKREST_ZSTD = "pgbackrest full, zst:3"
FILES = "vdistream files, 4 devices"
FILES_ZSTD = "vdistream files, 4 devices, zstd:3"
RESTORE_FILES = "vdistream restore files, 4 devices"
RESTORE_BB = "vdistream restore basebackup, 4 devices"
PGBACKREST_RESTORE = "pgbackrest restore"
TAR_EXTRACT = "GNU tar -xf base.tar (no fsync)"

#: (row, vdistream case, baseline case) in --json output
PAIRS = [
    ("basebackup 4 dev -> dir", "vdistream basebackup, 4 devices", BASEBACKUP),
    ("basebackup 4 dev -> dir", "vdistream basebackup, 4 devices", PGBACKREST),
    ("basebackup 1 dev -> dir", "vdistream basebackup, 1 device", BASEBACKUP),
    ("files 4 dev -> dir", FILES, BASEBACKUP),
    ("files 4 dev -> dir", FILES, PGBACKREST),
    ("restore files 4 dev <- dir", RESTORE_FILES, PGBACKREST_RESTORE),
    ("restore files 4 dev <- dir", RESTORE_FILES, TAR_EXTRACT),
    ("restore basebackup 4 dev <- dir", RESTORE_BB, PGBACKREST_RESTORE),
    ("basebackup 4 dev zstd:3 -> dir", "vdistream basebackup, 4 devices, zstd:3", BASEBACKUP_ZSTD),
    ("basebackup 4 dev zstd:3 -> dir", "vdistream basebackup, 4 devices, zstd:3", PGBACKREST_ZSTD),
    ("files 4 dev zstd:3 -> dir", FILES_ZSTD, BASEBACKUP_ZSTD),
    ("files 4 dev zstd:3 -> dir", FILES_ZSTD, PGBACKREST_ZSTD),
]


def measure_mib(argv: list[str]) -> dict[str, float]:
    """Run ``argv``; wall seconds, CPU seconds and peak RSS (MiB) of its process tree."""
    sample = measure(argv)
    return {**sample, "rss": sample["rss"] / MIB}


def prerequisites() -> tuple[str | None, str | None]:
    """(what the whole group misses, what the pgBackRest cases miss)."""
    absent = missing_pg_tools()
    group = None
    if absent:
        group = (
            f"{', '.join(absent)} under {PG_BINDIR} (Debian package postgresql-15)"
            " or set VDISTREAM_TEST_PG_BINDIR"
        )
    return group, missing_tools("pgbackrest")


def backup_ref(dest: Path) -> str:
    """``DEST/ID`` of the one backup in ``dest``."""
    (manifest,) = dest.glob("*/manifest.json")
    return str(manifest.parent)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", type=int, default=70, help="pgbench scale (70 ~ 1 GB)")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument(
        "--compressed", action="store_true", help="add zstd:3 cases beside both tools"
    )
    parser.add_argument("--json", action="store_true", help="print case records as JSON")
    args = parser.parse_args()

    group_missing, pgbackrest_missing = prerequisites()
    if group_missing:
        if args.json:
            emit([missing("pg", "PostgreSQL basebackup", group_missing)])
            return
        raise SystemExit(f"missing: {group_missing}")
    if pgbackrest_missing and not args.json:
        raise SystemExit(f"missing: {pgbackrest_missing}")
    say = progress if args.json else print

    cluster = PgCluster()
    try:
        server = cluster.initdb("bench")
        conf = cluster.root / "pgbackrest.conf"
        if not pgbackrest_missing:
            for name in ("repo", "pgbr-log", "pgbr-lock", "pgbr-spool"):
                cluster.directory(name)
            conf.write_text(
                "[global]\n"
                f"repo1-path={cluster.root / 'repo'}\n"
                "compress-type=none\nstart-fast=y\nlog-level-console=warn\n"
                f"log-path={cluster.root / 'pgbr-log'}\nlock-path={cluster.root / 'pgbr-lock'}\n"
                f"spool-path={cluster.root / 'pgbr-spool'}\n"
                "[bench]\n"
                f"pg1-path={server.data}\npg1-socket-path={server.socket_dir}\n"
                f"pg1-port={server.port}\npg1-user=postgres\n"
            )
            give_to_server_user(conf)
            with (server.data / "postgresql.conf").open("a") as f:
                f.write(
                    "archive_mode = on\n"
                    f"archive_command = 'pgbackrest --config={conf} --stanza=bench "
                    "archive-push %p'\n"
                )
        server.start()
        say(f"pgbench -i -s {args.scale} ...")
        run(
            [
                server.tool("pgbench"),
                "-i",
                "-q",
                "-s",
                str(args.scale),
                *server.connection("postgres"),
            ],
            timeout=3600,
        )
        size = int(server.psql("SELECT sum(pg_database_size(oid)) FROM pg_database"))
        pgbackrest = ["pgbackrest", f"--config={conf}", "--stanza=bench"]
        if not pgbackrest_missing:
            run(as_server_user([*pgbackrest, "stanza-create"]))
        url = f"postgresql://postgres@/postgres?host={server.socket_dir}&port={server.port}"
        out = cluster.root / "out"

        cases: dict[str, list[dict[str, float]]] = {}

        def case(name: str, argv: list[str]) -> None:
            shutil.rmtree(out, ignore_errors=True)
            out.mkdir()
            give_to_server_user(out)
            cases.setdefault(name, []).append(measure_mib(argv))

        def pg_basebackup(*extra: str) -> list[str]:
            return [
                server.tool("pg_basebackup"),
                "-w",
                "-Ft",
                "-X",
                "fetch",
                "--checkpoint=fast",
                *extra,
                "-D",
                str(out / "bb"),
                *server.connection("postgres")[:6],  # -h -p -U: -d is a conninfo here
            ]

        def vdistream(devices: int, *extra: str, mode: str = "basebackup") -> list[str]:
            return [
                *VDISTREAM,
                "backup",
                url,
                str(out),
                "--mode",
                mode,
                "--devices",
                str(devices),
                *extra,
            ]

        def keep(name: str) -> Path:
            """Move the last case's output aside, for the restore cases."""
            kept = cluster.root / f"kept-{name}"
            shutil.rmtree(kept, ignore_errors=True)
            out.rename(kept)
            return kept

        def restore_case(name: str, argv: list[str], target: Path, *, create: bool = False) -> None:
            shutil.rmtree(target, ignore_errors=True)
            if create:  # for tools that extract into an existing directory
                target.mkdir()
                give_to_server_user(target)
            cases.setdefault(name, []).append(measure_mib(argv))
            shutil.rmtree(target, ignore_errors=True)

        for i in range(args.repeat):
            say(f"pg: round {i + 1} of {args.repeat}")
            case(BASEBACKUP, pg_basebackup())
            for devices in (1, 4):
                case(
                    f"vdistream basebackup, {devices} device{'s' if devices > 1 else ''}",
                    vdistream(devices),
                )
            case(FILES, vdistream(4, mode="files"))
            if not pgbackrest_missing:
                case(PGBACKREST, as_server_user([*pgbackrest, "backup", "--type=full"]))
            if args.compressed:
                case(BASEBACKUP_ZSTD, pg_basebackup("--compress=client-zstd:3"))
                case(
                    "vdistream basebackup, 4 devices, zstd:3",
                    vdistream(4, "--compress", "zstd:3"),
                )
                case(FILES_ZSTD, vdistream(4, "--compress", "zstd:3", mode="files"))
                if not pgbackrest_missing:
                    case(
                        PGBACKREST_ZSTD,
                        as_server_user(
                            [
                                *pgbackrest,
                                "backup",
                                "--type=full",
                                "--compress-type=zst",
                                "--compress-level=3",
                            ]
                        ),
                    )
        # The restores, of the last backup of each kind.
        case(FILES, vdistream(4, mode="files"))
        kept_files = keep("files")
        case("vdistream basebackup, 4 devices", vdistream(4))
        kept_bb = keep("bb")
        case(BASEBACKUP, pg_basebackup())
        kept_tar = keep("tar")
        target = cluster.root / "restored"
        pgbr_target = cluster.directory("pgbr-restored")
        for i in range(args.repeat):
            say(f"pg restore: round {i + 1} of {args.repeat}")
            restore_case(
                RESTORE_FILES,
                [*VDISTREAM, "restore", backup_ref(kept_files), str(target)],
                target,
            )
            restore_case(
                RESTORE_BB, [*VDISTREAM, "restore", backup_ref(kept_bb), str(target)], target
            )
            restore_case(
                TAR_EXTRACT,
                ["tar", "-xf", str(kept_tar / "bb" / "base.tar"), "-C", str(target)],
                target,
                create=True,
            )
            if not pgbackrest_missing:
                restore_case(
                    PGBACKREST_RESTORE,
                    as_server_user([*pgbackrest, f"--pg1-path={pgbr_target}", "restore"]),
                    pgbr_target,
                    create=True,
                )
        if args.json:
            emit(json_records(cases, size, args.scale, pgbackrest_missing))
            return
        base = statistics.median(r["seconds"] for r in cases[BASEBACKUP])
        print(
            f"\ncluster {size / 1e9:.2f} GB (pgbench scale {args.scale}), median of {args.repeat}"
        )
        print(f"{'case':<38}{'wall s':>8}{'MB/s':>8}{'vs pg_bb':>9}{'CPU s':>8}{'RSS MiB':>9}")
        for name, runs in cases.items():
            wall = statistics.median(r["seconds"] for r in runs)
            print(
                f"{name:<38}{wall:>8.2f}{size / wall / 1e6:>8.0f}{base / wall:>9.2f}"
                f"{statistics.median(r['cpu'] for r in runs):>8.2f}"
                f"{statistics.median(r['rss'] for r in runs):>9.0f}"
            )
    finally:
        cluster.close()


def json_records(
    cases: dict[str, list[dict[str, float]]], size: int, scale: int, pgbackrest_missing: str | None
) -> list[Record]:
    records: list[Record] = []
    data = f"pgbench -s {scale}"
    for row, ours, base in PAIRS:
        if ours not in cases:
            continue
        if base not in cases:
            records.append(missing("pg", f"{row} vs {base}", pgbackrest_missing or "not run"))
            continue
        for side, name in (("vdistream", ours), ("baseline", base)):
            samples = [{**r, "rss": r["rss"] * MIB} for r in cases[name]]
            tool = "vdistream" if side == "vdistream" else name
            records.append(record("pg", row, side, tool, size, samples, data=data))
    return records


if __name__ == "__main__":
    main()
