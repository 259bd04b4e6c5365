"""Requests as the API reads them, backup ids, and how a client's URL meets the
settings' (no daemon needed)."""

from __future__ import annotations

import re
from datetime import UTC, datetime
from typing import Any

import pytest

from vdistream.service.backups import group_of
from vdistream.service.jobs import (
    InvalidRequestError,
    JobRequest,
    new_backup_id,
)
from vdistream.service.manager import _same_url
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
