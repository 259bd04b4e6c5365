"""Pure parts of the S3 backend (part-size schedule, retries, errors, URLs), and the few
things that need a server but no multipart (endpoint from the environment, buckets)."""

from __future__ import annotations

import random
import subprocess
import sys

import pytest
from botocore.exceptions import ClientError, EndpointConnectionError, ReadTimeoutError

from tests.s3.conftest import MotoServer, StorageFactory
from vdistream.errors import (
    StorageError,
    StorageExistsError,
    StorageFullError,
    StorageIntegrityError,
    StorageNotFoundError,
    StorageURLError,
)
from vdistream.storage import StorageRegistry, open_storage
from vdistream.storage.s3 import (
    DEFAULT_PART_SIZE,
    MAX_OBJECT_SIZE,
    MAX_PART_SIZE,
    MAX_PARTS,
    MIN_PART_SIZE,
    S3Storage,
    backoff_delay,
    initial_part_size,
    is_transient,
    part_size_for,
    part_sizes,
    stream_capacity,
    translate_s3_error,
)

MiB, GiB, TiB = 1 << 20, 1 << 30, 1 << 40


# --- the part-size schedule ----------------------------------------------------------


def test_schedule_doubles_every_thousand_parts() -> None:
    assert part_size_for(1) == part_size_for(1000) == 8 * MiB
    assert part_size_for(1001) == part_size_for(2000) == 16 * MiB
    assert part_size_for(9001) == part_size_for(MAX_PARTS) == 4 * GiB
    assert part_size_for(1, initial=1 * GiB) == 1 * GiB
    assert part_size_for(4001, initial=1 * GiB) == MAX_PART_SIZE  # capped at 5 GiB
    assert part_size_for(10**9) == MAX_PART_SIZE
    with pytest.raises(ValueError, match="start at 1"):
        part_size_for(0)


def test_a_stream_of_unknown_length_reaches_five_tib() -> None:
    assert stream_capacity() >= MAX_OBJECT_SIZE  # about 7.8 TiB in 10,000 parts
    assert stream_capacity(initial=6 * MiB) >= MAX_OBJECT_SIZE
    assert stream_capacity(initial=MIN_PART_SIZE) < MAX_OBJECT_SIZE  # hence refused:
    with pytest.raises(StorageURLError, match="cannot reach"):
        S3Storage("bucket", part_size=MIN_PART_SIZE)
    with pytest.raises(StorageURLError, match="cannot reach"):
        S3Storage("bucket", part_growth_interval=5_000)
    # a fixed 8 MiB part size would stop at 78 GiB:
    assert stream_capacity(growth_interval=10**9) == 10_000 * 8 * MiB


@pytest.mark.parametrize(
    "total",
    [0, 1, 8 * MiB - 1, 8 * MiB, 8 * MiB + 1, 78 * GiB, 100 * GiB + 7, TiB, MAX_OBJECT_SIZE],
)
def test_every_size_up_to_five_tib_fits_s3s_limits(total: int) -> None:
    sizes = part_sizes(total)
    assert sum(sizes) == total
    assert len(sizes) <= MAX_PARTS
    assert all(MIN_PART_SIZE <= size <= MAX_PART_SIZE for size in sizes[:-1])
    assert sizes[-1] <= MAX_PART_SIZE
    assert sizes == sorted(sizes[:-1]) + sizes[-1:]  # parts only grow


