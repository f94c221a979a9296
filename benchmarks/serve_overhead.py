"""CPU per request of serve-local's request path, in-process: no sockets, no load generator, no model.

The served model is replaced by one that returns zeros of the right shape at once, so what is measured is what the
server does per request around the model: the ASGI front and the shared KServe v2 handler (body, parse, batcher,
metrics, response) and, for gRPC, the servicer's Python part (``ModelInfer`` on a parsed message, response
serialised; gRPC's C core and the HTTP parser are not included). Requests run ``--concurrency`` at a time, 1 row
each, binary FP32, as the load test sends them.
Reports process CPU microseconds per request, so the figure is comparable across code versions run one after
another on a busy machine (run A/B interleaved with ``PYTHONPATH`` pointing at each tree).

    python benchmarks/serve_overhead.py --engine-dir ENGINE --requests 20000 --out x.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import time
from pathlib import Path
from typing import Any

import numpy as np


class _Instant:
    """The manifest of a real engine, with a model that answers zeros at once (the request path is measured)."""

    def __init__(self, engine_dir: str) -> None:
        from deploykit.manifest import Manifest

        self.manifest = Manifest.load(engine_dir)
        self.k = len(self.manifest.labels)

    def run(self, x: np.ndarray, thresholds: Any = None) -> Any:
        n = len(x)
        return type("R", (), {"probs": np.full((n, self.k), 1.0 / self.k, np.float32),
                              "exit_stage": np.zeros(n, np.int64), "score": np.zeros(n, np.float32),
                              "stage_batch_sizes": [n]})()


def _body(shape: list[int]) -> tuple[bytes, list[tuple[bytes, bytes]]]:
    x = np.random.default_rng(0).standard_normal([1, *shape]).astype("<f4").tobytes()
    hdr = json.dumps({"inputs": [{"name": "image", "shape": [1, *shape], "datatype": "FP32",
                                  "parameters": {"binary_data_size": len(x)}}],
                      "outputs": [{"name": "label"}, {"name": "exit_stage"}, {"name": "score"}]}).encode()
    body = hdr + x
    headers = [(b"host", b"127.0.0.1"), (b"content-length", str(len(body)).encode()),
               (b"content-type", b"application/octet-stream"),
               (b"inference-header-content-length", str(len(hdr)).encode())]
    return body, headers


async def _http(app: Any, model: str, shape: list[int], n: int, concurrency: int) -> None:
    body, headers = _body(shape)
    scope_base = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
                  "scheme": "http", "path": f"/v2/models/{model}/infer", "raw_path": b"", "query_string": b"",
                  "root_path": "", "headers": headers, "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 2)}
    codes: dict[int, int] = {}
    left = [n]

    async def worker() -> None:
        while left[0] > 0:
            left[0] -= 1
            async def receive(sent: list[bool] = [False]) -> dict:  # noqa: B006  (one list per request)
                if not sent[0]:
                    sent[0] = True
                    return {"type": "http.request", "body": body, "more_body": False}
                await asyncio.sleep(3600)
                return {"type": "http.disconnect"}

            async def send(message: dict) -> None:
                if message["type"] == "http.response.start":
                    codes[message["status"]] = codes.get(message["status"], 0) + 1

            await app(dict(scope_base), receive, send)

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    if set(codes) != {200}:
        raise SystemExit(f"unexpected status codes {codes}")


async def _grpc(handler: Any, model: str, shape: list[int], n: int, concurrency: int) -> None:
    from tritonclient.grpc import service_pb2

    from deploykit.serve import grpc_app

    if hasattr(grpc_app, "KServeGrpc"):  # the servicer over the framework-free service (session 4 on)
        servicer = grpc_app._servicer_class()(grpc_app.KServeGrpc(handler, lambda: False))
    else:  # earlier trees, for A/B runs with PYTHONPATH at them
        servicer = grpc_app._servicer_class()(handler, lambda: False)
    req = service_pb2.ModelInferRequest(model_name=model)
    req.inputs.add(name="image", datatype="FP32", shape=[1, *shape])
    req.raw_input_contents.append(np.random.default_rng(0).standard_normal([1, *shape]).astype("<f4").tobytes())
    for o in ("label", "exit_stage", "score"):
        req.outputs.add(name=o)
    wire = req.SerializeToString()

    class Context:
        async def abort(self, code: Any, details: str) -> None:
            raise SystemExit(f"gRPC call failed: {code} {details}")

    left = [n]

    async def worker() -> None:
        ctx = Context()
        while left[0] > 0:
            left[0] -= 1
            resp = await servicer.ModelInfer(service_pb2.ModelInferRequest.FromString(wire), ctx)
            resp.SerializeToString()

    await asyncio.gather(*(worker() for _ in range(concurrency)))


async def _measure(kind: str, engine_dir: str, n: int, concurrency: int, warmup: int) -> dict:
    from deploykit.serve.app import ServeConfig, create_app

    engine = _Instant(engine_dir)
    app = create_app(engine, ServeConfig(max_batch_size=32, max_queue_delay_ms=5, max_queue=4096, drift_window=0))
    shape = [int(v) for v in engine.manifest.input_spec.shape[1:]]
    model = engine.manifest.name
    state = app.state
    state.batcher.start()
    try:
        if kind == "http":
            run = lambda k: _http(app, model, shape, k, concurrency)  # noqa: E731
        else:
            run = lambda k: _grpc(state.handler, model, shape, k, concurrency)  # noqa: E731
        await run(warmup)
        c0, t0 = time.process_time(), time.perf_counter()
        await run(n)
        cpu, wall = time.process_time() - c0, time.perf_counter() - t0
    finally:
        await state.batcher.drain_and_stop()
    return {"kind": kind, "requests": n, "cpu_us_per_request": round(1e6 * cpu / n, 1),
            "wall_us_per_request": round(1e6 * wall / n, 1), "loadavg": os.getloadavg()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--engine-dir", required=True)
    p.add_argument("--kinds", default="http,grpc")
    p.add_argument("--requests", type=int, default=20000)
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--warmup", type=int, default=2000)
    p.add_argument("--out")
    args = p.parse_args()
    results = []
    for kind in args.kinds.split(","):
        try:
            results.append(asyncio.run(_measure(kind, args.engine_dir, args.requests, args.concurrency, args.warmup)))
        except (ImportError, AttributeError) as e:  # a tree without gRPC (or without the grpc extra)
            results.append({"kind": kind, "skipped": f"{type(e).__name__}: {e}"})
    print(json.dumps(results))
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
