"""The compression setting as the command line writes it and a manifest records it.

Text forms (case-insensitive, surrounding spaces ignored)::

    none        no compression stage
    zstd        zstd at the default level 3
    zstd:N      zstd at level N, 1..19 (higher: smaller and slower)
    lz4         lz4 frame, its fast default level (lz4 takes no level)

Manifest form: ``{"algorithm": "zstd", "level": 3}`` (``level`` is None for lz4 and
none). Every malformed value raises ``ConfigError`` naming the setting and the value.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

from vdistream.errors import ConfigError
from vdistream.pipeline.compress import ZSTD_DEFAULT_LEVEL, ZSTD_LEVELS

__all__ = ("CompressionSpec", "parse_compression")

_CHOICES = "none, lz4, zstd or zstd:LEVEL with LEVEL 1..19"


@dataclasses.dataclass(frozen=True)
class CompressionSpec:
    """An algorithm (``"none"``, ``"zstd"``, ``"lz4"``) and, for zstd, its level (default 3)."""

    algorithm: str
    level: int | None = None

    def __post_init__(self) -> None:
        if self.algorithm == "zstd" and self.level is None:
            object.__setattr__(self, "level", ZSTD_DEFAULT_LEVEL)  # frozen: set once here
        shown = repr(f"{self.algorithm}:{self.level}")
        _validate(self.algorithm, self.level, setting="compression", value=shown)

    @property
    def enabled(self) -> bool:
        """Whether a compression stage is needed at all."""
        return self.algorithm != "none"

    def __str__(self) -> str:
        return self.algorithm if self.level is None else f"{self.algorithm}:{self.level}"

    def to_dict(self) -> dict[str, object]:
        return {"algorithm": self.algorithm, "level": self.level}

    @classmethod
    def from_dict(
        cls, data: Mapping[str, object], *, setting: str = "manifest compression"
    ) -> CompressionSpec:
        """Read back ``to_dict()``; ``ConfigError`` naming ``setting`` if malformed."""
        algorithm, level = data.get("algorithm"), data.get("level")
        if not isinstance(algorithm, str):
            raise ConfigError(f"{setting}: 'algorithm' must be a string, got {algorithm!r}")
        if level is not None and type(level) is not int:
            raise ConfigError(f"{setting}: 'level' must be an integer or null, got {level!r}")
        _validate(algorithm, level, setting=setting, value=repr(dict(data)))
        return cls(algorithm, level)


def _validate(algorithm: str, level: int | None, *, setting: str, value: str) -> None:
    if algorithm == "zstd":
        if level is None or level not in ZSTD_LEVELS:
            raise ConfigError(f"{setting}={value}: zstd levels are 1..19")
    elif algorithm in ("lz4", "none"):
        if level is not None:
            raise ConfigError(f"{setting}={value}: {algorithm} takes no level")
    else:
        raise ConfigError(f"{setting}={value}: unknown algorithm {algorithm!r}; use {_CHOICES}")


def parse_compression(text: str, *, setting: str = "compression") -> CompressionSpec:
    """``"zstd:3"``, ``"zstd"``, ``"lz4"`` or ``"none"`` as a ``CompressionSpec``.

    ``setting`` names where the text came from (``"--compress"``) in the message.
    """
    value = text.strip().lower()
    algorithm, colon, level_text = value.partition(":")
    shown = repr(text)
    if not algorithm:
        raise ConfigError(f"{setting}={shown}: empty; use {_CHOICES}")
    if algorithm not in ("zstd", "lz4", "none"):
        raise ConfigError(f"{setting}={shown}: unknown algorithm {algorithm!r}; use {_CHOICES}")
    if not colon:
        level = ZSTD_DEFAULT_LEVEL if algorithm == "zstd" else None
    elif algorithm != "zstd":
        raise ConfigError(f"{setting}={shown}: {algorithm} takes no level")
    else:
        try:
            level = int(level_text, 10)
        except ValueError:
            raise ConfigError(f"{setting}={shown}: the zstd level must be a number 1..19") from None
    _validate(algorithm, level, setting=setting, value=shown)
    return CompressionSpec(algorithm, level)
