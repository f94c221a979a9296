"""Served throughput over both KServe v2 protocols with the standard clients, next to the offline cascade.

Starts `deploykit serve-local ENGINE --grpc-port P` on 127.0.0.1 (loopback only; bounded in time), then for each
protocol runs N closed-loop clients for T seconds on one asyncio loop, one row per request:
- ``grpc``: ``tritonclient.grpc.aio`` (raw_input_contents),
- ``http``: ``tritonclient.http.aio`` (binary tensor extension, tritonclient's default),
and measures the offline cascade (in-process, full batches) before and after. Also times the server's per-request
protocol work in-process (parse + response for a 1-row request, and the gRPC message conversion) to show where
the time of a small request goes. Writes JSON + PNG with throughput, p50 / p99, ratios, os.getloadavg().

    python benchmarks/serve_protocols.py --engine-dir ENGINE --clients 64 --duration 10 --out results/x.json
    python benchmarks/serve_protocols.py --make-tiny /tmp/tiny ...   # export the untrained tiny 4-exit model first
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import time
from pathlib import Path

import numpy as np
from _server import free_port, start_serve_local
from serve_load import offline

from deploykit.tune.bench import cpu_model


def make_tiny(out: str) -> str:
    """The untrained tiny 4-exit ViT of the serve tests (16 px, dim 32): a model bound by per-request cost."""
    import torch

    from deploykit.export import export_model
    from deploykit.methods import create_backbone, create_method

    torch.manual_seed(0)
    bb = create_backbone("vit_tiny_patch16_224", 10, img_size=16, patch_size=4, depth=4, embed_dim=32, num_heads=2)
    pre = {"input_size": [3, 16, 16], "mean": [0.5] * 3, "std": [0.25] * 3, "interpolation": "bilinear"}
    export_model(create_method("multiexit", bb, 10), out, labels=[f"class_{i}" for i in range(10)],
                 preprocessing=pre, name="tiny")
    return out


async def closed_loop(protocol: str, url: str, model: str, shape: list[int], clients: int, duration: float,
                      warmup: float) -> dict:
    """``clients`` coroutines send 1-row requests back to back with tritonclient's asyncio client."""
    if protocol == "grpc":
        import tritonclient.grpc.aio as tc
    else:
        import tritonclient.http.aio as tc
    kwargs = {} if protocol == "grpc" else {"conn_limit": clients}
    client = tc.InferenceServerClient(url=url, **kwargs)
    rng = np.random.default_rng(0)
    xs = [rng.standard_normal([1, *shape]).astype(np.float32) for _ in range(16)]
    outs = [tc.InferRequestedOutput(n) for n in ("label", "exit_stage", "score")]
    lat: list[float] = []
    steady: list[float] = []
    errors = [0]
    t_begin = time.perf_counter()
    stop = t_begin + duration

    async def one(i: int) -> None:
        k = i
        while time.perf_counter() < stop:
            inp = tc.InferInput("image", [1, *shape], "FP32")
            inp.set_data_from_numpy(xs[k % len(xs)])
            k += 1
            t0 = time.perf_counter()
            try:
                await client.infer(model, [inp], outputs=outs)
            except Exception:  # noqa: BLE001  (counted; the run goes on)
                errors[0] += 1
                continue
            t1 = time.perf_counter()
            lat.append(t1 - t0)
            if t0 >= t_begin + warmup:
                steady.append(t1 - t0)

    await asyncio.gather(*(one(i) for i in range(clients)))
    wall = time.perf_counter() - t_begin
    await client.close()
    ms = np.asarray(steady or lat) * 1000
    return {"protocol": protocol, "client": f"tritonclient.{protocol}.aio", "ok": len(lat), "errors": errors[0],
            "wall_s": wall, "rows_per_s": len(lat) / wall,
            "steady_rows_per_s": len(steady) / max(wall - warmup, 1e-9),
            "latency_ms": {"p50": float(np.percentile(ms, 50)), "p99": float(np.percentile(ms, 99)),
                           "min": float(ms.min()), "max": float(ms.max())}}


