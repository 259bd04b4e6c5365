"""The daemon fixture of tests/daemon, for the throttle's daemon tests."""

from __future__ import annotations

from tests.daemon.conftest import daemon_factory

__all__ = ("daemon_factory",)
