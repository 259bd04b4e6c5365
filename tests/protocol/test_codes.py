"""Every constant of the protocol against spec §10 (and §2.2, §3.3, §3.9, §4.1)."""

from __future__ import annotations

import enum

import pytest

import vdistream
from vdistream.protocol import (
    INFINITE_MS,
    CommandCode,
    Completion,
    Features,
    HResult,
    Whence,
)

# --- feature bits (spec §2.2, §10 "Feature bits") -------------------------------------

FEATURES = {
    "REMOVABLE": 0x1,
    "REWIND": 0x2,
    "POSITION": 0x10,
    "SKIP_BLOCKS": 0x20,
    "REVERSE_POSITION": 0x40,
    "DISCARD": 0x80,
    "FILE_MARKS": 0x100,
    "RANDOM_ACCESS": 0x200,
    "SNAPSHOT_PREPARE": 0x400,
    "ENUM_FROZEN_FILES": 0x800,
    "VSS_WRITER": 0x1000,
    "REQUEST_COMPLETE": 0x2000,
    "WRITE_MEDIA": 0x10000,
    "READ_MEDIA": 0x20000,
    "COMPLETE_ENABLED": 0x40000,
    "LATCH_STATS": 0x80000000,
    "LIKE_PIPE": 0,
    "LIKE_TAPE": 0x173,
    "LIKE_DISK": 0x200,
}


def test_features_is_an_int_flag() -> None:
    assert issubclass(Features, enum.IntFlag)


@pytest.mark.parametrize(("name", "value"), FEATURES.items())
def test_feature_value(name: str, value: int) -> None:
    assert int(getattr(Features, name)) == value


def test_features_have_no_other_names() -> None:
    assert set(Features.__members__) == set(FEATURES)


def test_like_tape_is_the_tape_bits() -> None:
    # spec §2.2: 0x173 = FileMarks|Removable|ReversePosition|Rewind|Position|SkipBlocks
    assert Features.LIKE_TAPE == (
        Features.FILE_MARKS
        | Features.REMOVABLE
        | Features.REVERSE_POSITION
        | Features.REWIND
        | Features.POSITION
        | Features.SKIP_BLOCKS
    )


def test_like_disk_is_random_access_and_like_pipe_is_nothing() -> None:
    assert int(Features.LIKE_DISK) == int(Features.RANDOM_ACCESS)
    assert int(Features.LIKE_PIPE) == 0
    assert not Features.LIKE_PIPE


def test_unassigned_feature_values_are_not_named() -> None:
    # spec §2.2: "Unassigned values: 0x4, 0x8, 0x4000, 0x8000 and 0x80000-0x40000000"
    named = {int(v) for v in Features.__members__.values()}
    unassigned = [0x4, 0x8, 0x4000, 0x8000] + [1 << b for b in range(19, 31)]
    assert named.isdisjoint(unassigned)


# --- commands (spec §3.3, §10 "Commands") ------------------------------------------

COMMANDS = {
    "READ": 1,
    "WRITE": 2,
    "CLEAR_ERROR": 3,
    "REWIND": 4,
    "WRITE_MARK": 5,
    "SKIP_MARKS": 6,
    "SKIP_BLOCKS": 7,
    "LOAD": 8,
    "GET_POSITION": 9,
    "SET_POSITION": 10,
    "DISCARD": 11,
    "FLUSH": 12,
    "SNAPSHOT": 13,
    "MOUNT_SNAPSHOT": 14,
    "PREPARE_TO_FREEZE": 15,
    "FILE_INFO_BEGIN": 16,
    "FILE_INFO_END": 17,
    "GET_ERROR": 18,
    "COMPLETE": 19,
}


def test_command_code_is_an_int_enum() -> None:
    assert issubclass(CommandCode, enum.IntEnum)


@pytest.mark.parametrize(("name", "value"), COMMANDS.items())
def test_command_code_value(name: str, value: int) -> None:
    code = CommandCode[name]
    assert code == value
    assert CommandCode(value) is code


def test_command_codes_are_exactly_1_to_19() -> None:
    assert {c.name: c.value for c in CommandCode} == COMMANDS
    assert sorted(c.value for c in CommandCode) == list(range(1, 20))
    with pytest.raises(ValueError):
        CommandCode(0)
    with pytest.raises(ValueError):
        CommandCode(20)


# --- completion codes (spec §3.9, §10 "Win32 completion codes"; api.md Completion) ----

