"""Dynamic batching: gather requests for up to ``max_queue_delay`` into batches of up to ``max_batch_size`` rows.

Policy (documented in docs/serve.md):
- The batch size counts rows, not requests. A request larger than ``max_batch_size`` is split across consecutive
  batches and its response waits for all its parts, put back in row order by offset (with ``instances`` > 1
  the batches finish in any order); a batch is filled by taking part
  of the next request when only part of it fits, so batches run full under load.
- The delay is measured from the arrival of the oldest waiting request (Triton's semantics): a batch runs as soon
  as it is full, or when its oldest request has waited ``max_queue_delay``.
- Requests with different exit thresholds are never mixed: a batch takes the oldest request's thresholds and the
  waiting requests that share them; the others stay queued, in order, for the next batch.
- ``max_queue`` bounds the number of waiting requests; beyond it :class:`QueueFull` (HTTP 503).
- Inference runs off the event loop on ``instances`` dedicated threads (Triton's ``instance_group`` count): with
  more than one, several batches run at once, each on its own thread; the run function must be thread-safe (ONNX
  Runtime CPU sessions are). An exception there fails every request in that batch and nothing else.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np

Thresholds = tuple[float | None, ...] | None
RunFn = Callable[[np.ndarray, Thresholds], dict[str, Any]]


class QueueFull(Exception):
    """The queue holds ``max_queue`` requests already (or the server is shutting down)."""


@dataclass
class _Pending:
    rows: np.ndarray
    thresholds: tuple[float | None, ...] | None
    future: asyncio.Future
    enqueued: float
    taken: int = 0
    parts: dict[int, dict[str, np.ndarray]] = field(default_factory=dict)  # row offset -> that part's result
    done_rows: int = 0
    queue_seconds: float = 0.0

    @property
    def left(self) -> int:
        return self.rows.shape[0] - self.taken


@dataclass
class BatchStats:
    """What one cascade run did, handed to the metrics observer."""

    rows: int
    requests: int
    seconds: float
    result: dict[str, Any] | None
    error: BaseException | None


class Batcher:
    """Queue + worker tasks that form batches and run them on ``instances`` inference threads.

    Args:
        run_fn: ``(rows float32 [B,C,H,W], thresholds or None) -> dict`` of per-row arrays (``probs``,
            ``exit_stage``, ``score``...) and optionally ``stage_batch_sizes``; called on the inference thread.
        max_batch_size: rows per cascade run.
        max_queue_delay_s: how long the oldest request may wait for a batch to fill.
        max_queue: waiting requests beyond which :meth:`submit` raises :class:`QueueFull`.
        on_batch: called on the event loop after each run (metrics).
        instances: batches that may run at once (one inference thread each).
    """

    def __init__(self, run_fn: RunFn, max_batch_size: int = 32, max_queue_delay_s: float = 0.005,
                 max_queue: int = 256, on_batch: Callable[[BatchStats], None] | None = None,
                 instances: int = 1) -> None:
        if max_batch_size < 1 or max_queue < 1 or max_queue_delay_s < 0 or instances < 1:
            raise ValueError("max_batch_size, max_queue and instances must be >= 1 and max_queue_delay_s >= 0")
        self.run_fn = run_fn
        self.max_batch_size = max_batch_size
        self.max_queue_delay_s = max_queue_delay_s
        self.max_queue = max_queue
        self.on_batch = on_batch
        self._queue: deque[_Pending] = deque()
        self._rows: dict[Thresholds, int] = {}  # rows waiting per thresholds key
        self._wakeup = asyncio.Event()
        self.instances = instances
        self._executor = ThreadPoolExecutor(max_workers=instances, thread_name_prefix="deploykit-infer")
        self._tasks: list[asyncio.Task] = []
        self._closing = False
        self._running = 0  # batches on the inference threads now

    # ---- lifecycle -----------------------------------------------------------------------------------------
    def start(self) -> None:
        """Start one worker task per instance on the running event loop."""
        if not self._tasks:
            loop = asyncio.get_running_loop()
            self._tasks = [loop.create_task(self._worker(), name=f"deploykit-batcher-{i}")
                           for i in range(self.instances)]

    async def drain_and_stop(self) -> None:
        """Refuse new requests, finish every queued and running one, then stop the worker and the thread."""
        self._closing = True
        while self._queue or self._running:
            self._wakeup.set()
            await asyncio.sleep(0.01)
        for task in self._tasks:
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                pass
        self._executor.shutdown(wait=True)

    @property
    def depth(self) -> int:
        """Requests waiting (not yet fully handed to the inference thread)."""
        return len(self._queue)

    @property
    def oldest_wait_s(self) -> float:
        """Seconds the oldest waiting request has been queued (0 when none): the load-adaptive controller's signal."""
        return time.perf_counter() - self._queue[0].enqueued if self._queue else 0.0

    @property
    def queued_rows(self) -> int:
        """Rows waiting for a batch (parts of split requests included): the controller's predicted-wait input."""
        return sum(self._rows.values())

    @property
    def closing(self) -> bool:
        return self._closing

    # ---- submit --------------------------------------------------------------------------------------------
    async def submit(self, rows: np.ndarray, thresholds: tuple[float | None, ...] | None = None
                     ) -> tuple[dict[str, np.ndarray], float]:
        """Queue ``rows``; returns (this request's rows of the result, seconds it waited in the queue).

        Raises:
            QueueFull: the queue is full or the server is shutting down.
            Exception: whatever the inference raised for this request's batch.
        """
        if self._closing:
            raise QueueFull("the server is shutting down")
        if len(self._queue) >= self.max_queue:
            raise QueueFull(f"the queue holds {len(self._queue)} requests (max_queue={self.max_queue})")
        item = _Pending(rows, thresholds, asyncio.get_running_loop().create_future(), time.perf_counter())
        self._queue.append(item)
        waiting = self._rows[thresholds] = self._rows.get(thresholds, 0) + rows.shape[0]
        if len(self._queue) == 1 or waiting >= self.max_batch_size:  # only wake the worker when it matters
            self._wakeup.set()
        result = await item.future
        return result, item.queue_seconds

    # ---- worker --------------------------------------------------------------------------------------------
    async def _worker(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not self._queue:
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            head = self._queue[0]
            if head.future.done():  # its client went away before it ran
                self._queue.popleft()
                self._sub_rows(head.thresholds, head.left)
                continue
            deadline = head.enqueued + self.max_queue_delay_s
            while self._ready_rows(head.thresholds) < self.max_batch_size and not self._closing:
                wait = deadline - time.perf_counter()
                if wait <= 0:
                    break
                self._wakeup.clear()
                try:
                    await asyncio.wait_for(self._wakeup.wait(), timeout=wait)
                except asyncio.TimeoutError:
                    break
            parts = self._take(head.thresholds)
            if not parts:
                continue
            x = parts[0][0].rows[parts[0][1]:parts[0][2]] if len(parts) == 1 else np.concatenate(
                [p.rows[a:b] for p, a, b in parts])
            self._running += 1
            t0 = time.perf_counter()
            error: BaseException | None = None
            result = None
            try:
                result = await loop.run_in_executor(self._executor, self.run_fn, x, head.thresholds)
            except Exception as e:  # an engine fault fails this batch only
                error = e
            finally:
                self._running -= 1
            seconds = time.perf_counter() - t0
            self._deliver(parts, result, error)
            if self.on_batch is not None:
                self.on_batch(BatchStats(int(x.shape[0]), len({id(p) for p, _, _ in parts}), seconds, result, error))

    def _ready_rows(self, key: Thresholds) -> int:
        return self._rows.get(key, 0)

    def _sub_rows(self, key: Thresholds, n: int) -> None:
        """Count rows out; a thresholds key with none left is dropped (unique per-request thresholds don't pile up)."""
        left = self._rows.get(key, 0) - n
        if left > 0:
            self._rows[key] = left
        else:
            self._rows.pop(key, None)

    def abandon_queued(self, reason: str) -> int:
        """Fail every request still waiting (not running) with :class:`QueueFull`; returns how many (drain deadline)."""
        n = 0
        for p in self._queue:
            if not p.future.done():
                p.future.set_exception(QueueFull(reason))
                n += 1
        self._queue.clear()
        self._rows.clear()
        return n

    def _take(self, key: Thresholds) -> list[tuple[_Pending, int, int]]:
        """Pop up to ``max_batch_size`` rows of requests sharing ``key``, oldest first, splitting the last."""
        room, parts, keep = self.max_batch_size, [], deque()
        now = time.perf_counter()
        while self._queue:
            p = self._queue.popleft()
            if p.future.done():  # the client went away, or an earlier part failed: drop the rest
                self._sub_rows(p.thresholds, p.left)
                continue
            if room == 0 or p.thresholds != key:
                keep.append(p)
                continue
            n = min(room, p.left)
            if p.taken == 0:
                p.queue_seconds = now - p.enqueued
            parts.append((p, p.taken, p.taken + n))
            p.taken += n
            self._sub_rows(key, n)
            room -= n
            if p.left:
                keep.append(p)
        keep.extend(self._queue)
        self._queue = keep
        return parts

    @staticmethod
    def _deliver(parts: list[tuple[_Pending, int, int]], result: dict[str, Any] | None,
                 error: BaseException | None) -> None:
        off = 0
        for p, a, b in parts:
            n = b - a
            if p.future.done():  # an earlier part already failed (or the client went away)
                off += n
                continue
            if error is not None:
                p.future.set_exception(error)
                continue
            p.parts[a] = {k: v[off:off + n] for k, v in result.items() if isinstance(v, np.ndarray)}
            p.done_rows += n
            off += n
            if p.done_rows == p.rows.shape[0]:
                p.future.set_result(_reassemble(p.parts))


def _reassemble(parts: dict[int, dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """A split request's parts in row order: with several instances, batches finish in any order."""
    if len(parts) == 1:
        return next(iter(parts.values()))
    ordered = [parts[a] for a in sorted(parts)]
    return {k: np.concatenate([q[k] for q in ordered]) for k in ordered[0]}
