"""The stages of one device stream, composed in a fixed order.

Backup::

    pump -> logical hash -> compress -> encrypt -> stored hash -> storage sink

Restore::

    storage source -> stored hash -> decrypt -> decompress -> logical hash -> pump

Compression comes before encryption (ciphertext does not compress). The *logical*
SHA-256 is of what the engine wrote, the *stored* SHA-256 of what reached the medium;
both are recorded in the manifest, and without stages they are the same.

Except that new backups with stages record no logical SHA-256. When encrypting, the
stored SHA-256 covers every stored byte and the AEAD tags authenticate each segment,
its place and the stream's end under the key; when compressing, decompression is
deterministic and the frame's own content checksum (zstd XXH64, lz4 XXH32, computed
by the compressor over its input and checked by the decoder) ties the decoded bytes
to what was compressed. Once the stored SHA-256 matches, the logical stream is exactly
what the engine wrote: a logical SHA-256 on top protected nothing more for another 0.6
CPU seconds a GiB. The manifest's pipeline says which (``"logical_digest": null``, and
``logical_sha256`` is null per device); a manifest without that key (written before)
has a logical SHA-256, and its restores check it as before.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

import anyio

from vdistream.errors import ConfigError
from vdistream.pipeline.checksum import HashingSink, HashingSource
from vdistream.pipeline.compress import CompressingSink, DecompressingSource
from vdistream.pipeline.context import DEFAULT_SEGMENT_SIZE
from vdistream.pipeline.spec import CompressionSpec
from vdistream.storage import Sink, Source

if TYPE_CHECKING:  # encryption (cryptography) is imported by the chains that encrypt
    from vdistream.pipeline.keys import Key

__all__ = ("ORDER", "PipelineConfig", "SinkChain", "SourceChain")

ORDER = ("compress", "encrypt", "store")


@dataclasses.dataclass(frozen=True)
class PipelineConfig:
    """The stages of a backup. ``key`` is what the streams are encrypted with: a new
    backup's ``envelope.DataKey`` (its ``describe`` is the manifest's key block), or a
    restored one's unwrapped data key. For a restore, ``encrypted`` says the stored
    streams are encrypted (from the manifest) whether or not a ``key`` was given."""

    compression: CompressionSpec | None = None
    key: Key | None = None
    encrypted: bool = False
    segment_size: int = DEFAULT_SEGMENT_SIZE
    #: whether the logical stream is hashed (SHA-256) when stages transform it; None:
    #: the rule for new backups (it is not, see the module docstring)
    logical_digest: bool | None = None

    def __post_init__(self) -> None:
        if self.key is not None and not self.encrypted:
            object.__setattr__(self, "encrypted", True)  # frozen: normalise once

    @property
    def compressed(self) -> bool:
        return self.compression is not None and self.compression.enabled

    @property
    def any(self) -> bool:
        return self.compressed or self.encrypted

    @property
    def hashes_logical(self) -> bool:
        """Whether the logical stream gets a SHA-256 of its own (when ``any``)."""
        return not self.any if self.logical_digest is None else self.logical_digest

    def describe(self) -> dict[str, Any]:
        """What the manifest records (nothing secret)."""
        from vdistream.pipeline.encrypt import describe_encryption

        return {
            "order": list(ORDER),
            "compression": self.compression.to_dict() if self.compressed else None,  # type: ignore[union-attr]
            "encryption": describe_encryption(self.key, segment_size=self.segment_size)
            if self.key is not None
            else None,
            "logical_digest": "sha256" if self.hashes_logical else None,
        }

    @classmethod
    def from_manifest(cls, recorded: dict[str, Any] | None, key: Key | None) -> PipelineConfig:
        if not recorded:
            return cls()
        compression = recorded.get("compression")
        encryption = recorded.get("encryption")
        return cls(
            compression=CompressionSpec.from_dict(compression) if compression else None,
            key=key if encryption else None,
            encrypted=bool(encryption),
            segment_size=int(encryption["segment_size"]) if encryption else DEFAULT_SEGMENT_SIZE,
            # older manifests have no such key: they hashed the logical stream
            logical_digest=recorded.get("logical_digest", "sha256") is not None,
        )


@dataclasses.dataclass
class SinkChain:
    outer: Sink  # what the pump writes to; commit/abort go through every stage
    stored: HashingSink
    logical: HashingSink

    @classmethod
    def build(
        cls,
        inner: Sink,
        config: PipelineConfig,
        *,
        context: bytes,
        limiter: anyio.CapacityLimiter,
    ) -> SinkChain:
        stored = HashingSink(inner, limiter=limiter)
        sink: Sink = stored
        if config.encrypted:
            if config.key is None:
                raise ConfigError("an encrypted backup needs a key")
            from vdistream.pipeline.encrypt import EncryptingSink

            sink = EncryptingSink(
                sink, config.key, context, segment_size=config.segment_size, limiter=limiter
            )
        if config.compressed:
            assert config.compression is not None
            sink = CompressingSink(
                sink, config.compression.algorithm, config.compression.level, limiter=limiter
            )
        if sink is stored:
            logical = stored
        else:
            logical = HashingSink(sink, limiter=limiter, digest=config.hashes_logical)
        return cls(logical, stored, logical)


@dataclasses.dataclass
class SourceChain:
    outer: Source
    stored: HashingSource
    logical: HashingSource

    @classmethod
    def build(
        cls,
        inner: Source,
        config: PipelineConfig,
        *,
        context: bytes,
        limiter: anyio.CapacityLimiter,
    ) -> SourceChain:
        stored = HashingSource(inner, limiter=limiter)
        source: Source = stored
        if config.encrypted:
            from vdistream.pipeline.encrypt import DecryptingSource

            source = DecryptingSource(source, config.key, context, limiter=limiter)
        if config.compressed:
            assert config.compression is not None
            source = DecompressingSource(source, config.compression.algorithm, limiter=limiter)
        if source is stored:
            logical = stored
        else:
            logical = HashingSource(source, limiter=limiter, digest=config.hashes_logical)
        return cls(logical, stored, logical)
