"""``Command`` and ``CommandResult``: the records api.md ("Values") fixes."""

from __future__ import annotations

import dataclasses

import pytest

import vdistream
from vdistream.protocol import Command, CommandCode, CommandResult, Completion


def test_command_fields_and_defaults() -> None:
    command = Command(CommandCode.FLUSH)
    assert command.code is CommandCode.FLUSH
    assert command.size == 0
    assert command.position == 0
    assert command.buffer is None
    assert command.prefix is None


def test_command_carries_its_buffer_and_prefix() -> None:
    area = bytearray(96)
    prefix, data = memoryview(area)[:32], memoryview(area)[32:]
    command = Command(CommandCode.READ, size=64, position=4096, buffer=data, prefix=prefix)
    assert (command.code, command.size, command.position) == (CommandCode.READ, 64, 4096)
    assert command.buffer is data
    assert command.prefix is prefix


def test_command_size_carries_signed_counts_and_whence() -> None:
    # spec §3.1: size is a signed count for SKIP_*, the whence for SET_POSITION
    assert Command(CommandCode.SKIP_MARKS, size=-2).size == -2
    assert Command(CommandCode.SET_POSITION, size=2, position=10).size == 2


@pytest.mark.parametrize("field", ["code", "size", "position", "buffer", "prefix"])
def test_command_is_read_only(field: str) -> None:
    command = Command(CommandCode.WRITE, size=512)
    with pytest.raises(dataclasses.FrozenInstanceError):
        setattr(command, field, None)


def test_command_result_fields_and_defaults() -> None:
    result = CommandResult(Completion.HANDLE_EOF)
    assert result.completion == 38
    assert result.bytes_transferred == 0
    assert result.position == 0
    full = CommandResult(completion=0, bytes_transferred=65536, position=131072)
    assert (full.completion, full.bytes_transferred, full.position) == (0, 65536, 131072)


def test_command_result_accepts_any_int_completion() -> None:
    # api.md: "Methods that take a completion code accept any int"
    assert CommandResult(87).completion == 87


def test_command_result_is_read_only() -> None:
    result = CommandResult(0)
    with pytest.raises(dataclasses.FrozenInstanceError):
        result.completion = 995  # type: ignore[misc]


def test_importable_from_the_top_level_package() -> None:
    assert vdistream.Command is Command
    assert vdistream.CommandResult is CommandResult
