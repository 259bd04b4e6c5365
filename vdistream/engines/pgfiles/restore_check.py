"""What arrived against what the index (and the catalog's manifest) lists.

``check_arrivals(index, arrived, expected)`` returns the problems, one line each,
naming the entry and its device: an entry listed but not arrived, arrived twice (on
two devices), on another device than listed, with another kind, size or CRC-32, or
arrived but not listed; and, when ``expected`` (the manifest's records) is given,
every difference between it and the index. An empty list means the backup is whole.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from vdistream.engines.pgfiles.layout import BackupIndex, EntryKind, FileRecord
from vdistream.engines.pgfiles.restore_writer import Arrival

__all__ = ("check_arrivals",)


def _facts(kind: EntryKind, size: int, crc: int) -> str:
    return f"{kind.name.lower()} of {size} bytes, CRC-32 {crc:08x}"


def check_arrivals(
    index: BackupIndex,
    arrived: Sequence[Mapping[str, Arrival]],
    expected: Sequence[FileRecord] | None = None,
    labels: Sequence[str] | None = None,
) -> list[str]:
    """The problems (module docstring); ``arrived[d]`` is device ``d``'s record,
    ``labels[d]`` its name in messages."""

    def device(number: int) -> str:
        if labels is not None and 0 <= number < len(labels):
            return f"device {labels[number]!r}"
        return f"device {number}"

    problems: list[str] = []
    where: dict[str, tuple[int, Arrival]] = {}
    for number, entries in enumerate(arrived):
        for path, arrival in entries.items():
            seen = where.get(path)
            if seen is not None:
                problems.append(f"{path} arrived twice ({device(seen[0])} and {device(number)})")
                continue
            where[path] = (number, arrival)
    listed: dict[str, FileRecord] = {}
    for record in index.records:
        if record.kind is EntryKind.INDEX or record.path in listed:
            problems.append(f"the index lists {record.path} twice or as an index")
            continue
        listed[record.path] = record
        found = where.get(record.path)
        if found is None:
            problems.append(
                f"{record.path} is missing (the index puts it on {device(record.device)})"
            )
            continue
        number, arrival = found
        if number != record.device:
            problems.append(
                f"{record.path} arrived on {device(number)}, the index puts it on "
                f"{device(record.device)}"
            )
        want = (record.kind, record.size, record.crc32)
        got = (arrival.kind, arrival.size, arrival.crc32)
        if got != want:
            problems.append(
                f"{record.path} arrived as a {_facts(*got)} on {device(number)}; the index "
                f"lists a {_facts(*want)}"
            )
    for path, (number, _) in where.items():
        if path not in listed:
            problems.append(f"{path} arrived on {device(number)} but is not in the index")
    if expected is not None:
        manifest = {record.path: record for record in expected}
        for path, record in manifest.items():
            other = listed.get(path)
            if other is None:
                problems.append(f"{path} is in the manifest but not in the backup's index")
            elif (other.kind, other.size, other.crc32, other.device) != (
                record.kind,
                record.size,
                record.crc32,
                record.device,
            ):
                problems.append(f"{path} differs between the manifest and the backup's index")
        problems.extend(
            f"{path} is in the backup's index but not in the manifest"
            for path in sorted(listed.keys() - manifest.keys())
        )
    return problems