def request_costs(engine_dir: str, n: int = 2000) -> dict:
    """Server-side protocol work per 1-row request, in-process (µs): parse, response, gRPC conversion."""
    from deploykit.runtime.cascade import Cascade
    from deploykit.serve import protocol
    from deploykit.serve.models import served_model

    with Cascade.from_dir(engine_dir, threads=1) as c:
        model = served_model(c)
        shape = [int(v) for v in c.manifest.input_spec.shape[1:]]
        x = np.zeros([1, *shape], np.float32).tobytes()
        hdr = json.dumps({"inputs": [{"name": "image", "shape": [1, *shape], "datatype": "FP32",
                                      "parameters": {"binary_data_size": len(x)}}],
                          "outputs": [{"name": n} for n in ("label", "exit_stage", "score")]}).encode()
        body, headers = hdr + x, {protocol.HEADER_LENGTH: str(len(hdr))}
        req = model.parse(body, headers)
        result = model.run(req.rows, None)
        out: dict[str, float] = {}

        def timed(name: str, fn: object) -> None:
            t0 = time.perf_counter()
            for _ in range(n):
                fn()
            out[name] = (time.perf_counter() - t0) / n * 1e6

        timed("parse_us", lambda: model.parse(body, headers))
        timed("respond_us", lambda: model.respond(req, result, None))
        timed("cascade_1_row_us", lambda: model.run(req.rows, None))
        try:
            from tritonclient.grpc import service_pb2 as pb

            from deploykit.serve.grpc_app import to_http_body, to_infer_response
            from deploykit.serve.handler import Reply

            g = pb.ModelInferRequest(model_name=c.manifest.name)
            g.inputs.add(name="image", datatype="FP32", shape=[1, *shape])
            g.raw_input_contents.append(x)
            req.binary_outputs = set(req.outputs)
            rb, rh = model.respond(req, result, None)
            timed("grpc_to_http_body_us", lambda: to_http_body(g))
            timed("grpc_to_response_us", lambda: to_infer_response(Reply(200, rb, rh)))
        except ImportError:
            pass
    return out


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = report["served"]
    fig, ax = plt.subplots(1, 2, figsize=(9, 3.5))
    names = [r["protocol"] for r in runs] + ["offline (before)", "offline (after)"]
    vals = [r["rows_per_s"] for r in runs] + [report["offline_before"]["rows_per_s"],
                                              report["offline_after"]["rows_per_s"]]
    ax[0].bar(names, vals, color=["#2f6fed", "#7aa2f7", "#999", "#bbb"][: len(names)])
    ax[0].set_ylabel("rows / s")
    ax[0].set_title(f"{report['model']}: {report['clients']} clients, 1 row each")
    for r in runs:
        ax[1].bar([f"{r['protocol']} p50", f"{r['protocol']} p99"], [r["latency_ms"]["p50"], r["latency_ms"]["p99"]])
    ax[1].set_ylabel("latency (ms)")
    ax[1].set_title(f"load avg {report['loadavg_before'][0]:.1f} / {report['loadavg_after'][0]:.1f}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--engine-dir")
    ap.add_argument("--make-tiny", help="Export the untrained tiny model here and use it.")
    ap.add_argument("--clients", type=int, default=64)
    ap.add_argument("--duration", type=float, default=10.0)
    ap.add_argument("--warmup", type=float, default=2.0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--max-batch-size", type=int, default=32)
    ap.add_argument("--max-queue-delay-ms", type=float, default=5.0)
    ap.add_argument("--offline-seconds", type=float, default=5.0)
    ap.add_argument("--protocols", default="grpc,http")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    engine = make_tiny(args.make_tiny) if args.make_tiny else args.engine_dir
    if not engine:
        ap.error("give --engine-dir or --make-tiny")
    report: dict = {"engine": engine, "clients": args.clients, "duration_s": args.duration, "threads": args.threads,
                    "max_batch_size": args.max_batch_size, "cpu": cpu_model(), "loadavg_before": os.getloadavg()}
    report["offline_before"] = offline(engine, args.max_batch_size, args.threads, args.offline_seconds)
    report["model"] = report["offline_before"]["model"]
    report["request_costs_us"] = request_costs(engine)
    port, gport = free_port(), free_port()
    proc = start_serve_local(engine, port, ["--grpc-port", str(gport), "--threads", str(args.threads),
                                            "--max-batch-size", str(args.max_batch_size),
                                            "--max-queue-delay-ms", str(args.max_queue_delay_ms)])
    try:
        report["served"] = []
        for p in args.protocols.split(","):
            url = f"127.0.0.1:{gport if p == 'grpc' else port}"
            shape = report["offline_before"]["input_shape"]
            r = asyncio.run(closed_loop(p, url, report["model"], shape, args.clients, args.duration, args.warmup))
            report["served"].append(r)
            print(json.dumps(r))
    finally:
        proc.terminate()
        report["server_exit_code"] = proc.wait(timeout=60)
    report["offline_after"] = offline(engine, args.max_batch_size, args.threads, args.offline_seconds)
    report["loadavg_after"] = os.getloadavg()
    for r in report["served"]:
        r["served_over_offline"] = [r["rows_per_s"] / report[k]["rows_per_s"] for k in ("offline_before",
                                                                                       "offline_after")]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    plot(report, out.with_suffix(".png"))
    print(json.dumps({k: report[k] for k in ("request_costs_us", "loadavg_before", "loadavg_after")}))


if __name__ == "__main__":
    main()
