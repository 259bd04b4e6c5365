"""Public test helpers: the storage conformance suite (needs pytest installed)."""

# The package's surface is exactly the suite's: its ``__all__`` and nothing more.
from vdistream.testing.storage_suite import *  # noqa: F403
from vdistream.testing.storage_suite import __all__ as __all__
