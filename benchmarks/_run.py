"""The benchmark harness behind ``benchmarks/run``: every benchmark, one table.

Runs each benchmark script (``--json``) in a child process, on data the scripts
generate, and prints one table: per case vdistream's figure and the baseline's,
measured in the same run, their ratio, CPU time per GiB and peak RSS of both sides
(all from the operating system, median of ``--repeat`` runs; see ``_harness.py`` and
docs/benchmarks.md).

    benchmarks/run [--quick] [--only GROUP[,GROUP]] [--repeat N] [--json PATH] [--markdown]
    benchmarks/run --from PATH [--markdown]     # the table of an earlier --json file

A group that cannot run (a tool or package missing) is a row that says what is
missing; a group whose script fails is a row with its error. The harness installs
nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
GIB = 1 << 30
MIB = 1 << 20


@dataclass(frozen=True)
class Group:
    name: str
    script: str
    what: str
    quick: tuple[str, ...]
    full: tuple[str, ...]


GROUPS = [
    Group(
        "vdi",
        "vdi_roundtrip.py",
        "command round trip; 1 MiB transfers through 4 devices",
        ("--round-trips", "5000", "--gib", "1"),
        ("--round-trips", "20000", "--gib", "4"),
    ),
    Group(
        "transport",
        "transport.py",
        "a set whose engine is another process, beside the same in one process; feed",
        ("--round-trips", "5000", "--gib", "1", "--feed-gib", "0.5"),
        ("--round-trips", "20000", "--gib", "2", "--feed-gib", "2"),
    ),
    Group(
        "file",
        "file_backup.py",
        "file backup and restore",
        ("--gib", "0.5", "--rss-gib"),
        ("--gib", "2", "--rss-gib"),
    ),
    Group(
        "mirror",
        "mirror.py",
        "a backup mirrored to two local directories (--mirror) beside the same to one",
        ("--gib", "0.5"),
        ("--gib", "2"),
    ),
    Group(
        "throttle",
        "throttle.py",
        "a backup under --max-rate: the worst 5-second window, and a live change",
        (),
        (),
    ),
    Group(
        "rss",
        "file_backup.py",
        "peak RSS of backups of growing size",
        ("--no-files", "--rss-gib", "0.25", "1"),
        ("--no-files", "--rss-gib", "1", "8"),
    ),
    Group(
        "pipeline",
        "pipeline.py",
        "compression and encryption",
        (
            "--gib",
            "0.25",
            "--devices",
            "4",
            "--zstd-threads",
            "4",
            "--stages",
            "none",
            "zstd:3",
            "aes",
            "zstd:3+aes",
        ),
        ("--gib", "1", "--devices", "4", "--zstd-threads", "4"),
    ),
    Group(
        "pg",
        "pg_backup.py",
        "PostgreSQL base backup",
        ("--scale", "10", "--compressed"),
        ("--scale", "70", "--compressed"),
    ),
    Group(
        "mssql",
        "sqlserver_backup.py",
        "SQL Server backup through the stand-in libsqlvdi.so",
        ("--gib", "0.5", "--rss-gib", "0.5", "1"),
        ("--gib", "2", "--rss-gib", "1", "8"),
    ),
    Group(
        "s3",
        "s3_backup.py",
        "S3 backup and restore (moto on loopback)",
        ("--gib", "0.125"),
        ("--gib", "0.5"),
    ),
]
BY_NAME = {g.name: g for g in GROUPS}


def run_group(group: Group, quick: bool, repeat: int) -> tuple[list[dict[str, Any]], float]:
    """The group's records (or one failure record) and its run time in seconds."""
    argv = [
        sys.executable,
        str(HERE / group.script),
        "--json",
        "--repeat",
        str(repeat),
        *(group.quick if quick else group.full),
    ]
    print(f"==> {group.name}: {' '.join(argv[1:])}", file=sys.stderr, flush=True)
    tail: list[str] = []
    start = time.perf_counter()
    with tempfile.TemporaryFile("w+") as out:
        process = subprocess.Popen(
            argv, stdout=out, stderr=subprocess.PIPE, text=True, cwd=HERE.parent
        )
        assert process.stderr is not None
        for line in process.stderr:  # progress lines, passed on as they come
            print(f"    {line.rstrip()}", file=sys.stderr, flush=True)
            tail = [*tail[-19:], line.rstrip()]
        code = process.wait()
        out.seek(0)
        lines = out.read().strip().splitlines()
    elapsed = time.perf_counter() - start
    if code == 0 and lines:
        try:
            return list(json.loads(lines[-1])), elapsed
        except ValueError:
            tail.append(f"unreadable output: {lines[-1][:200]}")
    reason = next((t for t in reversed(tail) if t.strip()), "no output")
    return [
        {"group": group.name, "case": group.what, "failed": f"exit {code}: {reason[:300]}"}
    ], elapsed


# ---------------------------------------------------------------------------- table


def fmt_seconds(s: float) -> str:
    if s >= 100:
        return f"{s:.0f} s"
    if s >= 10:
        return f"{s:.1f} s"
    if s >= 1:
        return f"{s:.2f} s"
    return f"{s:.3f} s"


