"""Backups as the user sees them: manifests, listing, verification."""

from vdistream.catalog.manifest import MANIFEST_NAME as MANIFEST_NAME
from vdistream.catalog.manifest import CatalogError as CatalogError
from vdistream.catalog.manifest import DeviceEntry as DeviceEntry
from vdistream.catalog.manifest import Manifest as Manifest
from vdistream.catalog.manifest import manifest_key as manifest_key
from vdistream.catalog.store import check_streams as check_streams
from vdistream.catalog.store import hash_stream as hash_stream
from vdistream.catalog.store import list_manifests as list_manifests
from vdistream.catalog.store import parse_backup_ref as parse_backup_ref
from vdistream.catalog.store import read_manifest as read_manifest
from vdistream.catalog.store import write_manifest as write_manifest

__all__ = (
    "MANIFEST_NAME",
    "CatalogError",
    "DeviceEntry",
    "Manifest",
    "check_streams",
    "hash_stream",
    "list_manifests",
    "manifest_key",
    "parse_backup_ref",
    "read_manifest",
    "write_manifest",
)