def test_random_sizes_and_hints_fit() -> None:
    rng = random.Random(7)
    for _ in range(200):
        total = rng.randrange(MAX_OBJECT_SIZE + 1)
        hint = rng.choice([None, total, total // 10, min(MAX_OBJECT_SIZE, total * 10)])
        sizes = part_sizes(total, initial=initial_part_size(hint))
        assert sum(sizes) == total
        assert len(sizes) <= MAX_PARTS
        assert all(MIN_PART_SIZE <= size <= MAX_PART_SIZE for size in sizes[:-1])


def test_too_large_for_the_schedule_is_refused() -> None:
    with pytest.raises(ValueError, match="more than 10 parts"):
        part_sizes(11 * MiB, initial=MiB, max_parts=10)


def test_size_hints() -> None:
    assert initial_part_size(None) == DEFAULT_PART_SIZE
    assert initial_part_size(0) == DEFAULT_PART_SIZE
    assert initial_part_size(2000 * 8 * MiB) == 8 * MiB
    assert initial_part_size(2000 * 8 * MiB + 1) == 16 * MiB
    assert initial_part_size(100 * GiB) == 64 * MiB
    assert initial_part_size(MAX_OBJECT_SIZE) == 4 * GiB
    assert initial_part_size(10 * MAX_OBJECT_SIZE) == MAX_PART_SIZE


# --- retries and errors ---------------------------------------------------------------


def client_error(code: str, status: int, operation: str = "PutObject") -> ClientError:
    return ClientError(
        {"Error": {"Code": code, "Message": "msg"}, "ResponseMetadata": {"HTTPStatusCode": status}},
        operation,
    )


def test_transient_errors() -> None:
    for code, status in [("SlowDown", 503), ("InternalError", 500), ("RequestTimeout", 400)]:
        assert is_transient(client_error(code, status))
    assert is_transient(client_error("Whatever", 502))
    assert is_transient(EndpointConnectionError(endpoint_url="http://127.0.0.1:1"))
    assert is_transient(ReadTimeoutError(endpoint_url="http://127.0.0.1:1"))
    for code, status in [("AccessDenied", 403), ("NoSuchBucket", 404), ("PreconditionFailed", 412)]:
        assert not is_transient(client_error(code, status))
    assert not is_transient(ValueError("bug"))


def test_backoff_is_jittered_exponential_and_capped() -> None:
    rng = random.Random(1)
    for attempt in range(1, 12):
        ceiling = min(2.0, 0.1 * 2 ** (attempt - 1))
        delays = [backoff_delay(attempt, base=0.1, cap=2.0, rng=rng) for _ in range(50)]
        assert all(0 <= delay <= ceiling for delay in delays)
        assert len(set(delays)) > 40  # jittered, not fixed
    assert backoff_delay(10_000, base=1, cap=20) <= 20


@pytest.mark.parametrize(
    ("code", "status", "cls"),
    [
        ("NoSuchKey", 404, StorageNotFoundError),
        ("404", 404, StorageNotFoundError),
        ("NoSuchUpload", 404, StorageNotFoundError),
        ("PreconditionFailed", 412, StorageExistsError),
        ("EntityTooLarge", 400, StorageFullError),
        ("BadDigest", 400, StorageIntegrityError),
        ("NoSuchBucket", 404, StorageError),
        ("AccessDenied", 403, StorageError),
    ],
)
def test_errors_are_translated_with_code_bucket_and_key(
    code: str, status: int, cls: type[StorageError]
) -> None:
    error = translate_s3_error(
        client_error(code, status),
        what="commit",
        bucket="bkt",
        key="p/k",
        url="s3://bkt/p/k",
        device="dev0",
        attempts=3,
    )
    assert type(error) is cls
    text = str(error)
    for part in (code, "bkt", "'p/k'", "dev0", "after 3 attempts", "commit failed"):
        assert part in text


@pytest.mark.asyncio
async def test_missing_bucket_and_missing_keys(make_storage: StorageFactory) -> None:
    storage = make_storage(bucket="no-such-bucket-here")
    with pytest.raises(StorageError, match=r"NoSuchBucket.*no-such-bucket-here") as caught:
        await storage.list()
    assert not isinstance(caught.value, StorageNotFoundError)
    with pytest.raises(StorageError, match="NoSuchBucket"):
        await storage.write_bytes("k", b"x")
    real = make_storage()
    with pytest.raises(StorageNotFoundError, match="backups/nope"):
        await real.stat("nope")
    with pytest.raises(StorageNotFoundError):
        await real.open_source("nope")
    with pytest.raises(StorageNotFoundError):
        await real.delete("nope")


@pytest.mark.asyncio
async def test_unreachable_endpoint_fails_after_bounded_retries() -> None:
    storage = S3Storage(
        "bucket", endpoint_url="http://127.0.0.1:9", max_attempts=3, backoff_base=0.01
    )
    async with storage:
        with pytest.raises(StorageError, match=r"after 3 attempts.*EndpointConnectionError"):
            await storage.list()


# --- URLs, registry, client ----------------------------------------------------------


def test_url_forms() -> None:
    storage = open_storage(
        "s3://my-bucket/some/prefix/?endpoint_url=http://127.0.0.1:9000&region=eu-west-1"
        "&addressing_style=virtual&profile=p"
    )
    assert isinstance(storage, S3Storage)
    assert (storage.bucket, storage.prefix, storage.url) == (
        "my-bucket",
        "some/prefix",
        "s3://my-bucket/some/prefix",
    )
    assert storage.endpoint_url == "http://127.0.0.1:9000"
    assert (storage.region, storage.addressing_style, storage.profile) == (
        "eu-west-1",
        "virtual",
        "p",
    )
    bare = StorageRegistry.with_builtins().open_storage("S3://b-1")
    assert isinstance(bare, S3Storage)
    assert (bare.prefix, bare.url, bare.endpoint_url) == ("", "s3://b-1", None)


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("s3://", "needs a bucket"),
        ("s3:///prefix", "needs a bucket"),
        ("s3://key:secret@bucket/p", "must not carry credentials"),
        ("s3://bucket/p?color=red", "unknown s3 URL option 'color'"),
        ("s3://bucket/p?region=", "empty s3 URL option"),
        ("s3://bucket/a//b", "invalid prefix"),
        ("s3://bucket/a/../b", "invalid prefix"),
        ("s3://b/p?addressing_style=sideways", "addressing_style"),
        ("s3://bucket/p#frag", "no fragment"),
        ("s3://x/p", "invalid bucket name"),
    ],
)
def test_bad_urls(url: str, reason: str) -> None:
    with pytest.raises(StorageURLError, match=reason):
        open_storage(url)


