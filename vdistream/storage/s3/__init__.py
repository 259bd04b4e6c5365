"""``s3://bucket/prefix``: objects in an S3 bucket (or any S3-compatible store), on
aiobotocore. Modules: ``client`` (URL, client, retries), ``errors`` (translation),
``parts`` (part sizes), ``storage`` (operations, upload maintenance), ``sink``,
``source``, ``tasks`` (the task group a sink or source owns) and ``hooks``. Only
``observe_retries`` comes with the package; the other names load aiobotocore, so they
are imported on first use (PEP 562): the daemon observes retries without AWS libraries.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from vdistream.storage.s3.hooks import observe_retries

if TYPE_CHECKING:
    from vdistream.storage.s3.client import backoff_delay
    from vdistream.storage.s3.errors import is_ambiguous, is_transient, translate_s3_error
    from vdistream.storage.s3.parts import (
        DEFAULT_PART_SIZE,
        MAX_OBJECT_SIZE,
        MAX_PART_SIZE,
        MAX_PARTS,
        MIN_PART_SIZE,
        PART_GROWTH_INTERVAL,
        initial_part_size,
        part_size_for,
        part_sizes,
        stream_capacity,
    )
    from vdistream.storage.s3.sink import S3Part, S3Sink
    from vdistream.storage.s3.source import S3Source
    from vdistream.storage.s3.storage import MARK_NAME, S3Object, S3Storage, S3Upload

__all__ = (
    "DEFAULT_PART_SIZE",
    "MARK_NAME",
    "MAX_OBJECT_SIZE",
    "MAX_PARTS",
    "MAX_PART_SIZE",
    "MIN_PART_SIZE",
    "PART_GROWTH_INTERVAL",
    "S3Object",
    "S3Part",
    "S3Sink",
    "S3Source",
    "S3Storage",
    "S3Upload",
    "backoff_delay",
    "initial_part_size",
    "is_ambiguous",
    "is_transient",
    "observe_retries",
    "part_size_for",
    "part_sizes",
    "stream_capacity",
    "translate_s3_error",
)


def __getattr__(name: str) -> Any:
    if name in __all__:  # from the module that defines it (each loads aiobotocore)
        for module in ("client", "errors", "parts", "sink", "source", "storage"):
            if name in (found := vars(importlib.import_module(f"{__name__}.{module}"))):
                return found[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
