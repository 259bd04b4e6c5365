"""Every Python example in the README runs as written, and leaves nothing behind in the
system's temporary directory: each runs in its own ``tmp_path`` with ``TMPDIR``
pointing inside it (an example's ``tempfile.mkdtemp()`` lands there), removed after."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"
EXAMPLES = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)


def test_the_readme_has_examples() -> None:
    assert len(EXAMPLES) >= 2


@pytest.mark.parametrize("code", EXAMPLES, ids=[f"example-{i}" for i in range(len(EXAMPLES))])
def test_example_runs(code: str, tmp_path: Path) -> None:
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    env = {**os.environ, "TMPDIR": str(scratch)}
    try:
        subprocess.run([sys.executable, "-c", code], check=True, cwd=tmp_path, timeout=60, env=env)
        if "tempfile" in code:
            assert any(scratch.iterdir())  # its temporaries went here, not to /tmp
    finally:
        shutil.rmtree(tmp_path, ignore_errors=True)
