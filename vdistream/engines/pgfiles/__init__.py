"""PostgreSQL's ``files`` mode: the data directory read by vdistream itself, in
parallel across the devices, and restored the same way (see ``layout``)."""

from vdistream.engines.pgfiles.layout import (
    BackupIndex,
    EntryHeader,
    EntryKind,
    FileRecord,
)

__all__ = ("BackupIndex", "EntryHeader", "EntryKind", "FileRecord")
