"""The command line's shared machinery: ``beside`` (a companion task beside a command's
work) and the layer rule that the daemon never imports the command line."""

from __future__ import annotations

import ast
from pathlib import Path

import anyio
import pytest

from vdistream.cli.framework import beside

SERVICE = Path(__file__).resolve().parents[2] / "vdistream" / "service"


class _Companion:
    def __init__(self) -> None:
        self.started = False
        self.cancelled = False

    async def __call__(self, *, task_status: anyio.abc.TaskStatus[None]) -> None:
        self.started = True
        task_status.started()
        try:
            await anyio.sleep_forever()
        except anyio.get_cancelled_exc_class():
            self.cancelled = True
            raise


@pytest.mark.asyncio
async def test_beside_returns_the_result_after_starting_and_cancelling_the_companion() -> None:
    companion = _Companion()
    seen: list[bool] = []

    async def work() -> int:
        seen.append(companion.started)  # the companion is running before the work starts
        return 7

    with anyio.fail_after(5):
        assert await beside(work, companion) == 7
    assert seen == [True]
    assert companion.cancelled


@pytest.mark.asyncio
async def test_beside_raises_the_works_error_itself_not_a_group() -> None:
    companion = _Companion()

    async def work() -> int:
        raise LookupError("no such backup")

    with anyio.fail_after(5), pytest.raises(LookupError, match="no such backup"):
        await beside(work, companion)
    assert companion.cancelled


def test_the_daemon_never_imports_the_command_line() -> None:
    offenders = []
    for path in sorted(SERVICE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            offenders += [f"{path.name}: {n}" for n in names if n.startswith("vdistream.cli")]
    assert offenders == []
