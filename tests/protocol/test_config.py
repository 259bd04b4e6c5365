"""``VDConfig``: the 44-byte layout of spec §2.1 and the limits of §2.1, §2.2 and §10."""

from __future__ import annotations

import dataclasses
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

import vdistream
from vdistream.protocol import Features, VDConfig

U32_MAX = 0xFFFFFFFF

#: spec §2.1, offset -> field (api.md names, struct order).
OFFSETS = {
    0: "device_count",
    4: "features",
    8: "prefix_zone_size",
    12: "alignment",
    16: "soft_file_mark_block_size",
    20: "eom_warning_size",
    24: "server_timeout_ms",
    28: "block_size",
    32: "max_io_depth",
    36: "max_transfer_size",
    40: "buffer_area_size",
}
FIELDS = list(OFFSETS.values())


# --- layout ---------------------------------------------------------------------------


def test_fields_in_struct_order() -> None:
    assert [f.name for f in dataclasses.fields(VDConfig)] == FIELDS


def test_defaults() -> None:
    config = VDConfig()
    assert dataclasses.astuple(config) == (1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0)
    assert config.device_count == 1
    assert all(getattr(config, name) == 0 for name in FIELDS[1:])


def test_default_packs_to_44_bytes() -> None:
    assert VDConfig().pack() == b"\x01\x00\x00\x00" + bytes(40)


def test_is_frozen() -> None:
    config = VDConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.device_count = 2  # type: ignore[misc]


def test_pack_is_little_endian_in_field_order() -> None:
    config = VDConfig(*range(1, 12))
    expected = b"".join(i.to_bytes(4, "little") for i in range(1, 12))
    assert config.pack() == expected
    assert len(expected) == 44


def test_pack_of_a_wide_value() -> None:
    config = VDConfig(device_count=0x01020304, buffer_area_size=0xA1B2C3D4)
    data = config.pack()
    assert data[0:4] == b"\x04\x03\x02\x01"
    assert data[40:44] == b"\xd4\xc3\xb2\xa1"
    assert data[4:40] == bytes(36)


@pytest.mark.parametrize(("offset", "name"), OFFSETS.items())
def test_unpack_reads_each_field_at_its_offset(offset: int, name: str) -> None:
    data = bytearray(44)
    data[offset : offset + 4] = (0xDEADBEEF).to_bytes(4, "little")
    config = VDConfig.unpack(bytes(data))
    assert getattr(config, name) == 0xDEADBEEF
    assert all(getattr(config, other) == 0 for other in FIELDS if other != name)


@pytest.mark.parametrize(("offset", "name"), OFFSETS.items())
def test_pack_writes_each_field_at_its_offset(offset: int, name: str) -> None:
    zeros = dict.fromkeys(FIELDS, 0)
    data = VDConfig(**{**zeros, name: 0xCAFEF00D}).pack()
    assert data[offset : offset + 4] == (0xCAFEF00D).to_bytes(4, "little")
    assert data[:offset] + data[offset + 4 :] == bytes(40)


u32 = st.integers(min_value=0, max_value=U32_MAX)


@given(st.tuples(*([u32] * 11)))
def test_round_trip(values: tuple[int, ...]) -> None:
    config = VDConfig(*values)
    data = config.pack()
    assert len(data) == 44
    assert data == struct.pack("<11I", *values)
    back = VDConfig.unpack(data)
    assert back == config
    assert dataclasses.astuple(back) == values


@given(st.binary(min_size=44, max_size=44))
def test_unpack_then_pack_is_identity(data: bytes) -> None:
    assert VDConfig.unpack(data).pack() == data


@pytest.mark.parametrize("length", [0, 1, 40, 43, 45, 48, 88])
def test_unpack_of_the_wrong_length_raises(length: int) -> None:
    with pytest.raises(ValueError):
        VDConfig.unpack(bytes(length))


@pytest.mark.parametrize("name", FIELDS)
@pytest.mark.parametrize("value", [-1, U32_MAX + 1, 1 << 40])
def test_pack_of_a_non_u32_field_raises(name: str, value: int) -> None:
    config = VDConfig(**{name: value})
    # Ours, naming the field: not the struct.error Python raises by itself.
    with pytest.raises(ValueError, match=rf"\b{name}={value} is not an unsigned 32-bit"):
        config.pack()


