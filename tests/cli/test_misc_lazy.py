"""Start-up: what a command does not use is not imported. Each check runs in a fresh
interpreter (``sys.modules`` of the test process holds everything)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap


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


def test_importing_the_package_loads_no_job_machinery() -> None:
    out = run_python(
        """
        import json, sys
        import vdistream
        loaded = [m for m in ("vdistream.coordinator", "vdistream.engines",
                  "vdistream.storage.file", "structlog") if m in sys.modules]
        import vdistream.coordinator, vdistream.vdi
        same = (vdistream.backup is vdistream.coordinator.backup
                and vdistream.Registry is vdistream.vdi.Registry)
        print(json.dumps({"loaded": loaded, "same": same,
                          "dir": sorted(set(vdistream.__all__) - set(dir(vdistream)))}))
        """
    )
    assert json.loads(out) == {"loaded": [], "same": True, "dir": []}


def test_a_backup_to_null_loads_neither_s3_nor_the_daemon() -> None:
    out = run_python(
        """
        import json, sys
        from vdistream.cli import main
        code = main(["backup", "cmd:cat /dev/null", "null://", "--devices", "2"])
        unused = ["aiobotocore", "botocore", "aiohttp", "pydantic", "prometheus_client",
                  "vdistream.cli.daemon", "vdistream.cli.prune", "vdistream.service",
                  "vdistream.storage.s3", "vdistream.storage.file"]
        print(json.dumps({"code": code, "loaded": [m for m in unused if m in sys.modules]}))
        """
    )
    assert json.loads(out.splitlines()[-1]) == {"code": 0, "loaded": []}


def test_help_lists_every_command_without_loading_them_first() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "vdistream", "--help"],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    listed = done.stdout.split("Commands:")[1].split()
    for name in (
        "backup",
        "restore",
        "verify",
        "list",
        "storage",
        "keygen",
        "demo",
        "prune",
        "serve",
        "status",
        "jobs",
        "job",
        "abort",
        "submit",
    ):
        assert name in listed, name


def test_a_quiet_logger_does_not_import_structlog_and_a_loud_one_logs() -> None:
    out = run_python(
        """
        import json, logging, sys
        from vdistream.log import get_logger
        log = get_logger("vdistream.test", job="j1").bind(device="d0")
        log.info("quiet_event", n=1)
        quiet = "structlog" in sys.modules
        records = []
        class Keep(logging.Handler):
            def emit(self, record):
                records.append((record.getMessage(), record.job, record.device, record.n))
        logging.getLogger("vdistream.test").addHandler(Keep())
        logging.getLogger("vdistream.test").setLevel(logging.INFO)
        log.info("loud_event", n=2)
        log.debug("dropped_event", n=3)
        print(json.dumps({"quiet": quiet, "records": records}))
        """
    )
    assert json.loads(out) == {"quiet": False, "records": [["loud_event", "j1", "d0", 2]]}
