"""The error tree of ``vdistream.errors`` against api.md ("Errors") and spec §4.1."""

from __future__ import annotations

import errno

import pytest

import vdistream
from vdistream.errors import (
    ConfigError,
    JobAbortedError,
    JobError,
    StorageError,
    StorageExistsError,
    StorageFullError,
    StorageIntegrityError,
    StorageNotFoundError,
    StorageURLError,
    VDAbortError,
    VDBusyError,
    VDClosedError,
    VDIError,
    VDInstanceNameError,
    VDInvalidError,
    VdistreamError,
    VDMemoryError,
    VDNotOpenError,
    VDNotSupportedError,
    VDOpenError,
    VDProtocolError,
    VDSecurityError,
    VDTimeoutError,
    VDUnexpectedError,
    translate_os_error,
)
from vdistream.protocol import ClientState, HResult, ServerState

#: api.md "Errors": class -> unsigned hresult; spec §4.1: the signed (Linux) column.
VDI_ERRORS: list[tuple[type[VDIError], int, int]] = [
    (VDNotOpenError, 0x80770002, -2139684862),
    (VDTimeoutError, 0x80770003, -2139684861),
    (VDAbortError, 0x80770004, -2139684860),
    (VDSecurityError, 0x80770005, -2139684859),
    (VDInvalidError, 0x80770006, -2139684858),
    (VDInstanceNameError, 0x80770007, -2139684857),
    (VDNotSupportedError, 0x80770009, -2139684855),
    (VDMemoryError, 0x8077000A, -2139684854),
    (VDUnexpectedError, 0x8077000B, -2139684853),
    (VDProtocolError, 0x8077000C, -2139684852),
    (VDOpenError, 0x8077000D, -2139684851),
    (VDClosedError, 0x8077000E, -2139684850),
    (VDBusyError, 0x8077000F, -2139684849),
]
PARAMS = [pytest.param(cls, u, s, id=cls.__name__) for cls, u, s in VDI_ERRORS]


# --- the tree ---------------------------------------------------------------------------


def test_base_is_an_exception() -> None:
    assert issubclass(VdistreamError, Exception)
    assert issubclass(VDIError, VdistreamError)


@pytest.mark.parametrize(("cls", "unsigned", "signed"), PARAMS)
def test_vdi_errors_are_direct_children_of_vdierror(
    cls: type[VDIError], unsigned: int, signed: int
) -> None:
    assert cls.__bases__ == (VDIError,)
    assert issubclass(cls, VdistreamError)


def test_vdi_error_classes_are_distinct() -> None:
    classes = [cls for cls, _, _ in VDI_ERRORS]
    for a in classes:
        for b in classes:
            assert issubclass(a, b) is (a is b)


@pytest.mark.parametrize(
    ("cls", "parent"),
    [
        (StorageError, VdistreamError),
        (StorageURLError, StorageError),
        (StorageNotFoundError, StorageError),
        (StorageExistsError, StorageError),
        (StorageFullError, StorageError),
        (StorageIntegrityError, StorageError),
        (ConfigError, VdistreamError),
        (JobError, VdistreamError),
        (JobAbortedError, JobError),
    ],
)
def test_the_rest_of_the_tree(cls: type[Exception], parent: type[Exception]) -> None:
    assert cls.__bases__ == (parent,)
    assert issubclass(cls, VdistreamError)
    assert not issubclass(cls, VDIError)


@pytest.mark.parametrize(("cls", "unsigned", "signed"), PARAMS)
def test_vdi_errors_are_importable_from_the_top_level_package(
    cls: type[VDIError], unsigned: int, signed: int
) -> None:
    assert getattr(vdistream, cls.__name__) is cls


def test_base_classes_are_importable_from_the_top_level_package() -> None:
    assert vdistream.VDIError is VDIError
    assert vdistream.VdistreamError is VdistreamError
    assert vdistream.StorageError is StorageError
    assert vdistream.ConfigError is ConfigError
    assert vdistream.JobError is JobError
    assert vdistream.JobAbortedError is JobAbortedError


# --- hresults ---------------------------------------------------------------------------


@pytest.mark.parametrize(("cls", "unsigned", "signed"), PARAMS)
def test_hresult_of_each_class(cls: type[VDIError], unsigned: int, signed: int) -> None:
    error = cls()
    assert error.hresult == unsigned
    assert cls("with a message").hresult == unsigned
    assert HResult(error.hresult) == unsigned


def test_busy_is_queue_full() -> None:
    assert VDBusyError().hresult == HResult.QUEUE_FULL


@pytest.mark.parametrize(("cls", "unsigned", "signed"), PARAMS)
def test_from_hresult_unsigned(cls: type[VDIError], unsigned: int, signed: int) -> None:
    error = VDIError.from_hresult(unsigned)
    assert type(error) is cls
    assert error.hresult == unsigned


@pytest.mark.parametrize(("cls", "unsigned", "signed"), PARAMS)
def test_from_hresult_signed(cls: type[VDIError], unsigned: int, signed: int) -> None:
    error = VDIError.from_hresult(signed)
    assert type(error) is cls
    # api.md: .hresult is "the unsigned 0x8077xxxx value"
    assert error.hresult == unsigned


@pytest.mark.parametrize(("cls", "unsigned", "signed"), PARAMS)
def test_from_hresult_of_the_enum(cls: type[VDIError], unsigned: int, signed: int) -> None:
    error = VDIError.from_hresult(HResult(unsigned))
    assert type(error) is cls


