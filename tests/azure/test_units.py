"""The pure parts of the Azure backend: URLs, credentials' choice, block arithmetic."""

from __future__ import annotations

import pytest

from vdistream.errors import StorageError, StorageURLError
from vdistream.storage import open_storage
from vdistream.storage.azure import AzureStorage
from vdistream.storage.azure.blocks import (
    MAX_BLOCK_SIZE,
    MAX_BLOCKS,
    block_id,
    block_size_for,
    initial_block_size,
    stream_capacity,
)
from vdistream.storage.azure.client import parse_connection_string


def test_urls() -> None:
    storage = open_storage("azure://acct1/backups/db1/daily?endpoint=http://127.0.0.1:1/acct1")
    assert isinstance(storage, AzureStorage)
    assert (storage.account, storage.container, storage.prefix) == ("acct1", "backups", "db1/daily")
    assert storage.url == "azure://acct1/backups/db1/daily"  # no query: no endpoint in errors
    assert storage._endpoint() == "http://127.0.0.1:1/acct1"
    bare = AzureStorage.from_url("azure://acct1/backups")
    assert (bare.prefix, bare.url) == ("", "azure://acct1/backups")
    assert bare._full_key("a/b") == "a/b"
    for url, problem in [
        ("azure://acct1", "needs a container"),
        ("azure://Acct/backups", "invalid storage account name 'Acct'"),
        ("azure://acct1/ab", "invalid container name 'ab'"),
        ("azure://acct1/a--b/x", "invalid container name 'a--b'"),
        ("azure://key@acct1/backups", "must not carry credentials"),
        ("azure://acct1/backups/a//b", "invalid prefix"),
        ("azure://acct1/backups?region=x", "unknown azure URL option 'region'"),
        ("azure://acct1/backups?endpoint=ftp://x", "must be an http:// or https:// URL"),
    ]:
        with pytest.raises(StorageURLError, match=problem):
            open_storage(url)


def test_endpoint_and_credentials_come_from_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for name in ("CONNECTION_STRING", "KEY", "SAS_TOKEN", "ENDPOINT"):
        monkeypatch.delenv(f"AZURE_STORAGE_{name}", raising=False)
    storage = AzureStorage.from_url("azure://acct1/backups")
    assert storage._endpoint() == "https://acct1.blob.core.windows.net"
    monkeypatch.setenv("AZURE_STORAGE_ENDPOINT", "http://127.0.0.1:5/acct1/")
    assert storage._endpoint() == "http://127.0.0.1:5/acct1"
    monkeypatch.delenv("AZURE_STORAGE_ENDPOINT")
    fields = "AccountName=other;AccountKey=a2V5;BlobEndpoint=http://h:1/other;x=a=b"
    assert parse_connection_string(fields) == {
        "accountname": "other",
        "accountkey": "a2V5",
        "blobendpoint": "http://h:1/other",
        "x": "a=b",
    }
    monkeypatch.setenv("AZURE_STORAGE_CONNECTION_STRING", fields)
    with pytest.raises(StorageError, match="is for account 'other', the URL names 'acct1'"):
        storage._connect()


def test_block_schedule() -> None:
    mib = 1 << 20
    assert block_size_for(1) == block_size_for(5_000) == 8 * mib
    assert block_size_for(5_001) == 16 * mib
    assert block_size_for(MAX_BLOCKS) == MAX_BLOCK_SIZE
    assert stream_capacity() > 38 << 40  # 8 MiB blocks doubling every 5,000: 38.6 TiB
    assert initial_block_size(None) == 8 * mib
    assert initial_block_size(1 << 40) == 128 * mib  # 10,000 blocks cover the hint
    ids = {block_id("0123456789abcdef", n) for n in (1, 99, MAX_BLOCKS)}
    assert len(ids) == 3
    assert {len(i) for i in ids} == {32}  # Azure wants one length per blob


def test_url_errors_never_show_credentials_put_in_the_url() -> None:
    for url in (
        "azure://c2VjcmV0@acct1/backups",
        "azure://acct1/backups?endpoint=https://h.example/?sv=1&sig=c2VjcmV0",
    ):
        with pytest.raises(StorageURLError) as caught:
            AzureStorage.from_url(url)
        assert "c2VjcmV0" not in str(caught.value), str(caught.value)
        assert "azure://acct1/backups" in str(caught.value)
