"""Requests as the API reads them, backup ids, how a client's URL meets the settings',
and which failures are refusals (no daemon needed)."""

from __future__ import annotations

import re
from datetime import UTC, datetime
from typing import Any

import pytest

from vdistream.engines import TargetExistsError
from vdistream.errors import JobError, KeyMissingError, StorageError, WrongKeyError
from vdistream.service.admission import _same_url
from vdistream.service.api import MAX_DEPTH, _json_depth, _parse_json
from vdistream.service.backups import group_of
from vdistream.service.jobs import (
    InvalidRequestError,
    JobRequest,
    ServiceError,
    new_backup_id,
)
from vdistream.service.runners import refusal
from vdistream.service.state import JobType


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ("backup", "must be a JSON object, not a string"),
        ({}, "'kind' must be one of backup, restore, verify"),
        ({"kind": "backup"}, "a backup needs 'database'"),
        ({"kind": "verify"}, "a verify needs 'database'"),
        ({"kind": "restore", "database": "app"}, "a restore needs a 'target'"),
        ({"kind": "backup", "database": "app", "target": "/x"}, "unknown field 'target'"),
        ({"kind": "verify", "database": "app", "content": "no"}, "'content' must be true or"),
        ({"kind": "backup", "database": 7}, "'database' must be a string, not a number"),
        ({"kind": "backup", "database": "app", "backup_id": "../x"}, "is not a backup id"),
        ({"kind": "backup", "database": "app", "backup_id": "latest"}, "names an existing"),
        ({"kind": "backup", "database": "app", "backup_id": "db.1"}, "are named app...."),
        (
            {"kind": "verify", "database": "app", "backup_id": "db.1"},
            "belongs to database 'db', not to 'app'",
        ),
        (
            {"kind": "restore", "database": "app", "target": "/x", "backup_id": "db.1"},
            "belongs to database 'db', not to 'app'",
        ),
    ],
)
def test_refused_requests_name_the_field(body: Any, message: str) -> None:
    with pytest.raises(InvalidRequestError, match=re.escape(message)):
        JobRequest.from_json(body)


def test_accepted_requests_and_their_stored_params() -> None:
    backup = JobRequest.from_json({"kind": "backup", "database": "app", "verify": None})
    assert backup == JobRequest(JobType.BACKUP, "app")
    assert backup.params() == {"trigger": "api"}
    restore = JobRequest.from_json(
        {"kind": "restore", "database": "app", "target": "/tmp/x.db", "overwrite": True}
    )
    assert restore.params() == {
        "trigger": "api",
        "target": "/tmp/x.db",
        "overwrite": True,
        "create": False,
    }
    by_source = JobRequest.from_json(
        {"kind": "backup", "source": "sqlite:///a.db", "destination": "local"}
    )
    assert by_source.database == ""
    assert by_source.source == "sqlite:///a.db"


def test_backup_ids_belong_to_their_database() -> None:
    backup_id = new_backup_id("app-2", datetime(2024, 1, 31, 23, 59, 59, tzinfo=UTC))
    assert re.fullmatch(r"app-2\.20240131T235959Z-[0-9a-f]{8}", backup_id)
    assert group_of(backup_id) == "app-2"
    assert group_of("20240131T235959Z-1234abcd") == ""  # made by `vdistream backup`


@pytest.mark.parametrize(
    ("configured", "given", "same"),
    [
        ("sqlite:///srv/app.db", "sqlite:///srv/app.db", True),
        ("sqlite:///srv/app.db", "sqlite:/srv/app.db", True),
        ("/var/backups", "file:///var/backups/", True),
        ("/var/backups", "/var/backups/other", False),
        ("cmd:pg_dumpall", "cmd:pg_dumpall", True),
        ("cmd:pg_dumpall", "cmd:pg_dump", False),
    ],
)
def test_client_urls_meet_configured_ones(configured: str, given: str, same: bool) -> None:
    assert _same_url(configured, given) is same