def test_abort_from_the_signed_linux_value() -> None:
    error = VDIError.from_hresult(-2139684860)
    assert isinstance(error, VDAbortError)
    assert error.hresult == 0x80770004


def test_queue_full_from_hresult_is_busy() -> None:
    assert type(VDIError.from_hresult(HResult.QUEUE_FULL)) is VDBusyError


@pytest.mark.parametrize(
    ("value", "unsigned"),
    [
        (0x80770008, 0x80770008),  # code 8: "not defined anywhere" (§4.1)
        (-2139684856, 0x80770008),
        (0x80770001, 0x80770001),
        (0x80770010, 0x80770010),
        (0x80070005, 0x80070005),  # E_ACCESSDENIED, seen from CreateEx (§4.1)
        (-2147024891, 0x80070005),
    ],
)
def test_from_hresult_of_an_unknown_value(value: int, unsigned: int) -> None:
    error = VDIError.from_hresult(value)
    assert type(error) is VDIError
    assert error.hresult == unsigned


def test_from_hresult_keeps_the_message() -> None:
    error = VDIError.from_hresult(0x8077000C, "open_device called twice")
    assert type(error) is VDProtocolError
    assert "open_device called twice" in str(error)


# --- messages ---------------------------------------------------------------------------


def _normal(text: str) -> str:
    return text.lower().replace("_", " ")


def test_message_names_set_device_and_state() -> None:
    error = VDAbortError(
        "get_command failed",
        set_name="nightly-db",
        device="nightly-db7",
        state=ClientState.NORMALLY_TERMINATED,
    )
    text = str(error)
    assert "get_command failed" in text
    assert "nightly-db" in text
    assert "nightly-db7" in text
    assert "normally terminated" in _normal(text)


def test_message_names_a_server_state() -> None:
    error = VDProtocolError(set_name="s1", device="dev-x", state=ServerState.CONNECTED)
    text = str(error)
    assert "s1" in text
    assert "dev-x" in text
    assert "connected" in text.lower()


def test_from_hresult_message_names_set_device_and_state() -> None:
    error = VDIError.from_hresult(
        -2139684850,
        "device closed",
        set_name="weekly",
        device="weekly3",
        state=ClientState.ACTIVE,
    )
    assert type(error) is VDClosedError
    text = str(error)
    assert "device closed" in text
    assert "weekly" in text
    assert "weekly3" in text
    assert "active" in text.lower()


def test_message_without_context_does_not_invent_any() -> None:
    text = str(VDTimeoutError("waited 5 s"))
    assert "waited 5 s" in text
    assert "None" not in text


def test_message_with_only_a_set() -> None:
    text = str(VDOpenError("close with open devices", set_name="only-set"))
    assert "only-set" in text
    assert "device" not in text.replace("devices", "")
    assert "None" not in text


def test_vdi_error_is_raisable_and_catchable_as_the_base() -> None:
    with pytest.raises(VdistreamError) as info:
        raise VDIError.from_hresult(0x80770004, set_name="x")
    assert isinstance(info.value, VDAbortError)
    assert info.value.hresult == 0x80770004


# --- translate_os_error -------------------------------------------------------------------

URL = "file:///var/backups/db-full.bak"


@pytest.mark.parametrize(
    ("code", "cls"),
    [
        (errno.ENOSPC, StorageFullError),
        (errno.EFBIG, StorageFullError),
        (errno.EDQUOT, StorageFullError),  # errors.py docstring: "(ENOSPC, EFBIG, quota)"
        (errno.ENOENT, StorageNotFoundError),
        (errno.EEXIST, StorageExistsError),
        (errno.EACCES, StorageError),
        (errno.EPERM, StorageError),
        (errno.EIO, StorageError),
        (errno.EISDIR, StorageError),
    ],
)
def test_translate_os_error(code: int, cls: type[StorageError]) -> None:
    original = OSError(code, "the system's own words")
    with pytest.raises(StorageError) as info, translate_os_error("write", url=URL):
        raise original
    error = info.value
    assert type(error) is cls
    assert error.url == URL
    assert URL in str(error)
    assert "write" in str(error)
    assert "the system's own words" in str(error)
    assert error.__cause__ is original


def test_translate_os_error_of_a_builtin_subclass() -> None:
    original = FileNotFoundError(errno.ENOENT, "No such file or directory")
    with pytest.raises(StorageNotFoundError) as info, translate_os_error("open", url=URL):
        raise original
    assert info.value.__cause__ is original
    assert URL in str(info.value)


def test_translate_os_error_without_errno() -> None:
    original = OSError("something odd")
    with pytest.raises(StorageError) as info, translate_os_error("commit", url=URL):
        raise original
    assert type(info.value) is StorageError
    assert info.value.__cause__ is original
    assert URL in str(info.value)


def test_translate_os_error_names_the_device() -> None:
    with (
        pytest.raises(StorageFullError) as info,
        translate_os_error("write", url=URL, device="db-full2"),
    ):
        raise OSError(errno.ENOSPC, "No space left on device")
    assert info.value.device == "db-full2"
    assert "db-full2" in str(info.value)
    assert URL in str(info.value)


def test_translate_os_error_lets_success_through() -> None:
    done = []
    with translate_os_error("write", url=URL):
        done.append(1)
    assert done == [1]


def test_translate_os_error_leaves_other_exceptions_alone() -> None:
    original = ValueError("not an OS error")
    with pytest.raises(ValueError) as info, translate_os_error("write", url=URL):
        raise original
    assert info.value is original
