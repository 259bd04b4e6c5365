"""The compression setting, and the encrypted format's recorded facts."""

from __future__ import annotations

import hashlib
import struct

import pytest

from vdistream.errors import ConfigError
from vdistream.pipeline import (
    CompressionSpec,
    EncryptingSink,
    Key,
    describe_encryption,
    looks_encrypted,
    parse_compression,
    stream_context,
)
from vdistream.pipeline.encrypt import HEADER_SIZE, MAGIC
from vdistream.storage import MemoryStorage


@pytest.mark.parametrize(
    ("text", "algorithm", "level", "shown"),
    [
        ("zstd", "zstd", 3, "zstd:3"),
        ("zstd:1", "zstd", 1, "zstd:1"),
        ("ZSTD:19", "zstd", 19, "zstd:19"),
        (" zstd:7 ", "zstd", 7, "zstd:7"),
        ("lz4", "lz4", None, "lz4"),
        ("none", "none", None, "none"),
    ],
)
def test_parse_compression(text: str, algorithm: str, level: int | None, shown: str) -> None:
    spec = parse_compression(text)
    assert (spec.algorithm, spec.level) == (algorithm, level)
    assert str(spec) == shown
    assert spec.enabled == (algorithm != "none")
    assert CompressionSpec.from_dict(spec.to_dict()) == spec
    assert parse_compression(str(spec)) == spec


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("zstd:0", "zstd levels are 1..19"),
        ("zstd:20", "zstd levels are 1..19"),
        ("zstd:", "must be a number 1..19"),
        ("zstd:fast", "must be a number 1..19"),
        ("zstd:3.5", "must be a number 1..19"),
        ("lz4:1", "lz4 takes no level"),
        ("none:1", "none takes no level"),
        ("gzip", "unknown algorithm 'gzip'; use none, lz4, zstd"),
        ("", "empty"),
        (":3", "empty"),
    ],
)
def test_bad_compression_settings(text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as raised:
        parse_compression(text, setting="--compress")
    assert str(raised.value).startswith(f"--compress={text!r}")


def test_compression_spec_construction_and_manifest_form() -> None:
    assert CompressionSpec("zstd") == CompressionSpec("zstd", 3)
    assert CompressionSpec("lz4").to_dict() == {"algorithm": "lz4", "level": None}
    with pytest.raises(ConfigError, match="zstd levels"):
        CompressionSpec("zstd", 99)
    for bad in (
        {"algorithm": "zstd", "level": 0},
        {"algorithm": "zstd", "level": "3"},
        {"algorithm": "zstd", "level": True},
        {"algorithm": None},
        {"algorithm": "brotli", "level": None},
        {},
    ):
        with pytest.raises(ConfigError, match="manifest compression"):
            CompressionSpec.from_dict(bad)


def test_stream_context_is_unambiguous() -> None:
    contexts = {
        stream_context("a", 0, 2),
        stream_context("a", 1, 2),
        stream_context("a", 0, 3),
        stream_context("b", 0, 2),
        stream_context("a\x00\x00\x00\x00", 0, 2),
        stream_context("", 0, 1),
    }
    assert len(contexts) == 6
    with pytest.raises(ValueError, match=r"not in 0\.\.1"):
        stream_context("a", 2, 2)


@pytest.mark.asyncio
async def test_the_header_layout() -> None:
    storage = MemoryStorage()
    key = Key.generate()
    headers = []
    for name in ("one", "two"):
        sink = EncryptingSink(await storage.open_sink(name), key, b"c", segment_size=65536)
        await sink.commit()
        headers.append((await storage.read_bytes(name))[:HEADER_SIZE])
    for header in headers:
        assert looks_encrypted(header)
        assert header[:8] == MAGIC
        version, suite, flags, segment_size = struct.unpack(">BBHI", header[8:16])
        assert (version, suite, flags, segment_size) == (1, 1, 0, 65536)
        assert header[68:76] == hashlib.sha256(header[:68]).digest()[:8]
    assert headers[0][16:48] != headers[1][16:48]  # a fresh salt per stream
    assert headers[0][52:68] != headers[1][52:68]  # so the key check differs too
    assert not looks_encrypted(b"\x28\xb5\x2f\xfd")


def test_describe_encryption_holds_nothing_secret() -> None:
    key = Key.generate()
    described = describe_encryption(key, segment_size=1 << 20)
    assert described == {
        "cipher": "aes-256-gcm",
        "format_version": 1,
        "segment_size": 1 << 20,
        "key": {"fingerprint": key.fingerprint, "kdf": None},
    }
    assert key.reveal().hex() not in repr(described)
