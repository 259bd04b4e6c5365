"""Backup and restore through 4 devices to a local S3 server, beside a plain upload.

Starts moto's S3 server on 127.0.0.1, then for a data file of ``--gib`` GiB (half
random, half compressible):

* vdistream: ``backup cmd:cat FILE s3://bucket/...`` through 4 devices (4 multipart
  uploads) and ``restore`` of it into ``cmd:cat > /dev/null``;
* baseline, in the same run: one ``aws s3 cp``-style stream with aiobotocore (a
  multipart upload of 8 MiB parts, 4 in flight) and one streamed GET of that object.

Each case is a child process: wall time, CPU and peak RSS from ``wait4``. Run with a
smaller and a larger ``--gib`` to see that peak RSS does not grow with the stream.
Usage: python benchmarks/s3_backup.py [--gib 2]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ENV = {
    "AWS_ACCESS_KEY_ID": "bench",
    "AWS_SECRET_ACCESS_KEY": "bench",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_EC2_METADATA_DISABLED": "true",
}


def measure(argv: list[str]) -> dict[str, float]:
    start = time.perf_counter()
    process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(process.pid, 0)
    elapsed = time.perf_counter() - start
    if status:
        err = process.stderr.read().decode() if process.stderr else ""
        raise RuntimeError(f"{argv[:6]} failed: {err}")
    return {
        "seconds": elapsed,
        "cpu": usage.ru_utime + usage.ru_stime,
        "rss": usage.ru_maxrss / 1024,
    }


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gib", type=float, default=2.0)
    parser.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        baseline(*args.child)
        return
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
        urllib.request.urlopen(urllib.request.Request(f"{endpoint}/bench", method="PUT"))
        data = root / "data"
        size = int(args.gib * (1 << 30))
        with data.open("wb") as f:
            chunk = os.urandom(8 << 20)
            for i in range(size // (8 << 20)):
                f.write(chunk if i % 2 else bytes(8 << 20))
        dest = f"s3://bench/backups?endpoint_url={endpoint}"
        vds = [sys.executable, "-m", "vdistream"]
        backup = measure([*vds, "backup", f"cmd:cat {data}", dest, "--devices", "4", "--json"])
        listed = json.loads(
            subprocess.run(
                [*vds, "list", dest, "--json"], capture_output=True, text=True, check=True
            ).stdout
        )
        ref = f"s3://bench/backups/{listed[0]['id']}?endpoint_url={endpoint}"
        restore = measure([*vds, "restore", ref, "cmd:sh -c 'cat > /dev/null'"])
        me = [sys.executable, __file__, "--child"]
        put = measure([*me, "put", endpoint, "bench", str(data)])
        get = measure([*me, "get", endpoint, "bench", str(data)])
        print(f"{args.gib:g} GiB to moto's S3 server on loopback")
        print(f"{'case':<44}{'GB/s':>7}{'CPU s':>8}{'RSS MiB':>9}")
        for label, r in (
            ("vdistream backup, 4 devices", backup),
            ("single-stream multipart upload (aiobotocore)", put),
            ("vdistream restore, 4 devices", restore),
            ("single-stream GET (aiobotocore)", get),
        ):
            print(f"{label:<44}{size / r['seconds'] / 1e9:>7.2f}{r['cpu']:>8.1f}{r['rss']:>9.0f}")
    finally:
        server.terminate()
        server.wait(10)
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
