"""The daemon: settings, schedules, retention, persistent job state, the job manager,
the control API, and ``Service``, which runs them inside the caller's event loop.

This module only re-exports; importing it configures nothing (no logging, no signal
handlers, no global metrics, no files opened). ``Service`` is imported on first use
(PEP 562 ``__getattr__``), so that the command line does not load aiohttp and
prometheus_client for commands that do not need them.

* ``Service``: ``async with Service(settings) as service:`` (``daemon`` module).

* ``settings``: ``load_settings(path, env)`` -> frozen ``Settings`` (TOML file +
  ``VDISTREAM_*`` overrides; errors name the key, the file and the line).
* ``schedule``: 5-field cron (``CronExpr``, ``next_fire``) and the ``Scheduler``.
* ``retention``: ``plan_retention(backups, policy, now)``, a pure function.
* ``state``: ``JobStore``, job records and last-verified backups in SQLite.
"""

import typing as _typing

from vdistream.service.retention import BackupInfo as BackupInfo
from vdistream.service.retention import Reason as Reason
from vdistream.service.retention import RetentionPlan as RetentionPlan
from vdistream.service.retention import RetentionPolicy as RetentionPolicy
from vdistream.service.retention import plan_retention as plan_retention
from vdistream.service.schedule import CronError as CronError
from vdistream.service.schedule import CronExpr as CronExpr
from vdistream.service.schedule import ScheduleCallback as ScheduleCallback
from vdistream.service.schedule import Scheduler as Scheduler
from vdistream.service.schedule import local_timezone as local_timezone
from vdistream.service.schedule import next_fire as next_fire
from vdistream.service.schedule import resolve_timezone as resolve_timezone
from vdistream.service.settings import DEFAULT_SETTINGS_PATH as DEFAULT_SETTINGS_PATH
from vdistream.service.settings import TOKEN_ENV as TOKEN_ENV
from vdistream.service.settings import DatabaseSettings as DatabaseSettings
from vdistream.service.settings import DestinationSettings as DestinationSettings
from vdistream.service.settings import Secret as Secret
from vdistream.service.settings import ServiceSettings as ServiceSettings
from vdistream.service.settings import Settings as Settings
from vdistream.service.settings import SettingsError as SettingsError
from vdistream.service.settings import load_settings as load_settings
from vdistream.service.settings import parse_duration as parse_duration
from vdistream.service.settings import settings_summary as settings_summary
from vdistream.service.state import INTERRUPTED_QUEUED_REASON as INTERRUPTED_QUEUED_REASON
from vdistream.service.state import INTERRUPTED_REASON as INTERRUPTED_REASON
from vdistream.service.state import SCHEMA_VERSION as SCHEMA_VERSION
from vdistream.service.state import JobNotFoundError as JobNotFoundError
from vdistream.service.state import JobRecord as JobRecord
from vdistream.service.state import JobState as JobState
from vdistream.service.state import JobStore as JobStore
from vdistream.service.state import JobType as JobType
from vdistream.service.state import StateError as StateError
from vdistream.service.state import VerifiedBackup as VerifiedBackup
from vdistream.service.state import new_job_id as new_job_id

if _typing.TYPE_CHECKING:
    from vdistream.service.daemon import Service as Service

__all__ = (
    "DEFAULT_SETTINGS_PATH",
    "INTERRUPTED_QUEUED_REASON",
    "INTERRUPTED_REASON",
    "SCHEMA_VERSION",
    "TOKEN_ENV",
    "BackupInfo",
    "CronError",
    "CronExpr",
    "DatabaseSettings",
    "DestinationSettings",
    "JobNotFoundError",
    "JobRecord",
    "JobState",
    "JobStore",
    "JobType",
    "Reason",
    "RetentionPlan",
    "RetentionPolicy",
    "ScheduleCallback",
    "Scheduler",
    "Secret",
    "Service",
    "ServiceSettings",
    "Settings",
    "SettingsError",
    "StateError",
    "VerifiedBackup",
    "load_settings",
    "local_timezone",
    "new_job_id",
    "next_fire",
    "parse_duration",
    "plan_retention",
    "resolve_timezone",
    "settings_summary",
)


def __getattr__(name: str) -> _typing.Any:
    if name == "Service":
        from vdistream.service.daemon import Service

        globals()["Service"] = Service
        return Service
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
