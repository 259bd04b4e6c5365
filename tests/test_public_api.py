"""The public surface: `__all__` lists exactly what the package re-exports."""

from __future__ import annotations

import importlib
import inspect
import pkgutil
import subprocess
import sys

import pytest

PACKAGES = [
    "vdistream",
    "vdistream.protocol",
    "vdistream.vdi",
    "vdistream.storage",
    "vdistream.engines",
    "vdistream.testing",
]
API_NAMES = [
    "ClientVirtualDeviceSet",
    "ClientVirtualDevice",
    "ServerVirtualDeviceSet",
    "ServerVirtualDevice",
    "Features",
    "CommandCode",
    "Completion",
    "Whence",
    "VDConfig",
    "Command",
    "CommandResult",
    "VDIError",
    "VDNotOpenError",
    "VDTimeoutError",
    "VDAbortError",
    "VDSecurityError",
    "VDInvalidError",
    "VDInstanceNameError",
    "VDNotSupportedError",
    "VDMemoryError",
    "VDUnexpectedError",
    "VDProtocolError",
    "VDOpenError",
    "VDClosedError",
    "VDBusyError",
]


@pytest.mark.parametrize("name", PACKAGES)
def test_all_is_a_tuple_of_exactly_the_public_names(name: str) -> None:
    module = importlib.import_module(name)
    exported = module.__all__
    assert isinstance(exported, tuple)
    assert len(set(exported)) == len(exported)
    for attr in exported:
        assert hasattr(module, attr), attr
    public = {
        attr
        for attr, value in vars(module).items()
        if not attr.startswith("_") and not isinstance(value, type(sys))
    }
    assert public == set(exported)


MODULES = [
    info.name
    for info in pkgutil.walk_packages(importlib.import_module("vdistream").__path__, "vdistream.")
    if not info.ispkg and not info.name.endswith("__main__")
]


@pytest.mark.parametrize("name", MODULES)
def test_every_module_all_is_a_tuple_of_its_public_names(name: str) -> None:
    """Each module's ``__all__``: a tuple, no repeats, every name there, and every public
    class or function the module defines listed (others are named with a ``_``)."""
    module = importlib.import_module(name)
    exported = module.__all__
    assert isinstance(exported, tuple)
    assert len(set(exported)) == len(exported)
    assert [attr for attr in exported if not hasattr(module, attr)] == []
    defined = {
        attr
        for attr, value in vars(module).items()
        if not attr.startswith("_")
        and (inspect.isclass(value) or inspect.isfunction(value))
        and value.__module__ == name
    }
    assert sorted(defined - set(exported)) == []


def test_api_md_names_are_importable_from_the_top() -> None:
    import vdistream

    missing = [name for name in API_NAMES if name not in vdistream.__all__]
    assert missing == []


def test_import_configures_nothing() -> None:
    """Importing vdistream installs no logging handler and no signal handler."""
    code = (
        "import logging, signal, structlog\n"
        "before = (logging.root.handlers[:], signal.getsignal(signal.SIGTERM),"
        " signal.getsignal(signal.SIGINT), structlog.is_configured())\n"
        "import vdistream\n"
        "from prometheus_client import REGISTRY\n"
        "collectors = set(REGISTRY._names_to_collectors)\n"
        "assert vdistream.Service.__module__ == 'vdistream.service.daemon'\n"
        "assert set(REGISTRY._names_to_collectors) == collectors  # no global metrics\n"
        "after = (logging.root.handlers[:], signal.getsignal(signal.SIGTERM),"
        " signal.getsignal(signal.SIGINT), structlog.is_configured())\n"
        "assert before == after, (before, after)\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
