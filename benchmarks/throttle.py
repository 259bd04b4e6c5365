"""A backup under a bandwidth limit: how well the limit holds, and how fast a change lands.

One backup of a generated stream (nothing read from disk, nothing written: ``null://``)
through 4 devices of 1 MiB transfers, limited to ``--rate`` (100M: 100 MiB/s) for
``--seconds`` seconds, then changed live (``job.throttle.set_rate``, what ``vdistream
throttle`` does in the daemon) to ``--change-to`` for as long again. The job's bytes
are sampled every 0.25 s. Printed (stderr, and extra keys of the records):

* the worst 5-second window of each part: its bytes against the limit's, as a
  deviation (target: within 10 %), over every window that lies wholly in one part
  (the second part's windows start once the change settled);
* the settle time of the change: from the change to the end of the first 0.5-second
  window from which on the 0.5-second windows of a whole second (sampled every 0.25 s)
  are within 10 % of the new rate (target: < 1 s;
  0.5 s is the resolution; a rate below ~20 transfers a second cannot be resolved).

With ``--json`` it prints two case records (``_harness.py``, group ``throttle``): each
part as vdistream's side, beside "the limit itself" (the wall time the limit allows for
the same bytes) as the baseline, so the ratio is the achieved rate over the limit.

Usage: python benchmarks/throttle.py [--rate 100M] [--change-to 50M] [--seconds 12]
           [--repeat 1] [--json]
"""

from __future__ import annotations

import argparse
import math
import resource
import statistics
import sys
from typing import Any

from _harness import MIB, Record, emit, progress

GROUP = "throttle"
TICK = 0.25
WINDOW = 5.0
SETTLE_WINDOW = 0.5


def run_once(rate: int, change_to: int, seconds: float) -> dict[str, Any]:
    """One backup (module doc): its samples ``(time, bytes)`` and when the rate changed."""
    import anyio

    from vdistream.coordinator import Job, JobKind, JobOptions
    from vdistream.engines import CallableProducer, StripedBackup, StripingOptions

    total = int(rate * seconds + change_to * seconds * 1.2)  # ends a little after 2x seconds
    remaining = total

    async def fill(view: memoryview) -> int:
        nonlocal remaining
        n = min(remaining, view.nbytes)  # the content does not matter: left as it is
        remaining -= n
        return n

    engine = StripedBackup(
        CallableProducer(fill), StripingOptions(max_transfer_size=MIB, buffer_count=16)
    )
    job = Job(JobKind.BACKUP, engine, "null://", options=JobOptions(devices=4, max_rate=rate))
    samples: list[tuple[float, int]] = []
    changed_at = 0.0
    cpu = [_cpu()]  # at the start, at the change, at the end

    async def sample() -> None:
        nonlocal changed_at
        start = anyio.current_time()
        next_tick = start
        while not job.progress.finished:
            now = anyio.current_time() - start
            if not changed_at and now >= seconds:
                job.throttle.set_rate(change_to)
                changed_at = now
                cpu.append(_cpu())
            samples.append((now, sum(d.bytes for d in job.progress.devices)))
            next_tick += TICK
            await anyio.sleep(max(0.0, next_tick - anyio.current_time()))

    async def main() -> None:
        async with anyio.create_task_group() as tg:
            tg.start_soon(sample)
            result = await job.run()
            result.raise_for_status()

    anyio.run(main)
    cpu.append(_cpu())
    return {
        "samples": samples,
        "changed_at": changed_at,
        "bytes": total,
        "cpu_before": cpu[1] - cpu[0],
        "cpu_after": cpu[2] - cpu[1],
    }


