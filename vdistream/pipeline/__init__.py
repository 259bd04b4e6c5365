"""Per-device byte transforms composed around a sink or a source.

Backup chain, per device: engine -> ``HashingSink`` (logical hash) ->
``CompressingSink`` -> ``EncryptingSink`` -> ``HashingSink`` (stored hash) -> storage
sink; restore reads the same stages in reverse through the matching sources.

Every name but the compression spec is imported on first access (``vdistream._lazy``),
so that importing the package (as the command line's option parsing does) loads
neither the stages nor cryptography.
"""

import typing as _typing

from vdistream._lazy import lazy_exports as _lazy_exports
from vdistream.pipeline.spec import CompressionSpec as CompressionSpec
from vdistream.pipeline.spec import parse_compression as parse_compression

if _typing.TYPE_CHECKING:
    from vdistream.pipeline.checksum import HashingSink as HashingSink
    from vdistream.pipeline.checksum import HashingSource as HashingSource
    from vdistream.pipeline.compress import CompressingSink as CompressingSink
    from vdistream.pipeline.compress import DecompressingSource as DecompressingSource
    from vdistream.pipeline.context import stream_context as stream_context
    from vdistream.pipeline.encrypt import DecryptingSource as DecryptingSource
    from vdistream.pipeline.encrypt import EncryptingSink as EncryptingSink
    from vdistream.pipeline.encrypt import describe_encryption as describe_encryption
    from vdistream.pipeline.encrypt import looks_encrypted as looks_encrypted
    from vdistream.pipeline.keys import Key as Key
    from vdistream.pipeline.keys import ScryptParams as ScryptParams
    from vdistream.pipeline.keys import generate_key_file as generate_key_file
    from vdistream.pipeline.keys import load_key as load_key

# Public name -> the module that defines it, imported on first access (PEP 562).
_LAZY: dict[str, str] = {
    "HashingSink": "vdistream.pipeline.checksum",
    "HashingSource": "vdistream.pipeline.checksum",
    "CompressingSink": "vdistream.pipeline.compress",
    "DecompressingSource": "vdistream.pipeline.compress",
    "DecryptingSource": "vdistream.pipeline.encrypt",
    "EncryptingSink": "vdistream.pipeline.encrypt",
    "describe_encryption": "vdistream.pipeline.encrypt",
    "looks_encrypted": "vdistream.pipeline.encrypt",
    "stream_context": "vdistream.pipeline.context",
    "Key": "vdistream.pipeline.keys",
    "ScryptParams": "vdistream.pipeline.keys",
    "generate_key_file": "vdistream.pipeline.keys",
    "load_key": "vdistream.pipeline.keys",
}

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


__getattr__, __dir__ = _lazy_exports(globals(), _LAZY, __all__)
