"""AES-GCM nonces are never reused: every segment of a stream has its own, two streams
under one key share none, and equal plaintexts never encrypt to equal ciphertexts.

A reused GCM nonce leaks the XOR of two plaintexts and lets anyone forge tags, yet a
stream with a constant nonce still reads back and still detects damage. So these tests
read the stored bytes themselves, with an independent reader built from the format the
module docstring of ``vdistream.pipeline.encrypt`` documents.
"""

from __future__ import annotations

import dataclasses
import hashlib
import struct

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from vdistream.pipeline import EncryptingSink, Key, stream_context
from vdistream.pipeline.encrypt import HEADER_SIZE, MAGIC
from vdistream.storage import MemoryStorage

pytestmark = pytest.mark.asyncio

SEGMENT = 1024  # the smallest segment size: many segments from little data
CONTEXT = stream_context("backup-nonces", 0, 1)
TAG = 16
FINAL = 1 << 31


@dataclasses.dataclass(frozen=True)
class Segment:
    word: int
    ciphertext: bytes
    tag: bytes


@dataclasses.dataclass(frozen=True)
class Stream:
    """A stored stream taken apart by the documented layout (version 1)."""

    header: bytes
    salt: bytes
    nonce_prefix: bytes
    segments: tuple[Segment, ...]

    @classmethod
    def parse(cls, stored: bytes) -> Stream:
        header = stored[:HEADER_SIZE]
        assert header[:8] == MAGIC
        segment_size, salt, nonce_prefix = struct.unpack(">I32s4s", header[12:52])
        assert segment_size == SEGMENT
        segments = []
        offset = HEADER_SIZE
        while offset < len(stored):
            (word,) = struct.unpack_from(">I", stored, offset)
            length = word & ~FINAL
            body = stored[offset + 4 : offset + 4 + length + TAG]
            segments.append(Segment(word, body[:length], body[length:]))
            offset += 4 + length + TAG
        assert offset == len(stored)
        assert [bool(s.word & FINAL) for s in segments] == [False] * (len(segments) - 1) + [True]
        return cls(header, salt, nonce_prefix, tuple(segments))

    def nonce(self, index: int) -> bytes:
        """The documented nonce of segment ``index``: ``nonce_prefix || u64(index)``."""
        return self.nonce_prefix + struct.pack(">Q", index)

    def nonces(self) -> list[bytes]:
        return [self.nonce(index) for index in range(len(self.segments))]

    def open(self, key: Key) -> bytes:
        """Decrypt every segment with its documented nonce (``InvalidTag`` if not)."""
        data_key = HKDF(
            algorithm=hashes.SHA256(),
            length=32,
            salt=self.salt,
            info=b"vdistream/v1/aes-256-gcm/data-key",
        ).derive(key.reveal())
        aead = AESGCM(data_key)
        header_hash = hashlib.sha256(self.header).digest()
        plain = bytearray()
        for index, segment in enumerate(self.segments):
            aad = header_hash + struct.pack(">QI", index, segment.word) + CONTEXT
            plain += aead.decrypt(self.nonce(index), segment.ciphertext + segment.tag, aad)
        return bytes(plain)


async def _encrypt(data: bytes, key: Key) -> bytes:
    storage = MemoryStorage()
    sink = EncryptingSink(await storage.open_sink("s"), key, CONTEXT, segment_size=SEGMENT)
    await sink.write(memoryview(data))
    await sink.commit()
    return await storage.read_bytes("s")


# Eight segments of one identical plaintext, then a short final one.
BLOCK = bytes(range(256)) * (SEGMENT // 256)
DATA = BLOCK * 8 + b"tail"


async def test_each_segment_opens_only_with_its_own_documented_nonce() -> None:
    key = Key.generate()
    stream = Stream.parse(await _encrypt(DATA, key))
    assert len(stream.segments) == 9
    assert stream.open(key) == DATA
    assert len(set(stream.nonces())) == len(stream.segments)


async def test_two_streams_under_one_key_share_no_nonce() -> None:
    key = Key.generate()
    first = Stream.parse(await _encrypt(DATA, key))
    second = Stream.parse(await _encrypt(DATA, key))
    assert first.open(key) == second.open(key) == DATA
    # A fresh salt (so a fresh data key) and a fresh nonce prefix for every stream.
    assert first.salt != second.salt
    assert first.nonce_prefix != second.nonce_prefix
    assert not set(first.nonces()) & set(second.nonces())


async def test_equal_plaintext_segments_encrypt_to_different_ciphertexts() -> None:
    key = Key.generate()
    stream = Stream.parse(await _encrypt(DATA, key))
    full = [s.ciphertext for s in stream.segments[:8]]
    assert all(len(c) == SEGMENT for c in full)
    assert len(set(full)) == len(full)  # a repeated nonce would repeat the keystream
    assert len({s.tag for s in stream.segments}) == len(stream.segments)


async def test_equal_plaintexts_encrypt_differently_in_two_streams() -> None:
    key = Key.generate()
    first, second = await _encrypt(DATA, key), await _encrypt(DATA, key)
    assert first != second
    a, b = Stream.parse(first), Stream.parse(second)
    for x, y in zip(a.segments, b.segments, strict=True):
        assert x.word == y.word
        assert x.ciphertext != y.ciphertext
        assert x.tag != y.tag