def _cpu() -> float:
    """CPU seconds of this process so far (every thread)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def windows(
    samples: list[tuple[float, int]], start: float, end: float, width: float
) -> list[tuple[float, float]]:
    """``(time, bytes per second)`` of every window of ``width`` seconds between two
    samples that lies in ``[start, end]``."""
    out = []
    for i, (t0, b0) in enumerate(samples):
        if t0 < start - 1e-9:
            continue
        for t1, b1 in samples[i + 1 :]:
            if t1 - t0 >= width - 1e-6:
                if t1 <= end + 1e-9:
                    out.append((t0, (b1 - b0) / (t1 - t0)))
                break
    return out


def analyse(run: dict[str, Any], rate: int, change_to: int) -> dict[str, float]:
    samples, changed = run["samples"], run["changed_at"]
    last = next(t for t, b in samples if b >= samples[-1][1])  # the stream's end
    first = [abs(r - rate) / rate for _, r in windows(samples, 0.0, changed, WINDOW)]
    halves = windows(samples, changed, last, SETTLE_WINDOW)
    settle = None
    for t, _ in halves:
        # in the band from this window on, for a second (a later hiccup of a busy
        # machine is noise, not the change settling late)
        following = [r for u, r in halves if t <= u <= t + 1.0 + 1e-9]
        if all(abs(r - change_to) / change_to <= 0.10 for r in following):
            settle = t + SETTLE_WINDOW - changed
            break
    settled = changed + (settle if settle is not None else 1.0)
    second = [abs(r - change_to) / change_to for _, r in windows(samples, settled, last, WINDOW)]
    before = [b for t, b in samples if t <= changed][-1]
    return {
        "worst_before": max(first),
        "worst_after": max(second) if second else float("nan"),
        "settle": float("nan") if settle is None else settle,
        "rate_before": before / changed,
        "rate_after": (samples[-1][1] - before) / (last - changed),
        "seconds_before": changed,
        "seconds_after": last - changed,
        "bytes_before": before,
        "bytes_after": samples[-1][1] - before,
        "cpu_before": run["cpu_before"],
        "cpu_after": run["cpu_after"],
    }


def settled(seconds: float) -> str:
    if math.isnan(seconds):  # fewer than ~10 transfers a half second: cannot tell
        return "n/a (too few transfers per 0.5 s window at this rate)"
    return f"{seconds:.2f} s"


def text_rate(rate: float) -> str:
    return f"{rate / MIB:.1f} MiB/s"


def main() -> None:
    from vdistream.throttle import format_rate, parse_rate

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rate", default="100M")
    parser.add_argument("--change-to", default="50M")
    parser.add_argument("--seconds", type=float, default=12.0, help="of each part")
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--json", action="store_true", help="print case records as JSON")
    args = parser.parse_args()
    rate, change_to = parse_rate(args.rate), parse_rate(args.change_to)
    if rate is None or change_to is None:
        sys.exit("throttle.py: --rate and --change-to must be limits")
    results = []
    for i in range(args.repeat):
        parts = f"{format_rate(rate)} then {format_rate(change_to)}"
        progress(f"throttle: run {i + 1}/{args.repeat}, {parts}")
        result = analyse(run_once(rate, change_to, args.seconds), rate, change_to)
        results.append(result)
        progress(
            f"  {format_rate(rate)}: {text_rate(result['rate_before'])}, worst 5 s window "
            f"{result['worst_before']:.1%} off; live change to {format_rate(change_to)}: "
            f"settled in {settled(result['settle'])}, then {text_rate(result['rate_after'])}, "
            f"worst 5 s window {result['worst_after']:.1%} off"
        )
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    def median(key: str) -> float:
        return statistics.median(r[key] for r in results)

    worst = {
        "worst_5s_deviation": max(max(r["worst_before"], r["worst_after"]) for r in results),
        "settle_seconds": median("settle"),
        "settle_seconds_worst": max(r["settle"] for r in results),
    }
    records: list[Record] = []
    for part, limit in (("before", rate), ("after", change_to)):
        case = (
            f"backup 4 dev -> null at {format_rate(rate)}"
            if part == "before"
            else f"the same, changed live to {format_rate(change_to)}"
        )
        moved, wall = median(f"bytes_{part}"), median(f"seconds_{part}")
        common = {"group": GROUP, "case": case, "data": "generated", "bytes": int(moved)}
        records.append(
            {
                **common,
                "side": "vdistream",
                "tool": "vdistream",
                "ops": None,
                "wall": wall,
                "cpu": median(f"cpu_{part}"),
                "rss": rss,
                "repeats": len(results),
                "walls": [round(r[f"seconds_{part}"], 6) for r in results],
                **worst,
            }
        )
        records.append(
            {
                **common,
                "side": "baseline",
                "tool": f"the limit ({format_rate(limit)})",
                "ops": None,
                "wall": moved / limit,
                "cpu": 0.0,
                "rss": 0,
                "repeats": len(results),
                "walls": [],
            }
        )
    progress(
        f"throttle: worst 5 s window {worst['worst_5s_deviation']:.1%} off (target 10 %), "
        f"live change settled in {settled(worst['settle_seconds'])} (median; worst "
        f"{settled(worst['settle_seconds_worst'])}; target < 1 s; 0.5 s is the resolution)"
    )
    if args.json:
        emit(records)


if __name__ == "__main__":
    main()
