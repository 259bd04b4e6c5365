"""Each engine test gets a registry of its own, passed to both sides."""

from __future__ import annotations

import pytest

from vdistream import Registry


@pytest.fixture
def registry() -> Registry:
    return Registry()
