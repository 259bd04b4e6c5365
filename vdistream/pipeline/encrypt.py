"""Authenticated streaming encryption of one device's byte stream (AES-256-GCM).

``EncryptingSink(inner, key, context)`` cuts the plaintext into segments and writes each
one sealed with AES-256-GCM; ``DecryptingSource(inner, key, context)`` checks and opens
them. Each segment is authenticated *before* any of its plaintext is handed out, so a
damaged stream never yields damaged (or attacker-chosen) bytes.

Stream format, version 1 (all integers big-endian)
--------------------------------------------------
::

    header, 76 bytes
      0   8  magic            b"\\x89VDSENC\\n"
      8   1  version          1
      9   1  suite            1 = AES-256-GCM, subkeys by HKDF-SHA256, key check HMAC-SHA256
     10   2  flags            0 (reserved; a reader refuses anything else)
     12   4  segment_size     plaintext bytes in a full segment (1 KiB .. 64 MiB)
     16  32  salt             random per stream
     48   4  nonce_prefix     random per stream
     52  16  key_check        HMAC-SHA256(check_key, header[0:52])[:16]
     68   8  header_checksum  SHA-256(header[0:68])[:8]
    then segments i = 0, 1, 2, ... each
      0   4  word             bit 31: final segment; bits 0..30: plaintext length n
      4   n  ciphertext
    4+n  16  GCM tag

``key`` is the backup's own random data key (``vdistream.pipeline.envelope``: the
manifest keeps it wrapped for the user's keys), or for a backup made before envelopes
the user's key itself; the stream format is the same. Keys:
``data_key = HKDF-SHA256(key, salt, info="vdistream/v1/aes-256-gcm/data-key")``
and ``check_key = HKDF-SHA256(key, salt, info="vdistream/v1/key-check")``. A fresh salt
makes every stream's data key unique, so the deterministic nonce
``nonce_prefix || u64(i)`` is never reused under one key (the random prefix is defence
in depth). Associated data of segment ``i``::

    SHA-256(header) || u64(i) || word || context

Why this detects each kind of damage, as ``CorruptStreamError`` naming the URL:

* a flipped bit: in the header, ``header_checksum`` fails (unkeyed on purpose, so that
  damage is not mistaken for a wrong key); in a segment, its tag fails;
* reordered or dropped segments: the index is in the nonce and the associated data;
* truncation: exactly one segment carries the final flag, and it is the last thing in
  the object. An object ending anywhere else (inside a segment, or cleanly between two
  non-final segments) lacks it; cutting a segment short fails its tag; bytes after the
  final segment are refused;
* a stream swapped with another device's or another backup's: ``context`` (the backup
  id, device index and device count, see ``stream_context``) differs, so segment 0
  fails. The header alone still verifies: the key is right.

The final flag is in the length word, authenticated with the segment, so the reader
needs no read-ahead: non-final segments are never empty, the final one may be (a
stream whose length is a multiple of the segment size, or an empty stream, ends with
an empty final segment). Full segments are written as soon as they fill; ``flush``
also seals the partial segment it has, as a short non-final segment, so that
everything written so far is durable; ``commit`` seals the rest as the final segment.

``readinto`` raises as soon as it meets the damage, and bytes it had copied into the
buffer during that call (intact plaintext of earlier segments) are not delivered: the
caller gets the exception, never a short count that would look like a clean end. Every
later call raises again.

A wrong key fails ``key_check`` and raises ``WrongKeyError`` ("the key does not match
the one this backup was encrypted with") before any segment is read; no key at all
raises ``KeyMissingError`` when the source is made.

Contract (beyond ``vdistream.storage.base``): sequential only (``position`` must equal
the current position, else ``PipelineError``; ``random_access`` False); the sink's
``size``/``bytes_written`` and the source's positions count plaintext bytes; the
source's ``size`` is None. Sealing and opening run in worker threads through
``limiter``; cancellation is checked on entry and the rest of a call is shielded. The
caller's buffer is only read (or written) while the call runs. Memory per device: one
segment of plaintext plus one sealed segment (about two segments).
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import secrets
import struct
from typing import Final

import anyio
import anyio.lowlevel
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from vdistream import threads
from vdistream.errors import CorruptStreamError, KeyMissingError, PipelineError, WrongKeyError
from vdistream.pipeline._stage import StageSink, StageSource, read_full, where
from vdistream.pipeline.context import DEFAULT_SEGMENT_SIZE, stream_context
from vdistream.pipeline.keys import KEY_SIZE, Key
from vdistream.storage import Sink, Source

__all__ = (
    "CIPHER",
    "DEFAULT_SEGMENT_SIZE",
    "FORMAT_VERSION",
    "HEADER_SIZE",
    "MAGIC",
    "DecryptingSource",
    "EncryptingSink",
    "StreamHeader",
    "describe_encryption",
    "looks_encrypted",
    "stream_context",
)

MAGIC: Final = b"\x89VDSENC\n"
FORMAT_VERSION: Final = 1
CIPHER: Final = "aes-256-gcm"
HEADER_SIZE: Final = 76
MIN_SEGMENT_SIZE: Final = 1 << 10
MAX_SEGMENT_SIZE: Final = 1 << 26

_SUITE = 1
_TAG = 16
_WORD = 4
_FINAL = 1 << 31
_CHECKED_PREFIX = 52  # header bytes the key check covers
_CHECKSUMMED_PREFIX = 68  # header bytes the header checksum covers
_DATA_KEY_LABEL = b"vdistream/v1/aes-256-gcm/data-key"
_CHECK_KEY_LABEL = b"vdistream/v1/key-check"
_HEADER_START = struct.Struct(">8sBBHI32s4s")  # magic .. nonce_prefix, 52 bytes


def looks_encrypted(prefix: bytes | bytearray | memoryview) -> bool:
    """Whether an object starting with ``prefix`` (8 bytes or more) is in this format."""
    return bytes(prefix[: len(MAGIC)]) == MAGIC


def describe_encryption(key: Key, *, segment_size: int = DEFAULT_SEGMENT_SIZE) -> dict[str, object]:
    """What a manifest records about the encryption of a backup (nothing secret)."""
    return {
        "cipher": CIPHER,
        "format_version": FORMAT_VERSION,
        "segment_size": segment_size,
        "key": key.describe(),
    }


def _key_material(key: Key | bytes | None, *, url: str, device: str | None = None) -> bytes:
    if key is None:
        raise KeyMissingError(f"the stream is encrypted and no key was given {where(url, device)}")
    material = key.reveal() if isinstance(key, Key) else bytes(key)
    if len(material) != KEY_SIZE:
        raise PipelineError(
            f"an encryption key is {KEY_SIZE} bytes, got {len(material)} {where(url, device)}"
        )
    return material


def _subkey(material: bytes, salt: bytes, label: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=salt, info=label).derive(material)


def _key_check(material: bytes, salt: bytes, checked: bytes) -> bytes:
    check_key = _subkey(material, salt, _CHECK_KEY_LABEL)
    return hmac.new(check_key, checked, hashlib.sha256).digest()[:16]


@dataclasses.dataclass(frozen=True)
class StreamHeader:
    """A parsed stream header (see the module docstring); ``raw`` is its 76 bytes."""

    segment_size: int
    salt: bytes
    nonce_prefix: bytes
    raw: bytes

    @classmethod
    def new(cls, material: bytes, segment_size: int) -> StreamHeader:
        salt, nonce_prefix = secrets.token_bytes(32), secrets.token_bytes(4)
        start = _HEADER_START.pack(
            MAGIC, FORMAT_VERSION, _SUITE, 0, segment_size, salt, nonce_prefix
        )
        checked = start + _key_check(material, salt, start)
        raw = checked + hashlib.sha256(checked).digest()[:8]
        return cls(segment_size, salt, nonce_prefix, raw)

    @classmethod
    def parse(cls, raw: bytes) -> StreamHeader:
        """Check everything that needs no key: ``CorruptStreamError`` (without the URL)
        if it is damaged, ``PipelineError`` if it is of another version."""
        if len(raw) < len(MAGIC) and MAGIC.startswith(raw):
            raise CorruptStreamError(
                f"truncated: {len(raw)} bytes, the header alone is {HEADER_SIZE}"
            )
        if not looks_encrypted(raw):
            raise CorruptStreamError("no encryption header (the object is not in this format)")
        if len(raw) < HEADER_SIZE:
            raise CorruptStreamError(
                f"truncated: {len(raw)} bytes, the header alone is {HEADER_SIZE}"
            )
        expected = hashlib.sha256(raw[:_CHECKSUMMED_PREFIX]).digest()[:8]
        if not hmac.compare_digest(expected, raw[_CHECKSUMMED_PREFIX:HEADER_SIZE]):
            raise CorruptStreamError("the header checksum does not match: the header is damaged")
        _, version, suite, flags, segment_size, salt, nonce_prefix = _HEADER_START.unpack(
            raw[:_CHECKED_PREFIX]
        )
        if version != FORMAT_VERSION or suite != _SUITE or flags:
            raise PipelineError(
                f"unsupported encryption format (version {version}, suite {suite}, flags "
                f"{flags}); this vdistream reads version {FORMAT_VERSION} suite {_SUITE}"
            )
        if not MIN_SEGMENT_SIZE <= segment_size <= MAX_SEGMENT_SIZE:
            raise CorruptStreamError(f"segment size {segment_size} out of range")
        return cls(segment_size, salt, nonce_prefix, raw[:HEADER_SIZE])

    def key_matches(self, material: bytes) -> bool:
        checked = self.raw[:_CHECKED_PREFIX]
        expected = _key_check(material, self.salt, checked)
        return hmac.compare_digest(expected, self.raw[_CHECKED_PREFIX:_CHECKSUMMED_PREFIX])


class _SegmentCipher:
    """Seals and opens segments of one stream; used by one thread at a time."""

    def __init__(self, material: bytes, header: StreamHeader, context: bytes) -> None:
        self._aead = AESGCM(_subkey(material, header.salt, _DATA_KEY_LABEL))
        self._nonce_prefix = header.nonce_prefix
        self._header_hash = hashlib.sha256(header.raw).digest()
        self._context = bytes(context)

    def _nonce_and_aad(self, index: int, word: int) -> tuple[bytes, bytes]:
        position = struct.pack(">QI", index, word)
        nonce = self._nonce_prefix + position[:8]
        return nonce, self._header_hash + position + self._context

    def seal_into(
        self, index: int, word: int, plain: memoryview | bytearray, out: memoryview
    ) -> None:
        nonce, aad = self._nonce_and_aad(index, word)
        self._aead.encrypt_into(nonce, plain, aad, out)

    def open_into(self, index: int, word: int, sealed: memoryview, out: memoryview) -> bool:
        """Verify and decrypt into ``out``; False if the tag does not verify.

        ``out`` may hold unverified bytes after a False: it must be our own buffer,
        never the caller's, and is never handed out then.
        """
        nonce, aad = self._nonce_and_aad(index, word)
        try:
            self._aead.decrypt_into(nonce, sealed, aad, out)
        except InvalidTag:
            return False
        return True


def _check_segment_size(segment_size: int, *, url: str) -> None:
    if not MIN_SEGMENT_SIZE <= segment_size <= MAX_SEGMENT_SIZE:
        raise PipelineError(
            f"segment size {segment_size} is out of range "
            f"{MIN_SEGMENT_SIZE}..{MAX_SEGMENT_SIZE} ({url})"
        )


class EncryptingSink(StageSink):
    """Encrypts everything written into the segmented format, written to ``inner``."""

    STAGE = "encrypted"
    BLOCKING_WRITES = True

    def __init__(
        self,
        inner: Sink,
        key: Key | bytes | None,
        context: bytes,
        *,
        segment_size: int = DEFAULT_SEGMENT_SIZE,
        limiter: anyio.CapacityLimiter | None = None,
    ) -> None:
        super().__init__(inner, limiter)
        self.segment_size = segment_size
        material = _key_material(key, url=self.url, device=self.device)
        _check_segment_size(segment_size, url=self.url)
        self.header = StreamHeader.new(material, segment_size)
        self._cipher: _SegmentCipher | None = _SegmentCipher(material, self.header, context)
        self._header_written = False
        # the partial segment: _plain[:_filled]. Allocated once: a bytearray that grows
        # and clears for each segment gets fresh pages from the kernel every time,
        # which cost more than the encryption itself (page faults, measured)
        self._plain = bytearray(segment_size)
        self._filled = 0
        self._record = bytearray(_WORD + segment_size + _TAG)  # one sealed segment
        self._index = 0

    @property
    def segments_written(self) -> int:
        return self._index

    def _seal_segment(
        self, cipher: _SegmentCipher, plain: memoryview | bytearray, final: bool
    ) -> int:
        """Worker thread: seal ``plain`` as the next segment into ``_record``."""
        length = len(plain)
        word = length | (_FINAL if final else 0)
        struct.pack_into(">I", self._record, 0, word)
        with memoryview(self._record) as record, record[_WORD : _WORD + length + _TAG] as out:
            cipher.seal_into(self._index, word, plain, out)
        return _WORD + length + _TAG

    async def _write_header(self) -> None:
        if not self._header_written:
            with memoryview(self.header.raw) as view:
                await self.inner.write(view)
            self._header_written = True

    async def _emit(self, plain: memoryview | bytearray, *, final: bool) -> None:
        cipher = self._cipher
        assert cipher is not None  # dropped only when leaving OPEN
        size = await threads.run_sync(
            self._seal_segment, cipher, plain, final, limiter=self.limiter
        )
        with memoryview(self._record) as record, record[:size] as out:
            await self.inner.write(out)
        self._index += 1

    def _write_blocking(self, view: memoryview, start: int) -> None:
        """Worker thread: the header first, then every segment that fills, sealed and
        written to ``inner`` (which hashes and stores it in the same thread)."""
        if not view.nbytes:
            return
        cipher = self._cipher
        assert cipher is not None  # dropped only when leaving OPEN
        if not self._header_written:
            with memoryview(self.header.raw) as header:
                self.inner.write_blocking(header)
            self._header_written = True
        segment = self.segment_size
        offset = 0
        while offset < view.nbytes:
            take = min(segment - self._filled, view.nbytes - offset)
            with view[offset : offset + take] as piece:
                if not self._filled and take == segment:
                    self._emit_blocking(cipher, piece)  # no copy needed
                elif self._gather(piece):
                    self._emit_blocking(cipher, self._plain)
                    self._filled = 0
            offset += take

    def _gather(self, piece: memoryview) -> bool:
        """Append ``piece`` to the partial segment; True when the segment is full."""
        end = self._filled + piece.nbytes
        self._plain[self._filled : end] = piece
        self._filled = end
        return end == self.segment_size

    def _emit_blocking(self, cipher: _SegmentCipher, plain: memoryview | bytearray) -> None:
        size = self._seal_segment(cipher, plain, False)
        with memoryview(self._record) as record, record[:size] as out:
            self.inner.write_blocking(out)
        self._index += 1

    async def _write(self, view: memoryview, start: int) -> None:
        if self.blocking_writes:
            await self._write_through(view, start)
            return
        if not view.nbytes:
            return
        await self._write_header()
        segment = self.segment_size
        offset = 0
        while offset < view.nbytes:
            take = min(segment - self._filled, view.nbytes - offset)
            with view[offset : offset + take] as piece:
                if not self._filled and take == segment:
                    await self._emit(piece, final=False)  # no copy needed
                elif self._gather(piece):
                    await self._emit(self._plain, final=False)
                    self._filled = 0
            offset += take

    async def _flush(self) -> None:
        await self._write_header()
        if self._filled:  # a short non-final segment, so these bytes are durable too
            with memoryview(self._plain) as plain, plain[: self._filled] as partial:
                await self._emit(partial, final=False)
            self._filled = 0
        await self.inner.flush()

    async def _seal(self) -> None:
        await self._write_header()
        with memoryview(self._plain) as plain, plain[: self._filled] as partial:
            await self._emit(partial, final=True)
        self._filled = 0
        self._release()

    def _release(self) -> None:
        self._cipher = None
        self._plain = bytearray()
        self._record = bytearray()


class DecryptingSource(StageSource):
    """Reads what ``EncryptingSink`` wrote; every segment is verified before use.

    ``key`` None raises ``KeyMissingError`` at once. The header is read (and the key
    checked) by the first ``readinto``, or earlier by ``read_header()``.
    """

    STAGE = "encrypted"

    def __init__(
        self,
        inner: Source,
        key: Key | bytes | None,
        context: bytes,
        *,
        limiter: anyio.CapacityLimiter | None = None,
    ) -> None:
        super().__init__(inner, limiter)
        self._material = _key_material(key, url=self.url)
        self._context = bytes(context)
        self.header: StreamHeader | None = None
        self._cipher: _SegmentCipher | None = None
        self._next_word = b""  # the next segment's length word, read with the segment before
        self._record = bytearray()
        self._index = 0

    def __repr__(self) -> str:
        return f"<DecryptingSource {self.url}, segment {self._index}>"

    def _corrupt(self, detail: str) -> CorruptStreamError:
        return CorruptStreamError(f"encrypted stream is damaged: {detail} ({self.url})")

    async def read_header(self) -> StreamHeader:
        """Read and check the header and the key; idempotent.

        ``CorruptStreamError`` if it is damaged or missing, ``WrongKeyError`` if the
        key is not the one the stream was written with.
        """
        self._raise_latched()
        if self.header is not None:
            return self.header
        await anyio.lowlevel.checkpoint_if_cancelled()
        with anyio.CancelScope(shield=True), self._latching():
            header = await self._start()
        return header

    async def _start(self) -> StreamHeader:
        if self.header is not None:
            return self.header
        start = bytearray(HEADER_SIZE + _WORD)  # the first segment's word comes along
        with memoryview(start) as view:
            count = await read_full(self.inner, view)
        if count == 0:
            raise self._corrupt("the object is empty; an encrypted stream has a header")
        try:
            header = StreamHeader.parse(bytes(start[: min(count, HEADER_SIZE)]))
        except CorruptStreamError as exc:
            raise self._corrupt(str(exc)) from exc
        except PipelineError as exc:
            raise PipelineError(f"{exc} ({self.url})") from exc
        if not header.key_matches(self._material):
            raise WrongKeyError(
                f"the key does not match the one this backup was encrypted with ({self.url})"
            )
        self._cipher = _SegmentCipher(self._material, header, self._context)
        self._next_word = bytes(start[HEADER_SIZE:count])
        self._record = bytearray(header.segment_size + _TAG + _WORD)
        self._out = bytearray(header.segment_size)
        self.header = header
        return header

    def _open(self, cipher: _SegmentCipher, word: int, length: int) -> bool:
        """Worker thread: verify and decrypt the segment in ``_record`` into ``_out``."""
        with (
            memoryview(self._record) as record,
            record[: length + _TAG] as sealed,
            memoryview(self._out) as plain,
            plain[:length] as out,
        ):
            return cipher.open_into(self._index, word, sealed, out)

    async def _refill(self) -> None:
        """Read, verify and decrypt the next segment."""
        header, cipher, index = self.header, self._cipher, self._index
        assert header is not None  # the header is read first
        assert cipher is not None
        if len(self._next_word) < _WORD:
            if not self._next_word:
                after = f"after segment {index - 1}" if index else "right after the header"
                raise self._corrupt(f"truncated: the object ends {after}, before the final segment")
            raise self._corrupt(f"truncated inside the length of segment {index}")
        word = int.from_bytes(self._next_word, "big")
        final, length = bool(word & _FINAL), word & ~_FINAL
        if length > header.segment_size or (length == 0 and not final):
            raise self._corrupt(f"segment {index} has an invalid length word {word:#010x}")
        wanted = length + _TAG + (0 if final else _WORD)  # with the next segment's word
        with memoryview(self._record) as record, record[:wanted] as target:
            count = await read_full(self.inner, target)
        if count < length + _TAG:
            raise self._corrupt(f"truncated inside segment {index}")
        verified = await threads.run_sync(self._open, cipher, word, length, limiter=self.limiter)
        if not verified:
            raise self._corrupt(
                f"segment {index} (plaintext from byte {self._position}) fails authentication: "
                "its bytes were altered, segments were reordered or dropped, or the "
                "stream belongs to another device or backup"
            )
        if final:
            # Checked before the final plaintext is handed out: a stream with anything
            # appended is not the stream that was written.
            with memoryview(bytearray(1)) as probe:
                if await read_full(self.inner, probe):
                    raise self._corrupt("unexpected data after the final segment")
            self._ended = True
        self._next_word = bytes(self._record[length + _TAG : count])
        self._out_start, self._out_end = 0, length
        self._index += 1

    async def close(self) -> None:
        await super().close()
        self._record = bytearray()
