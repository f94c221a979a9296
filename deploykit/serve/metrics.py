"""Prometheus metrics (``deploykit_`` prefix, base units, ``_total`` counters) plus a small live summary for the page.

Each server gets its own registry, so several servers in one process (tests) don't clash.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from typing import Any

import numpy as np
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from deploykit.serve.batcher import BatchStats

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)

OUTCOMES = {200: "success", 400: "bad_request", 404: "not_found", 408: "timeout", 413: "too_large",
            415: "bad_request", 499: "client_closed", 500: "error", 503: "overloaded"}


class ServeMetrics:
    """Every series serve-local exports, and the rolling window behind ``/stats``."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self, model: str, num_stages: int, max_batch_size: int | None = None, window: int = 2000) -> None:
        self.model = model
        sizes = set(_SIZE_BUCKETS)
        if max_batch_size:  # tell full batches from nearly-full ones
            sizes |= {max_batch_size, max(1, max_batch_size - 1), max(1, 3 * max_batch_size // 4)}
        size_buckets = tuple(sorted(sizes))
        self.num_stages = num_stages
        r = self.registry = CollectorRegistry()
        self.requests = Counter("deploykit_requests_total", "Infer requests by outcome and HTTP status code.",
                                ["model", "outcome", "code"], registry=r)
        self.request_seconds = Histogram("deploykit_request_duration_seconds",
                                         "Infer request latency, body read to response.", ["model"],
                                         buckets=_LATENCY_BUCKETS, registry=r)
        self.queue_seconds = Histogram("deploykit_queue_duration_seconds",
                                       "Time a request waited in the batching queue.", ["model"],
                                       buckets=_LATENCY_BUCKETS, registry=r)
        self.compute_seconds = Histogram("deploykit_batch_compute_duration_seconds",
                                         "Cascade time per batch.", ["model"], buckets=_LATENCY_BUCKETS, registry=r)
        self.batch_size = Histogram("deploykit_batch_size", "Rows per cascade run (dynamic batch size).", ["model"],
                                    buckets=size_buckets, registry=r)
        self.stage_batch_size = Histogram("deploykit_stage_batch_size",
                                          "Rows entering each stage after batch compaction.", ["model", "stage"],
                                          buckets=size_buckets, registry=r)
        self.exits = Counter("deploykit_exits_total", "Rows that exited at each stage.", ["model", "stage"],
                             registry=r)
        self.rows = Counter("deploykit_inference_rows_total", "Rows run through the cascade.", ["model"], registry=r)
        self.batches = Counter("deploykit_batches_total", "Cascade runs, by outcome.", ["model", "outcome"],
                               registry=r)
        self.queue_depth = Gauge("deploykit_queue_depth", "Requests waiting in the batching queue.", ["model"],
                                 registry=r)
        self.in_flight = Gauge("deploykit_requests_in_flight", "Infer requests being handled.", ["model"],
                               registry=r)
        for k in range(num_stages):
            self.exits.labels(model, str(k))
        # labelled children looked up once: observe_request runs per request, and .labels() costs a lock + hashing
        self._by_code: dict[int, Any] = {}
        self._request_seconds = self.request_seconds.labels(model)
        self._queue_seconds = self.queue_seconds.labels(model)
        self.in_flight_child = self.in_flight.labels(model)
        self._lock = threading.Lock()
        self._latencies: deque[float] = deque(maxlen=window)
        self._exit_counts = np.zeros(num_stages, dtype=np.int64)
        self._codes: dict[int, int] = {}
        self._fractions: deque[float] = deque(maxlen=window)
        self._triton = {k: [0, 0] for k in ("success", "fail", "queue", "compute_infer")}  # [count, ns]
        self._batch_stats: dict[int, list[int]] = {}  # batch size -> [count, ns]
        self._inferences = self._executions = self._last_inference_ms = 0
        self._started = time.time()

    def observe_request(self, code: int, seconds: float, queue_seconds: float | None) -> None:
        """Record one finished infer request."""
        child = self._by_code.get(code)
        if child is None:
            child = self._by_code[code] = self.requests.labels(self.model, OUTCOMES.get(code, "other"), str(code))
        child.inc()
        self._request_seconds.observe(seconds)
        if queue_seconds is not None:
            self._queue_seconds.observe(queue_seconds)
        with self._lock:
            self._codes[code] = self._codes.get(code, 0) + 1
            if code == 200:
                self._latencies.append(seconds)
            _add(self._triton["success" if code == 200 else "fail"], seconds)
            if queue_seconds is not None:
                _add(self._triton["queue"], queue_seconds)

    def observe_batch(self, s: BatchStats) -> None:
        """Record one cascade run (called by the batcher)."""
        self.batches.labels(self.model, "error" if s.error else "success").inc()
        self.batch_size.labels(self.model).observe(s.rows)
        self.compute_seconds.labels(self.model).observe(s.seconds)
        self.rows.labels(self.model).inc(s.rows)
        with self._lock:
            self._inferences += s.rows
            self._executions += 1
            self._last_inference_ms = int(time.time() * 1000)
            _add(self._triton["compute_infer"], s.seconds)
            _add(self._batch_stats.setdefault(s.rows, [0, 0]), s.seconds)
        if s.result is None:
            return
        for k, n in enumerate(s.result.get("stage_batch_sizes") or []):
            self.stage_batch_size.labels(self.model, str(k)).observe(n)
        if "exit_stage" in s.result:  # a cascade
            self.observe_exits(s.result["exit_stage"])
        if "layer_fraction" in s.result:  # a MuE engine: per-sample exits inside its streams and decoder
            self.observe_layers(s.result["layer_fraction"])

    def observe_layers(self, fractions: np.ndarray) -> None:
        """Record the fraction of layers each row ran (MuE; created on first use, so cascades don't export it)."""
        if not hasattr(self, "layer_fraction"):
            self.layer_fraction = Histogram("deploykit_layer_fraction", "Fraction of the model's layers each row "
                                            "ran (MuE's per-sample exits).", ["model"], registry=self.registry,
                                            buckets=(0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0))
        for f in np.asarray(fractions, dtype=np.float64).reshape(-1):
            self.layer_fraction.labels(self.model).observe(float(f))
        with self._lock:
            self._fractions.extend(np.asarray(fractions, dtype=np.float64).reshape(-1).tolist())

    def observe_exits(self, exit_stage: np.ndarray) -> None:
        """Count where rows left the cascade (serve-ray's ingress calls this directly: it has no batcher)."""
        counts = np.bincount(np.asarray(exit_stage, dtype=np.int64), minlength=self.num_stages)
        for k, n in enumerate(counts[: self.num_stages]):
            if n:
                self.exits.labels(self.model, str(k)).inc(int(n))
        with self._lock:
            self._exit_counts += counts[: self.num_stages]

    def observe_operating_point(self, point: Any, slo_s: float | None = None) -> None:
        """Set the load-adaptive gauges (created on first use, so servers without an SLO don't export them)."""
        if not hasattr(self, "op_level"):
            r = self.registry
            self.op_level = Gauge("deploykit_operating_point", "Load-adaptive rung (0 = calibrated thresholds; "
                                  "higher = cheaper, earlier exits).", ["model"], registry=r)
            self.op_accuracy = Gauge("deploykit_operating_point_expected_accuracy",
                                     "Accuracy the calibration curve predicts at the current operating point.",
                                     ["model"], registry=r)
            self.op_flops = Gauge("deploykit_operating_point_flops_ratio",
                                  "Expected FLOPs / full-model FLOPs at the current operating point.", ["model"],
                                  registry=r)
            self.op_changes = Counter("deploykit_operating_point_changes_total", "Operating point moves.",
                                      ["model", "direction"], registry=r)
            self.op_slo = Gauge("deploykit_latency_slo_seconds", "The --latency-slo-ms target.", ["model"],
                                registry=r)
            self._op_last = point.level
        elif point.level != self._op_last:
            self.op_changes.labels(self.model, "down" if point.level > self._op_last else "up").inc()
            self._op_last = point.level
        if slo_s is not None:
            self.op_slo.labels(self.model).set(slo_s)
        self.op_level.labels(self.model).set(point.level)
        self.op_flops.labels(self.model).set(point.flops_ratio)
        if point.expected_accuracy is not None:
            self.op_accuracy.labels(self.model).set(point.expected_accuracy)

    def observe_drift(self, distance: float, threshold: float) -> None:
        """Set the drift gauges (created on first use: servers without a calibration record don't export them)."""
        if not hasattr(self, "drift"):
            self.drift = Gauge("deploykit_exit_drift", "Total-variation distance between the joint distribution of "
                               "(exit stage, exit-score bin) over the drift window and at calibration (0 = same, "
                               "1 = disjoint).", ["model"], registry=self.registry)
            self.drift_threshold = Gauge("deploykit_exit_drift_threshold", "The --drift-threshold level.",
                                         ["model"], registry=self.registry)
        self.drift.labels(self.model).set(distance)
        self.drift_threshold.labels(self.model).set(threshold)

    def triton_statistics(self, version: str) -> dict[str, Any]:
        """This model's entry of Triton's statistics extension (``GET /v2/models/{name}/stats``, ModelStatistics).

        Durations are cumulative nanoseconds; ``compute_infer`` is the engine's time per batch (input and output
        handling are counted in the request, so ``compute_input`` / ``compute_output`` stay 0).
        """
        def d(v: list[int]) -> dict[str, int]:
            return {"count": v[0], "ns": v[1]}

        zero = {"count": 0, "ns": 0}
        with self._lock:
            t = {k: d(v) for k, v in self._triton.items()}
            batches = [{"batch_size": b, "compute_input": dict(zero), "compute_infer": d(v),
                        "compute_output": dict(zero)} for b, v in sorted(self._batch_stats.items())]
            return {"name": self.model, "version": version, "last_inference": self._last_inference_ms,
                    "inference_count": self._inferences, "execution_count": self._executions,
                    "inference_stats": {**t, "compute_input": dict(zero), "compute_output": dict(zero),
                                        "cache_hit": dict(zero), "cache_miss": dict(zero)},
                    "batch_stats": batches}

    def exposition(self) -> bytes:
        """The Prometheus text format."""
        return generate_latest(self.registry)

    def summary(self) -> dict[str, Any]:
        """A small JSON view for the page: exits per stage, recent latency percentiles, status codes."""
        with self._lock:
            lat = np.asarray(self._latencies, dtype=np.float64)
            exits = self._exit_counts.tolist()
            codes = {str(k): v for k, v in sorted(self._codes.items())}
            fractions = list(self._fractions)
        pct = (lambda q: float(np.percentile(lat, q) * 1000)) if lat.size else (lambda q: None)
        return {"model": self.model, "exits_per_stage": exits, "requests_by_code": codes,
                "latency_ms": {"p50": pct(50), "p90": pct(90), "p99": pct(99), "window": int(lat.size)},
                "uptime_s": time.time() - self._started,
                "mean_layer_fraction": float(np.mean(fractions)) if fractions else None}


def _add(acc: list[int], seconds: float) -> None:
    acc[0] += 1
    acc[1] += int(seconds * 1e9)
