"""Command round trip and pump throughput of the in-process device set.

Prints, measured in the same process:
* the round trip of one WRITE command (server send -> client get and complete ->
  server result) in microseconds, beside a bare anyio memory-stream ping-pong;
* the throughput of pumping 1 MiB buffers through a 4-device set (the client only
  completes, no storage), beside a plain memory copy of the same bytes;
* peak RSS.

With ``--json`` every case runs in a child process of its own, ``--repeat`` times
(default 5 for round trips, 3 for throughput; median kept), with wall and CPU time of
the measured call (``getrusage``) and peak RSS from ``wait4``; it adds the 1 MiB
transfers through 4 devices as a whole backup job into ``null://`` (framing,
checksums, manifest) beside the same memory copy, and prints a list of case records
(see ``_harness.py``) on stdout instead of the table.

Usage: python benchmarks/vdi_roundtrip.py [--round-trips N] [--gib G] [--repeat N] [--json]
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import sys
import time

import anyio

from vdistream import (
    ClientVirtualDeviceSet,
    CommandCode,
    Features,
    Registry,
    ServerVirtualDeviceSet,
    VDClosedError,
    VDConfig,
)

MIB = 1024 * 1024


async def memory_stream_ping_pong(n: int) -> float:
    """Seconds per round trip through two zero-buffer anyio memory object streams."""
    to_b, from_a = anyio.create_memory_object_stream[int](0)
    to_a, from_b = anyio.create_memory_object_stream[int](0)

    async def echo() -> None:
        async for item in from_a:
            await to_a.send(item)
        await to_a.aclose()

    async with anyio.create_task_group() as tg:
        tg.start_soon(echo)
        start = time.perf_counter()
        for i in range(n):
            await to_b.send(i)
            await from_b.receive()
        elapsed = time.perf_counter() - start
        await to_b.aclose()
    return elapsed / n


async def _set(
    devices: int, buffers: int, size: int
) -> tuple[ClientVirtualDeviceSet, ServerVirtualDeviceSet, list[str]]:
    registry = Registry()
    client = ClientVirtualDeviceSet(registry=registry)
    client.create("bench", VDConfig(device_count=devices))
    server = ServerVirtualDeviceSet(registry=registry)
    server.open(None, "bench")
    server.begin_configuration(Features.WRITE_MEDIA, 65536, 0, size)
    server.request_buffers(size, 0, buffers)
    server.end_configuration()
    await client.get_configuration(1)
    names = ["bench"] + [f"bench{i}" for i in range(1, devices)]
    return client, server, names


async def client_loop(client: ClientVirtualDeviceSet, name: str) -> None:
    device = client.open_device(name)
    while True:
        try:
            command = await device.get_command(10)
        except VDClosedError:
            return
        device.complete_command(command, 0, command.size)


async def vdi_round_trip(n: int) -> float:
    """Seconds per WRITE round trip, one command outstanding at a time."""
    client, server, names = await _set(1, 1, 65536)
    async with anyio.create_task_group() as tg:
        tg.start_soon(client_loop, client, names[0])
        device = server.open_device(names[0])
        await server.wait_active(5)
        buffer = await server.allocate_buffer(65536)
        start = time.perf_counter()
        for _ in range(n):
            await device.send_command(CommandCode.WRITE, 65536, buffer=buffer)
        elapsed = time.perf_counter() - start
        device.close_device()
    client.close()
    server.close()
    return elapsed / n


async def vdi_pump(total: int, devices: int = 4, depth: int = 4) -> float:
    """Seconds to move ``total`` bytes in 1 MiB WRITEs through ``devices`` devices."""
    client, server, names = await _set(devices, devices * depth, MIB)
    per_device = total // devices // MIB

    async def engine(name: str) -> None:
        device = server.open_device(name)
        await server.wait_active(5)
        buffers = [await server.allocate_buffer(MIB) for _ in range(depth)]
        inflight = []
        for i in range(per_device):
            if len(inflight) == depth:
                await inflight.pop(0)
            inflight.append(device.send_command(CommandCode.WRITE, MIB, buffer=buffers[i % depth]))
        for pending in inflight:
            await pending
        device.close_device()

    start = time.perf_counter()
    async with anyio.create_task_group() as tg:
        for name in names:
            tg.start_soon(client_loop, client, name)
            tg.start_soon(engine, name)
    elapsed = time.perf_counter() - start
    client.close()
    server.close()
    return elapsed


def memory_copy(total: int) -> float:
    source = bytearray(MIB)
    target = bytearray(MIB)
    start = time.perf_counter()
    for _ in range(total // MIB):
        target[:] = source
    return time.perf_counter() - start


async def null_backup(total: int, devices: int = 4) -> float:
    """Seconds of a whole backup job of ``total`` generated bytes in 1 MiB transfers
    through ``devices`` devices into ``null://``."""
    from vdistream import JobOptions, backup
    from vdistream.engines import CallableProducer, StripedBackup, StripingOptions

    source = memoryview(os.urandom(MIB))
    remaining = total

    async def fill(view: memoryview) -> int:
        nonlocal remaining
        n = min(remaining, view.nbytes, MIB)
        view[:n] = source[:n]
        remaining -= n
        return n

    start = time.perf_counter()
    result = await backup(
        StripedBackup(CallableProducer(fill), StripingOptions(max_transfer_size=MIB)),
        "null://",
        options=JobOptions(devices=devices),
    )
    result.raise_for_status()
    return time.perf_counter() - start


