"""The stand-in's own raw backup rate: ``python -m standin.mssql.bench [SIZE_MIB] [DEVICES...]``.

Its server side writes a database into the shared buffers for a raw ctypes client that completes
every WRITE without storing it; the rate is the one the server reports in message 3014.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

from standin.mssql.control import StandinServer
from standin.mssql.rawclient import RawClient, ended_well
from standin.sqlvdi.build import build

__all__ = ("main", "raw_rate")


def raw_rate(
    server: StandinServer, client_lib: Path, database: str, devices: int, mts: int
) -> float:
    """MB/s of one BACKUP DATABASE as the stand-in reports it (3014)."""
    client = RawClient(client_lib)
    name = f"bench{os.getpid()}d{devices}m{mts}"
    client.create(name, devices)
    names = [name] + [f"{name}{i}" for i in range(1, devices)]
    clauses = ", ".join(f"VIRTUAL_DEVICE = N'{n}'" for n in names)
    statement = (
        f"BACKUP DATABASE [{database}] TO {clauses} WITH FORMAT, NAME = N'bench', "
        f"BLOCKSIZE = 65536, BUFFERCOUNT = {4 * devices}, MAXTRANSFERSIZE = {mts}"
    )
    env = dict(os.environ, SQLCMDPASSWORD=server.password)
    cmd = [sys.executable, str(server.sqlcmd), "-S", f"{server.host},{server.port}"]
    cmd += ["-U", server.user, "-b", "-Q", statement]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, text=True)
    try:
        if client.get_configuration(15000) != 0:
            raise RuntimeError("GetConfiguration failed")
        result = client.run(names, store=False)
        out, _ = proc.communicate(timeout=600)
    finally:
        client.close()
    if proc.returncode != 0 or not ended_well(result):
        raise RuntimeError(out)
    match = re.search(r"\(([\d.]+) MB/sec\)", out)
    if match is None:
        raise RuntimeError(out)
    return float(match.group(1))


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    size_mib = int(args[0]) if args else 512
    device_counts = [int(a) for a in args[1:]] or [1, 4]
    with tempfile.TemporaryDirectory() as tmp:
        libs = build(Path(tmp) / "libs")
        with StandinServer.start(Path(tmp) / "mssql", libs=libs) as server:
            server.create_database("bench", size_mib << 20, seed=1)
            for devices in device_counts:
                for mts in (1 << 20, 4 << 20):
                    rate = raw_rate(server, libs.client, "bench", devices, mts)
                    sys.stdout.write(
                        f"{size_mib} MiB, {devices} device(s), MAXTRANSFERSIZE {mts >> 20} MiB: "
                        f"{rate:.0f} MB/s (server side)\n"
                    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
