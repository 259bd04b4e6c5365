"""Public test helpers: the storage conformance suite (needs pytest installed)."""

from vdistream.testing.storage_suite import CANCEL_DELAYS as CANCEL_DELAYS
from vdistream.testing.storage_suite import STORAGE_CHECKS as STORAGE_CHECKS
from vdistream.testing.storage_suite import Residue as Residue
from vdistream.testing.storage_suite import StorageCheck as StorageCheck
from vdistream.testing.storage_suite import StorageConformance as StorageConformance
from vdistream.testing.storage_suite import StorageMaker as StorageMaker
from vdistream.testing.storage_suite import cancel_during as cancel_during
from vdistream.testing.storage_suite import check_storage as check_storage

__all__ = (
    "CANCEL_DELAYS",
    "STORAGE_CHECKS",
    "Residue",
    "StorageCheck",
    "StorageConformance",
    "StorageMaker",
    "cancel_during",
    "check_storage",
)
