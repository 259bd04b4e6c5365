"""A real moto S3 server (a subprocess on 127.0.0.1) for the S3 tests.

The server allows parts of ``TEST_PART_SIZE`` (instead of S3's 5 MiB) so that
multi-part streams stay small. Credentials are dummies set in the environment for the
whole session; every test gets its own bucket.
"""

from __future__ import annotations

import contextlib
import importlib.util
import itertools
import os
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from typing import IO, Any

import botocore.config
import botocore.session
import pytest
import pytest_asyncio

from tests.s3.proxy import FaultProxy
from tests.servers import environment, free_port
from vdistream.storage.s3 import S3Storage

#: The smallest part the test server accepts (and the sinks' first part size).
TEST_PART_SIZE = 64 * 1024

_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_SESSION_TOKEN": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_EC2_METADATA_DISABLED": "true",
    "AWS_CONFIG_FILE": os.devnull,
    "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
}
_UNSET = ("AWS_PROFILE", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3")


@dataclass
class MotoServer:
    """The running server: its endpoint and a synchronous botocore client on it."""

    endpoint: str
    port: int
    client: Any
    _buckets: Iterator[int] = field(default_factory=itertools.count)

    def new_bucket(self) -> str:
        name = f"test-{os.getpid()}-{next(self._buckets)}"
        self.client.create_bucket(Bucket=name)
        return name

    def keys(self, bucket: str, prefix: str = "") -> list[str]:
        keys: list[str] = []
        for page in self.client.get_paginator("list_objects_v2").paginate(
            Bucket=bucket, Prefix=prefix
        ):
            keys.extend(item["Key"] for item in page.get("Contents", []))
        return keys

    def uploads(self, bucket: str, prefix: str = "") -> list[tuple[str, str]]:
        page = self.client.list_multipart_uploads(Bucket=bucket, Prefix=prefix)
        return [(item["Key"], item["UploadId"]) for item in page.get("Uploads", [])]

    def get(self, bucket: str, key: str) -> bytes:
        data: bytes = self.client.get_object(Bucket=bucket, Key=key)["Body"].read()
        return data

    def residue(self, storage: S3Storage) -> list[str]:
        """Everything under the storage's prefix: object keys and open uploads."""
        root = f"{storage.prefix}/" if storage.prefix else ""
        held = [key[len(root) :] for key in self.keys(storage.bucket, root)]
        held += [f"<upload {key}>" for key, _ in self.uploads(storage.bucket, root)]
        return held


@pytest.fixture(scope="session")
def moto_server() -> Iterator[MotoServer]:
    if importlib.util.find_spec("moto") is None or importlib.util.find_spec("flask") is None:
        pytest.fail(
            "the S3 tests need moto's server: pip install 'moto[server]' "
            "(declared in vdistream's test extra)",
            pytrace=False,
        )
    with environment(_ENV, _UNSET), tempfile.TemporaryFile() as log:
        yield from _run_moto(log)


def _run_moto(log: IO[bytes]) -> Iterator[MotoServer]:
    """Start ``python -m moto.server`` on a free loopback port, wait until it answers,
    yield it, stop it."""
    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    env = dict(
        os.environ,
        S3_UPLOAD_PART_MIN_SIZE=str(TEST_PART_SIZE),
        MOTO_S3_DEFAULT_KEY_BUFFER_SIZE=str(64 << 20),
    )
    process = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            if process.poll() is not None:
                log.seek(0)
                pytest.fail(
                    f"moto server exited with {process.returncode}:\n"
                    + log.read().decode(errors="replace"),
                    pytrace=False,
                )
            try:
                with urllib.request.urlopen(f"{endpoint}/moto-api/", timeout=1):
                    break
            except (urllib.error.URLError, OSError):
                if time.monotonic() > deadline:
                    pytest.fail("moto server did not answer within 30 s", pytrace=False)
                time.sleep(0.1)
        client = botocore.session.get_session().create_client(
            "s3",
            endpoint_url=endpoint,
            region_name="us-east-1",
            config=botocore.config.Config(
                s3={"addressing_style": "path"},
                request_checksum_calculation="when_required",
                response_checksum_validation="when_required",
            ),
        )
        yield MotoServer(endpoint, port, client)
        client.close()
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.fixture
def bucket(moto_server: MotoServer) -> str:
    return moto_server.new_bucket()


#: Test defaults: small parts and ranges, quick retries.
FAST: dict[str, Any] = {
    "part_size": TEST_PART_SIZE,
    "min_part_size": TEST_PART_SIZE,
    "read_chunk_size": TEST_PART_SIZE,
    "backoff_base": 0.01,
    "backoff_cap": 0.05,
    "connect_timeout": 5.0,
    "read_timeout": 10.0,
}

StorageFactory = Callable[..., S3Storage]


@pytest_asyncio.fixture
async def make_storage(moto_server: MotoServer, bucket: str) -> AsyncIterator[StorageFactory]:
    """``make_storage(prefix="p", **options)``: S3 storages on this test's bucket
    (talking to moto directly unless ``endpoint_url`` says otherwise); closed at the
    end of the test."""
    made: list[S3Storage] = []

    def make(prefix: str = "backups", **options: Any) -> S3Storage:
        settings = {"endpoint_url": moto_server.endpoint, **FAST, **options}
        storage = S3Storage(settings.pop("bucket", bucket), prefix, **settings)
        made.append(storage)
        return storage

    yield make
    for storage in made:
        with contextlib.suppress(Exception):
            await storage.aclose()


@pytest_asyncio.fixture
async def proxy(moto_server: MotoServer) -> AsyncIterator[FaultProxy]:
    """A fault-injecting proxy in front of the S3 server (``tests/s3/proxy.py``)."""
    proxy = FaultProxy(moto_server.port)
    await proxy.start()
    yield proxy
    await proxy.stop()


@pytest.fixture
def faulty(make_storage: StorageFactory, proxy: FaultProxy) -> StorageFactory:
    """Storages that talk to moto through the proxy."""

    def make(**options: object) -> S3Storage:
        return make_storage(endpoint_url=proxy.endpoint, **options)

    return make
