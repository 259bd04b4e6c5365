"""Per-device byte transforms composed around a sink or a source."""

from vdistream.pipeline.checksum import HashingSink as HashingSink
from vdistream.pipeline.checksum import HashingSource as HashingSource

__all__ = ("HashingSink", "HashingSource")
