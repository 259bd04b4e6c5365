"""Where a key is in a TOML text: ``tomllib`` gives no positions, so the text is scanned
(``vdistream.service.settings`` module doc: Lines)."""

from __future__ import annotations

import re
import tomllib

__all__ = ("KeyPath", "Locator")

KeyPath = tuple[str, ...]

_PART = r"""(?:[A-Za-z0-9_-]+|"(?:[^"\\]|\\.)*"|'[^']*')"""
_DOTTED = rf"{_PART}(?:\s*\.\s*{_PART})*"
_HEADER = re.compile(rf"^\s*\[\s*({_DOTTED})\s*\]")
_ARRAY_HEADER = re.compile(rf"^\s*\[\[\s*({_DOTTED})\s*\]\]")
_KEY = re.compile(rf"^\s*({_DOTTED})\s*=")


def _split_key(dotted: str) -> KeyPath:
    parts = (match.group() for match in re.finditer(_PART, dotted))
    return tuple(tomllib.loads(f"k = {p}")["k"] if p[0] in "\"'" else p for p in parts)


class Locator:
    """Line numbers of table headers and keys in a TOML text (module doc: Lines)."""

    def __init__(self, text: str) -> None:
        self._lines: dict[KeyPath, int] = {}
        table: KeyPath = ()
        in_multiline: str | None = None
        arrays: dict[KeyPath, int] = {}  # an array of tables -> its elements so far
        for number, line in enumerate(text.splitlines(), start=1):
            if in_multiline is not None:
                if line.count(in_multiline) % 2 == 1:
                    in_multiline = None
                continue
            array = _ARRAY_HEADER.match(line)
            if array:  # [[service.webhooks]]: element N is the key path (..., "N")
                at = _split_key(array[1])
                arrays[at] = arrays.get(at, -1) + 1
                self._lines.setdefault(at, number)
                table = (*at, str(arrays[at]))
                self._lines.setdefault(table, number)
                continue
            header = _HEADER.match(line)
            if header and not line.lstrip().startswith("[["):
                table = _split_key(header[1])
                self._lines.setdefault(table, number)
                continue
            key = _KEY.match(line)
            if key is None:
                continue
            path = table + _split_key(key[1])
            self._lines.setdefault(path, number)
            # keys inside an inline table are on its line: its own line answers for them
            rest = line[key.end() :]
            in_multiline = next((q for q in ('"""', "'''") if rest.count(q) % 2 == 1), None)

    def line_of(self, path: KeyPath) -> int | None:
        """The line of ``path``, else of its nearest ancestor, else of a descendant."""
        for end in range(len(path), 0, -1):
            if path[:end] in self._lines:
                return self._lines[path[:end]]
        for known, number in self._lines.items():
            if known[: len(path)] == path:
                return number
        return None
