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
import zlib
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

_MODEL_PATH = re.compile(r"^/v2/models/([^/]+)(?:/versions/([^/]+))?(/ready|/infer|/config|/stats)?/?$")
_SERVER_PATHS = ("/v2", "/v2/", "/v2/health/live", "/v2/health/ready", "/metrics", "/v2/models/stats",
                 "/v2/repository/index")
_POST_PATHS = ("/v2/repository/index",)


@dataclass
class Reply:
    """An HTTP response, framework-free; ``parts`` is a successful infer response left unserialised (gRPC)."""

    status: int
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)
    parts: protocol.Encoded | None = None


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


class ClientGone(Exception):
    """The client closed the connection before its body arrived (499: nobody is left to answer)."""


class BodyTimeout(Exception):
    """The request body did not arrive within ``--read-timeout`` (408)."""


class ShuttingDown(Exception):
    """The drain deadline passed before the request body arrived (503)."""


class Drain:
    """Shutdown state shared by a front-end and its server: readiness, infer requests in the handler, the deadline.

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
    elif isinstance(e, ClientGone):
        status, msg = 499, str(e)
    elif isinstance(e, BodyTimeout):
        status, msg = 408, str(e)
        headers["connection"] = "close"
    elif isinstance(e, ShuttingDown):
        status, msg = 503, str(e)
        headers.update({"retry-after": str(retry_after_s), "connection": "close"})
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
        batching: ``max_batch_size``, ``max_queue_delay_ms``, ``instances`` (for the model config endpoint).
        read_timeout_s: how long a request body may take to arrive (408 past it; None: no limit).
        drain: the server's shutdown state (infer requests counted; bodies still arriving at its deadline get 503).
    """

    def __init__(self, model: ServedModel, submit: Submit, metrics: ServeMetrics, max_request_mb: float,
                 ready: Callable[[], bool] = lambda: True, adaptive: Any = None,
                 on_scrape: Callable[[], None] | None = None, retry_after_s: int = 1,
                 batching: dict[str, Any] | None = None, read_timeout_s: float | None = None,
                 drain: Drain | None = None) -> None:
        self.model, self.submit, self.metrics = model, submit, metrics
        self.batching = batching or {}
        self.max_request_mb = max_request_mb
        self.max_bytes = int(max_request_mb * 1024 * 1024)
        self.ready, self.adaptive, self.on_scrape = ready, adaptive, on_scrape
        self.retry_after_s = retry_after_s
        self.read_timeout_s, self.drain = read_timeout_s, drain

    async def handle(self, method: str, path: str, headers: dict[str, str],
                     stream: Callable[[], AsyncIterator[bytes]]) -> Reply:
        """Answer one request; ``headers`` lower-cased, ``stream()`` yields the body in chunks."""
        method = "GET" if method == "HEAD" else method
        try:
            return await self._route(method, path, headers, stream)
        except Exception as e:  # noqa: BLE001  (every error becomes a reply, mapped once by error_reply)
            return error_reply(e, self.retry_after_s)

    async def _route(self, method: str, path: str, headers: dict[str, str],
                     stream: Callable[[], AsyncIterator[bytes]]) -> Reply:
        m = None if path in _SERVER_PATHS else _MODEL_PATH.match(path)
        if m is None and path not in _SERVER_PATHS:
            raise protocol.ProtocolError(f"{method} {path}: not found; see GET /v2 and /v2/models/{{name}} "
                                         "(KServe v2)", 404)
        post = path in _POST_PATHS or (m is not None and m.group(3) == "/infer")
        if method != ("POST" if post else "GET"):
            raise protocol.ProtocolError(f"{method} {path}: method not allowed; use {'POST' if post else 'GET'}",
                                         405)
        if m is None:
            return self._server_route(path)
        name, version, what = m.group(1), m.group(2), m.group(3)
        if what == "/infer":
            if self.drain is not None:
                self.drain.active += 1
            try:
                return await self._read_and_infer(name, version, headers, stream)
            finally:
                if self.drain is not None:
                    self.drain.active -= 1
        protocol.check_model(self.model.info, name, version)
        if what == "/ready":
            return Reply(200 if self.ready() else 503)
        if what == "/config":
            return json_reply(self.model_config())
        if what == "/stats":
            return json_reply({"model_stats": [self.metrics.triton_statistics(self.model.version)]})
        return json_reply(self.model.metadata())

    def _server_route(self, path: str) -> Reply:
        if path in ("/v2", "/v2/"):
            return json_reply(protocol.server_metadata(__version__))
        if path == "/v2/health/live":
            return Reply(200)
        if path == "/v2/health/ready":
            return Reply(200 if self.ready() else 503)
        if path == "/v2/models/stats":
            return json_reply({"model_stats": [self.metrics.triton_statistics(self.model.version)]})
        if path == "/v2/repository/index":
            return json_reply(self.repository_index())
        if self.on_scrape is not None:
            self.on_scrape()
        return Reply(200, self.metrics.exposition(), {"content-type": self.metrics.content_type})

    def repository_index(self) -> list[dict[str, str]]:
        """The one model this server serves, ready unless the server is draining (Triton's repository index)."""
        return [{"name": self.model.name, "version": self.model.version,
                 "state": "READY" if self.ready() else "UNAVAILABLE"}]

    def model_config(self) -> dict[str, Any]:
        """The model as a Triton model configuration (JSON form of ``model_config.proto``), from its metadata."""
        meta = self.model.metadata()

        def tensors(items: list[dict[str, Any]]) -> list[dict[str, Any]]:
            return [{"name": t["name"], "data_type": f"TYPE_{'STRING' if t['datatype'] == 'BYTES' else t['datatype']}",
                     "dims": [int(d) for d in t["shape"][1:]] or [1]} for t in items]

        b = self.batching
        return {"name": self.model.name, "platform": meta["platform"], "backend": "deploykit",
                "max_batch_size": int(b.get("max_batch_size", 0)),
                "input": tensors(meta["inputs"]), "output": tensors(meta["outputs"]),
                "dynamic_batching": {"max_queue_delay_microseconds": int(1000 * b.get("max_queue_delay_ms", 0))},
                "instance_group": [{"count": int(b.get("instances", 1)), "kind": "KIND_CPU"}]}

    async def infer(self, name: str, version: str | None, headers: dict[str, str], body: bytes | protocol.Decoded,
                    t0: float | None = None) -> Reply:
        """One infer request whose body has been read: HTTP bytes, or a gRPC request already decoded.

        Checks the model, parses, submits and responds; errors mapped by :func:`error_reply`, metrics recorded. A
        decoded request's success reply carries the response as ``parts`` (no HTTP body is written).
        """
        t0 = time.perf_counter() if t0 is None else t0
        code, queue_s = 500, None
        self.metrics.in_flight_child.inc()
        try:
            protocol.check_model(self.model.info, name, version)
            req = await self._parse(body, headers)
            done = await self.submit(req)
            parts = self.model.respond_parts(req, done.result, done.parameters)
            code, queue_s = 200, done.queue_s
            if isinstance(body, protocol.Decoded):
                return Reply(200, parts=parts)
            out, extra = protocol.encode_http(parts)
            return Reply(200, out, extra)
        except Exception as e:  # noqa: BLE001  (mapped once, below)
            reply = error_reply(e, self.retry_after_s)
            code = reply.status
            return reply
        finally:
            self.metrics.in_flight_child.dec()
            seconds = time.perf_counter() - t0
            self.metrics.observe_request(code, seconds, queue_s)
            if self.adaptive is not None and code == 200:
                self.adaptive.observe(seconds)

    async def _parse(self, body: bytes | protocol.Decoded, headers: dict[str, str]) -> Any:
        """The model's parse; off the event loop when it decodes images or copies a large tensor."""
        if isinstance(body, protocol.Decoded):
            parse, args = self.model.parse_decoded, (body,)
        else:
            parse, args = self.model.parse, (body, headers)
        if protocol.heavy(body):
            return await asyncio.get_running_loop().run_in_executor(None, parse, *args)
        return parse(*args)

    async def _read_and_infer(self, name: str, version: str | None, headers: dict[str, str],
                              stream: Callable[[], AsyncIterator[bytes]]) -> Reply:
        t0 = time.perf_counter()
        try:
            body = await self.read_body_within(headers, stream)
        except Exception as e:  # noqa: BLE001  (413, 408, bad encoding: counted like any failed request)
            reply = error_reply(e, self.retry_after_s)
            self.metrics.observe_request(reply.status, time.perf_counter() - t0, None)
            return reply
        return await self.infer(name, version, headers, body, t0)

    async def read_body_within(self, headers: dict[str, str], stream: Callable[[], AsyncIterator[bytes]]) -> bytes:
        """:meth:`read_body` within ``read_timeout_s`` and the drain deadline: a stalled client holds nothing long."""
        expired = self.drain.expired if self.drain is not None else None
        if self.read_timeout_s is None and expired is None:
            return await self.read_body(headers, stream)
        reader = asyncio.ensure_future(self.read_body(headers, stream))
        done, _ = await asyncio.wait({reader} if expired is None else {reader, expired}, timeout=self.read_timeout_s,
                                     return_when=asyncio.FIRST_COMPLETED)
        if reader in done:
            return reader.result()
        reader.cancel()
        if expired is not None and expired.done():
            raise ShuttingDown("the server is shutting down and the request body had not arrived; retry")
        raise BodyTimeout(f"the request body did not arrive within {self.read_timeout_s:g} s (--read-timeout); "
                          "send it at once")

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
        encoding = headers.get("content-encoding", "identity").strip().lower()
        if encoding not in _DECODERS:
            raise protocol.ProtocolError(f"Content-Encoding {encoding!r} is not supported; send gzip, deflate or "
                                         "identity", 415)
        chunks, size = [], 0
        async for chunk in stream():
            size += len(chunk)
            if size > self.max_bytes:
                raise TooLarge(f"request body is {limit}")
            chunks.append(chunk)
        body = b"".join(chunks)
        return body if encoding == "identity" else decompress(body, encoding, self.max_bytes, limit)


