"""Drift watch: is the served traffic still exiting the way calibration said it would?

A sliding window of the last ``window`` served rows (exit stage and exit score of each) is compared with the
calibration record in the manifest (``calibration.exit_record``, written by ``deploykit calibrate``). The distance
is the total-variation distance between the joint distributions of (exit stage, exit-score bin); see
:mod:`deploykit.runtime.exit_record` for its meaning. Only rows run at the calibrated thresholds count (requests
with their own thresholds, and load-adaptive rungs other than home, exit differently by design).

The distance is exported as the ``deploykit_exit_drift`` gauge once the window is full; crossing ``threshold``
logs a warning (and going back below it logs that too), and ``/stats`` carries the state for the page.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from typing import Any

import numpy as np

from deploykit.runtime.exit_record import DISTANCE, check_record, joint_counts, tv_distance

log = logging.getLogger("deploykit.serve")

DEFAULT_WINDOW = 500
DEFAULT_THRESHOLD = 0.25


class DriftWatch:
    """Sliding window of (exit stage, exit score) against the calibration record; thread-safe."""

    def __init__(self, record: dict[str, Any], window: int = DEFAULT_WINDOW,
                 threshold: float = DEFAULT_THRESHOLD) -> None:
        self.record, self.window, self.threshold = record, int(window), float(threshold)
        self._stage: deque[int] = deque(maxlen=self.window)
        self._score: deque[float] = deque(maxlen=self.window)
        self._lock = threading.Lock()
        self.distance: float | None = None  # None until the window is full
        self.alarm = False
        self.rows_seen = 0
        self.crossings = 0

    @classmethod
    def from_manifest(cls, manifest: Any, window: int, threshold: float) -> DriftWatch:
        """The watch for a calibrated manifest; ValueError if it has no (usable) exit record."""
        record = (manifest.calibration or {}).get("exit_record")
        if record is None:
            raise ValueError("the manifest has no calibration exit record (calibrated before drift watch existed, "
                             "or never calibrated); run `deploykit calibrate ENGINE_DIR`")
        check_record(record, manifest.num_stages)
        return cls(record, window, threshold)

    def observe(self, exit_stage: np.ndarray, score: np.ndarray) -> float | None:
        """Add one batch's rows; returns the distance (None while the window fills)."""
        stage = np.asarray(exit_stage, dtype=np.int64).ravel()
        sc = np.asarray(score, dtype=np.float64).ravel()
        with self._lock:
            self._stage.extend(stage.tolist())
            self._score.extend(sc.tolist())
            self.rows_seen += len(stage)
            if len(self._stage) < self.window:
                return None
            counts = joint_counts(self.record, np.fromiter(self._stage, np.int64), np.fromiter(self._score, float))
            self.distance = tv_distance(self.record, counts)
            was, self.alarm = self.alarm, self.distance > self.threshold
        if self.alarm and not was:
            self.crossings += 1
            log.warning("exit drift %.3f > %.3f over the last %d rows: served inputs no longer exit the way "
                        "calibration did; the thresholds' accuracy promise may not hold (re-calibrate on recent "
                        "data)", self.distance, self.threshold, self.window)
        elif was and not self.alarm:
            log.info("exit drift back to %.3f (<= %.3f)", self.distance, self.threshold)
        return self.distance

    def window_fractions(self) -> list[float]:
        with self._lock:
            st = np.fromiter(self._stage, np.int64)
        n = self.record["num_stages"]
        return (np.bincount(st, minlength=n)[:n] / max(len(st), 1)).tolist()

    def state(self) -> dict[str, Any]:
        """For ``/stats`` and the page."""
        return {"distance": self.distance, "threshold": self.threshold, "window": self.window,
                "rows_in_window": min(self.rows_seen, self.window), "rows_seen": self.rows_seen,
                "alarm": self.alarm, "crossings": self.crossings, "meaning": DISTANCE,
                "calibration_exit_fractions": self.record["exit_fractions"],
                "window_exit_fractions": self.window_fractions()}