def fmt_rate(r: dict[str, Any]) -> str:
    if r.get("ops"):
        return f"{r['wall'] / r['ops'] * 1e6:.1f} µs/op"
    if not r["bytes"]:
        return "-"
    rate = r["bytes"] / r["wall"]
    if rate >= 1e9:
        return f"{rate / 1e9:.2f} GB/s"
    return f"{rate / 1e6:.0f} MB/s"


def fmt_size(r: dict[str, Any]) -> str:
    if r.get("ops"):
        return f"{r['ops']} ops"
    size = r["bytes"]
    if not size:
        return "0"
    return f"{size / GIB:.2f} GiB" if size >= GIB else f"{size / MIB:.0f} MiB"


def fmt_cpu(ours: dict[str, Any], base: dict[str, Any]) -> str:
    if ours.get("ops"):
        return (
            f"{ours['cpu'] / ours['ops'] * 1e6:.1f} / {base['cpu'] / base['ops'] * 1e6:.1f} µs/op"
        )
    if not ours["bytes"]:  # a fixed cost: CPU seconds in all
        return f"{ours['cpu']:.2f} / {base['cpu']:.2f} s"
    return f"{ours['cpu'] / (ours['bytes'] / GIB):.2f} / {base['cpu'] / (base['bytes'] / GIB):.2f}"


def ratio(ours: dict[str, Any], base: dict[str, Any]) -> float:
    """vdistream's throughput over the baseline's (>1: vdistream is faster)."""
    if ours.get("ops"):
        return (base["wall"] / base["ops"]) / (ours["wall"] / ours["ops"])
    if not ours["bytes"]:
        return float(base["wall"] / ours["wall"])
    return (ours["bytes"] / ours["wall"]) / (base["bytes"] / base["wall"])


HEADER = [
    "group",
    "case",
    "data",
    "size",
    "vdistream wall",
    "rate",
    "baseline",
    "wall",
    "rate",
    "ratio",
    "CPU s/GiB vds / base",
    "peak RSS MiB vds / base",
]


def rows(records: Sequence[dict[str, Any]]) -> list[list[str]]:
    """One row per (vdistream, baseline) pair, in order; a row for each missing or
    failed case."""
    out: list[list[str]] = []
    pending: dict[str, Any] | None = None
    for r in records:
        if "missing" in r or "failed" in r:
            note = f"MISSING: {r['missing']}" if "missing" in r else f"FAILED: {r['failed']}"
            out.append([r["group"], r["case"], note])
            continue
        if r["side"] == "vdistream":
            pending = r
            continue
        if pending is None or pending["case"] != r["case"]:
            out.append([r["group"], r["case"], "FAILED: baseline without a vdistream record"])
            continue
        ours, base = pending, r
        out.append(
            [
                ours["group"],
                ours["case"],
                ours.get("data") or "-",
                fmt_size(ours),
                fmt_seconds(ours["wall"]),
                fmt_rate(ours),
                base["tool"],
                fmt_seconds(base["wall"]),
                fmt_rate(base),
                f"{ratio(ours, base):.2f}",
                fmt_cpu(ours, base),
                f"{ours['rss'] / MIB:.0f} / {base['rss'] / MIB:.0f}",
            ]
        )
    return out


NUMERIC = {3, 4, 5, 7, 8, 9, 10, 11}


def text_table(table: list[list[str]]) -> str:
    full = [r for r in table if len(r) == len(HEADER)]
    widths = [max(len(r[i]) for r in [HEADER, *full]) for i in range(len(HEADER))]
    lines = []
    for r in [HEADER, *table]:
        if len(r) != len(HEADER):  # missing / failed: the note spans the rest
            lines.append(f"{r[0]:<{widths[0]}}  {r[1]:<{widths[1]}}  {r[2]}")
            continue
        cells = [
            f"{c:>{widths[i]}}" if i in NUMERIC else f"{c:<{widths[i]}}" for i, c in enumerate(r)
        ]
        lines.append("  ".join(cells).rstrip())
        if r is HEADER:
            lines.append("-" * len(lines[-1]))
    return "\n".join(lines)


def markdown_table(table: list[list[str]]) -> str:
    align = ["---:" if i in NUMERIC else "---" for i in range(len(HEADER))]
    lines = ["| " + " | ".join(HEADER) + " |", "|" + "|".join(align) + "|"]
    for r in table:
        cells = r if len(r) == len(HEADER) else [*r, *[""] * (len(HEADER) - len(r))]
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(lines)


def rss_note(records: Sequence[dict[str, Any]]) -> str | None:
    """Peak RSS of the vdistream backups of the rss group, smallest to largest."""
    ours = [r for r in records if r.get("group") == "rss" and r.get("side") == "vdistream"]
    if len(ours) < 2:
        return None
    ours.sort(key=lambda r: r["bytes"])
    sizes = ", ".join(f"{r['bytes'] / GIB:g} GiB: {r['rss'] / MIB:.0f} MiB" for r in ours)
    growth = ours[-1]["rss"] / ours[0]["rss"]
    return f"vdistream peak RSS by backup size: {sizes} (largest / smallest: x{growth:.2f})"


