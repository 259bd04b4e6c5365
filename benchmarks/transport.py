"""Device sets across processes (docs/transport.md) beside the same set in one process.

Cases, each side measured in the same run:

* **WRITE round trip, 1 device, 64 KiB**: an engine in another process sends one WRITE
  at a time and waits for its completion; the client (this process) completes it at
  once. Beside: the same loop with the engine in the client's process. Target: at most
  3x the in-process figure.
* **4 dev x 1 MiB WRITE, client completes**: 4 devices, 4 buffers each in flight, the
  engine in another process; beside: the same in one process. Target: at least 0.8x.
* **feed -> null://** (``--feed-gib``): ``vdistream backup external:NAME null://
  --devices 4`` and ``vdistream feed NAME < FILE`` (wall time of the pair, CPU of both
  processes); beside: ``vdistream backup "cmd:cat FILE" null:// --devices 4``.

The in-process figures come from ``vdi_roundtrip.py``'s own functions. Across processes
the engine (a child ``python benchmarks/transport.py --engine ...``) times its own loop
and reports it; the CPU figure adds the engine's to the client's.

Usage: python benchmarks/transport.py [--round-trips N] [--gib G] [--feed-gib G]
                                      [--repeat N] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import anyio

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

MIB = 1024 * 1024
ROUND_TRIP_SIZE = 65536
DEPTH = 4


def _cpu_self() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


# --- the engine side, in a child process ------------------------------------------------


async def engine_round_trips(directory: str, name: str, count: int) -> dict[str, float]:
    from vdistream import CommandCode, Features
    from vdistream.transport import RemoteServerVirtualDeviceSet, RuntimeDirectory

    async with RemoteServerVirtualDeviceSet(directory=RuntimeDirectory(directory)) as server:
        await server.open(None, name)
        await server.begin_configuration(Features.WRITE_MEDIA, 65536, 0, ROUND_TRIP_SIZE)
        await server.request_buffers(ROUND_TRIP_SIZE, 0, 1)
        await server.end_configuration()
        device = await server.open_device(name)
        await server.wait_active(10)
        buffer = await server.allocate_buffer(ROUND_TRIP_SIZE)
        for _ in range(min(200, count)):  # warm up both sides
            await device.send_command(CommandCode.WRITE, ROUND_TRIP_SIZE, buffer=buffer)
        cpu, start = _cpu_self(), time.perf_counter()
        for _ in range(count):
            await device.send_command(CommandCode.WRITE, ROUND_TRIP_SIZE, buffer=buffer)
        seconds, cpu = time.perf_counter() - start, _cpu_self() - cpu
        server.free_buffer(buffer)
        await device.close_device()
        await server.close()
    return {"seconds": seconds, "cpu": cpu}


async def engine_pump(directory: str, name: str, total: int) -> dict[str, float]:
    from vdistream import CommandCode, Features
    from vdistream.transport import RemoteServerVirtualDeviceSet, RuntimeDirectory

    async with RemoteServerVirtualDeviceSet(directory=RuntimeDirectory(directory)) as server:
        await server.open(None, name)
        devices = server.get_configuration().device_count
        await server.begin_configuration(Features.WRITE_MEDIA, 65536, 0, MIB)
        await server.request_buffers(MIB, 0, devices * DEPTH)
        await server.end_configuration()
        names = [name] + [f"{name}{i}" for i in range(1, devices)]
        opened = [await server.open_device(n) for n in names]
        await server.wait_active(10)
        per_device = total // devices // MIB

        async def run(device: object) -> None:
            buffers = [await server.allocate_buffer(MIB) for _ in range(DEPTH)]
            inflight = []
            for i in range(per_device):
                if len(inflight) == DEPTH:
                    await inflight.pop(0)
                inflight.append(
                    device.send_command(CommandCode.WRITE, MIB, buffer=buffers[i % DEPTH])  # type: ignore[attr-defined]
                )
            for pending in inflight:
                await pending
            for buffer in buffers:
                server.free_buffer(buffer)

        cpu, start = _cpu_self(), time.perf_counter()
        async with anyio.create_task_group() as group:
            for device in opened:
                group.start_soon(run, device)
        seconds, cpu = time.perf_counter() - start, _cpu_self() - cpu
        for device in opened:
            await device.close_device()
        await server.close()
    return {"seconds": seconds, "cpu": cpu}


# --- the client side ----------------------------------------------------------------------


async def across_processes(case: str, count: int, devices: int) -> dict[str, float]:
    """Serve a set to an engine child running ``case``; its own timing and the CPU of
    both processes over the same interval (the client's measured around the child)."""
    from vdistream import ClientVirtualDeviceSet, Registry, VDClosedError, VDConfig
    from vdistream.transport import RuntimeDirectory, serve_set

    with tempfile.TemporaryDirectory(prefix="vd-bench-") as tmp:
        directory = RuntimeDirectory(tmp)
        registry = Registry()
        name = "bench"
        client = ClientVirtualDeviceSet(registry=registry)
        client.create(name, VDConfig(device_count=devices))
        report: dict[str, float] = {}

        async def complete_all(device_name: str) -> None:
            device = client.open_device(device_name)
            while True:
                try:
                    command = await device.get_command(30)
                except VDClosedError:
                    return
                device.complete_command(command, 0, command.size)

        async def engine() -> None:
            argv = [sys.executable, __file__, "--engine", case, tmp, name, str(count)]
            result = await anyio.run_process(argv, check=True)
            report.update(json.loads(result.stdout.decode().strip().splitlines()[-1]))

        cpu = _cpu_self()
        async with anyio.create_task_group() as group:
            await group.start(
                lambda task_status: serve_set(
                    name, registry=registry, directory=directory, task_status=task_status
                )
            )
            group.start_soon(engine)
            await client.get_configuration(30)
            for device_name in [name] + [f"{name}{i}" for i in range(1, devices)]:
                group.start_soon(complete_all, device_name)
        client_cpu = _cpu_self() - cpu
        client.close()
    # The client's CPU covers the whole session (set-up included); scale it to the
    # engine's measured interval would be a guess, so it is reported whole.
    return {"seconds": report["seconds"], "cpu": report["cpu"] + client_cpu}


def in_process(case: str, count: int) -> dict[str, float]:
    import vdi_roundtrip

    cpu, start = _cpu_self(), time.perf_counter()
    if case == "round-trip":
        per = anyio.run(vdi_roundtrip.vdi_round_trip, count)
        seconds = per * count
    else:
        seconds = anyio.run(vdi_roundtrip.vdi_pump, count)
    wall = time.perf_counter() - start
    cpu = (_cpu_self() - cpu) * (seconds / wall if wall else 1.0)
    return {"seconds": seconds, "cpu": cpu}


# --- feed beside cmd:cat ---------------------------------------------------------------------


def _vdistream() -> list[str]:
    return [sys.executable, "-m", "vdistream"]


def feed_pair(path: Path, runtime: str) -> dict[str, float]:
    """``backup external:NAME null://`` and ``feed NAME < path``: wall of the pair, CPU of
    both (rusage of the two children)."""
    env = {**os.environ, "VDISTREAM_RUNTIME_DIR": runtime}
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    backup = subprocess.Popen(
        [*_vdistream(), "backup", "external:bench", "null://", "--devices", "4"],
        env=env,
        stdout=subprocess.DEVNULL,
    )
    socket_path = Path(runtime) / "bench.sock"
    deadline = time.monotonic() + 30
    while not socket_path.exists():
        if backup.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"the backup did not publish {socket_path}")
        time.sleep(0.005)
    with path.open("rb") as data:
        feed = subprocess.run([*_vdistream(), "feed", "bench"], env=env, stdin=data, check=False)
    if backup.wait(120) != 0 or feed.returncode != 0:
        raise SystemExit(f"backup exited {backup.returncode}, feed {feed.returncode}")
    seconds = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    return {"seconds": seconds, "cpu": cpu}