CHILD_CASES = ("ping-pong", "round-trip", "pump", "null-backup", "memory-copy")


def child(case: str, count: int) -> None:
    """Run one case (``count`` round trips or bytes) and print its Timer as JSON."""
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from _harness import Timer

    with Timer() as timer:
        if case == "ping-pong":
            anyio.run(memory_stream_ping_pong, count)
        elif case == "round-trip":
            anyio.run(vdi_round_trip, count)
        elif case == "pump":
            anyio.run(vdi_pump, count)
        elif case == "null-backup":
            anyio.run(null_backup, count)
        else:
            memory_copy(count)
    print(timer.json())


def json_main(round_trips: int, gib: float, repeat: int | None) -> None:
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from _harness import emit, measure_child, progress, record

    total = int(gib * 1024 * MIB) // (4 * MIB) * (4 * MIB)
    counts = {
        "ping-pong": round_trips,
        "round-trip": round_trips,
        "pump": total,
        "null-backup": total,
        "memory-copy": total,
    }
    samples: dict[str, list[dict[str, float]]] = {case: [] for case in CHILD_CASES}
    for case in CHILD_CASES:
        times = repeat or (5 if case in ("ping-pong", "round-trip") else 3)
        progress(f"vdi: {case} x{times}")
        for _ in range(times):
            samples[case].append(
                measure_child(
                    [sys.executable, __file__, "--child", case, str(counts[case])],
                )
            )
    nominal = round_trips * 65536  # the WRITE commands carry 64 KiB buffers
    copy = record("vdi", "", "baseline", "memory copy, 1 MiB", total, samples["memory-copy"])
    emit(
        [
            record(
                "vdi",
                "WRITE round trip, 1 device, 64 KiB",
                "vdistream",
                "vdistream",
                nominal,
                samples["round-trip"],
                ops=round_trips,
            ),
            record(
                "vdi",
                "WRITE round trip, 1 device, 64 KiB",
                "baseline",
                "anyio memory-stream ping-pong",
                nominal,
                samples["ping-pong"],
                ops=round_trips,
            ),
            record(
                "vdi",
                "4 dev x 1 MiB WRITE, client completes",
                "vdistream",
                "vdistream",
                total,
                samples["pump"],
            ),
            {**copy, "case": "4 dev x 1 MiB WRITE, client completes"},
            record(
                "vdi",
                "4 dev x 1 MiB backup job -> null://",
                "vdistream",
                "vdistream",
                total,
                samples["null-backup"],
                data="random",
            ),
            {**copy, "case": "4 dev x 1 MiB backup job -> null://", "data": "random"},
        ]
    )


async def main(round_trips: int, gib: float, repeat: int | None = None) -> None:
    total = int(gib * 1024 * MIB)
    rtts, runs = repeat or 5, repeat or 3
    bare = statistics.median([await memory_stream_ping_pong(round_trips) for _ in range(rtts)])
    vdi = statistics.median([await vdi_round_trip(round_trips) for _ in range(rtts)])
    pump = statistics.median([await vdi_pump(total) for _ in range(runs)])
    copy = statistics.median([memory_copy(total) for _ in range(runs)])
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"{'case':<44}{'vdistream':>14}{'baseline':>14}{'ratio':>8}")
    print(
        f"{'WRITE round trip (us) vs memory-stream ping-pong':<44}"
        f"{vdi * 1e6:>14.1f}{bare * 1e6:>14.1f}{vdi / bare:>8.2f}"
    )
    print(
        f"{'4 devices x 1 MiB WRITE (GB/s) vs memcpy':<44}"
        f"{total / pump / 1e9:>14.2f}{total / copy / 1e9:>14.2f}{copy / pump:>8.2f}"
    )
    print(f"peak RSS: {rss:.0f} MiB")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--round-trips", type=int, default=20000)
    parser.add_argument("--gib", type=float, default=4.0)
    parser.add_argument("--repeat", type=int, default=None, help="runs per case (median)")
    parser.add_argument("--json", action="store_true", help="print case records as JSON")
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child[0], int(args.child[1]))
    elif args.json:
        json_main(args.round_trips, args.gib, args.repeat)
    else:
        anyio.run(main, args.round_trips, args.gib, args.repeat)
