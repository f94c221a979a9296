"""The one KServe v2 HTTP request handler, shared by serve-local (Starlette) and serve-ray (the Ray Serve ingress).

Framework-free: a front-end hands over method, path, headers and the body stream, and sends back the
:class:`Reply`. The handler routes the KServe v2 paths, reads the body under the size limit, lets the engine kind's
:class:`~deploykit.serve.models.ServedModel` parse it, submits it (the front-end's ``submit``: serve-local's batcher,
serve-ray's stage deployments), builds the response, and maps every error to its status code in one place
(:func:`error_reply`). Request metrics and the load-adaptive controller's latency signal are recorded here too, so
both front-ends export the same series.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from deploykit import __version__
from deploykit.errors import DataError
from deploykit.serve import protocol
from deploykit.serve.batcher import QueueFull
from deploykit.serve.metrics import ServeMetrics
from deploykit.serve.models import ServedModel

_MODEL_PATH = re.compile(r"^/v2/models/([^/]+)(?:/versions/([^/]+))?(/ready|/infer)?/?$")
_PARSE_IN_THREAD_BYTES = 64 * 1024


@dataclass
class Reply:
    """An HTTP response, framework-free."""

    status: int
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)


@dataclass
class Submitted:
    """What a front-end's ``submit`` returns.

    This request's rows of the result, its queue wait, and response ``parameters`` (e.g. the load-adaptive
    operating point).
    """

    result: dict[str, np.ndarray]
    queue_s: float | None = None
    parameters: dict[str, Any] | None = None


Submit = Callable[[Any], Awaitable[Submitted]]


class TooLarge(Exception):
    """The request body is over ``--max-request-mb``."""


def json_reply(obj: Any, status: int = 200) -> Reply:
    """A JSON body reply."""
    import json

    return Reply(status, json.dumps(obj).encode(), {"content-type": "application/json"})


def error_reply(e: BaseException, retry_after_s: int = 1) -> Reply:
    """The one mapping from an exception to a KServe v2 error reply (``{"error": ...}``)."""
    headers = {"content-type": "application/json"}
    if isinstance(e, protocol.ProtocolError):
        status, msg = e.status, str(e)
    elif isinstance(e, TooLarge):
        status, msg = 413, str(e)
    elif isinstance(e, QueueFull):
        status, msg = 503, f"server busy: {e}; retry after {retry_after_s} s"
        headers["retry-after"] = str(retry_after_s)
    elif isinstance(e, DataError):
        status, msg = 400, str(e)
    else:  # engine fault: this request fails, the server stays up
        status, msg = 500, (f"inference failed ({type(e).__name__}: {e}); the server is still up, retry or check "
                            "the engine")
    return Reply(status, protocol.error_body(msg), headers)


class KServeHandler:
    """KServe v2 over HTTP for one served model.

    Args:
        model: the engine kind's adapter (parse, response, metadata).
        submit: runs a parsed request; raises :class:`QueueFull` when overloaded.
        metrics: the server's metrics (request counts and latency are recorded here).
        max_request_mb: body size limit (413 beyond it).
        ready: whether the server takes requests (``False`` while draining: 503 on the ready endpoints).
        adaptive: the load-adaptive controller, fed each successful request's latency.
        on_scrape: called before ``/metrics`` is rendered (to set gauges such as the queue depth).
        retry_after_s: the ``Retry-After`` of a 503.
    """

    def __init__(self, model: ServedModel, submit: Submit, metrics: ServeMetrics, max_request_mb: float,
                 ready: Callable[[], bool] = lambda: True, adaptive: Any = None,
                 on_scrape: Callable[[], None] | None = None, retry_after_s: int = 1) -> None:
        self.model, self.submit, self.metrics = model, submit, metrics
        self.max_request_mb = max_request_mb
        self.max_bytes = int(max_request_mb * 1024 * 1024)
        self.ready, self.adaptive, self.on_scrape = ready, adaptive, on_scrape
        self.retry_after_s = retry_after_s

    async def handle(self, method: str, path: str, headers: dict[str, str],
                     stream: Callable[[], AsyncIterator[bytes]]) -> Reply:
        """Answer one request; ``headers`` lower-cased, ``stream()`` yields the body in chunks."""
        method = "GET" if method == "HEAD" else method
        try:
            return await self._route(method, path, headers, stream)
        except Exception as e:  # noqa: BLE001  (every error becomes a reply; infer errors are mapped in _infer)
            return error_reply(e, self.retry_after_s)

    async def _route(self, method: str, path: str, headers: dict[str, str],
                     stream: Callable[[], AsyncIterator[bytes]]) -> Reply:
        m = _MODEL_PATH.match(path)
        known = path in ("/v2", "/v2/", "/v2/health/live", "/v2/health/ready", "/metrics") or m is not None
        if not known:
            raise protocol.ProtocolError(f"{method} {path}: not found; see GET /v2 and /v2/models/{{name}} "
                                         "(KServe v2)", 404)
        post = m is not None and m.group(3) == "/infer"
        if method != ("POST" if post else "GET"):
            raise protocol.ProtocolError(f"{method} {path}: method not allowed; use {'POST' if post else 'GET'}",
                                         405)
        if m is None:
            return self._server_route(path)
        protocol.check_model(self.model.info, m.group(1), m.group(2))
        if m.group(3) == "/ready":
            return Reply(200 if self.ready() else 503)
        if m.group(3) is None:
            return json_reply(self.model.metadata())
        return await self._infer(headers, stream)

    def _server_route(self, path: str) -> Reply:
        if path in ("/v2", "/v2/"):
            return json_reply(protocol.server_metadata(__version__))
        if path == "/v2/health/live":
            return Reply(200)
        if path == "/v2/health/ready":
            return Reply(200 if self.ready() else 503)
        if self.on_scrape is not None:
            self.on_scrape()
        return Reply(200, self.metrics.exposition(), {"content-type": self.metrics.content_type})

    async def _infer(self, headers: dict[str, str], stream: Callable[[], AsyncIterator[bytes]]) -> Reply:
        t0, code, queue_s = time.perf_counter(), 500, None
        self.metrics.in_flight.labels(self.model.name).inc()
        try:
            body = await self.read_body(headers, stream)
            if len(body) > _PARSE_IN_THREAD_BYTES or b'"BYTES"' in body[:4096]:  # decoding images: off the loop
                req = await asyncio.get_running_loop().run_in_executor(None, self.model.parse, body, headers)
            else:
                req = self.model.parse(body, headers)
            done = await self.submit(req)
            out, extra = self.model.respond(req, done.result, done.parameters)
            code, queue_s = 200, done.queue_s
            return Reply(200, out, extra)
        except Exception as e:  # noqa: BLE001  (mapped once, below)
            reply = error_reply(e, self.retry_after_s)
            code = reply.status
            return reply
        finally:
            self.metrics.in_flight.labels(self.model.name).dec()
            seconds = time.perf_counter() - t0
            self.metrics.observe_request(code, seconds, queue_s)
            if self.adaptive is not None and code == 200:
                self.adaptive.observe(seconds)

    async def read_body(self, headers: dict[str, str], stream: Callable[[], AsyncIterator[bytes]]) -> bytes:
        """The request body, refused with 413 past the limit.

        A declared oversize body is drained first (within 4x the limit), so simple clients read the 413, not a reset.
        """
        limit = (f"over the limit of {self.max_bytes} bytes (--max-request-mb {self.max_request_mb:g}); send "
                 "fewer rows per request")
        declared = headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            if int(declared) <= 4 * self.max_bytes:
                async for _ in stream():
                    pass
            raise TooLarge(f"request body of {int(declared)} bytes is {limit}")
        chunks, size = [], 0
        async for chunk in stream():
            size += len(chunk)
            if size > self.max_bytes:
                raise TooLarge(f"request body is {limit}")
            chunks.append(chunk)
        return b"".join(chunks)
