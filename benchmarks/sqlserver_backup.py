"""SQL Server backup through the stand-in libsqlvdi.so, beside the stand-in's own raw rate.

One stand-in SQL Server (``standin.mssql``: a Python process playing SQL Server, its server
side of the VDI in the compiled stand-in library) is started for the run; its databases are
procedural (no disk behind them). Each case backs up one database, repeated, median shown:

* raw: a minimal ctypes client (``standin.mssql.rawclient``) that completes every WRITE
  without storing it, while the stand-in ``sqlcmd`` runs the very statement vdistream
  sends (same BLOCKSIZE, BUFFERCOUNT, MAXTRANSFERSIZE, CHECKSUM): the stand-in's own rate;
* ``vdistream backup mssql://...?trigger=sqlcmd null:// --devices 1`` and ``4``;
* the same into a directory on the local disk (each stream fsynced), beside
  ``dd if=/dev/zero of=FILE bs=1M conv=fsync`` of the same size (the database has no file
  to read, so ``dd`` only writes); each file case starts after an untimed write of the same
  size (``warm``);
* peak RSS of a 4-device backup into a directory of databases of ``--rss-gib`` sizes
  (``null://`` when the disk has no room for the largest), beside the raw client.

Rates are the job's: vdistream's ``seconds`` of ``--json`` (from the job's start to its
manifest, not the interpreter's start) and the raw client's from ``Create`` to the end of
``sqlcmd``; the whole process's wall is in each record as ``process_wall``. CPU and peak RSS
are of the process tree (``wait4``, GNU time); the stand-in server's own CPU seconds (it is
a separate process that both sides share) are in each record as ``server_cpu``.

Usage: python benchmarks/sqlserver_backup.py [--gib 2] [--devices 1 4] [--rss-gib 1 8]
           [--repeat 3] [--dir DIR] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from _harness import (
    GIB,
    MIB,
    Record,
    emit,
    measure,
    missing,
    missing_tools,
    progress,
    record,
)

__all__ = ("main",)

ROOT = Path(__file__).resolve().parent.parent

GROUP = "mssql"
VDISTREAM = [sys.executable, "-m", "vdistream"]
#: what vdistream's command line sends by default (1 MiB transfers, 2 buffers per device)
MAX_TRANSFER = MIB
BLOCK = 64 * 1024
TICKS = os.sysconf("SC_CLK_TCK")


# ------------------------------------------------------------------------ the raw client


def raw_child(host: str, port: int, user: str, database: str, devices: int, lib: str) -> None:
    """Run one backup with the raw client; print its seconds, bytes and the 3014 rate."""
    import re

    from standin.mssql.rawclient import RawClient, ended_well

    start = time.perf_counter()
    client = RawClient(Path(lib))
    name = f"raw{os.getpid()}"
    client.create(name, devices)
    names = [name] + [f"{name}{i}" for i in range(1, devices)]
    clauses = ", ".join(f"VIRTUAL_DEVICE = N'{n}'" for n in names)
    statement = (
        f"BACKUP DATABASE [{database}] TO {clauses} WITH FORMAT, NAME = N'{name}', CHECKSUM, "
        f"BLOCKSIZE = {BLOCK}, BUFFERCOUNT = {2 * devices}, MAXTRANSFERSIZE = {MAX_TRANSFER}"
    )
    sqlcmd = [os.environ["VDISTREAM_SQLCMD"], "-S", f"{host},{port}", "-U", user]
    sqlcmd += ["-d", "master", "-b", "-Q", statement]
    proc = subprocess.Popen(sqlcmd, stdout=subprocess.PIPE, text=True)
    try:
        if client.get_configuration(30_000) != 0:
            raise RuntimeError("GetConfiguration failed")
        result = client.run(names, store=False)
        out, _ = proc.communicate(timeout=3600)
    finally:
        client.close()
    seconds = time.perf_counter() - start
    if proc.returncode != 0 or not ended_well(result):
        raise SystemExit(f"raw backup failed: {out.strip()}")
    match = re.search(r"\(([\d.]+) MB/sec\)", out)
    server_rate = float(match.group(1)) if match else 0.0
    print(json.dumps({"seconds": seconds, "bytes": sum(result.written), "server": server_rate}))


# ------------------------------------------------------------------------ measuring


class Bench:
    """The stand-in server of the run and how each case is measured against it."""

    def __init__(self, root: Path) -> None:
        from standin.mssql.control import StandinServer
        from standin.sqlvdi.build import build

        self.root = root
        self.libs = build(root / "libs")
        self.server = StandinServer.start(root / "mssql", libs=self.libs)
        self.env = dict(
            os.environ,
            VDISTREAM_SQLVDI=str(self.libs.client),
            VDISTREAM_SQLCMD=str(self.server.sqlcmd),
            VDISTREAM_MSSQL_PASSWORD=self.server.password,
            SQLCMDPASSWORD=self.server.password,
            PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
            # the stand-in sqlcmd is a Python script run by `env python3`: this interpreter
            # first, so that a version manager's shim (pyenv: ~0.2 s a start) is not what
            # each of vdistream's statements and queries measures
            PATH=os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]),
        )

    def close(self) -> None:
        self.server.stop()

    def server_cpu(self) -> float:
        """CPU seconds (user + system, every thread) of the stand-in server so far."""
        fields = Path(f"/proc/{self.server.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / TICKS

    def _run(self, argv: list[str], env: dict[str, str] | None = None) -> dict[str, Any]:
        """Run ``argv``; its process figures, the JSON of its last stdout line, server CPU."""
        before = self.server_cpu()
        with tempfile.TemporaryFile("w+") as out:
            sample = measure(argv, stdout=out, env=env or self.env)
            out.seek(0)
            inner = json.loads(out.read().strip().splitlines()[-1])
        return {**sample, "inner": inner, "server_cpu": self.server_cpu() - before}

    def raw(self, database: str, devices: int) -> dict[str, Any]:
        s = self.server
        run = self._run(
            [
                *(sys.executable, __file__, "--child-raw", s.host, str(s.port), s.user),
                *(database, str(devices), str(self.libs.client)),
            ]
        )
        inner = run.pop("inner")
        return {
            **run,
            "process_wall": run["seconds"],
            "seconds": inner["seconds"],
            "bytes": inner["bytes"],
            "server_rate": inner["server"] * 1e6,
        }

    def vdistream(self, database: str, devices: int, dest: str) -> dict[str, Any]:
        url = self.server.url(database) + "?trigger=sqlcmd"
        run = self._run(
            [*VDISTREAM, "backup", url, dest, "--devices", str(devices), "--json"],
        )
        inner = run.pop("inner")
        if inner.get("status") != "succeeded":
            raise RuntimeError(f"vdistream backup of {database}: {inner.get('error')}")
        return {
            **run,
            "process_wall": run["seconds"],
            "seconds": float(inner["seconds"]),
            "bytes": int(inner["bytes"]),
        }


def warm(out: Path, size: int) -> None:
    """Write and delete ``size`` bytes in ``out``, untimed, before a case that writes files.

    In a VM whose balloon reports free pages to the host (virtio_balloon here), the first
    write into page-cache pages freed a while ago pays the host's faults: 2 GiB of ``dd
    conv=fsync`` took 5.9 s (4.9 s system time) after 20 s idle and 1.3 s right after
    another. Every file case (ours and ``dd``) starts from the same warm state instead of
    whichever ran last."""
    target = out / "warm.tmp"
    subprocess.run(
        ["dd", "if=/dev/zero", f"of={target}", "bs=1M", f"count={size // MIB}", "status=none"],
        check=True,
    )
    target.unlink()


def dd_file(out: Path, size: int) -> dict[str, Any]:
    warm(out.parent, size)
    sample = measure(
        ["dd", "if=/dev/zero", f"of={out}", "bs=1M", f"count={size // MIB}", "conv=fsync"]
    )
    out.unlink()
    return {**sample, "bytes": size // MIB * MIB, "process_wall": sample["seconds"]}


def make_record(case: str, side: str, tool: str, runs: list[dict[str, Any]], data: str) -> Record:
    size = int(statistics.median(r["bytes"] for r in runs))
    rec = record(GROUP, case, side, tool, size, runs, data=data)
    rec["process_wall"] = statistics.median(r["process_wall"] for r in runs)
    if "server_cpu" in runs[0]:
        rec["server_cpu"] = statistics.median(r["server_cpu"] for r in runs)
    if "server_rate" in runs[0]:
        rec["server_rate"] = statistics.median(r["server_rate"] for r in runs)
    return rec


def devices_label(devices: int) -> str:
    return f"{devices} dev"


def run_all(args: argparse.Namespace) -> list[Record]:
    root = Path(tempfile.mkdtemp(prefix="vdistream-bench-mssql-", dir=args.dir))
    bench = None
    try:
        bench = Bench(root)
        records: list[Record] = []
        size = int(args.gib * GIB)
        data = "procedural pages"
        bench.server.create_database("bench", size, seed=1)
        out = root / "out"
        cases: dict[str, list[dict[str, Any]]] = {}
        for i in range(args.repeat):
            progress(f"mssql: {args.gib:g} GiB, round {i + 1} of {args.repeat}")
            for devices in args.devices:
                cases.setdefault(f"raw{devices}", []).append(bench.raw("bench", devices))
                cases.setdefault(f"null{devices}", []).append(
                    bench.vdistream("bench", devices, "null://")
                )
                shutil.rmtree(out, ignore_errors=True)
                out.mkdir()
                warm(out, size)
                cases.setdefault(f"dir{devices}", []).append(
                    bench.vdistream("bench", devices, str(out))
                )
                shutil.rmtree(out, ignore_errors=True)
            out.mkdir()
            cases.setdefault("dd", []).append(dd_file(out / "dd.out", size))
            shutil.rmtree(out, ignore_errors=True)
        for devices in args.devices:
            label = devices_label(devices)
            raw = (f"stand-in raw client, {label}", f"raw{devices}")
            dd = ("dd if=/dev/zero bs=1M conv=fsync", "dd")
            for case, ours, (tool, base) in (
                (f"backup {label} -> null://", f"null{devices}", raw),
                (f"backup {label} -> dir (fsync)", f"dir{devices}", raw),
                (f"backup {label} -> dir (fsync)", f"dir{devices}", dd),
            ):
                records.append(make_record(case, "vdistream", "vdistream", cases[ours], data))
                records.append(make_record(case, "baseline", tool, cases[base], data))

        for gib in args.rss_gib:
            rss_size = int(gib * GIB)
            free = shutil.disk_usage(root).free
            to_files = free > rss_size + 2 * GIB
            where = "dir (fsync)" if to_files else "null://"
            if not to_files:
                progress(
                    f"mssql: {free / GIB:.1f} GiB free under {root}: the {gib:g} GiB RSS case "
                    "goes to null:// instead of a directory"
                )
            name = f"rss{gib:g}".replace(".", "_")
            bench.server.create_database(name, rss_size, seed=2)
            ours, base = [], []
            for i in range(args.repeat):
                progress(f"mssql: peak RSS, {gib:g} GiB -> {where}, round {i + 1} of {args.repeat}")
                shutil.rmtree(out, ignore_errors=True)
                out.mkdir()
                ours.append(bench.vdistream(name, 4, str(out) if to_files else "null://"))
                shutil.rmtree(out, ignore_errors=True)
                base.append(bench.raw(name, 4))
            label = f"peak RSS: backup {gib:g} GiB, 4 dev -> {where}"
            records.append(make_record(label, "vdistream", "vdistream", ours, data))
            records.append(make_record(label, "baseline", "stand-in raw client, 4 dev", base, data))
        return records
    finally:
        if bench is not None:
            bench.close()
        shutil.rmtree(root, ignore_errors=True)


def print_table(records: list[Record]) -> None:
    print(f"{'case':<44}{'side':<40}{'GiB':>6}{'MB/s':>8}{'CPU s':>8}{'srv CPU':>8}{'RSS MiB':>9}")
    for r in records:
        print(
            f"{r['case']:<44}{r['tool']:<40}{r['bytes'] / GIB:>6.2f}"
            f"{r['bytes'] / r['wall'] / 1e6:>8.0f}{r['cpu']:>8.2f}"
            f"{r.get('server_cpu', 0.0):>8.2f}{r['rss'] / MIB:>9.0f}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gib", type=float, default=2.0, help="size of the database")
    parser.add_argument("--devices", type=int, nargs="+", default=[1, 4])
    parser.add_argument(
        "--rss-gib", type=float, nargs="*", default=[1, 8], help="sizes of the RSS cases"
    )
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--dir", default=None, help="where the backups go (default: $TMPDIR)")
    parser.add_argument("--json", action="store_true", help="print case records as JSON")
    parser.add_argument("--child-raw", nargs=6, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child_raw:
        host, port, user, database, devices, lib = args.child_raw
        raw_child(host, int(port), user, database, int(devices), lib)
        return
    absent = missing_tools("dd", "g++")
    if absent:
        what = absent.replace("g++", "g++ (Debian package g++)")
        if args.json:
            emit([missing(GROUP, "SQL Server backup (stand-in)", what)])
            return
        raise SystemExit(f"missing: {what}")
    records = run_all(args)
    if args.json:
        emit(records)
    else:
        print_table(records)


if __name__ == "__main__":
    main()