def cmd_cat(path: Path) -> dict[str, float]:
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    subprocess.run(
        [*_vdistream(), "backup", f"cmd:cat {path}", "null://", "--devices", "4"],
        stdout=subprocess.DEVNULL,
        check=True,
    )
    seconds = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return {
        "seconds": seconds,
        "cpu": (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime),
    }


# --- driver ----------------------------------------------------------------------------------


def child(kind: str, case: str, count: int) -> None:
    if kind == "xproc":
        devices = 1 if case == "round-trip" else 4
        result = anyio.run(across_processes, case, count, devices)
    else:
        result = in_process(case, count)
    print(json.dumps({**result, "rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}))


def samples_of(kind: str, case: str, count: int, times: int) -> list[dict[str, float]]:
    from _harness import measure_child

    return [
        measure_child([sys.executable, __file__, "--child", kind, case, str(count)])
        for _ in range(times)
    ]


def json_main(round_trips: int, gib: float, feed_gib: float, repeat: int | None) -> None:
    from _harness import emit, make_data, progress, record

    total = int(gib * 1024 * MIB) // (4 * MIB) * (4 * MIB)
    records = []
    for case, count, label, ops in (
        ("round-trip", round_trips, "WRITE round trip, 1 device, 64 KiB", round_trips),
        ("pump", total, "4 dev x 1 MiB WRITE, client completes", None),
    ):
        times = repeat or (5 if case == "round-trip" else 3)
        size = round_trips * ROUND_TRIP_SIZE if ops else total
        for kind, side, tool in (
            ("xproc", "vdistream", "engine in another process"),
            ("inproc", "baseline", "engine in the same process"),
        ):
            progress(f"transport: {case} {kind} x{times}")
            samples = samples_of(kind, case, count, times)
            records.append(record("transport", label, side, tool, size, samples, ops=ops))
    if feed_gib > 0:
        feed_size = int(feed_gib * 1024 * MIB)
        times = repeat or 3
        with tempfile.TemporaryDirectory(prefix="vd-bench-feed-") as tmp:
            path = Path(tmp) / "stream"
            make_data(path, feed_size, "random")
            runtime = Path(tmp) / "run"
            runtime.mkdir(mode=0o700)
            label = "feed 4 dev -> null://"
            for side, tool, run in (
                (
                    "vdistream",
                    "vdistream feed (another process)",
                    lambda: feed_pair(path, str(runtime)),
                ),
                ("baseline", "vdistream backup cmd:cat", lambda: cmd_cat(path)),
            ):
                progress(f"transport: {label} {side} x{times}")
                samples = []
                for _ in range(times):
                    sample = run()
                    samples.append({**sample, "rss": 0})
                records.append(
                    record("transport", label, side, tool, feed_size, samples, data="random")
                )
    emit(records)


def main(round_trips: int, gib: float, feed_gib: float, repeat: int | None) -> None:
    total = int(gib * 1024 * MIB) // (4 * MIB) * (4 * MIB)
    times = repeat or 3
    print(f"{'case':<44}{'xproc':>12}{'inproc':>12}{'ratio':>8}")
    for case, count in (("round-trip", round_trips), ("pump", total)):
        xs = sorted(s["seconds"] for s in samples_of("xproc", case, count, times))
        ins = sorted(s["seconds"] for s in samples_of("inproc", case, count, times))
        x, i = xs[len(xs) // 2], ins[len(ins) // 2]
        if case == "round-trip":
            xs_, is_ = x / count * 1e6, i / count * 1e6
            print(f"{'WRITE round trip (us)':<44}{xs_:>12.1f}{is_:>12.1f}{x / i:>8.2f}")
        else:
            xg, ig = total / x / 1e9, total / i / 1e9
            print(f"{'4 dev x 1 MiB WRITE (GB/s)':<44}{xg:>12.2f}{ig:>12.2f}{i / x:>8.2f}")
    if feed_gib > 0:
        from _harness import make_data

        with tempfile.TemporaryDirectory(prefix="vd-bench-feed-") as tmp:
            path = Path(tmp) / "stream"
            size = make_data(path, int(feed_gib * 1024 * MIB), "random")
            runtime = Path(tmp) / "run"
            runtime.mkdir(mode=0o700)
            feed = feed_pair(path, str(runtime))
            cat = cmd_cat(path)
            print(
                f"{'feed -> null:// vs cmd:cat (MB/s)':<44}{size / feed['seconds'] / 1e6:>12.0f}"
                f"{size / cat['seconds'] / 1e6:>12.0f}{cat['seconds'] / feed['seconds']:>8.2f}"
            )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--round-trips", type=int, default=20000)
    parser.add_argument("--gib", type=float, default=2.0)
    parser.add_argument("--feed-gib", type=float, default=2.0)
    parser.add_argument("--repeat", type=int, default=None, help="runs per case (median)")
    parser.add_argument("--json", action="store_true", help="print case records as JSON")
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    parser.add_argument("--engine", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.engine:
        case, directory, name, count = args.engine
        func = engine_round_trips if case == "round-trip" else engine_pump
        print(json.dumps(anyio.run(func, directory, name, int(count))))
    elif args.child:
        child(args.child[0], args.child[1], int(args.child[2]))
    elif args.json:
        json_main(args.round_trips, args.gib, args.feed_gib, args.repeat)
    else:
        main(args.round_trips, args.gib, args.feed_gib, args.repeat)
