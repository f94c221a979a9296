"""The serve-local HTTP app: a thin Starlette adapter over the shared KServe v2 handler, plus ``/stats`` and the page.

The app owns a :class:`~deploykit.serve.batcher.Batcher` started and drained by the ASGI lifespan, so a server
shutdown (SIGTERM) finishes every request in flight before the engine is released. What kind of engine it serves
(a classification cascade, a MuE engine) is the business of :mod:`deploykit.serve.models` alone.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from importlib import resources
from typing import Any

import numpy as np
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Route

from deploykit.data.preprocess import MAX_IMAGE_PIXELS
from deploykit.serve import protocol
from deploykit.serve.batcher import Batcher, BatchStats
from deploykit.serve.drift import DriftWatch
from deploykit.serve.handler import ClientGone, Drain, KServeHandler, Submitted
from deploykit.serve.metrics import ServeMetrics
from deploykit.serve.models import served_model


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
    instances: int = 1  # batches run at once, one inference thread each (the engine must be thread-safe)
    drift_window: int = 500  # drift watch (deploykit/serve/drift.py): rows in the sliding window; 0 = off
    drift_threshold: float = 0.25  # total-variation distance that counts as drift
    drift_required: bool = False  # the user asked for drift watch: a manifest without a record is an error
    grpc_port: int | None = None  # KServe v2 over gRPC on this port too (deploykit/serve/grpc_app.py); None/0 = off
    grpc_host: str = "127.0.0.1"
    max_image_pixels: int = MAX_IMAGE_PIXELS  # per image file, checked from its header before decoding
    read_timeout_s: float = 30.0  # a request body must arrive within this (408 past it)
    drain_timeout_s: float = 30.0  # SIGTERM: how long accepted requests may take to finish (503 for those left)


def create_app(engine: Any, config: ServeConfig | None = None) -> Starlette:
    """Build the ASGI app around a loaded engine.

    ``engine``: a Cascade, a MuEEngine, or anything with their ``manifest`` and ``run`` / ``predict``.
    """
    config = config or ServeConfig()
    model = served_model(engine)
    model.max_image_pixels = config.max_image_pixels
    drain = Drain(config.drain_timeout_s)
    metrics = ServeMetrics(model.name, model.num_stages, config.max_batch_size)
    adaptive = (model.adaptive_controller(config.latency_slo_ms, config.instances)
                if config.latency_slo_ms is not None else None)
    if adaptive is not None:
        adaptive.listeners.append(lambda p: metrics.observe_operating_point(p))
        metrics.observe_operating_point(adaptive.current(), adaptive.slo_s)

    drift = _drift_watch(model.manifest, config)

    def run_batch(rows: np.ndarray, key: Any) -> dict[str, Any]:
        point = adaptive.current() if adaptive is not None and key is None else None
        calibrated = key is None and (point is None or point.level == 0)
        if point is not None:  # requests without their own thresholds follow the controller
            key = point.thresholds
        out = model.run(rows, key)
        if point is not None:
            out["operating_point"] = np.full(len(rows), point.level, dtype=np.int64)
        out["at_calibrated_thresholds"] = calibrated  # not an array: stays out of the responses
        return out

    def on_batch(stats: BatchStats) -> None:
        metrics.observe_batch(stats)
        if adaptive is not None and stats.result is not None and "operating_point" in stats.result:
            adaptive.observe_batch(stats.rows, stats.seconds, int(stats.result["operating_point"][0]))
        if drift is not None and stats.result is not None and stats.result.get("at_calibrated_thresholds"):
            d = drift.observe(stats.result["exit_stage"], stats.result["score"])
            if d is not None:
                metrics.observe_drift(d, drift.threshold)

    batcher = Batcher(run_batch, config.max_batch_size, config.max_queue_delay_ms / 1000.0, config.max_queue,
                      on_batch=on_batch, instances=config.instances)

    async def submit(req: Any) -> Submitted:
        result, queue_s = await batcher.submit(req.rows, model.batch_key(req))
        params = None
        if "operating_point" in result:  # a request split over batches reports its cheapest point
            params = adaptive.ladder[int(result["operating_point"].max())].as_params()
        return Submitted(result, queue_s, params)

    handler = KServeHandler(model, submit, metrics, config.max_request_mb,
                            ready=lambda: not (batcher.closing or drain.draining),
                            adaptive=adaptive, retry_after_s=config.retry_after_s,
                            on_scrape=lambda: metrics.queue_depth.labels(model.name).set(batcher.depth),
                            batching={"max_batch_size": config.max_batch_size,
                                      "max_queue_delay_ms": config.max_queue_delay_ms, "instances": config.instances},
                            read_timeout_s=config.read_timeout_s, drain=drain)

    async def stats(request: Request) -> Response:
        s = metrics.summary()
        s.update(model.page_info())
        s.update(queue_depth=batcher.depth, max_batch_size=config.max_batch_size,
                 max_queue_delay_ms=config.max_queue_delay_ms)
        if adaptive is not None:
            s["adaptive"] = adaptive.state()
        s["drift"] = drift.state() if drift is not None else None
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
        grpc_server = None
        if config.grpc_port:  # gRPC on the same loop, so it shares the batcher, limits and metrics with HTTP
            from deploykit.serve.grpc_app import start_grpc

            grpc_server = await start_grpc(handler, config.grpc_host, config.grpc_port, lambda: batcher.closing)
        app.state.grpc_server = grpc_server
        yield
        if ticker is not None:
            ticker.cancel()
        # stop taking RPCs (those in flight go on), finish everything queued, then let the RPCs answer
        stopping = asyncio.ensure_future(grpc_server.stop(grace=60)) if grpc_server is not None else None
        await batcher.drain_and_stop()
        if stopping is not None:
            await stopping

    async def adapt() -> None:
        while True:
            await asyncio.sleep(config.adaptive_tick_s)
            adaptive.tick(batcher.oldest_wait_s, batcher.queued_rows)

    async def not_found(request: Request, exc: Exception) -> Response:
        code = getattr(exc, "status_code", 404)
        return _error(code, f"{request.method} {request.url.path}: {getattr(exc, 'detail', 'not found')}; "
                            "see GET /v2 and /v2/models/{name} (KServe v2)")

    routes = [Route("/", index), Route("/stats", stats)]
    app = _App(routes=routes, lifespan=lifespan, exception_handlers={404: not_found, 405: not_found})
    app.kserve = handler
    app.state.batcher, app.state.metrics, app.state.info = batcher, metrics, model.info
    app.state.adaptive, app.state.model, app.state.handler = adaptive, model, handler
    app.state.drift, app.state.drain = drift, drain
    return app


class _App(Starlette):
    """Starlette for the page and ``/stats``; every other HTTP path goes straight to the KServe v2 handler.

    The KServe paths (infer above all) skip Starlette's routing, middleware and Request / Response objects, which
    on a small model cost the event loop about as much as the KServe work itself (docs/results.md, issue 17).
    """

    kserve: KServeHandler

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["path"] not in _STARLETTE_PATHS:
            await _kserve_asgi(self.kserve, scope, receive, send)
            return
        await super().__call__(scope, receive, send)


_STARLETTE_PATHS = frozenset(("/", "/stats"))


async def _kserve_asgi(handler: KServeHandler, scope: Any, receive: Any, send: Any) -> None:
    """One HTTP request answered by the shared handler, on bare ASGI (ASGI headers are already lower-case)."""
    headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}

    async def stream() -> AsyncIterator[bytes]:
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":  # the client went away: not a server error, nobody to answer
                raise ClientGone("client closed the connection before sending the whole body")
            chunk = message.get("body", b"")
            if chunk:
                yield chunk
            if not message.get("more_body", False):
                return

    r = await handler.handle(scope["method"], scope["path"], headers, stream)
    raw = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in r.headers.items()]
    if r.status >= 200 and r.status not in (204, 304):
        raw.append((b"content-length", str(len(r.body)).encode()))
    await send({"type": "http.response.start", "status": r.status, "headers": raw})
    await send({"type": "http.response.body", "body": r.body})


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> Response:
    headers = {"content-type": "application/json", **(headers or {})}
    return Response(protocol.error_body(message), status, headers=headers)


def _drift_watch(manifest: Any, config: ServeConfig) -> DriftWatch | None:
    """The drift watch, if on and the manifest has a calibration record (required if the user asked for it)."""
    import logging

    from deploykit.errors import ConfigError

    if config.drift_window <= 0:
        return None
    try:
        return DriftWatch.from_manifest(manifest, config.drift_window, config.drift_threshold)
    except ValueError as e:
        if config.drift_required:
            raise ConfigError(f"--drift-window / --drift-threshold: {e}") from e
        logging.getLogger("deploykit.serve").info("drift watch off: %s", e)
        return None
