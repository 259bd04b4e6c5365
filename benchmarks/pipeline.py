"""Compression and encryption throughput per device count, beside the zstd command line.

For compressible data (text-like, ~4:1 with zstd) and random data, backs up a file
through 1, 2 and 4 devices into ``null://`` with no stage, zstd:1, zstd:3, lz4, and
encryption (AES-256-GCM) alone and after zstd:3, and runs ``zstd -T2 -3`` on the same
file in the same run. Each vdistream case runs in a child process (wall time and CPU
from the OS); the table shows GB/s of input, the ratio to ``zstd -T2 -3`` and, for
encryption, its cost relative to the same run without it.

Usage: python benchmarks/pipeline.py [--gib 1] [--devices 1 2 4]
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CASES = [
    ("none", False),
    ("zstd:1", False),
    ("zstd:3", False),
    ("lz4", False),
    ("none", True),
    ("zstd:3", True),
]


def make_data(path: Path, size: int, kind: str) -> None:
    rng = random.Random(5)
    with path.open("wb") as f:
        if kind == "random":
            for _ in range(size // (8 << 20)):
                f.write(os.urandom(8 << 20))
            return
        words = [
            w.encode()
            for w in ["select", "from", "where", "order", "by", "group", "vacuum", "index"]
        ]
        block = b" ".join(
            rng.choice(words) + str(rng.randrange(10**6)).encode() for _ in range(200_000)
        )
        written = 0
        while written < size:
            f.write(block)
            written += len(block)


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gib", type=float, default=1.0)
    parser.add_argument("--devices", type=int, nargs="+", default=[1, 2, 4])
    args = parser.parse_args()
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
            make_data(data, size, kind)
            subprocess.run(["cat", str(data)], stdout=subprocess.DEVNULL, check=True)
            actual = data.stat().st_size
            base, base_cpu = run(["zstd", "-q", "-T2", "-3", "-c", str(data)])
            print(f"\n{kind}: zstd -T2 -3: {actual / base / 1e9:.2f} GB/s ({base_cpu:.1f})")
            header = "".join(f"{f'{d} dev':>18}" for d in args.devices)
            print(f"{'stages':<18}{header}")
            plain: dict[tuple[str, int], float] = {}
            for compress, encrypt in CASES:
                cells = []
                for devices in args.devices:
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
                    if encrypt:
                        argv += ["--encrypt-key-file", str(key)]
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