def test_bad_options() -> None:
    with pytest.raises(StorageURLError, match="part_size"):
        S3Storage("bucket", part_size=MiB)  # below S3's 5 MiB
    with pytest.raises(StorageURLError, match="max_attempts"):
        S3Storage("bucket", max_attempts=0)


def test_importing_vdistream_does_not_import_aiobotocore() -> None:
    code = (
        "import sys, vdistream, vdistream.storage, vdistream.catalog.audit;"
        "from vdistream.storage import open_storage;"
        "assert 'aiobotocore' not in sys.modules, 'imported too early';"
        "open_storage('s3://bucket/p');"
        "assert 'aiobotocore' in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.asyncio
async def test_endpoint_from_the_environment(
    moto_server: MotoServer, bucket: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL", moto_server.endpoint)
    async with open_storage(f"s3://{bucket}/env") as storage:
        assert isinstance(storage, S3Storage)
        await storage.write_bytes("k", b"via AWS_ENDPOINT_URL")
    assert moto_server.get(bucket, "env/k") == b"via AWS_ENDPOINT_URL"


@pytest.mark.asyncio
async def test_one_client_per_storage_closed_and_recreated(make_storage: StorageFactory) -> None:
    storage = make_storage()
    first = await storage._client()
    assert await storage._client() is first
    await storage.write_bytes("a", b"1")
    await storage.aclose()
    await storage.aclose()  # idempotent
    assert await storage.read_bytes("a") == b"1"  # a new client on demand
    assert await storage._client() is not first


@pytest.mark.asyncio
async def test_list_pages_through_everything(make_storage: StorageFactory) -> None:
    storage = make_storage(list_page_size=2)
    keys = [f"k{i}" for i in range(7)] + ["sub/x"]
    for key in keys:
        await storage.write_bytes(key, key.encode())
    assert await storage.list() == sorted(keys)
    assert await storage.list("sub/") == ["sub/x"]
    sizes = {obj.key: obj.size for obj in await storage.list_objects()}
    assert sizes == {key: len(key) for key in keys}