# --- JSON bodies as the API parses them -------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "depth"),
    [
        (b"{}", 1),
        (b'{"a": [1, {"b": []}]}', 4),
        (b'["[[[[", "{{{{"]', 1),  # brackets inside strings do not count
        (b'["\\"[[[[", "\\\\"]', 1),  # nor after an escaped quote
        (b'"[[[[', 0),  # an unterminated string ends the scan
        (b"[" * 1_000_000, MAX_DEPTH + 1),  # stops counting past the limit
        (b"]]]][", 0),  # unbalanced: json.loads refuses it
    ],
)
def test_json_depth_is_counted_without_recursion(raw: bytes, depth: int) -> None:
    assert _json_depth(raw) == depth


@pytest.mark.timeout(10)  # a bounded wait (a signal interrupts even a regex scan)
def test_json_depth_is_linear_on_unterminated_strings() -> None:
    """64 KiB of ``"\\"`` pairs: a scan that restarted at every quote would take
    minutes (quadratic); this one takes milliseconds."""
    assert _json_depth(b'["' + b'\\"' * 30_000) == 1
    assert _json_depth(b'"\\' * 30_000) == 0


@pytest.mark.parametrize(
    ("raw", "code", "message"),
    [
        (b"[" * 30_000 + b"]" * 30_000, "invalid_request", f"deeper than {MAX_DEPTH} levels"),
        (b'{"a":' * 10_000 + b"1" + b"}" * 10_000, "invalid_request", "deeper than"),
        (b"[" * (MAX_DEPTH + 1) + b"]" * (MAX_DEPTH + 1), "invalid_request", "deeper than"),
        (b"\xff{}", "malformed_json", "not UTF-8 text (byte 0"),
        (b"\xef\xbb\xbf{}", "malformed_json", "not valid JSON"),  # a BOM
        (b'{"kind": NaN}', "malformed_json", "NaN is not a JSON value"),
        (b"[Infinity]", "malformed_json", "Infinity is not a JSON value"),
        (b'{"a": 1, "a": 2}', "malformed_json", "the key 'a' appears twice"),
        (b"1" * 5_000, "malformed_json", "not valid JSON"),  # past int's digit limit
        (b'{"kind": "a\\u0000b"}', "invalid_request", "'kind' holds a NUL character"),
        (b'{"kind": ["\\ud800"]}', "invalid_request", "'kind' holds a NUL character or a"),
        (b'{"\\udfff": 1}', "invalid_request", "a field name holds"),
        (b'{"kind": "\xed\xa0\x80"}', "malformed_json", "not UTF-8"),  # an encoded surrogate
    ],
)
def test_bodies_are_refused_before_they_can_hurt(raw: bytes, code: str, message: str) -> None:
    with pytest.raises(ServiceError, match=re.escape(message)) as caught:
        _parse_json(raw)
    assert caught.value.code == code
    assert 400 <= caught.value.status < 500


def test_plain_json_parses() -> None:
    nested = b"[" * MAX_DEPTH + b"]" * MAX_DEPTH
    assert _parse_json(nested) is not None
    body = b'{"kind": "restore", "database": "app", "target": "/tmp/\xc3\xa9t\xc3\xa9.db"}'
    assert _parse_json(body) == {"kind": "restore", "database": "app", "target": "/tmp/été.db"}
    assert _parse_json(b'{"reason": "\\ud83d\\ude00"}') == {"reason": "\U0001f600"}


# --- refusals are not aborts ------------------------------------------------------------


def test_refusals_are_recognised_through_the_chain() -> None:
    exists = TargetExistsError("the restore target /x already exists")
    assert refusal(exists) == "target_exists"
    wrapped = JobError("restore failed")
    wrapped.__cause__ = exists
    assert refusal(wrapped) == "target_exists"
    assert refusal(WrongKeyError("wrong key")) == "wrong_key"
    assert refusal(KeyMissingError("no key")) == "key_missing"
    assert refusal(StorageError("disk full")) is None
    assert refusal(None) is None
