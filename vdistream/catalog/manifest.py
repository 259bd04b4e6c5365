"""The manifest: what a backup is, written LAST, after every device stream committed.

A backup exists for ``list``, ``restore`` and ``verify`` only when its manifest is
committed at ``<backup_id>/manifest.json`` in its destination. The manifest names the
engine and the source (never credentials), the start and end time, the VDI
configuration, and for each device its stream's key, URL, byte count and SHA-256, plus
the tool versions. It carries a SHA-256 of its own canonical content, so a manifest
edited by hand is refused with a clear message instead of restoring the wrong thing.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Any

from vdistream.errors import VdistreamError
from vdistream.storage._common import MANIFEST_NAME  # storage must know it too: one name

__all__ = (
    "MANIFEST_NAME",
    "CatalogError",
    "DeviceEntry",
    "Manifest",
    "manifest_key",
)

FORMAT = "vdistream-manifest"
VERSION = 1


class CatalogError(VdistreamError):
    """A manifest is missing, malformed, modified, or does not match its streams."""


def manifest_key(backup_id: str) -> str:
    return f"{backup_id}/{MANIFEST_NAME}"


@dataclasses.dataclass(frozen=True)
class DeviceEntry:
    """One device stream: ``bytes``/``sha256`` of what is stored (after compression and
    encryption), ``logical_*`` of what the engine wrote (the same without stages)."""

    index: int
    name: str
    key: str
    url: str
    bytes: int
    sha256: str
    logical_bytes: int | None = None
    logical_sha256: str | None = None


@dataclasses.dataclass(frozen=True)
class Manifest:
    backup_id: str
    engine: str  # "sqlite", "postgresql", "cmd", "mssql", "external"
    mode: str | None
    source: str  # without credentials
    started: str  # ISO 8601, UTC
    ended: str
    vdi: dict[str, int]  # device_count, block_size, max_transfer_size, buffer_count, features
    devices: tuple[DeviceEntry, ...]
    versions: dict[str, str]
    logical_bytes: int | None = None
    #: the stages, in order, with their parameters (nothing secret); None: no stages
    pipeline: dict[str, Any] | None = None
    #: the source file's permission bits (SQLite), which a restore follows within its
    #: umask; None: not recorded (backups before it, or no file)
    file_mode: int | None = None
    #: SQL Server backups (engine "mssql"): the database, the backup type ("D" full, "I"
    #: differential, "L" log), copy-only, the LSNs from msdb.dbo.backupset as decimal
    #: strings, start and finish (UTC), the server and its version; what chains and
    #: retention read (``vdistream.catalog.chain``). None for the other engines.
    sqlserver: dict[str, Any] | None = None
    #: PostgreSQL ``files`` mode: the backup's start and stop LSNs, timeline, system
    #: identifier, server version, WAL segments, tablespaces and every file's size,
    #: CRC-32 and device (``files``: rows of ``pgfiles.layout.FileRecord.to_json``),
    #: which a delta restore compares against. None for the other engines and modes.
    postgresql: dict[str, Any] | None = None

    @property
    def stored_bytes(self) -> int:
        """What the medium holds (after compression and encryption)."""
        return sum(d.bytes for d in self.devices)

    @property
    def stream_bytes(self) -> int:
        """What the engine wrote to the devices (before compression and encryption)."""
        return sum(
            d.logical_bytes if d.logical_bytes is not None else d.bytes for d in self.devices
        )

    def relocated(self, base_url: str) -> Manifest:
        """This manifest with each device's ``url`` where its stream is now: under
        ``base_url``, the storage it was read from. The recorded URLs are where the
        backup was written, wrong once it was copied elsewhere; errors name the real
        place. The copy is for reading only (its checksum would not match)."""
        base = base_url.rstrip("/")
        return dataclasses.replace(
            self,
            devices=tuple(dataclasses.replace(d, url=f"{base}/{d.key}") for d in self.devices),
        )

    @property
    def key_block(self) -> dict[str, Any] | None:
        """What the manifest records about the encryption key (``pipeline.encryption.key``:
        a fingerprint and KDF before envelopes, the wrapped data key since); None when
        the backup is not encrypted. Nothing in it is secret."""
        encryption = (self.pipeline or {}).get("encryption")
        if not encryption:
            return None
        block = encryption.get("key")
        return block if isinstance(block, dict) else None

    def with_key_block(self, block: dict[str, Any]) -> Manifest:
        """This manifest with another key block and nothing else changed (the key
        commands' rewrap); its checksum is computed anew by ``to_json``."""
        if self.key_block is None:
            raise CatalogError(f"backup {self.backup_id} is not encrypted: it has no key block")
        assert self.pipeline is not None  # it has a key block
        encryption = {**self.pipeline["encryption"], "key": block}
        return dataclasses.replace(self, pipeline={**self.pipeline, "encryption": encryption})

    def carries(self, data: bytes) -> bool:
        """Whether ``to_json`` says all that the stored manifest ``data`` (this one, as
        read) says. False when it holds fields this version does not know (a newer
        vdistream wrote it): rewriting it would drop them, under a fresh checksum."""
        try:
            stored = json.loads(data)
        except (ValueError, UnicodeDecodeError):
            return False
        return bool(json.loads(self.to_json()) == stored)

    def _body(self) -> dict[str, Any]:
        body = dataclasses.asdict(self)
        body["devices"] = [dataclasses.asdict(d) for d in self.devices]
        return {"format": FORMAT, "version": VERSION, **body}

    def to_json(self) -> bytes:
        body = self._body()
        body["checksum"] = _checksum(body)
        return json.dumps(body, indent=2, sort_keys=True).encode() + b"\n"

    def summary(self) -> dict[str, Any]:
        """What ``list --json`` shows for this backup."""
        return {
            "id": self.backup_id,
            "engine": self.engine,
            "mode": self.mode,
            "source": self.source,
            "started": self.started,
            "ended": self.ended,
            "devices": len(self.devices),
            "bytes": self.stored_bytes,
            "stored_bytes": self.stored_bytes,
            "logical_bytes": self.stream_bytes,
            "compression": (self.pipeline or {}).get("compression"),
            "encrypted": bool((self.pipeline or {}).get("encryption")),
            "sqlserver": self.sqlserver,
        }

    @classmethod
    def from_json(cls, data: bytes, *, where: str) -> Manifest:
        try:
            body = json.loads(data)
        except (ValueError, UnicodeDecodeError) as exc:
            raise CatalogError(f"manifest {where} is not valid JSON: {exc}") from exc
        if not isinstance(body, dict) or body.get("format") != FORMAT:
            raise CatalogError(f"{where} is not a vdistream manifest")
        if body.get("version") != VERSION:
            raise CatalogError(
                f"manifest {where} has format version {body.get('version')!r}; "
                f"this vdistream reads version {VERSION}"
            )
        stated = body.pop("checksum", None)
        if stated != _checksum(body):
            raise CatalogError(
                f"manifest {where} was modified after it was written (its checksum does not "
                "match its content); refusing to trust it"
            )
        try:
            devices = tuple(DeviceEntry(**d) for d in body["devices"])
            return cls(
                backup_id=body["backup_id"],
                engine=body["engine"],
                mode=body["mode"],
                source=body["source"],
                started=body["started"],
                ended=body["ended"],
                vdi=dict(body["vdi"]),
                devices=devices,
                versions=dict(body["versions"]),
                logical_bytes=body.get("logical_bytes"),
                pipeline=body.get("pipeline"),
                file_mode=body.get("file_mode"),
                sqlserver=body.get("sqlserver"),
                postgresql=body.get("postgresql"),
            )
        except (KeyError, TypeError) as exc:
            raise CatalogError(f"manifest {where} is incomplete: {exc!r}") from exc


def _checksum(body: dict[str, Any]) -> str:
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(canonical).hexdigest()
