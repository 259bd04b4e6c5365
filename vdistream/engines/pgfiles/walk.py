"""What a files-mode backup copies from a data directory: ``walk(...)`` lists it.

A pure function of the file system (no server, no devices): it lists the data
directory and its tablespaces as ``Item``\\s, skipping what PostgreSQL's documentation
("Backing Up the Data Directory", continuous archiving) and ``basebackup.c`` skip:

* the *contents* of ``pg_wal`` (its directory and ``pg_wal/archive_status`` are kept;
  the backup adds the WAL it needs itself), ``pg_replslot``, ``pg_dynshmem``,
  ``pg_notify``, ``pg_serial``, ``pg_snapshots``, ``pg_stat_tmp`` and ``pg_subtrans``
  (the directories themselves are kept, with their modes);
* the files ``postmaster.pid``, ``postmaster.opts``, ``postgresql.auto.conf.tmp``,
  ``current_logfiles(.tmp)``, ``pg_internal.init*``, ``backup_label``,
  ``tablespace_map``, ``backup_manifest(.tmp)`` anywhere in the data directory's top
  level (``pg_internal.init`` anywhere);
* anything whose name starts with ``pgsql_tmp`` (temporary files and directories);
* temporary relations (``t<backend>_<relfilenode>...``) and, in a database directory,
  the main/fsm/vm forks of unlogged relations (those with an ``_init`` fork, which is
  kept: recovery rebuilds the others from it);
* anything that is not a regular file, a directory or a symbolic link.

Tablespaces: ``pg_tblspc/<oid>`` is listed as a SYMLINK (its target is the
tablespace's location: ``tablespaces``' if given, else the link's own absolute target,
which is what ``pg_tablespace_location`` reads, so that a tablespace created after the
server was asked is copied too) and, of the location, only this server's version
directory (``PG_<major>_<catversion>``, ``version_dir``) is walked, under the path
``pg_tblspc/<oid>/<version_dir>/...``: other versions' directories in the same
location belong to other clusters. ``pg_wal`` as a symbolic link (``initdb -X``) is
listed as a directory. Other symbolic links are listed as links, never followed.

Order: directories and links first (parents before children), then files, largest
first: the order the devices take them in.
"""

from __future__ import annotations

import dataclasses
import enum
import os
import re
import stat
from collections.abc import Iterator, Mapping

__all__ = ("EXCLUDED_DIR_CONTENTS", "EXCLUDED_FILES", "Item", "ItemKind", "walk")

#: Directories whose contents are not backed up (the directories themselves are).
EXCLUDED_DIR_CONTENTS = frozenset(
    {
        "pg_wal",
        "pg_replslot",
        "pg_dynshmem",
        "pg_notify",
        "pg_serial",
        "pg_snapshots",
        "pg_stat_tmp",
        "pg_subtrans",
    }
)
#: Files of the data directory's top level that are never backed up.
EXCLUDED_FILES = frozenset(
    {
        "postmaster.pid",
        "postmaster.opts",
        "postgresql.auto.conf.tmp",
        "current_logfiles",
        "current_logfiles.tmp",
        "backup_label",
        "tablespace_map",
        "backup_manifest",
        "backup_manifest.tmp",
    }
)
_TEMP_PREFIX = "pgsql_tmp"
_INTERNAL_INIT = "pg_internal.init"
_TEMP_RELATION = re.compile(r"t\d+_\d+(_(fsm|vm|init))?(\.\d+)?")
_FORK = re.compile(r"(\d+)(_(fsm|vm|init))?(\.\d+)?")


class ItemKind(enum.Enum):
    FILE = "file"
    DIRECTORY = "directory"
    SYMLINK = "symlink"


@dataclasses.dataclass(frozen=True, slots=True)
class Item:
    """One thing to back up: ``path`` relative to the data directory (``/``-separated
    str), ``source`` the absolute path to read, the ``lstat`` facts of the walk, and a
    symbolic link's ``target``."""

    kind: ItemKind
    path: str
    source: str
    size: int
    mode: int
    mtime_ns: int
    target: str | None = None


def walk(
    data_directory: str,
    tablespaces: Mapping[int, str] | None = None,
    *,
    version_dir: str | None = None,
) -> list[Item]:
    """Every item to back up (module docstring). ``tablespaces`` maps each tablespace's
    oid to its location (``pg_tablespace_location``); ``version_dir`` is the name of
    this server's directory inside each location (all of the location when ``None``).
    ``OSError`` of the data directory itself propagates; entries that vanish while
    listed are skipped (the backup's WAL replay recreates what mattered)."""
    spaces = {str(oid): location for oid, location in (tablespaces or {}).items()}
    listed = list(_walk_dir(data_directory, "", top=True, spaces=spaces, version_dir=version_dir))
    tree = [item for item in listed if item.kind is not ItemKind.FILE]
    files = [item for item in listed if item.kind is ItemKind.FILE]
    files.sort(key=lambda item: item.size, reverse=True)
    return tree + files


def _item(kind: ItemKind, path: str, source: str, st: os.stat_result) -> Item:
    size = st.st_size if kind is ItemKind.FILE else 0
    return Item(kind, path, source, size, stat.S_IMODE(st.st_mode), st.st_mtime_ns)


