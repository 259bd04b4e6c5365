"""The package re-exports only, and importing it configures nothing."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import vdistream.service


def test_all_is_a_tuple_of_exactly_the_public_names() -> None:
    exported = vdistream.service.__all__
    assert isinstance(exported, tuple)
    assert len(set(exported)) == len(exported)
    for name in exported:
        assert hasattr(vdistream.service, name), name
    public = {
        name
        for name, value in vars(vdistream.service).items()
        if not name.startswith("_") and not isinstance(value, type(sys))
    }
    assert public == set(exported)


def test_importing_configures_no_logging_and_no_signals() -> None:
    code = textwrap.dedent(
        """
        import logging, signal, sys
        handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)}
        root = list(logging.getLogger().handlers)
        import structlog
        import vdistream.service
        from vdistream.service import settings, schedule, retention, state
        assert {s: signal.getsignal(s) for s in handlers} == handlers
        assert logging.getLogger().handlers == root
        assert logging.getLogger().level == logging.WARNING
        assert not structlog.is_configured()
        assert signal.set_wakeup_fd(-1) == -1
        print("clean")
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "clean"
