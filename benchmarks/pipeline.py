"""Compression and encryption throughput per device count, beside the zstd command line.

For compressible data (text-like, ~4:1 with zstd) and random data, backs up a file
through 1, 2 and 4 devices into ``null://`` with no stage, zstd:1, zstd:3, lz4, and
encryption (AES-256-GCM) alone and after zstd:3, and runs ``zstd -T2 -3`` on the same
file in the same run. Each vdistream case runs in a child process (wall time and CPU
from the OS); the table shows GB/s of input, the ratio to ``zstd -T2 -3`` and, for
encryption, its cost relative to the same run without it.

With ``--json`` every stage runs ``--repeat`` times (median kept) beside the command
line a user would pick for the same work, measured the same way (``wait4``), and the
script prints a list of case records (``_harness.py``) instead of the table:

* no stage: ``cat FILE``; zstd:N: ``zstd -TT -N -c FILE`` (T: ``--zstd-threads``);
  lz4: ``lz4 -c FILE``; AES-256-GCM: ``openssl enc -aes-256-ctr`` (``enc`` has no AEAD
  mode; CTR is the same AES core without the GHASH); zstd:3 + AES:
  ``zstd -TT -3 -c FILE | openssl enc -aes-256-ctr``; all into /dev/null.

Usage: python benchmarks/pipeline.py [--gib 1] [--devices 1 2 4] [--zstd-threads 2]
           [--repeat N] [--data compressible random] [--stages ...] [--json]
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _harness import (
    Record,
    emit,
    make_data,
    measure,
    missing,
    missing_tools,
    progress,
    record,
)

CASES = [
    ("none", False),
    ("zstd:1", False),
    ("zstd:3", False),
    ("lz4", False),
    ("none", True),
    ("zstd:3", True),
]


def run(argv: list[str]) -> tuple[float, float]:
    start = time.perf_counter()
    process = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(process.pid, 0)
    elapsed = time.perf_counter() - start
    if status:
        raise RuntimeError(
            f"{argv} failed: {process.stderr.read().decode() if process.stderr else ''}"
        )
    return elapsed, usage.ru_utime + usage.ru_stime


def stage_name(compress: str, encrypt: bool) -> str:
    if encrypt:
        return "aes" if compress == "none" else f"{compress}+aes"
    return compress


def vdistream_argv(data: Path, devices: int, compress: str, key: Path | None) -> list[str]:
    argv = [
        sys.executable,
        "-m",
        "vdistream",
        "backup",
        f"cmd:cat {data}",
        "null://",
        "--devices",
        str(devices),
        "--compress",
        compress,
        "--stall-timeout",
        "600",
    ]
    if key is not None:
        argv += ["--encrypt-key-file", str(key)]
    return argv


def baseline_argv(data: Path, compress: str, encrypt: bool, threads: int) -> tuple[str, list[str]]:
    """(label, argv) of the command line that does the same work as a stage."""
    aes = [
        "openssl",
        "enc",
        "-aes-256-ctr",
        "-K",
        os.urandom(32).hex(),
        "-iv",
        os.urandom(16).hex(),
    ]
    if compress == "none":
        if encrypt:
            return "openssl enc -aes-256-ctr", [*aes, "-in", str(data)]
        return "cat", ["cat", str(data)]
    if compress == "lz4":
        return "lz4 -1", ["lz4", "-q", "-1", "-c", str(data)]
    level = compress.split(":")[1] if ":" in compress else "3"
    zstd = ["zstd", "-q", f"-T{threads}", f"-{level}", "-c", str(data)]
    label = f"zstd -T{threads} -{level}"
    if encrypt:
        pipe = f"{shlex.join(zstd)} | {shlex.join(aes)}"
        return f"{label} | openssl enc -aes-256-ctr", ["sh", "-c", pipe]
    return label, zstd


def tools_for(compress: str, encrypt: bool) -> list[str]:
    tools = ["cat"]
    if compress.startswith("zstd"):
        tools.append("zstd")
    if compress == "lz4":
        tools.append("lz4")
    if encrypt:
        tools += ["openssl", "sh"]
    return tools


def json_main(args: argparse.Namespace) -> None:
    wanted = args.stages or [stage_name(c, e) for c, e in CASES]
    cases = [(c, e) for c, e in CASES if stage_name(c, e) in wanted]
    records: list[Record] = []
    root = Path(tempfile.mkdtemp(prefix="vdistream-pipeline-"))
    try:
        key = root / "key"
        subprocess.run(
            [sys.executable, "-m", "vdistream", "keygen", str(key)], check=True, capture_output=True
        )
        # the fixed cost of every case below: interpreter, imports, job set-up, manifest
        empty = root / "empty"
        empty.touch()
        case = "empty stream, 4 dev -> null:// (fixed cost)"
        progress(f"pipeline: {case} x{args.repeat}")
        ours = [measure(vdistream_argv(empty, 4, "none", None)) for _ in range(args.repeat)]
        base = [measure(["cat", str(empty)]) for _ in range(args.repeat)]
        records.append(record("pipeline", case, "vdistream", "vdistream", 0, ours, data="empty"))
        records.append(record("pipeline", case, "baseline", "cat", 0, base, data="empty"))
        for kind in args.data:
            data = root / kind
            progress(f"pipeline: writing {args.gib:g} GiB of {kind} data")
            size = make_data(data, int(args.gib * (1 << 30)), kind)
            for devices in args.devices:
                for compress, encrypt in cases:
                    label = stage_name(compress, encrypt)
                    case = f"{label}, {devices} dev -> null://"
                    absent = missing_tools(*tools_for(compress, encrypt))
                    if absent:
                        records.append(missing("pipeline", f"{case} ({kind})", absent))
                        continue
                    progress(f"pipeline: {kind} {case} x{args.repeat}")
                    tool, base_argv = baseline_argv(data, compress, encrypt, args.zstd_threads)
                    ours_argv = vdistream_argv(data, devices, compress, key if encrypt else None)
                    ours, base = [], []
                    for _ in range(args.repeat):
                        ours.append(measure(ours_argv))
                        base.append(measure(base_argv))
                    records.append(
                        record("pipeline", case, "vdistream", "vdistream", size, ours, data=kind)
                    )
                    records.append(
                        record("pipeline", case, "baseline", tool, size, base, data=kind)
                    )
            data.unlink()
    finally:
        shutil.rmtree(root, ignore_errors=True)
    emit(records)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gib", type=float, default=1.0)
    parser.add_argument("--devices", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument(
        "--zstd-threads", type=int, default=2, help="zstd -T of the baseline (default 2)"
    )
    parser.add_argument("--repeat", type=int, default=3, help="(--json) runs per case")
    parser.add_argument(
        "--data", nargs="+", default=["compressible", "random"], help="(--json) data kinds"
    )
    parser.add_argument(
        "--stages",
        nargs="+",
        choices=[stage_name(c, e) for c, e in CASES],
        help="(--json) stages to run (default all)",
    )
    parser.add_argument("--json", action="store_true", help="print case records as JSON")
    args = parser.parse_args()
    if args.json:
        json_main(args)
        return
    root = Path(tempfile.mkdtemp(prefix="vdistream-pipeline-"))
    try:
        key = root / "key"
        subprocess.run(
            [sys.executable, "-m", "vdistream", "keygen", str(key)], check=True, capture_output=True
        )
        size = int(args.gib * (1 << 30))
        print(f"{args.gib:g} GiB per case; GB/s of input (wall), CPU s in brackets")
        for kind in ("compressible", "random"):
            data = root / kind
            actual = make_data(data, size, kind)
            t = args.zstd_threads
            base, base_cpu = run(["zstd", "-q", f"-T{t}", "-3", "-c", str(data)])
            print(f"\n{kind}: zstd -T{t} -3: {actual / base / 1e9:.2f} GB/s ({base_cpu:.1f})")
            header = "".join(f"{f'{d} dev':>18}" for d in args.devices)
            print(f"{'stages':<18}{header}")
            plain: dict[tuple[str, int], float] = {}
            for compress, encrypt in CASES:
                cells = []
                for devices in args.devices:
                    argv = vdistream_argv(data, devices, compress, key if encrypt else None)
                    wall, cpu = run(argv)
                    rate = actual / wall / 1e9
                    if not encrypt:
                        plain[compress, devices] = wall
                        extra = f" x{base / wall:.2f}" if compress == "zstd:3" else ""
                    else:
                        extra = f" +{wall / plain[compress, devices] - 1:.0%}"
                    cells.append(f"{rate:.2f} ({cpu:.1f}){extra}")
                label = compress + (" + aes" if encrypt else "")
                print(f"{label:<18}" + "".join(f"{c:>18}" for c in cells))
            data.unlink()
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
