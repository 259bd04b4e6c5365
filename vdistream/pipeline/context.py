"""What binds an encrypted stream to its place, without loading the cipher.

``stream_context`` and ``DEFAULT_SEGMENT_SIZE`` live here, not in ``encrypt``, because
every job computes a context and every pipeline has a segment size, and ``encrypt``
imports ``cryptography``: a job that does not encrypt should not pay for that import.
"""

from __future__ import annotations

import struct
from typing import Final

__all__ = ("DEFAULT_SEGMENT_SIZE", "stream_context")

#: plaintext bytes a segment holds (one AES-256-GCM call and tag each)
DEFAULT_SEGMENT_SIZE: Final = 1 << 20
_CONTEXT_LABEL = b"vdistream/v1/device-stream"


def stream_context(backup_id: str, device_index: int, device_count: int) -> bytes:
    """The ``context`` for one device stream of a backup: binds the stream to its place.

    Length-prefixed so that no two different triples encode to the same bytes.
    """
    if not 0 <= device_index < device_count:
        raise ValueError(f"device index {device_index} is not in 0..{device_count - 1}")
    name = backup_id.encode("utf-8")
    return b"".join(
        (
            _CONTEXT_LABEL,
            struct.pack(">I", len(name)),
            name,
            struct.pack(">II", device_index, device_count),
        )
    )
