"""Per-device byte transforms composed around a sink or a source.

Backup chain, per device: engine -> ``HashingSink`` (logical hash) ->
``CompressingSink`` -> ``EncryptingSink`` -> ``HashingSink`` (stored hash) -> storage
sink; restore reads the same stages in reverse through the matching sources.
"""

from vdistream.pipeline.checksum import HashingSink as HashingSink
from vdistream.pipeline.checksum import HashingSource as HashingSource
from vdistream.pipeline.compress import CompressingSink as CompressingSink
from vdistream.pipeline.compress import DecompressingSource as DecompressingSource
from vdistream.pipeline.encrypt import DecryptingSource as DecryptingSource
from vdistream.pipeline.encrypt import EncryptingSink as EncryptingSink
from vdistream.pipeline.encrypt import describe_encryption as describe_encryption
from vdistream.pipeline.encrypt import looks_encrypted as looks_encrypted
from vdistream.pipeline.encrypt import stream_context as stream_context
from vdistream.pipeline.keys import Key as Key
from vdistream.pipeline.keys import ScryptParams as ScryptParams
from vdistream.pipeline.keys import generate_key_file as generate_key_file
from vdistream.pipeline.keys import load_key as load_key
from vdistream.pipeline.spec import CompressionSpec as CompressionSpec
from vdistream.pipeline.spec import parse_compression as parse_compression

__all__ = (
    "CompressingSink",
    "CompressionSpec",
    "DecompressingSource",
    "DecryptingSource",
    "EncryptingSink",
    "HashingSink",
    "HashingSource",
    "Key",
    "ScryptParams",
    "describe_encryption",
    "generate_key_file",
    "load_key",
    "looks_encrypted",
    "parse_compression",
    "stream_context",
)
