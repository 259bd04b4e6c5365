"""The daemon's JSON log renders an exception without its frames' local variables: they
can hold a webhook URL's token, a password or a request's headers. (In a child process:
``configure_logging`` sets structlog up for the whole process, as ``serve`` does.)"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

_CHILD = textwrap.dedent(
    """
    import logging, sys
    from vdistream.service.logconfig import configure_logging

    configure_logging("json", "info", stream=sys.stdout)
    secret_url = "https://hooks.example.com/T000/B000/s3cr3t-token"
    try:
        raise ConnectionError("refused")
    except ConnectionError:
        logging.getLogger("vdistream.test").exception("notification_failed")
    """
)


def test_a_logged_exception_carries_no_locals() -> None:
    out = subprocess.run(
        [sys.executable, "-c", _CHILD], capture_output=True, text=True, timeout=60, check=True
    ).stdout
    line = json.loads(out.strip().splitlines()[-1])
    assert line["event"] == "notification_failed"
    assert "ConnectionError" in json.dumps(line["exception"])
    assert "s3cr3t-token" not in out
