"""Review of the lazy start-up (issue 14): what the eager modules did still works.

A logger from ``vdistream.log.get_logger`` copies and pickles like structlog's;
``vdistream backu`` still suggests ``backup``; ``import vdistream`` still reaches the
submodules; and loading every lazily exported name configures nothing."""

from __future__ import annotations

import copy
import json
import logging
import pickle
import subprocess
import sys
import textwrap

import pytest

from vdistream.cli import main
from vdistream.log import get_logger


def run_python(code: str) -> str:
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


class Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.mark.parametrize(
    "clone",
    [copy.copy, copy.deepcopy, lambda logger: pickle.loads(pickle.dumps(logger))],
    ids=["copy", "deepcopy", "pickle"],
)
def test_a_logger_copies_and_pickles_and_still_logs(clone: object) -> None:
    name = "vdistream.tests.revmisc"
    stdlib = logging.getLogger(name)
    handler = Records()
    stdlib.addHandler(handler)
    stdlib.setLevel(logging.INFO)
    try:
        logger = get_logger(name, job="j1")
        assert callable(clone)
        twin = clone(logger)
        twin.bind(device=2).info("device_opened", size=5)
        twin.debug("dropped")  # below the level
    finally:
        stdlib.removeHandler(handler)
        stdlib.setLevel(logging.NOTSET)
    [record] = handler.records
    assert record.msg == "device_opened"
    assert record.__dict__["job"] == "j1"
    assert record.__dict__["device"] == 2
    assert record.__dict__["size"] == 5


def test_an_unknown_command_is_one_line_with_the_closest_one(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["backu"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err == "vdistream: error: No such command 'backu'. Did you mean 'backup'?\n"


def test_the_package_still_reaches_its_submodules() -> None:
    out = run_python(
        """
        import json
        import vdistream
        print(json.dumps([
            vdistream.storage.open_storage is vdistream.open_storage,
            vdistream.coordinator.backup is vdistream.backup,
            vdistream.storage.registry.default_registry is vdistream.storage.default_registry,
            hasattr(vdistream, "no_such_module"),
        ]))
        """
    )
    assert json.loads(out) == [True, True, True, False]


def test_loading_every_lazy_name_configures_nothing() -> None:
    """``tests/test_public_api.py::test_import_configures_nothing`` with every lazy
    name loaded: ``import vdistream`` alone imports almost nothing now."""
    run_python(
        """
        import importlib, logging, signal, structlog
        before = (logging.root.handlers[:], signal.getsignal(signal.SIGTERM),
                  signal.getsignal(signal.SIGINT), structlog.is_configured())
        from prometheus_client import REGISTRY
        collectors = set(REGISTRY._names_to_collectors)
        for package in ("vdistream", "vdistream.storage", "vdistream.pipeline",
                        "vdistream.engines", "vdistream.operations", "vdistream.sqlserver"):
            module = importlib.import_module(package)
            for name in module.__all__:
                value = getattr(module, name)
                assert getattr(module, name) is value, (package, name)
        assert set(REGISTRY._names_to_collectors) == collectors  # no global metrics
        after = (logging.root.handlers[:], signal.getsignal(signal.SIGTERM),
                 signal.getsignal(signal.SIGINT), structlog.is_configured())
        assert before == after, (before, after)
        """
    )