@pytest.mark.parametrize("name", FIELDS)
@pytest.mark.parametrize("value", [-1, U32_MAX + 1])
def test_problems_name_a_non_u32_field(name: str, value: int) -> None:
    problems = VDConfig(**{name: value}).problems()
    assert problems
    assert any(name in p for p in problems)


def test_importable_from_the_top_level_package() -> None:
    assert vdistream.VDConfig is VDConfig


# --- limits -----------------------------------------------------------------------------


def test_default_config_is_valid() -> None:
    assert VDConfig().problems() == []
    assert VDConfig().client_problems() == []


def _check(config: VDConfig, field: str, ok: bool) -> None:
    problems = config.problems()
    if ok:
        assert problems == []
    else:
        assert len(problems) == 1, problems
        assert field in problems[0]


@pytest.mark.parametrize(
    ("value", "ok"),
    [(0, False), (1, True), (2, True), (32, True), (64, True), (65, False), (1000, False)],
)
def test_device_count(value: int, ok: bool) -> None:
    # spec §2.1: deviceCount 1..64
    _check(VDConfig(device_count=value), "device_count", ok)


@pytest.mark.parametrize(
    ("value", "ok"),
    [
        (0, True),  # not yet set by the server
        (256, False),
        (511, False),
        (512, True),
        (513, False),
        (1024, True),
        (4096, True),
        (65536, True),
        (131072, False),
        (3 * 512, False),
    ],
)
def test_block_size(value: int, ok: bool) -> None:
    # spec §2.1: power of 2, 512..65536
    _check(VDConfig(block_size=value), "block_size", ok)


@pytest.mark.parametrize(
    ("value", "ok"),
    [
        (0, True),  # not yet set by the server
        (65536, True),
        (2 * 65536, True),
        (1024 * 1024, True),
        (4 * 1024 * 1024, True),
        (4 * 1024 * 1024 + 65536, False),
        (100000, False),
        (32768, False),
        (65536 + 512, False),
    ],
)
def test_max_transfer_size(value: int, ok: bool) -> None:
    # spec §2.1: multiple of 64 KB, 65536..4194304
    _check(VDConfig(max_transfer_size=value), "max_transfer_size", ok)
    if ok:  # its neighbour, not a multiple of 64 KB, is refused: the field is checked
        _check(VDConfig(max_transfer_size=value + 512), "max_transfer_size", False)


@pytest.mark.parametrize(
    ("value", "ok"),
    [
        (0, True),  # no requirement
        (1, True),
        (3, False),
        (512, True),
        (4096, True),
        (6144, False),
        (65536, True),
        (131072, False),
    ],
)
def test_alignment(value: int, ok: bool) -> None:
    # spec §2.1 [inferred]: reject a non-power-of-two or > 64 KB alignment
    _check(VDConfig(alignment=value), "alignment", ok)


def test_every_problem_is_reported() -> None:
    config = VDConfig(device_count=0, block_size=513, max_transfer_size=100000, alignment=3)
    problems = config.problems()
    assert len(problems) == 4
    for field in ("device_count", "block_size", "max_transfer_size", "alignment"):
        assert sum(field in p for p in problems) >= 1, field


# --- feature combinations (spec §2.2 "Supported combinations") ---------------------------

F = Features
MODES = [
    # pipe-like: features 0; optional Removable (and Discard)
    F.LIKE_PIPE,
    F.REMOVABLE,
    F.DISCARD,
    F.REMOVABLE | F.DISCARD,
    # tape-like: LikeTape (optional Discard)
    F.LIKE_TAPE,
    F.LIKE_TAPE | F.DISCARD,
    # disk-like: LikeDisk; optional Removable (and Discard)
    F.LIKE_DISK,
    F.LIKE_DISK | F.REMOVABLE,
    F.LIKE_DISK | F.DISCARD,
    F.LIKE_DISK | F.REMOVABLE | F.DISCARD,
]
ADDONS = [
    F.LIKE_PIPE,
    F.SNAPSHOT_PREPARE,
    F.REQUEST_COMPLETE,
    F.SNAPSHOT_PREPARE | F.REQUEST_COMPLETE,
]
SUPPORTED = [pytest.param(int(m | a), id=f"0x{int(m | a):x}") for m in MODES for a in ADDONS]


