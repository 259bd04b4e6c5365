"""Backup and restore through 4 devices to a local S3 server, beside a plain upload.

Starts moto's S3 server on 127.0.0.1, then for a data file of ``--gib`` GiB (half
random, half compressible):

* vdistream: ``backup cmd:cat FILE s3://bucket/...`` through 4 devices (4 multipart
  uploads) and ``restore`` of it into ``cmd:cat > /dev/null``;
* baseline, in the same run: one ``aws s3 cp``-style stream with aiobotocore (a
  multipart upload of 8 MiB parts, 4 in flight) and one streamed GET of that object.

Each case is a child process: wall time, CPU and peak RSS from ``wait4``. Run with a
smaller and a larger ``--gib`` to see that peak RSS does not grow with the stream.
With ``--repeat N`` each case runs N times (moto's state is reset before each round,
so that it does not hold every earlier upload in memory) and the median is shown;
``--json`` prints a list of case records (``_harness.py``) instead of the table.
Usage: python benchmarks/s3_backup.py [--gib 2] [--repeat 1] [--json]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from _harness import Record, emit, make_data, missing, progress, record
from _harness import measure as measure_os

ENV = {
    "AWS_ACCESS_KEY_ID": "bench",
    "AWS_SECRET_ACCESS_KEY": "bench",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_EC2_METADATA_DISABLED": "true",
}


def measure(argv: list[str]) -> dict[str, float]:
    """Wall seconds, CPU seconds and peak RSS (MiB) of ``argv``'s process tree."""
    sample = measure_os(argv)
    return {**sample, "rss": sample["rss"] / (1 << 20)}


def baseline(mode: str, endpoint: str, bucket: str, path: str) -> None:
    """Child: a single-stream upload or download with aiobotocore."""
    import asyncio

    from aiobotocore.session import get_session

    async def main() -> None:
        session = get_session()
        async with session.create_client("s3", endpoint_url=endpoint) as s3:
            if mode == "get":
                response = await s3.get_object(Bucket=bucket, Key="baseline")
                async with response["Body"] as body:
                    while await body.read(8 << 20):
                        pass
                return
            upload = await s3.create_multipart_upload(Bucket=bucket, Key="baseline")
            parts: list[dict[str, object]] = []
            slots = asyncio.Semaphore(4)  # at most 4 parts in memory, like 4 in flight

            async def put(number: int, data: bytes) -> None:
                try:
                    done = await s3.upload_part(
                        Bucket=bucket,
                        Key="baseline",
                        UploadId=upload["UploadId"],
                        PartNumber=number,
                        Body=data,
                    )
                    parts.append({"PartNumber": number, "ETag": done["ETag"]})
                finally:
                    slots.release()

            tasks = []
            f = await asyncio.to_thread(open, path, "rb")
            try:
                number = 1
                while True:
                    await slots.acquire()
                    chunk = await asyncio.to_thread(f.read, 8 << 20)
                    if not chunk:
                        slots.release()
                        break
                    tasks.append(asyncio.create_task(put(number, chunk)))
                    number += 1
            finally:
                f.close()
            await asyncio.gather(*tasks)
            parts.sort(key=lambda p: p["PartNumber"])  # type: ignore[arg-type,return-value]
            await s3.complete_multipart_upload(
                Bucket=bucket,
                Key="baseline",
                UploadId=upload["UploadId"],
                MultipartUpload={"Parts": parts},
            )

    asyncio.run(main())


CASES = [
    ("backup 4 dev -> s3://", "vdistream", "backup"),
    ("backup 4 dev -> s3://", "multipart upload, 1 stream (aiobotocore)", "put"),
    ("restore 4 dev <- s3://", "vdistream", "restore"),
    ("restore 4 dev <- s3://", "streamed GET, 1 stream (aiobotocore)", "get"),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gib", type=float, default=2.0)
    parser.add_argument("--repeat", type=int, default=1, help="runs per case (median)")
    parser.add_argument("--json", action="store_true", help="print case records as JSON")
    parser.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        baseline(*args.child)
        return
    absent = [m for m in ("moto.server", "flask", "aiobotocore") if not importlib.util.find_spec(m)]
    if absent:
        what = f"Python modules {', '.join(absent)} (pip install -e '.[test]': moto[server])"
        if args.json:
            emit([missing("s3", "S3 backup and restore", what)])
            return
        raise SystemExit(f"missing: {what}")
    os.environ.update(ENV)
    root = Path(tempfile.mkdtemp(prefix="vdistream-s3-bench-"))
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    endpoint = f"http://127.0.0.1:{port}"
    server = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        for _ in range(100):
            try:
                urllib.request.urlopen(endpoint, timeout=1)
                break
            except OSError:
                time.sleep(0.1)
        data = root / "data"
        size = make_data(data, int(args.gib * (1 << 30)), "mixed")
        dest = f"s3://bench/backups?endpoint_url={endpoint}"
        vds = [sys.executable, "-m", "vdistream"]
        me = [sys.executable, __file__, "--child"]
        runs: dict[str, list[dict[str, float]]] = {}
        for i in range(args.repeat):
            if args.json:
                progress(f"s3: round {i + 1} of {args.repeat}")
            # a fresh server state every round: moto keeps every object in memory
            urllib.request.urlopen(
                urllib.request.Request(f"{endpoint}/moto-api/reset", method="POST")
            )
            urllib.request.urlopen(urllib.request.Request(f"{endpoint}/bench", method="PUT"))
            runs.setdefault("backup", []).append(
                measure([*vds, "backup", f"cmd:cat {data}", dest, "--devices", "4", "--json"])
            )
            listed = json.loads(
                subprocess.run(
                    [*vds, "list", dest, "--json"], capture_output=True, text=True, check=True
                ).stdout
            )
            ref = f"s3://bench/backups/{listed[0]['id']}?endpoint_url={endpoint}"
            runs.setdefault("restore", []).append(
                measure([*vds, "restore", ref, "cmd:sh -c 'cat > /dev/null'"])
            )
            runs.setdefault("put", []).append(measure([*me, "put", endpoint, "bench", str(data)]))
            runs.setdefault("get", []).append(measure([*me, "get", endpoint, "bench", str(data)]))
        if args.json:
            records: list[Record] = []
            for case, tool, key in CASES:
                side = "vdistream" if tool == "vdistream" else "baseline"
                samples = [{**r, "rss": r["rss"] * (1 << 20)} for r in runs[key]]
                records.append(record("s3", case, side, tool, size, samples, data="mixed"))
            emit(records)
            return
        print(f"{args.gib:g} GiB to moto's S3 server on loopback")
        print(f"{'case':<44}{'GB/s':>7}{'CPU s':>8}{'RSS MiB':>9}")
        for label, key in (
            ("vdistream backup, 4 devices", "backup"),
            ("single-stream multipart upload (aiobotocore)", "put"),
            ("vdistream restore, 4 devices", "restore"),
            ("single-stream GET (aiobotocore)", "get"),
        ):
            wall = statistics.median(r["seconds"] for r in runs[key])
            cpu = statistics.median(r["cpu"] for r in runs[key])
            rss = statistics.median(r["rss"] for r in runs[key])
            print(f"{label:<44}{size / wall / 1e9:>7.2f}{cpu:>8.1f}{rss:>9.0f}")
    finally:
        server.terminate()
        server.wait(10)
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
