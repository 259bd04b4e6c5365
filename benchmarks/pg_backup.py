"""PostgreSQL base backup: vdistream (1 and 4 devices) beside pg_basebackup and pgBackRest.

On one pgbench cluster started for the run (Debian's PostgreSQL 15, as the postgres
user, Unix socket only), each case backs up the whole cluster to files on the same
disk, repeated, median shown:

* ``pg_basebackup -Ft -X fetch --checkpoint=fast -D dir`` (the tool vdistream drives);
* ``vdistream backup postgresql://... DEST --mode basebackup --devices 1`` and ``4``
  (pg_basebackup's tar stream, striped into virtual devices, hashed, committed, manifest);
* ``pgbackrest backup --type=full`` with ``compress-type=none`` into a local repository
  (Debian's pgbackrest 2.45; WAL archiving through pgbackrest, as it requires).

Wall time, throughput of the database size, CPU seconds and peak RSS of each process
tree (``wait4``). Usage: python benchmarks/pg_backup.py [--scale 70] [--repeat 3]
(scale 70 is about 1 GB of pgbench data).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.databases.pgserver import (
    PgCluster,
    as_server_user,
    give_to_server_user,
    run,
)

VDISTREAM = [sys.executable, "-m", "vdistream"]


def measure(argv: list[str]) -> dict[str, float]:
    """Run ``argv``; wall seconds, CPU seconds and peak RSS (MiB) of its process tree."""
    start = time.perf_counter()
    process = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(process.pid, 0)
    elapsed = time.perf_counter() - start
    stderr = process.stderr.read().decode() if process.stderr else ""
    if status != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({status}): {stderr}")
    return {
        "seconds": elapsed,
        "cpu": usage.ru_utime + usage.ru_stime,
        "rss": usage.ru_maxrss / 1024,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", type=int, default=70, help="pgbench scale (70 ~ 1 GB)")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()

    cluster = PgCluster()
    try:
        server = cluster.initdb("bench")
        conf = cluster.root / "pgbackrest.conf"
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
                f"archive_command = 'pgbackrest --config={conf} --stanza=bench archive-push %p'\n"
            )
        server.start()
        print(f"pgbench -i -s {args.scale} ...", flush=True)
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
        run(as_server_user([*pgbackrest, "stanza-create"]))
        url = f"postgresql://postgres@/postgres?host={server.socket_dir}&port={server.port}"
        out = cluster.root / "out"

        cases: dict[str, list[dict[str, float]]] = {}

        def case(name: str, argv: list[str]) -> None:
            shutil.rmtree(out, ignore_errors=True)
            out.mkdir()
            give_to_server_user(out)
            cases.setdefault(name, []).append(measure(argv))

        for _ in range(args.repeat):
            case(
                "pg_basebackup -Ft",
                [
                    server.tool("pg_basebackup"),
                    "-w",
                    "-Ft",
                    "-X",
                    "fetch",
                    "--checkpoint=fast",
                    "-D",
                    str(out / "bb"),
                    *server.connection("postgres")[:6],  # -h -p -U: -d is a conninfo here
                ],
            )
            for devices in (1, 4):
                case(
                    f"vdistream basebackup, {devices} device{'s' if devices > 1 else ''}",
                    [
                        *VDISTREAM,
                        "backup",
                        url,
                        str(out),
                        "--mode",
                        "basebackup",
                        "--devices",
                        str(devices),
                    ],
                )
            case(
                "pgbackrest full, no compression",
                as_server_user([*pgbackrest, "backup", "--type=full"]),
            )
        base = statistics.median(r["seconds"] for r in cases["pg_basebackup -Ft"])
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


if __name__ == "__main__":
    main()