@pytest.mark.parametrize("features", SUPPORTED)
def test_supported_combination_is_accepted(features: int) -> None:
    config = VDConfig(features=features)
    assert config.problems() == []
    assert config.client_problems() == []
    # Its neighbour with an unassigned bit is refused: the combination is checked.
    neighbour = VDConfig(features=features | 0x4)
    for problems in (neighbour.problems(), neighbour.client_problems()):
        assert len(problems) == 1, problems
        assert "features 0x" in problems[0]


@pytest.mark.parametrize("features", SUPPORTED)
@pytest.mark.parametrize(
    "granted",
    [F.WRITE_MEDIA, F.READ_MEDIA, F.WRITE_MEDIA | F.READ_MEDIA, F.WRITE_MEDIA | F.COMPLETE_ENABLED],
)
def test_server_bits_are_fine_in_a_final_configuration(features: int, granted: int) -> None:
    # spec §2.1: on return from GetConfiguration the server has ORed in WriteMedia /
    # ReadMedia (and CompleteEnabled); only a client may not offer them.
    config = VDConfig(features=features | granted)
    assert config.problems() == []
    problems = config.client_problems()
    assert len(problems) == 1, problems
    assert "features" in problems[0]


UNSUPPORTED = [
    F.RANDOM_ACCESS | F.FILE_MARKS,
    F.POSITION,
    F.REWIND,
    F.SKIP_BLOCKS,
    F.FILE_MARKS,
    F.REVERSE_POSITION,
    F.LIKE_TAPE & ~F.POSITION,  # tape without one of its bits
    F.LIKE_TAPE & ~F.REMOVABLE,
    F.LIKE_TAPE | F.RANDOM_ACCESS,
    F.LIKE_DISK | F.POSITION,
    F.LIKE_DISK | F.FILE_MARKS,
    F.REMOVABLE | F.REWIND,
    F.ENUM_FROZEN_FILES,  # 0x800, undocumented
    F.VSS_WRITER,  # 0x1000, undocumented
    F.LATCH_STATS,  # 0x80000000, undocumented
    F.LIKE_DISK | F.ENUM_FROZEN_FILES,
    F.LIKE_TAPE | F.VSS_WRITER,
    F.REMOVABLE | F.LATCH_STATS,
    0x4,  # unassigned
    0x8,
    0x4000,
    0x8000,
    0x80000,
    0x40000000,
    F.LIKE_DISK | 0x8000,
]


@pytest.mark.parametrize(
    "features", [pytest.param(int(f), id=f"0x{int(f):x}") for f in UNSUPPORTED]
)
@pytest.mark.parametrize("method", ["problems", "client_problems"])
def test_unsupported_combination_is_rejected(features: int, method: str) -> None:
    problems: list[str] = getattr(VDConfig(features=features), method)()
    assert len(problems) == 1, problems
    assert "features" in problems[0]


@pytest.mark.parametrize(
    "bit",
    [
        pytest.param(F.WRITE_MEDIA, id="WRITE_MEDIA"),
        pytest.param(F.READ_MEDIA, id="READ_MEDIA"),
        pytest.param(F.COMPLETE_ENABLED, id="COMPLETE_ENABLED"),
    ],
)
@pytest.mark.parametrize("mode", [F.LIKE_PIPE, F.LIKE_TAPE, F.LIKE_DISK])
def test_client_may_not_offer_server_bits(bit: int, mode: int) -> None:
    config = VDConfig(features=mode | bit)
    assert config.problems() == []
    problems = config.client_problems()
    assert len(problems) == 1, problems
    assert "features" in problems[0]


def test_client_problems_include_problems() -> None:
    config = VDConfig(device_count=65, features=F.WRITE_MEDIA)
    base = config.problems()
    assert len(base) == 1
    assert "device_count" in base[0]
    problems = config.client_problems()
    assert base[0] in problems
    assert len(problems) == 2
    assert any("device_count" in p for p in problems)
    assert any("features" in p for p in problems)
