"""Timing you can trust: interleaved repeats with device sync, spread of every figure, and honest warnings.

A benchmark figure without its spread and the machine's load can't be judged: on shared cores a "speed-up" can be
another process stealing time from one variant. Every figure here is reported as min / median / max over repeats,
ratios per repeat (the variants of one repeat ran back to back), and the report says when the machine was busy or a
ratio is physically implausible.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

BUSY_LOAD_PER_CORE = 0.5  # 1-minute load average above cores x this: other work shared the cores (no /proc/stat)
BUSY_SHARE = 0.1  # other processes used more than this share of all cores: the timings were contended


def time_interleaved(variants: dict[str, Callable[[], Any]], warmup: int, repeats: int,
                     sync: Callable[[], None] = lambda: None,
                     tick: Callable[[], None] = lambda: None) -> dict[str, list[float]]:
    """Seconds per pass of each variant, ``repeats`` times, variants interleaved within each repeat.

    ``sync`` waits for queued device work (GPU runners return before the GPU finishes); it runs before a timer
    starts and before it stops, so every variant is timed to completion. ``tick`` is called once per round.
    """
    for _ in range(warmup):
        for fn in variants.values():
            fn()
            sync()
        tick()
    samples: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(repeats):
        for name, fn in variants.items():
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            samples[name].append(time.perf_counter() - t0)
        tick()
    return samples


def spread(values: list[float] | np.ndarray, scale: float = 1.0) -> dict[str, float]:
    """``{"min", "median", "max"}`` of ``values`` times ``scale``."""
    v = np.asarray(values, dtype=np.float64) * scale
    return {"min": float(v.min()), "median": float(np.median(v)), "max": float(v.max())}


def ratio_spread(num: list[float], den: list[float]) -> dict[str, float]:
    """Spread of per-repeat ratios ``num[i] / den[i]`` (variants of one repeat ran back to back)."""
    return spread(np.asarray(num, dtype=np.float64) / np.asarray(den, dtype=np.float64))


def cores() -> int:
    """Logical CPUs of the machine (system load averages count runnable tasks machine-wide)."""
    return os.cpu_count() or 1


@dataclass
class CpuSnapshot:
    """Busy CPU seconds of the whole machine (``/proc/stat``) and of this process (all its threads), at a time."""

    machine_s: float
    own_s: float
    wall: float


def cpu_snapshot() -> CpuSnapshot | None:
    """Now's :class:`CpuSnapshot`; None where ``/proc/stat`` can't be read (not Linux)."""
    try:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:9]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + fields[4]  # idle + iowait
    t = os.times()
    return CpuSnapshot((sum(fields) - idle) / os.sysconf("SC_CLK_TCK"), t.user + t.system, time.monotonic())


def others_share(a: CpuSnapshot | None, b: CpuSnapshot | None) -> float | None:
    """Share of all cores other processes used between two snapshots (0: they had the machine to themselves)."""
    if a is None or b is None or b.wall <= a.wall:
        return None
    other = (b.machine_s - a.machine_s) - (b.own_s - a.own_s)
    return round(max(0.0, other) / ((b.wall - a.wall) * cores()), 3)


def idle_share(window_s: float = 0.5) -> float | None:
    """Share of all cores other processes use now, measured over ``window_s`` while this process sleeps.

    Unlike the 1-minute load average, this doesn't count work that just finished (a training step before a bench).
    """
    a = cpu_snapshot()
    time.sleep(window_s)
    return others_share(a, cpu_snapshot())


def load_warnings(start: list[float] | None, end: list[float] | None, own_threads: int,
                  others_before: float | None = None, others_during: float | None = None) -> list[str]:
    """Warnings when other work shared the cores, before or during the run.

    Measured CPU shares of other processes decide where given (Linux); else the 1-minute load average does.
    """
    n, out = cores(), []
    limit = n * BUSY_LOAD_PER_CORE
    load = f"load average {start[0]:.2f}" if start else "no load average"
    if others_before is not None:
        if others_before > BUSY_SHARE:
            out.append(f"machine busy before the bench: other processes used {others_before:.0%} of the {n} cores "
                       f"({load}); times and ratios are contended; rerun on an idle machine")
    elif start and start[0] > limit:
        out.append(f"machine busy before the bench: load average {start[0]:.2f} on {n} cores (above {limit:g}); "
                   "other processes shared the cores, so times and ratios are contended; rerun on an idle machine")
    if others_during is not None:
        if others_during > BUSY_SHARE:
            out.append(f"machine busy during the bench: other processes used {others_during:.0%} of the {n} cores "
                       "while it ran; times are contended")
    elif end and end[0] - own_threads > limit:
        out.append(f"machine busy during the bench: load average {end[0]:.2f} on {n} cores, {end[0] - own_threads:.2f}"
                   f" above this bench's own {own_threads} thread(s) (limit {limit:g}); times are contended")
    return out


def ratio_warnings(bs: int, ideal: float, speedup: dict[str, float], mono: dict[str, float],
                   chain: dict[str, float]) -> list[str]:
    """Warnings for figures no correct measurement produces: faster than the FLOPs allow, beyond the spread."""
    out = []
    if speedup["min"] > ideal:
        out.append(f"batch {bs}: realised speed-up {speedup['median']:.2f}x (min {speedup['min']:.2f}x over repeats) "
                   f"exceeds the ideal {ideal:.2f}x from FLOPs; the monolithic timing was slowed by something else "
                   "(contention, frequency scaling) — don't quote it")
    if chain["max"] < mono["min"]:
        out.append(f"batch {bs}: the chain without exits ({chain['median']:.3g} ms) ran faster than the monolithic "
                   f"graph ({mono['median']:.3g} ms) beyond the spread, although it does the same work plus hand-offs;"
                   " the machine was likely contended")
    return out