def _unlogged(names: list[str]) -> frozenset[str]:
    """The relfilenodes of a database directory that have an ``_init`` fork."""
    found = set()
    for name in names:
        match = _FORK.fullmatch(name)
        if match and match.group(3) == "init":
            found.add(match.group(1))
    return frozenset(found)


def _skip(name: str, *, top: bool, database: bool, unlogged: frozenset[str]) -> bool:
    """Whether entry ``name`` of a directory is left out (module docstring)."""
    if name.startswith(_TEMP_PREFIX) or name.startswith(_INTERNAL_INIT):
        return True
    if top and name in EXCLUDED_FILES:
        return True
    if database:
        if _TEMP_RELATION.fullmatch(name):
            return True
        match = _FORK.fullmatch(name)
        if match and match.group(1) in unlogged and match.group(3) != "init":
            return True
    return False


def _walk_dir(
    directory: str,
    prefix: str,
    *,
    top: bool,
    spaces: Mapping[str, str],
    version_dir: str | None,
    database: bool = False,
) -> Iterator[Item]:
    """The items below ``directory`` (whose path in the backup is ``prefix``)."""
    try:
        with os.scandir(directory) as scan:
            entries = sorted(scan, key=lambda entry: entry.name)
    except FileNotFoundError:
        if top:
            raise
        return
    names = [entry.name for entry in entries]
    unlogged = _unlogged(names) if database else frozenset()
    for entry in entries:
        name = entry.name
        if _skip(name, top=top, database=database, unlogged=unlogged):
            continue
        path = prefix + name
        try:
            st = entry.stat(follow_symlinks=False)
        except FileNotFoundError:
            continue
        if stat.S_ISLNK(st.st_mode):
            yield from _link(entry.path, path, st, top=top, spaces=spaces, version_dir=version_dir)
        elif stat.S_ISDIR(st.st_mode):
            yield _item(ItemKind.DIRECTORY, path, entry.path, st)
            if top and name in EXCLUDED_DIR_CONTENTS:
                if name == "pg_wal":
                    yield from _archive_status(entry.path)
                continue
            yield from _walk_dir(
                entry.path,
                path + "/",
                top=False,
                spaces=spaces,
                version_dir=version_dir,
                database=_is_database_dir(prefix, name),
            )
        elif stat.S_ISREG(st.st_mode):
            yield _item(ItemKind.FILE, path, entry.path, st)
        # sockets, fifos, devices: nothing a backup can copy


def _is_database_dir(prefix: str, name: str) -> bool:
    """``base/<oid>`` or ``pg_tblspc/<oid>/<version>/<oid>``: where relations live."""
    if not name.isdigit():
        return False
    parts = prefix.rstrip("/").split("/")
    return parts == ["base"] or (len(parts) == 3 and parts[0] == "pg_tblspc")


def _archive_status(wal: str) -> Iterator[Item]:
    status = os.path.join(wal, "archive_status")
    try:
        st = os.lstat(status)
    except FileNotFoundError:
        return
    if stat.S_ISDIR(st.st_mode):
        yield _item(ItemKind.DIRECTORY, "pg_wal/archive_status", status, st)


def _link(
    source: str,
    path: str,
    st: os.stat_result,
    *,
    top: bool,
    spaces: Mapping[str, str],
    version_dir: str | None,
) -> Iterator[Item]:
    """A symbolic link: a tablespace (walked), ``pg_wal`` (a directory), or a link."""
    try:
        target = os.readlink(source)
    except FileNotFoundError:
        return
    parts = path.split("/")
    if top and path == "pg_wal":
        try:
            real = os.stat(source)
        except FileNotFoundError:
            return
        yield Item(
            ItemKind.DIRECTORY, path, source, 0, stat.S_IMODE(real.st_mode), real.st_mtime_ns
        )
        yield from _archive_status(source)
        return
    target_bytes = len(os.fsencode(target))
    link = Item(ItemKind.SYMLINK, path, source, target_bytes, 0o777, st.st_mtime_ns, target=target)
    # Every pg_tblspc/<oid> link is a tablespace: its target IS the location (what
    # pg_tablespace_location reads), so one created after the server was asked for
    # its tablespaces is copied too, not kept as an empty link.
    location = spaces.get(parts[1]) if len(parts) == 2 and parts[0] == "pg_tblspc" else None
    if location is None and len(parts) == 2 and parts[0] == "pg_tblspc" and parts[1].isdigit():
        location = target if os.path.isabs(target) else None
    if location is not None:
        yield dataclasses.replace(link, target=location, size=len(os.fsencode(location)))
        yield from _tablespace(location, path + "/", spaces=spaces, version_dir=version_dir)
        return
    yield link


def _tablespace(
    location: str, prefix: str, *, spaces: Mapping[str, str], version_dir: str | None
) -> Iterator[Item]:
    if version_dir is None:
        yield from _walk_dir(location, prefix, top=False, spaces=spaces, version_dir=None)
        return
    directory = os.path.join(location, version_dir)
    try:
        st = os.lstat(directory)
    except FileNotFoundError:
        return
    if not stat.S_ISDIR(st.st_mode):
        return
    yield _item(ItemKind.DIRECTORY, prefix + version_dir, directory, st)
    yield from _walk_dir(
        directory, f"{prefix}{version_dir}/", top=False, spaces=spaces, version_dir=version_dir
    )
