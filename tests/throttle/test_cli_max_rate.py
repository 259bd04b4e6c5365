"""``vdistream backup``, ``restore`` and ``verify --max-rate`` as a user types them: the
measured rate (bytes over the job's own seconds, generous bounds) shows the limit
applied, the stream is intact (SHA-256), and a bad rate is exit 2, one line.
Precision belongs to benchmarks/throttle.py."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.daemon.conftest import REPO

pytestmark = pytest.mark.timeout(90)

MIB = 1024 * 1024
SIZE = 12 * MIB


def _run(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "vdistream", *argv],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
        check=False,
    )


def test_backup_and_restore_at_a_limited_rate(tmp_path: Path) -> None:
    data = tmp_path / "data.bin"
    data.write_bytes(hashlib.shake_256(b"throttle").digest(SIZE))
    dest = tmp_path / "backups"

    unlimited = _run("backup", f"cmd:cat {data}", str(dest), "--id", "free", "--json")
    assert unlimited.returncode == 0, unlimited.stderr
    free = json.loads(unlimited.stdout)

    limited = _run(
        "backup", f"cmd:cat {data}", str(dest), "--id", "slow", "--max-rate", "4M", "--json"
    )
    assert limited.returncode == 0, limited.stderr
    slow = json.loads(limited.stdout)
    assert slow["logical_bytes"] >= SIZE  # the stream as framed through the devices
    rate = slow["logical_bytes"] / slow["seconds"]
    # ~12.5 MiB at 4 MiB/s: about 3 s (the bucket starts empty, holds 1 MiB at most)
    assert 2 * MIB < rate < 4.6 * MIB, (rate, slow["seconds"])
    assert slow["seconds"] > 2 * free["seconds"], (free, slow)

    out = tmp_path / "restored.bin"
    restored = _run(
        "restore", f"{dest}/slow", f"cmd:sh -c 'cat > {out}'", "--max-rate", "8M", "--json"
    )
    assert restored.returncode == 0, restored.stderr
    back = json.loads(restored.stdout)
    assert hashlib.sha256(out.read_bytes()).digest() == hashlib.sha256(data.read_bytes()).digest()
    # ~12.5 MiB at 8 MiB/s: about 1.5 s
    assert 2 * MIB < back["bytes"] / back["seconds"] < 9.2 * MIB, back

    # verify's checksum pass (no trial restore) reads under the limit too: ~3 s at 4M
    # more than the same verify unlimited (both times include the command's start-up,
    # which a loaded machine can stretch beyond any fixed bound)
    took = {}
    for rate in ("off", "4M"):
        started = time.monotonic()
        checked = _run("verify", f"{dest}/slow", "--no-content", "--max-rate", rate, "--json")
        took[rate] = time.monotonic() - started
        assert checked.returncode == 0, checked.stderr
        assert json.loads(checked.stdout)["status"] == "verified"
    assert took["4M"] > took["off"] + 1.5, took


@pytest.mark.parametrize("command", ["backup", "restore"])
def test_a_bad_rate_is_a_usage_error(tmp_path: Path, command: str) -> None:
    done = _run(command, "cmd:true", str(tmp_path / "x"), "--max-rate", "fast")
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert "fast" in lines[-1]
    assert "is not a rate" in lines[-1]
    assert "Traceback" not in done.stderr
