"""Streaming compression of one device's byte stream: one zstd or lz4 frame per object.

``CompressingSink(inner, algorithm, level)`` compresses what is written and writes the
compressed bytes to ``inner``; ``DecompressingSource(inner, algorithm)`` reads them back.
The stored object is a plain, standard frame (``zstd -d`` / ``lz4 -d`` decode it):

* ``"zstd"``: one zstd frame with a content checksum (XXH64), levels 1..19 (default 3).
  Memory per device grows with the level: a few MB at level 3, roughly 100 MB of
  compressor tables at level 19; decoding needs the frame's window (8 MiB at most for
  levels up to 19; the decoder refuses frames asking for more than 16 MiB, so a
  hostile header cannot make it allocate zstd's default limit of 128 MiB).
* ``"lz4"``: one LZ4 frame (linked 64 KiB blocks, content checksum), the fast level.

Contract (beyond ``vdistream.storage.base``)
--------------------------------------------
* Sequential, threads, cancellation and states as for every stage
  (``vdistream.pipeline._stage``); ``size`` and ``bytes_written`` of the sink count
  *uncompressed* bytes. One compressor or decompressor object per stream, so devices
  compress in parallel. The caller's buffer is only read while the call runs: the
  compressor copies what it keeps, so it may be released right after ``write`` returns.
* ``flush`` ends the current compressed block (zstd ``FLUSH_BLOCK``, lz4 flush without
  ending the frame), writes it and flushes ``inner``: everything written so far is
  durable and decodable. ``commit`` ends the frame, then commits ``inner``; if that
  commit is refused (``StorageExistsError``) ``commit`` may be called again and only
  retries the inner commit. ``abort`` aborts ``inner``.
* Memory is bounded per device: compressed output is gathered up to 1 MiB before it
  is written to ``inner`` (fewer, larger writes), so at most 1 MiB plus one buffer's
  worth of output is held. The source keeps at most one read (256 KiB) plus one
  incomplete block of compressed input, and at most 1 MiB + 128 KiB of decoded but
  undelivered output, even for a hostile stream: zstd input is fed one block at a time
  (a block decodes to at most 128 KiB), lz4 is asked for a bounded amount of output.
* Corruption: a stream that fails to decode, whose frame is cut short (the decoder must
  have finished its frame at the end of the object) or that has bytes after its frame
  raises ``CorruptStreamError`` naming the URL. Without encryption, damage is only
  detected as well as the codec's checksum allows, and decoded bytes before the damage
  may already have been returned; the stored-object hash catches the rest.
  ``readinto`` raises as soon as it meets the damage, and bytes it had copied into the
  buffer during that call are not delivered: the caller gets the exception, never a
  short count that would look like a clean end. Every later call raises again.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any, Final, Protocol

import anyio
import anyio.lowlevel

from vdistream import threads
from vdistream.errors import CorruptStreamError, PipelineError
from vdistream.pipeline._stage import StageSink, StageSource, read_full, where
from vdistream.storage import Sink, Source


def _lz4() -> Any:
    """``lz4.frame`` (untyped), imported by the first stream that needs it: the
    commands that do not compress never load it."""
    import lz4.frame  # type: ignore[import-untyped]  # lz4 ships no type information

    return lz4.frame


def _codec_errors() -> tuple[type[Exception], ...]:
    """What the codecs raise (RuntimeError: lz4.frame's)."""
    import zstandard

    return (zstandard.ZstdError, RuntimeError)


__all__ = (
    "ALGORITHMS",
    "ZSTD_DEFAULT_LEVEL",
    "ZSTD_LEVELS",
    "CompressingSink",
    "DecompressingSource",
)

#: The algorithms a stage accepts ("none" means: no stage at all).
ALGORITHMS: Final = ("zstd", "lz4")
ZSTD_LEVELS: Final = range(1, 20)
ZSTD_DEFAULT_LEVEL: Final = 3

# Compressed output is written to the inner sink in pieces of at least this size (or at
# flush/commit), so a small compressed result does not cost a storage call of its own.
_OUTPUT_CHUNK = 1 << 20
# Compressed bytes read from the inner source at a time.
_READ_CHUNK = 1 << 18
# A worker-thread call stops decoding once this much output is waiting for delivery.
_DECODE_BUDGET = 1 << 20
# The largest zstd block, compressed or decoded (RFC 8878, Block_Maximum_Size).
_ZSTD_BLOCK_MAX = 128 * 1024
_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
# Level 19 uses an 8 MiB window; twice that leaves room, a hostile frame gets no more.
_ZSTD_WINDOW_MAX = 1 << 24


def _check_algorithm(algorithm: str, level: int | None, *, url: str) -> int | None:
    """The level to use for ``algorithm``; ``PipelineError`` if either is unusable."""
    if algorithm == "zstd":
        if level is None:
            return ZSTD_DEFAULT_LEVEL
        if level not in ZSTD_LEVELS:
            raise PipelineError(f"zstd level {level} is out of range 1..19 ({url})")
        return level
    if algorithm == "lz4":
        if level is not None:
            raise PipelineError(f"lz4 takes no level, got {level} ({url})")
        return None
    raise PipelineError(
        f"unknown compression algorithm {algorithm!r}; expected one of "
        f"{', '.join(ALGORITHMS)} ({url})"
    )


# --- encoders ------------------------------------------------------------------------


class _Encoder(Protocol):
    def compress(self, data: memoryview) -> bytes: ...
    def flush(self) -> bytes: ...
    def finish(self) -> bytes: ...


class _ZstdEncoder:
    def __init__(self, level: int) -> None:
        import zstandard  # here: the commands that do not compress never load it

        self._obj = zstandard.ZstdCompressor(level=level, write_checksum=True).compressobj()
        self._block = zstandard.COMPRESSOBJ_FLUSH_BLOCK
        self._finish = zstandard.COMPRESSOBJ_FLUSH_FINISH

    def compress(self, data: memoryview) -> bytes:
        return self._obj.compress(data)

    def flush(self) -> bytes:
        return self._obj.flush(self._block)

    def finish(self) -> bytes:
        return self._obj.flush(self._finish)


class _Lz4Encoder:
    # The low-level API, because LZ4FrameCompressor.flush() ends the frame and a
    # mid-stream flush must not.
    def __init__(self) -> None:
        self._context = _lz4().create_compression_context()
        self._header: bytes | None = _lz4().compress_begin(
            self._context,
            content_checksum=True,
            block_linked=True,
            auto_flush=False,
        )

    def _with_header(self, data: bytes) -> bytes:
        if self._header is None:
            return data
        data, self._header = self._header + data, None
        return data

    def compress(self, data: memoryview) -> bytes:
        return self._with_header(_lz4().compress_chunk(self._context, data))

    def flush(self) -> bytes:
        return self._with_header(_lz4().compress_flush(self._context, end_frame=False))

    def finish(self) -> bytes:
        return self._with_header(_lz4().compress_flush(self._context, end_frame=True))


class CompressingSink(StageSink):
    """Compresses everything written into one ``algorithm`` frame written to ``inner``."""

    STAGE = "compressed"
    BLOCKING_WRITES = True

    def __init__(
        self,
        inner: Sink,
        algorithm: str,
        level: int | None = None,
        *,
        limiter: anyio.CapacityLimiter | None = None,
    ) -> None:
        super().__init__(inner, limiter)
        self.algorithm = algorithm
        self.level = _check_algorithm(algorithm, level, url=inner.url)
        self._encoder: _Encoder | None = (
            _ZstdEncoder(self.level) if self.level is not None else _Lz4Encoder()
        )
        # compressed, not yet written to inner: _pending[:_used]. It only grows (to about
        # _OUTPUT_CHUNK plus one write's output): cleared and regrown for every chunk, a
        # bytearray gets fresh pages from the kernel each time (page faults, measured)
        self._pending = bytearray()
        self._used = 0

    @contextlib.contextmanager
    def _errors(self, what: str) -> Iterator[None]:
        """Codec errors become ``PipelineError`` (``_failing`` then fails the sink)."""
        try:
            yield
        except _codec_errors() as exc:
            raise PipelineError(
                f"{what} failed: {self.algorithm}: {exc} {where(self.url, self.device)}"
            ) from exc

    async def _code(self, step: Callable[[_Encoder], bytes]) -> None:
        """Run ``step`` on the encoder in a worker thread; its output joins ``_pending``,
        which the event loop does not touch while the thread runs."""
        encoder = self._encoder
        assert encoder is not None  # dropped only when leaving OPEN

        def run() -> None:
            self._keep(step(encoder))

        await threads.run_sync(run, limiter=self.limiter)

    async def _drain(self) -> None:
        if self._used:
            with memoryview(self._pending) as pending, pending[: self._used] as view:
                await self.inner.write(view)
            self._used = 0

    async def _write(self, view: memoryview, start: int) -> None:
        if self.blocking_writes:
            await self._write_through(view, start)
        elif view.nbytes:
            await self._code(lambda encoder: encoder.compress(view))
            if self._used >= _OUTPUT_CHUNK:
                await self._drain()

    def _write_blocking(self, view: memoryview, start: int) -> None:
        """Worker thread: compress, and write the output once a chunk of it gathered."""
        encoder = self._encoder
        assert encoder is not None  # dropped only when leaving OPEN
        if view.nbytes:
            self._keep(encoder.compress(view))
        if self._used >= _OUTPUT_CHUNK:
            with memoryview(self._pending) as pending, pending[: self._used] as chunk:
                self.inner.write_blocking(chunk)
            self._used = 0

    def _keep(self, output: bytes) -> None:
        """Append ``output`` to ``_pending`` (which grows, never shrinks)."""
        end = self._used + len(output)
        self._pending[self._used : end] = output
        self._used = end

    async def _flush(self) -> None:
        await self._code(lambda encoder: encoder.flush())
        await self._drain()
        await self.inner.flush()

    async def _seal(self) -> None:
        await self._code(lambda encoder: encoder.finish())
        await self._drain()
        self._encoder = None

    def _release(self) -> None:
        self._encoder = None
        self._pending = bytearray()


# --- decoders ------------------------------------------------------------------------


class _Decoder(Protocol):
    #: the frame is complete (and verified by the codec)
    done: bool
    #: the decoder cannot make progress without more input
    hungry: bool

    def decode(self, data: bytearray, out: bytearray, budget: int) -> None:
        """Consume input from the front of ``data``, append output to ``out``.

        Returns when the frame is done, when more input is needed (``hungry``), or once
        ``out`` holds ``budget`` bytes or more.
        """
        ...

    def leftover(self) -> int:
        """Input bytes held past the end of the frame (trailing garbage)."""
        ...


class _ZstdDecoder:
    """Feeds the decompressor one frame unit (header, block, checksum) at a time.

    zstandard's ``decompressobj`` returns *all* the output of the input it is given, and
    a few bytes of a hostile (or merely all-zero) stream can decode to gigabytes. A
    block decodes to at most 128 KiB, so feeding whole blocks bounds the output per
    step; walking the frame's structure also tells exactly where the frame ends.
    """

    def __init__(self) -> None:
        import zstandard

        self._obj = zstandard.ZstdDecompressor(max_window_size=_ZSTD_WINDOW_MAX).decompressobj()
        self._unit = "header"  # then "block" ..., then "checksum" if present
        self._has_checksum = False
        self.done = False
        self.hungry = True

    def _next_unit_size(self, data: bytearray, start: int) -> int | None:
        """Byte length of the unit at ``data[start:]``, None if not known yet."""
        available = len(data) - start
        if self._unit == "header":
            if available < 5:
                return None
            if data[start : start + 4] != _ZSTD_MAGIC:
                raise CorruptStreamError("not a zstd frame (bad magic number)")
            descriptor = data[start + 4]
            if descriptor & 0x08:
                raise CorruptStreamError("zstd frame header has its reserved bit set")
            single_segment = bool(descriptor & 0x20)
            self._has_checksum = bool(descriptor & 0x04)
            fcs_size = (1 if single_segment else 0, 2, 4, 8)[descriptor >> 6]
            dict_size = (0, 1, 2, 4)[descriptor & 0x03]
            return 5 + (0 if single_segment else 1) + dict_size + fcs_size
        if self._unit == "checksum":
            return 4
        if available < 3:
            return None
        header = int.from_bytes(data[start : start + 3], "little")
        block_type = (header >> 1) & 0x03
        block_size = header >> 3
        if block_type == 3:
            raise CorruptStreamError("zstd block of the reserved type")
        if block_size > _ZSTD_BLOCK_MAX:
            raise CorruptStreamError(f"zstd block of {block_size} bytes exceeds the 128 KiB limit")
        return 3 + (1 if block_type == 1 else block_size)  # an RLE block stores 1 byte

    def decode(self, data: bytearray, out: bytearray, budget: int) -> None:
        start = 0
        try:
            with memoryview(data) as view:
                while not self.done and len(out) < budget:
                    size = self._next_unit_size(data, start)
                    if size is None or len(data) - start < size:
                        self.hungry = True
                        break
                    self.hungry = False
                    with view[start : start + size] as unit:  # released even on error
                        out += self._obj.decompress(unit)
                    if self._unit == "block" and data[start] & 0x01:  # Last_Block
                        self._unit = "checksum" if self._has_checksum else "end"
                    elif self._unit == "header":
                        self._unit = "block"
                    elif self._unit == "checksum":
                        self._unit = "end"
                    start += size
                    if self._unit == "end":
                        if not self._obj.eof:
                            raise CorruptStreamError("zstd frame structure and decoder disagree")
                        self.done = True
                        self.hungry = False
        finally:
            del data[:start]

    def leftover(self) -> int:
        return 0  # input past the frame stays in the caller's buffer


class _Lz4Decoder:
    """``LZ4FrameDecompressor`` with ``max_length``: bounded output per step."""

    def __init__(self) -> None:
        self._obj = _lz4().LZ4FrameDecompressor()
        self._leftover = 0
        self.done = False
        self.hungry = True

    def decode(self, data: bytearray, out: bytearray, budget: int) -> None:
        # The decompressor keeps the input it could not consume yet, so hand it all
        # over; we only add more when it says it needs input.
        chunk = bytes(data)
        data.clear()
        out += self._obj.decompress(chunk, max_length=budget - len(out))
        if self._obj.eof:
            self.done = True
            self.hungry = False
            self._leftover = len(self._obj.unused_data or b"")  # None when nothing is left
        else:
            self.hungry = self._obj.needs_input

    def leftover(self) -> int:
        return self._leftover


class DecompressingSource(StageSource):
    """Reads the frame ``CompressingSink`` wrote and returns the uncompressed bytes."""

    STAGE = "decompressed"

    def __init__(
        self,
        inner: Source,
        algorithm: str,
        *,
        limiter: anyio.CapacityLimiter | None = None,
    ) -> None:
        super().__init__(inner, limiter)
        self.algorithm = algorithm
        _check_algorithm(algorithm, None, url=self.url)
        self._decoder: _Decoder = _ZstdDecoder() if algorithm == "zstd" else _Lz4Decoder()
        self._input = bytearray()  # compressed, not yet decoded
        self._scratch = bytearray(_READ_CHUNK)
        self._inner_ended = False

    def __repr__(self) -> str:
        return f"<DecompressingSource {self.algorithm} {self.url}>"

    def _corrupt(self, detail: str) -> CorruptStreamError:
        return CorruptStreamError(f"corrupt {self.algorithm} stream: {detail} ({self.url})")

    async def _read_more(self) -> bool:
        """Append compressed bytes from ``inner`` to the input; False at its end."""
        if self._inner_ended:
            return False
        with memoryview(self._scratch) as view:
            count = await read_full(self.inner, view)
            self._input += view[:count]
        if count < len(self._scratch):
            self._inner_ended = True
        return count > 0

    def _decode(self) -> None:
        try:
            self._decoder.decode(self._input, self._out, _DECODE_BUDGET)
        except Exception as exc:
            if not isinstance(exc, (CorruptStreamError, *_codec_errors())):
                raise
            raise self._corrupt(str(exc)) from exc  # adds the URL

    async def _refill(self) -> None:
        """Decode until output is waiting, or the frame has ended with nothing after it."""
        self._out.clear()
        while not self._out:
            if self._decoder.done:
                if self._input or self._decoder.leftover() or await self._read_more():
                    raise self._corrupt("unexpected data after the end of the frame")
                self._ended = True
                break
            if self._decoder.hungry and not await self._read_more():
                # The decoder must have finished its frame when the object ends.
                raise self._corrupt("truncated: the object ends inside the compressed frame")
            await threads.run_sync(self._decode, limiter=self.limiter)
        self._out_start, self._out_end = 0, len(self._out)

    async def close(self) -> None:
        await super().close()
        self._input = bytearray()
