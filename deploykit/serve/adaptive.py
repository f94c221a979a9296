"""Load-adaptive exits: move along the calibrated accuracy–FLOPs curve when latency nears the SLO.

Front-end agnostic (no HTTP framework, no asyncio), so serve-local and a Ray Serve front-end share it: feed it
request latencies (:meth:`AdaptiveController.observe`) and finished batches
(:meth:`AdaptiveController.observe_batch`: rows, compute seconds, the rung it ran at), call
:meth:`AdaptiveController.tick` periodically with the oldest queued request's age and the queued rows, and read
:meth:`AdaptiveController.current` when a batch runs.

The rule (documented in docs/serve.md):
- The *ladder* is the calibrated point (the manifest's thresholds, "home") followed by ever cheaper points of the
  Pareto curve that ``deploykit calibrate`` recorded, each at most ``step_ratio`` times the FLOPs of the one before.
  The controller never goes above home: adaptation only trades accuracy for latency under load.
- Signal ``s`` = max(p95 latency of requests that *arrived* after the last change and finished in the last
  ``window_s``, the oldest waiting request's wait counted from the last change at most): only what the current
  point did counts, so the backlog left by the previous point doesn't push the controller further down.
- *Service rate* of a rung: rows per compute second of the batches it ran in the last ``window_s``; for a rung
  with no recent batch, the most recent measured rung's rate scaled by the FLOPs ratio (cheaper rung, faster).
  *Predicted wait* at a rung = queued rows / its service rate: what a request arriving now would wait.
- Step down (cheaper) as soon as the predicted wait at the current rung exceeds ``high * SLO`` (once per batch
  measured at the new rung, so the controller doesn't act twice on the same guess), or when ``s > high * SLO``
  (at most once per ``down_dwell_s``). The move goes straight to the first cheaper rung whose predicted wait is at
  most ``high * SLO`` (the cheapest when none is), so a 2x overload is answered in one move, not one rung per dwell.
- Step up one rung when ``s * cost(up) / cost(current) < low * SLO`` and the predicted wait at the dearer rung is
  under ``low * SLO``, both for ``up_hold_s``: the latency the dearer point is predicted to cause must sit well
  inside the SLO, so the controller doesn't oscillate.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from deploykit.errors import ConfigError


@dataclass(frozen=True)
class OperatingPoint:
    """One rung of the ladder: thresholds and what calibration predicts for them."""

    level: int  # 0 = home (the calibrated thresholds); higher = cheaper
    thresholds: tuple[float | None, ...]
    flops_ratio: float
    expected_accuracy: float | None

    def as_params(self) -> dict[str, Any]:
        """The response ``parameters`` / stats view."""
        return {"operating_point": self.level, "expected_accuracy": self.expected_accuracy,
                "expected_flops_ratio": round(self.flops_ratio, 4)}


def build_ladder(curve: list[dict[str, Any]], home: list[float | None], home_flops: float | None = None,
                 home_accuracy: float | None = None, step_ratio: float = 0.95) -> list[OperatingPoint]:
    """Home point plus cheaper curve points, each at most ``step_ratio`` × the FLOPs of the previous rung.

    Args:
        curve: ``manifest.calibration["curve"]`` (``flops_ratio``, ``test_accuracy`` / ``val_accuracy``,
            ``thresholds``), any order.
        home: the manifest's thresholds (where the server starts and returns to).
        home_flops: FLOPs ratio of ``home`` (default: the curve point with the same thresholds, else the dearest).
        home_accuracy: expected accuracy of ``home`` (default: the matching curve point's, else unknown).
        step_ratio: how much cheaper each rung must be than the one before (coarser ladders move faster).
    """
    if not curve:
        raise ConfigError("the manifest has no calibration curve; run `deploykit calibrate ENGINE_DIR` before "
                          "serving with --latency-slo-ms")
    pts = sorted(curve, key=lambda p: -float(p.get("test_flops_ratio", p["flops_ratio"])))

    def acc(p: dict[str, Any]) -> float | None:
        v = p.get("test_accuracy", p.get("val_accuracy"))
        return None if v is None else float(v)

    def flops(p: dict[str, Any]) -> float:
        return float(p.get("test_flops_ratio", p["flops_ratio"]))

    same = [p for p in pts if _same(p["thresholds"], home)]
    if home_flops is None:
        home_flops = flops(same[0]) if same else flops(pts[0])
    if home_accuracy is None and same:
        home_accuracy = acc(same[0])
    ladder = [OperatingPoint(0, tuple(home), home_flops, home_accuracy)]
    for p in pts:
        if flops(p) <= step_ratio * ladder[-1].flops_ratio:
            ladder.append(OperatingPoint(len(ladder), tuple(p["thresholds"]), flops(p), acc(p)))
    return ladder


def _round(v: float | None) -> float | None:
    return None if v is None else round(v, 1)


def _same(a: list[float | None], b: list[float | None]) -> bool:
    if len(a) != len(b):
        return False
    return all((x is None and y is None) or (x is not None and y is not None and abs(x - y) < 1e-9)
               for x, y in zip(a, b))


class AdaptiveController:
    """Chooses the operating point from recent latency; thread-safe (observed on the loop, read on the worker).

    Args:
        ladder: from :func:`build_ladder`; rung 0 is home.
        slo_s: the latency target (p99) in seconds.
        high: step down when the signal exceeds ``high * slo_s`` (early enough to drain before the SLO).
        low: step up when the predicted signal at the dearer point is under ``low * slo_s``.
        window_s: latency window for the p95 and batch window for the service rate.
        down_dwell_s: least time between two down-steps on the latency signal (lets the queue react); a down-step
            on the predicted wait only waits for one batch measured at the new rung.
        up_hold_s: how long the up-condition must hold before a step up.
        instances: batches the server runs at once; the service rate is per instance, so waits divide by it.
        clock: time source (tests).
    """

    def __init__(self, ladder: list[OperatingPoint], slo_s: float, high: float = 0.5, low: float = 0.3,
                 window_s: float = 1.0, down_dwell_s: float = 0.3, up_hold_s: float = 2.0, instances: int = 1,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if slo_s <= 0 or not 0 < low < high <= 1:
            raise ConfigError(f"expected slo > 0 and 0 < low < high <= 1, got slo={slo_s}, low={low}, high={high}")
        self.ladder, self.slo_s, self.high, self.low = ladder, slo_s, high, low
        self.window_s, self.down_dwell_s, self.up_hold_s = window_s, down_dwell_s, up_hold_s
        self.instances = max(1, int(instances))
        self._clock = clock
        self._lock = threading.Lock()
        self._level = 0
        self._lat: deque[tuple[float, float]] = deque(maxlen=4096)  # (finished, arrived)
        self._batches: deque[tuple[float, int, float, int]] = deque(maxlen=1024)  # (finished, rows, seconds, level)
        self._changed = clock()
        self._up_since: float | None = None
        self.changes = {"down": 0, "up": 0}
        self.listeners: list[Callable[[OperatingPoint], None]] = []

    @classmethod
    def from_manifest(cls, manifest: Any, slo_ms: float, **kwargs: Any) -> AdaptiveController:
        """Ladder from ``manifest.calibration["curve"]`` with the manifest's thresholds as home."""
        from deploykit.runtime.cascade import stage_costs

        cal = manifest.calibration or {}
        home = list(manifest.thresholds())
        flops = acc = None
        if all(t is None for t in home[:-1]):  # exits off: full depth, whose figures calibration measured
            cum, full = stage_costs(manifest)
            flops, acc = float(cum[-1] / full), (cal.get("test") or {}).get("full_accuracy")
        ladder = build_ladder(cal.get("curve") or [], home, flops, acc)
        return cls(ladder, slo_ms / 1000.0, **kwargs)

    def current(self) -> OperatingPoint:
        """The point new batches should run at."""
        return self.ladder[self._level]

    def observe(self, latency_s: float) -> None:
        """Record one finished request."""
        with self._lock:
            now = self._clock()
            self._lat.append((now, now - latency_s))

    def observe_batch(self, rows: int, seconds: float, level: int | None = None) -> None:
        """Record one finished batch: ``rows`` run in ``seconds`` of compute at rung ``level`` (default: current)."""
        if rows <= 0 or seconds <= 0:
            return
        with self._lock:
            self._batches.append((self._clock(), int(rows), float(seconds), self._level if level is None else level))

    def service_rate(self, level: int | None = None) -> float | None:
        """Predicted rows/s at rung ``level`` (default: current); ``None`` before any batch was measured."""
        level = self._level if level is None else level
        now = self._clock()
        with self._lock:
            recent = [b for b in self._batches if b[0] >= now - self.window_s] or list(self._batches)[-8:]
        if not recent:
            return None
        own = [b for b in recent if b[3] == level]
        if own:
            return sum(b[1] for b in own) / sum(b[2] for b in own)
        ref = recent[-1][3]  # the latest measured rung, scaled by FLOPs
        same = [b for b in recent if b[3] == ref]
        rate = sum(b[1] for b in same) / sum(b[2] for b in same)
        return rate * self.ladder[ref].flops_ratio / max(self.ladder[level].flops_ratio, 1e-9)

    def predicted_wait(self, queued_rows: int, level: int | None = None) -> float:
        """Seconds a request arriving now would wait at rung ``level``: queued rows / service rate (0 if unknown)."""
        rate = self.service_rate(level)
        return queued_rows / (rate * self.instances) if rate and queued_rows > 0 else 0.0

    def _target(self, queued_rows: int, level: int) -> int:
        """First rung cheaper than ``level`` whose predicted wait is at most ``high * SLO`` (else the cheapest)."""
        for k in range(level + 1, len(self.ladder)):
            if self.predicted_wait(queued_rows, k) <= self.high * self.slo_s:
                return k
        return len(self.ladder) - 1

    def _measured_since_change(self) -> bool:
        with self._lock:
            return any(b[0] >= self._changed and b[3] == self._level for b in self._batches)

    def signal(self, oldest_wait_s: float = 0.0) -> float:
        """``max(p95 latency of requests served at the current point, oldest request's wait since the change)``."""
        now = self._clock()
        with self._lock:
            recent = [end - start for end, start in self._lat if end >= now - self.window_s and start >= self._changed]
        p95 = float(np.percentile(recent, 95)) if recent else 0.0
        return max(p95, min(oldest_wait_s, now - self._changed))

    def tick(self, oldest_wait_s: float = 0.0, queued_rows: int = 0) -> OperatingPoint:
        """Apply the rule once (``queued_rows``: rows waiting for a batch); returns the (possibly new) current point."""
        now = self._clock()
        s = self.signal(oldest_wait_s)
        level, bound = self._level, self.high * self.slo_s
        bottom = len(self.ladder) - 1
        predicted = self.predicted_wait(queued_rows, level)
        if predicted > bound and level < bottom and (self._measured_since_change()
                                                     or now - self._changed >= self.down_dwell_s):
            self._set(self._target(queued_rows, level), now, "down")
        elif s > bound or predicted > bound:
            self._up_since = None
            if s > bound and level < bottom and now - self._changed >= self.down_dwell_s:
                self._set(self._target(queued_rows, level) if queued_rows > 0 else level + 1, now, "down")
        elif level > 0:
            cur, up = self.ladder[level], self.ladder[level - 1]
            predicted_s = s * up.flops_ratio / max(cur.flops_ratio, 1e-9)
            calm = self.low * self.slo_s
            if predicted_s < calm and self.predicted_wait(queued_rows, level - 1) < calm:
                if self._up_since is None:
                    self._up_since = now
                elif now - self._up_since >= self.up_hold_s:
                    self._set(level - 1, now, "up")
            else:
                self._up_since = None
        return self.current()

    def _set(self, level: int, now: float, direction: str) -> None:
        self._level, self._changed, self._up_since = level, now, None
        self.changes[direction] += 1
        for fn in self.listeners:
            fn(self.ladder[level])

    def state(self) -> dict[str, Any]:
        """JSON view for ``/stats``."""
        return {**self.current().as_params(), "slo_ms": self.slo_s * 1000, "levels": len(self.ladder),
                "changes": dict(self.changes), "service_rate_rows_s": _round(self.service_rate()),
                "ladder": [{"flops_ratio": round(p.flops_ratio, 4), "expected_accuracy": p.expected_accuracy}
                           for p in self.ladder]}