def machine() -> dict[str, Any]:
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    memory = 0
    try:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (OSError, ValueError):
        pass
    version = ""
    try:
        from importlib.metadata import version as package_version

        version = package_version("vdistream")
    except Exception:
        pass
    tools = {}
    for name, argv in (
        ("zstd", ["zstd", "--version"]),
        ("lz4", ["lz4", "--version"]),
        ("openssl", ["openssl", "version"]),
        ("pg_basebackup", ["/usr/lib/postgresql/15/bin/pg_basebackup", "--version"]),
        ("pgbackrest", ["pgbackrest", "version"]),
    ):
        try:
            done = subprocess.run(argv, capture_output=True, text=True, timeout=10, check=True)
            line = (done.stdout or done.stderr).strip().splitlines()[0]
            tools[name] = line.strip("* ").split(", by ")[0].split(" (Library")[0]
        except (OSError, subprocess.SubprocessError, IndexError):
            tools[name] = "missing"
    return {
        "tools": tools,
        "cpus": os.cpu_count(),
        "cpu_model": model,
        "memory_gib": round(memory / GIB, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "vdistream": version,
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="benchmarks/run",
        description="Run every benchmark beside its baseline and print one table.",
    )
    parser.add_argument(
        "--quick", action="store_true", help="small sizes: under 5 minutes on 2 cores"
    )
    parser.add_argument(
        "--only",
        default="",
        help=f"comma-separated groups to run (of {', '.join(BY_NAME)}); default all",
    )
    parser.add_argument("--repeat", type=int, default=3, help="runs per case, median shown")
    parser.add_argument("--json", metavar="PATH", help="also write every record to PATH")
    parser.add_argument("--markdown", action="store_true", help="print the table as Markdown")
    parser.add_argument(
        "--from",
        dest="source",
        metavar="PATH",
        help="run nothing: print the table of a file written by --json",
    )
    args = parser.parse_args(argv)
    if args.source:
        saved = json.loads(Path(args.source).read_text())
        return report(
            saved["records"],
            saved["machine"],
            saved["mode"],
            saved["repeat"],
            saved["group_seconds"],
            saved["seconds"],
            markdown=args.markdown,
        )
    names = [n.strip() for n in args.only.split(",") if n.strip()] or list(BY_NAME)
    unknown = [n for n in names if n not in BY_NAME]
    if unknown:
        parser.error(f"unknown group(s) {', '.join(unknown)}; groups: {', '.join(BY_NAME)}")
    if args.repeat < 1:
        parser.error("--repeat must be at least 1")

    start = time.perf_counter()
    records: list[dict[str, Any]] = []
    timings: dict[str, float] = {}
    for group in GROUPS:
        if group.name in names:
            found, timings[group.name] = run_group(group, args.quick, args.repeat)
            records += found
    total = time.perf_counter() - start
    info = machine()
    mode = "--quick" if args.quick else "full"
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                {
                    "mode": mode,
                    "repeat": args.repeat,
                    "machine": info,
                    "seconds": total,
                    "group_seconds": timings,
                    "records": records,
                },
                indent=1,
            )
            + "\n"
        )
    return report(records, info, mode, args.repeat, timings, total, markdown=args.markdown)


def report(
    records: list[dict[str, Any]],
    info: dict[str, Any],
    mode: str,
    repeat: int,
    timings: dict[str, float],
    total: float,
    *,
    markdown: bool,
) -> int:
    """Print the table and its notes; 1 when a group failed."""
    notes = [
        f"{mode} run, median of {repeat}; {info['cpus']} CPUs ({info['cpu_model']}), "
        f"{info['memory_gib']} GiB RAM, Linux {info['kernel']}, Python {info['python']}, "
        f"vdistream {info['vdistream']}",
        "tools: " + "; ".join(info.get("tools", {}).values()),
        "rate: bytes / wall (GB = 1e9 B); ratio: vdistream rate / baseline rate "
        "(> 1: vdistream faster); CPU: user + system of the process tree (wait4/getrusage);"
        " peak RSS: ru_maxrss of the largest process",
    ]
    if not shutil.which("time") and not os.access("/usr/bin/time", os.X_OK):
        notes.append(
            "/usr/bin/time is missing (Debian package time): peak RSS of small tools "
            "reads as the harness's own size"
        )
    rss = rss_note(records)
    if rss:
        notes.append(rss)
    notes.append(
        "run time: "
        + ", ".join(f"{name} {seconds:.0f} s" for name, seconds in timings.items())
        + f"; total {total:.0f} s ({total / 60:.1f} min)"
    )
    table = rows(records)
    if markdown:
        print(markdown_table(table))
        print()
        for note in notes:
            print(f"- {note}")
    else:
        print()
        print(text_table(table))
        print()
        for note in notes:
            print(note)
    return 1 if any("failed" in r for r in records) else 0


if __name__ == "__main__":
    sys.exit(main())