COMPLETIONS = {
    "SUCCESS": 0,
    "INVALID_HANDLE": 6,
    "HANDLE_EOF": 38,
    "HANDLE_DISK_FULL": 39,
    "NOT_SUPPORTED": 50,
    "DISK_FULL": 112,
    "OPERATION_ABORTED": 995,
    "END_OF_MEDIA": 1100,
    "FILEMARK_DETECTED": 1101,
    "NO_DATA_DETECTED": 1104,
    "IO_DEVICE": 1117,
    "EOM_OVERFLOW": 1129,
    "NO_SYSTEM_RESOURCES": 1450,
}


def test_completion_is_an_int_enum() -> None:
    assert issubclass(Completion, enum.IntEnum)


@pytest.mark.parametrize(("name", "value"), COMPLETIONS.items())
def test_completion_value(name: str, value: int) -> None:
    assert Completion[name] == value
    assert Completion(value) is Completion[name]


def test_completions_are_exactly_the_api_list() -> None:
    assert {c.name: c.value for c in Completion} == COMPLETIONS


# --- whence (spec §3.3 "VDWhence") ------------------------------------------------------


def test_whence() -> None:
    assert issubclass(Whence, enum.IntEnum)
    assert {w.name: w.value for w in Whence} == {"BEGINNING": 0, "CURRENT": 1, "END": 2}


# --- HRESULTs (spec §4.1, §10 "HRESULTs") -----------------------------------------------

#: name -> (code, unsigned, signed) transcribed from the §4.1 table.
HRESULTS = {
    "NOTOPEN": (2, 2155282434, -2139684862),
    "TIMEOUT": (3, 2155282435, -2139684861),
    "ABORT": (4, 2155282436, -2139684860),
    "SECURITY": (5, 2155282437, -2139684859),
    "INVALID": (6, 2155282438, -2139684858),
    "INSTANCE_NAME": (7, 2155282439, -2139684857),
    "NOTSUPPORTED": (9, 2155282441, -2139684855),
    "MEMORY": (10, 2155282442, -2139684854),
    "UNEXPECTED": (11, 2155282443, -2139684853),
    "PROTOCOL": (12, 2155282444, -2139684852),
    "OPEN": (13, 2155282445, -2139684851),
    "CLOSE": (14, 2155282446, -2139684850),
    "BUSY": (15, 2155282447, -2139684849),
}

#: §10's hex listing.
HRESULT_HEX = {
    "NOERROR": 0,
    "NOTOPEN": 0x80770002,
    "TIMEOUT": 0x80770003,
    "ABORT": 0x80770004,
    "SECURITY": 0x80770005,
    "INVALID": 0x80770006,
    "INSTANCE_NAME": 0x80770007,
    "NOTSUPPORTED": 0x80770009,
    "MEMORY": 0x8077000A,
    "UNEXPECTED": 0x8077000B,
    "PROTOCOL": 0x8077000C,
    "OPEN": 0x8077000D,
    "CLOSE": 0x8077000E,
    "BUSY": 0x8077000F,
    "QUEUE_FULL": 0x8077000F,
}


def test_hresult_is_an_int_enum() -> None:
    assert issubclass(HResult, enum.IntEnum)


@pytest.mark.parametrize(("name", "value"), HRESULT_HEX.items())
def test_hresult_hex_value(name: str, value: int) -> None:
    assert HResult[name] == value


@pytest.mark.parametrize(("name", "columns"), HRESULTS.items())
def test_hresult_columns_of_4_1(name: str, columns: tuple[int, int, int]) -> None:
    code, unsigned, signed = columns
    value = HResult[name]
    # VD_ERROR(code) = MAKE_HRESULT(SEVERITY_ERROR=1, facility 0x77, code)
    assert value == (1 << 31) | (0x77 << 16) | code
    assert value == unsigned
    # the Linux signed int has the same bits
    assert value - (1 << 32) == signed
    assert signed & 0xFFFFFFFF == value


def test_hresult_names_are_exactly_the_spec_list() -> None:
    assert {name: int(m) for name, m in HResult.__members__.items()} == HRESULT_HEX


def test_queue_full_is_busy() -> None:
    assert HResult["QUEUE_FULL"] is HResult["BUSY"]
    assert int(HResult.QUEUE_FULL) == 0x8077000F


def test_noerror_is_zero() -> None:
    assert int(HResult.NOERROR) == 0
    assert HResult(0) is HResult.NOERROR


def test_code_8_is_unused() -> None:
    with pytest.raises(ValueError):
        HResult(0x80770008)


def test_infinite() -> None:
    assert INFINITE_MS == 0xFFFFFFFF


def test_values_are_importable_from_the_top_level_package() -> None:
    # api.md: "Everything here is importable from the top-level package"
    assert vdistream.Features is Features
    assert vdistream.CommandCode is CommandCode
    assert vdistream.Completion is Completion
    assert vdistream.Whence is Whence
    assert vdistream.HResult is HResult