_DECODERS = {"identity": None, "gzip": 16 + zlib.MAX_WBITS, "deflate": zlib.MAX_WBITS, "x-gzip": 16 + zlib.MAX_WBITS}


def decompress(body: bytes, encoding: str, max_bytes: int, limit: str) -> bytes:
    """A gzip / deflate body, decompressed; past ``max_bytes`` of output it is refused (413) before more is made.

    ``deflate`` is the zlib format (RFC 9110; what tritonclient sends); a raw deflate stream is accepted too.
    """
    wbits = _DECODERS[encoding]
    try:
        d = zlib.decompressobj(wbits)
        out = d.decompress(body, max_bytes + 1)
    except zlib.error:
        if encoding != "deflate":
            raise protocol.ProtocolError(f"the {encoding} request body is corrupt; send a valid {encoding} "
                                         "stream or no Content-Encoding") from None
        try:
            d = zlib.decompressobj(-zlib.MAX_WBITS)
            out = d.decompress(body, max_bytes + 1)
        except zlib.error as e:
            raise protocol.ProtocolError(f"the deflate request body is corrupt ({e}); send a valid zlib "
                                         "stream or no Content-Encoding") from None
    if len(out) > max_bytes or d.unconsumed_tail:
        raise TooLarge(f"decompressed request body is {limit}")
    if not d.eof:
        raise protocol.ProtocolError(f"the {encoding} request body is truncated; send the whole stream")
    return out
