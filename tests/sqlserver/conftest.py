"""SQL Server tests run against the stand-in (``standin``): its fixtures are shared here."""

from tests.sqlserver.standin_fixtures import *  # noqa: F403
