"""The serve-local HTTP app (Starlette): KServe v2 REST routes, ``/metrics``, ``/stats`` and the page at ``/``.

The app owns a :class:`~deploykit.serve.batcher.Batcher` started and drained by the ASGI lifespan, so a server
shutdown (SIGTERM) finishes every request in flight before the cascade is released.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from importlib import resources
from typing import Any

import numpy as np
from starlette.applications import Starlette
from starlette.requests import ClientDisconnect, Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Route

from deploykit import __version__
from deploykit.data.preprocess import MAX_IMAGE_PIXELS
from deploykit.data.preprocess import decode_image as decode_pixels
from deploykit.errors import DataError
from deploykit.serve import protocol
from deploykit.serve.adaptive import AdaptiveController
from deploykit.serve.batcher import Batcher, BatchStats, QueueFull
from deploykit.serve.metrics import ServeMetrics

_PARSE_IN_THREAD_BYTES = 64 * 1024


@dataclass
class ServeConfig:
    """Batching and admission knobs (CLI flags of ``deploykit serve-local``)."""

    max_batch_size: int = 32
    max_queue_delay_ms: float = 5.0
    max_queue: int = 256
    max_request_mb: float = 16.0
    retry_after_s: int = 1
    latency_slo_ms: float | None = None  # load-adaptive exits (deploykit/serve/adaptive.py); None = off
    adaptive_tick_s: float = 0.05
    instances: int = 1  # batches run at once, one inference thread each (the cascade must be thread-safe)
    max_image_pixels: int = MAX_IMAGE_PIXELS  # per image file, checked from its header before decoding
    read_timeout_s: float = 30.0  # a request body must arrive within this (408 past it)
    drain_timeout_s: float = 30.0  # SIGTERM: how long accepted requests may take to finish (503 for those left)


class Drain:
    """Shutdown state shared by the app and the server: readiness, requests in the handler, the drain deadline.

    ``begin`` (SIGTERM) turns readiness to 503; requests keep being served until the deadline; ``expire`` (the
    deadline) answers every request still waiting in the queue or for its body with a 503, so each accepted
    request is answered exactly once, within ``--drain-timeout``.
    """

    def __init__(self, timeout_s: float) -> None:
        self.timeout_s = timeout_s
        self.active = 0  # infer requests inside the handler
        self.deadline: float | None = None
        self.expired: asyncio.Future | None = None  # created on the server's loop (lifespan)

    @property
    def draining(self) -> bool:
        return self.deadline is not None

    def begin(self) -> None:
        if self.deadline is None:
            self.deadline = time.monotonic() + self.timeout_s

    def remaining_s(self) -> float:
        return float("inf") if self.deadline is None else max(0.0, self.deadline - time.monotonic())

    def expire(self) -> None:
        """The deadline passed: answer what is still queued or reading its body with a 503."""
        if self.expired is not None and not self.expired.done():
            self.expired.set_result(True)


class _HTTPError(Exception):
    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.headers = status, headers or {}


def create_app(cascade: Any, config: ServeConfig | None = None) -> Starlette:
    """Build the ASGI app around a loaded cascade (anything with ``run``, ``manifest``)."""
    config = config or ServeConfig()
    manifest = cascade.manifest
    info = protocol.ModelInfo.from_manifest(manifest)
    metrics = ServeMetrics(info.name, info.num_stages, config.max_batch_size)
    max_bytes = int(config.max_request_mb * 1024 * 1024)
    pre = manifest.preprocessing
    drain = Drain(config.drain_timeout_s)

    adaptive = (AdaptiveController.from_manifest(manifest, config.latency_slo_ms, instances=config.instances)
                if config.latency_slo_ms is not None else None)
    if adaptive is not None:
        adaptive.listeners.append(lambda p: metrics.observe_operating_point(p))
        metrics.observe_operating_point(adaptive.current(), adaptive.slo_s)

    def run_batch(x: np.ndarray, thresholds: tuple[float | None, ...] | None) -> dict[str, Any]:
        point = adaptive.current() if adaptive is not None and thresholds is None else None
        if point is not None:  # requests without their own thresholds follow the controller
            thresholds = point.thresholds
        r = cascade.run(x, list(thresholds) if thresholds is not None else None)
        out = {"probs": r.probs, "exit_stage": r.exit_stage, "score": r.score,
               "stage_batch_sizes": list(r.stage_batch_sizes)}
        if point is not None:
            out["operating_point"] = np.full(len(x), point.level, dtype=np.int64)
        return out

    def on_batch(stats: BatchStats) -> None:
        metrics.observe_batch(stats)
        if adaptive is not None and stats.result is not None and "operating_point" in stats.result:
            adaptive.observe_batch(stats.rows, stats.seconds, int(stats.result["operating_point"][0]))

    batcher = Batcher(run_batch, config.max_batch_size, config.max_queue_delay_ms / 1000.0, config.max_queue,
                      on_batch=on_batch, instances=config.instances)

    def decode_image(data: bytes) -> np.ndarray:
        return decode_pixels(data, pre, max_pixels=config.max_image_pixels)

    def parse(body: bytes, headers: dict[str, str]) -> protocol.InferRequest:
        return protocol.parse_infer_request(body, headers, info, decode_image)

    def check_model(request: Request) -> None:
        try:
            protocol.check_model(info, request.path_params["name"], request.path_params.get("version"))
        except protocol.ProtocolError as e:
            raise _HTTPError(e.status, str(e)) from e

    async def read_body(request: Request) -> bytes:
        """The body within ``read_timeout_s`` (and the drain deadline): a stalled client holds nothing for long."""
        reader = asyncio.ensure_future(_read_body(request))
        stop = {reader} if drain.expired is None else {reader, drain.expired}
        done, _ = await asyncio.wait(stop, timeout=config.read_timeout_s, return_when=asyncio.FIRST_COMPLETED)
        if reader in done:
            return reader.result()
        reader.cancel()
        if drain.expired is not None and drain.expired.done():
            raise _HTTPError(503, "the server is shutting down and the request body had not arrived; retry",
                             {"retry-after": str(config.retry_after_s), "connection": "close"})
        raise _HTTPError(408, f"the request body did not arrive within {config.read_timeout_s:g} s "
                              "(--read-timeout); send it at once", {"connection": "close"})

    async def _read_body(request: Request) -> bytes:
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > max_bytes:
            if int(declared) <= 4 * max_bytes:  # read and drop it, so simple clients see the 413, not a reset
                async for _ in request.stream():
                    pass
            raise _HTTPError(413, f"request body of {int(declared)} bytes is over the limit of {max_bytes} bytes "
                                  f"(--max-request-mb {config.max_request_mb:g}); send fewer rows per request")
        chunks, size = [], 0
        try:
            async for chunk in request.stream():
                size += len(chunk)
                if size > max_bytes:
                    raise _HTTPError(413, f"request body is over the limit of {max_bytes} bytes "
                                          f"(--max-request-mb {config.max_request_mb:g}); send fewer rows per "
                                          "request")
                chunks.append(chunk)
        except ClientDisconnect as e:  # the client went away: not a server error, nobody to answer
            raise _HTTPError(499, "client closed the connection before sending the whole body") from e
        return b"".join(chunks)

    async def infer_once(request: Request) -> tuple[Response, int, float | None]:
        check_model(request)
        body = await read_body(request)
        headers = {k.lower(): v for k, v in request.headers.items()}
        try:
            if len(body) > _PARSE_IN_THREAD_BYTES or b'"BYTES"' in body[:4096]:
                req = await asyncio.get_running_loop().run_in_executor(None, parse, body, headers)
            else:
                req = parse(body, headers)
        except protocol.ProtocolError as e:
            raise _HTTPError(e.status, str(e)) from e
        try:
            result, queue_s = await batcher.submit(req.rows, req.thresholds)
        except QueueFull as e:
            raise _HTTPError(503, f"server busy: {e}; retry after {config.retry_after_s} s",
                             {"retry-after": str(config.retry_after_s)}) from e
        except DataError as e:
            raise _HTTPError(400, str(e)) from e
        except Exception as e:  # engine fault: this batch fails, the server stays up
            raise _HTTPError(500, f"inference failed ({type(e).__name__}: {e}); the server is still up, "
                                  "retry or check the engine") from e
        params = None
        if "operating_point" in result:  # a request split over batches reports its cheapest point
            params = adaptive.ladder[int(result["operating_point"].max())].as_params()
        body_out, extra = protocol.build_response(req, protocol.output_arrays(result, info.labels), info, params)
        return Response(body_out, 200, headers=extra), 200, queue_s

    async def infer(request: Request) -> Response:
        t0 = time.perf_counter()
        code, queue_s = 500, None
        metrics.in_flight.labels(info.name).inc()
        drain.active += 1
        try:
            response, code, queue_s = await infer_once(request)
            return response
        except _HTTPError as e:
            code = e.status
            return _error(e.status, str(e), e.headers)
        finally:
            drain.active -= 1
            metrics.in_flight.labels(info.name).dec()
            metrics.observe_request(code, time.perf_counter() - t0, queue_s)
            if adaptive is not None and code == 200:
                adaptive.observe(time.perf_counter() - t0)

    async def live(request: Request) -> Response:
        return Response(status_code=200)

    async def ready(request: Request) -> Response:
        return Response(status_code=503 if batcher.closing or drain.draining else 200)

    async def server_meta(request: Request) -> Response:
        return JSONResponse(protocol.server_metadata(__version__))

    async def model_meta(request: Request) -> Response:
        try:
            check_model(request)
        except _HTTPError as e:
            return _error(e.status, str(e))
        return JSONResponse(protocol.model_metadata(info))

    async def model_ready(request: Request) -> Response:
        try:
            check_model(request)
        except _HTTPError as e:
            return _error(e.status, str(e))
        return Response(status_code=503 if batcher.closing or drain.draining else 200)

    async def prom(request: Request) -> Response:
        metrics.queue_depth.labels(info.name).set(batcher.depth)
        return Response(metrics.exposition(), headers={"content-type": metrics.content_type})

    async def stats(request: Request) -> Response:
        s = metrics.summary()
        s.update(queue_depth=batcher.depth, num_stages=info.num_stages, labels=info.labels,
                 max_batch_size=config.max_batch_size, max_queue_delay_ms=config.max_queue_delay_ms,
                 thresholds=list(manifest.thresholds()))
        if adaptive is not None:
            s["adaptive"] = adaptive.state()
        return JSONResponse(s)

    page = resources.files("deploykit.serve").joinpath("static/index.html").read_text()

    async def index(request: Request) -> Response:
        return HTMLResponse(page)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        batcher.start()
        drain.expired = asyncio.get_running_loop().create_future()
        drain.expired.add_done_callback(lambda _: batcher.abandon_queued(
            f"the server shut down before this request ran (--drain-timeout {config.drain_timeout_s:g} s)"))
        ticker = asyncio.get_running_loop().create_task(adapt()) if adaptive is not None else None
        yield
        if ticker is not None:
            ticker.cancel()
        await batcher.drain_and_stop()

    async def adapt() -> None:
        while True:
            await asyncio.sleep(config.adaptive_tick_s)
            adaptive.tick(batcher.oldest_wait_s, batcher.queued_rows)

    m = "/v2/models/{name}"
    mv = "/v2/models/{name}/versions/{version}"
    routes = [
        Route("/", index), Route("/metrics", prom), Route("/stats", stats),
        Route("/v2", server_meta), Route("/v2/health/live", live), Route("/v2/health/ready", ready),
        Route(m, model_meta), Route(mv, model_meta),
        Route(m + "/ready", model_ready), Route(mv + "/ready", model_ready),
        Route(m + "/infer", infer, methods=["POST"]), Route(mv + "/infer", infer, methods=["POST"]),
    ]
    async def not_found(request: Request, exc: Exception) -> Response:
        code = getattr(exc, "status_code", 404)
        return _error(code, f"{request.method} {request.url.path}: {getattr(exc, 'detail', 'not found')}; "
                            "see GET /v2 and /v2/models/{name} (KServe v2)")

    app = Starlette(routes=routes, lifespan=lifespan, exception_handlers={404: not_found, 405: not_found})
    app.state.batcher, app.state.metrics, app.state.info = batcher, metrics, info
    app.state.adaptive = adaptive
    app.state.drain = drain
    return app


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> Response:
    headers = {"content-type": "application/json", **(headers or {})}
    return Response(protocol.error_body(message), status, headers=headers)
