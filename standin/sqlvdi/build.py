"""Compile the stand-in VDI libraries with g++: ``python -m standin.sqlvdi.build OUTDIR``.

Builds ``libsqlvdi.so`` (the client library, Microsoft's ABI) and
``libsqlvdi_standin_server.so`` (its server side) into OUTDIR. A library is rebuilt only when
one of its sources is newer than it; each is compiled to a private temporary name and renamed
into place, so that concurrent builds into the same directory are safe.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

__all__ = ("BuildError", "Libraries", "build", "main")

SOURCE_DIR = Path(__file__).resolve().parent
HEADERS = ("vdi.h", "vdierror.h", "standin.h")
CXXFLAGS = ("-O2", "-std=c++17", "-fPIC", "-shared", "-pthread", "-Wall", "-Wextra")
LIBS = ("-lrt",)


class BuildError(RuntimeError):
    """The stand-in libraries could not be compiled (no g++, or a compiler error)."""


@dataclass(frozen=True)
class Libraries:
    """Paths of the two compiled stand-in libraries."""

    client: Path
    server: Path


def _compiler() -> str:
    cxx = os.environ.get("CXX") or shutil.which("g++")
    if not cxx:
        raise BuildError(
            "g++ not found: the stand-in libsqlvdi.so is compiled at test time;"
            " install the Debian package g++ (apt-get install g++)"
        )
    return cxx


def _compile(
    cxx: str, output: Path, source: str, version_script: str, extra: tuple[str, ...]
) -> None:
    inputs = [SOURCE_DIR / name for name in (source, version_script, *extra, *HEADERS)]
    inputs.append(Path(__file__).resolve())  # the flags live here
    if output.exists() and output.stat().st_mtime >= max(p.stat().st_mtime for p in inputs):
        return
    fd, tmp_name = tempfile.mkstemp(prefix=f".{output.name}.", suffix=".tmp", dir=output.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    command = [
        cxx,
        *CXXFLAGS,
        f"-Wl,--version-script={SOURCE_DIR / version_script}",
        "-o",
        str(tmp),
        str(SOURCE_DIR / source),
        *LIBS,
    ]
    try:
        result = subprocess.run(command, capture_output=True, text=True, check=False)
        if result.returncode != 0:
            raise BuildError(f"compiling {source} into {output} failed:\n{result.stderr.strip()}")
        tmp.chmod(0o755)
        os.replace(tmp, output)  # atomic: a concurrent loader sees the old or the new file
    finally:
        tmp.unlink(missing_ok=True)


def build(outdir: Path | str) -> Libraries:
    """Compile (when sources changed) both stand-in libraries into ``outdir``."""
    out = Path(outdir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    cxx = _compiler()
    libs = Libraries(client=out / "libsqlvdi.so", server=out / "libsqlvdi_standin_server.so")
    _compile(cxx, libs.client, "client.cpp", "sqlvdi.map", ())
    _compile(cxx, libs.server, "server.cpp", "server.map", ("vdss.h",))
    return libs


def main(argv: list[str] | None = None) -> int:
    """Command line: build into OUTDIR and print the two library paths."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        sys.stderr.write("usage: python -m standin.sqlvdi.build OUTDIR\n")
        return 2
    try:
        libs = build(args[0])
    except BuildError as exc:
        sys.stderr.write(f"{exc}\n")
        return 1
    sys.stdout.write(f"{libs.client}\n{libs.server}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
