"""Load test for `deploykit serve-local` (loopback only; bounded in time and request count; stops by itself).

Phases, all against one server on 127.0.0.1 (HTTP on --port and KServe v2 gRPC on --grpc-port, one process):
1. offline: the cascade in-process at the server's max batch size (rows/s, median full-batch time);
2. closed loop, per protocol (``--protocols``): N concurrent clients for T seconds, 1 row per request:
   ``raw-http`` is a minimal keep-alive HTTP/1.1 client (binary tensor extension, what tritonclient sends; the
   lightest load generator, the one earlier results used), ``http`` is ``tritonclient.http.aio`` and ``grpc`` is
   ``tritonclient.grpc.aio`` (the standard async clients, one client object shared by the N tasks);
   ``--repeats`` runs the protocols interleaved that many times (spread: min / median / max);
3. overload: open loop at F x the raw-http closed-loop throughput for T_o seconds: codes, answered-exactly-once,
   server RSS;
4. recovery: a few clients for a short while: every request must succeed again.
Writes JSON (+ PNG) with throughput, p50/p99, batch-size distribution, errors by code, os.getloadavg().

    python benchmarks/serve_load.py --engine-dir engines/tiny --clients 64 --duration 10 --out benchmarks/results/x.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import time
from collections import Counter
from pathlib import Path

import numpy as np
from _server import free_port, start_serve_local, wait_grpc

from deploykit.tune.bench import cpu_model

# ---- a minimal keep-alive HTTP/1.1 client (low overhead: it shares the CPU with the server) ---------------------
CLIENT_ERRORS: Counter[str] = Counter()  # failed requests (code -1) by exception type, plus stale-connection reopens


def client_error(e: BaseException) -> int:
    """Count a failed request by its exception type; returns the code the reports use for it (-1)."""
    CLIENT_ERRORS[type(e).__name__] += 1
    return -1


class Conn:
    """One keep-alive connection. Like urllib3's pool, it reopens a pooled connection the server has since closed
    (uvicorn closes idle keep-alive connections after 5 s) instead of sending into it."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def request(self, path: str, body: bytes, headers: dict[str, str]) -> tuple[int, bytes]:
        if self.writer is not None and (self.reader.at_eof() or self.writer.is_closing()):
            CLIENT_ERRORS["stale_connection_reopened"] += 1
            self.close()
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        head = f"POST {path} HTTP/1.1\r\nHost: {self.host}\r\nContent-Length: {len(body)}\r\n"
        head += "".join(f"{k}: {v}\r\n" for k, v in headers.items()) + "\r\n"
        self.writer.write(head.encode() + body)
        await self.writer.drain()
        status_line = await self.reader.readline()
        if not status_line:
            raise ConnectionError("server closed the connection")
        code = int(status_line.split()[1])
        length, close = 0, False
        while (line := await self.reader.readline()) not in (b"\r\n", b""):
            k, _, v = line.decode().partition(":")
            if k.lower() == "content-length":
                length = int(v)
            elif k.lower() == "connection" and "close" in v.lower():
                close = True
        data = await self.reader.readexactly(length)
        if close:
            self.close()
        return code, data

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None


def make_payloads(shape: list[int], n: int = 16) -> tuple[list[bytes], dict[str, str]]:
    """1-row FP32 requests in the binary tensor data extension (what tritonclient sends by default)."""
    rng = np.random.default_rng(0)
    bodies, header_len = [], None
    for _ in range(n):
        x = rng.standard_normal([1, *shape]).astype("<f4").tobytes()
        hdr = json.dumps({"inputs": [{"name": "image", "shape": [1, *shape], "datatype": "FP32",
                                      "parameters": {"binary_data_size": len(x)}}],
                          "outputs": [{"name": "label"}, {"name": "exit_stage"}, {"name": "score"}]}).encode()
        header_len = len(hdr)
        bodies.append(hdr + x)
    return bodies, {"Inference-Header-Content-Length": str(header_len), "Content-Type": "application/octet-stream"}


# ---- phases ----------------------------------------------------------------------------------------------------
async def closed_loop(host: str, port: int, path: str, bodies: list[bytes], headers: dict[str, str], clients: int,
                      duration: float, max_requests: int, warmup: float = 0.0) -> dict:
    """Clients send back to back for ``duration``; latency / throughput also reported after ``warmup`` seconds
    (the start-up transient: all clients arriving at once fill batches unevenly for the first few batches)."""
    lat, codes, sent, steady = [], {}, [0], []
    t_begin = time.perf_counter()
    stop = t_begin + duration

    async def client(i: int) -> None:
        conn = Conn(host, port)
        while time.perf_counter() < stop and sent[0] < max_requests:
            sent[0] += 1
            t0 = time.perf_counter()
            try:
                code, _ = await conn.request(path, bodies[(i + sent[0]) % len(bodies)], headers)
            except (ConnectionError, OSError, asyncio.IncompleteReadError) as e:
                code = client_error(e)
                conn.close()
            codes[code] = codes.get(code, 0) + 1
            if code == 200:
                t1 = time.perf_counter()
                lat.append(t1 - t0)
                if t0 >= t_begin + warmup:
                    steady.append(t1 - t0)
        conn.close()

    await asyncio.gather(*(client(i) for i in range(clients)))
    wall = time.perf_counter() - t_begin
    out = summarize(lat, codes, sent[0], wall)
    if warmup:
        s = summarize(steady, {200: len(steady)}, len(steady), max(wall - warmup, 1e-9))
        out["steady"] = {"after_s": warmup, "ok": len(steady), "latency_ms": s["latency_ms"]}
    return out


def make_arrays(shape: list[int], n: int = 16) -> list[np.ndarray]:
    """The same 1-row inputs as :func:`make_payloads`, as arrays for tritonclient."""
    rng = np.random.default_rng(0)
    return [rng.standard_normal([1, *shape]).astype("<f4") for _ in range(n)]


async def closed_loop_tritonclient(protocol: str, target: str, model: str, arrays: list[np.ndarray], clients: int,
                                   duration: float, max_requests: int, warmup: float = 0.0) -> dict:
    """As :func:`closed_loop`, with ``tritonclient.http.aio`` or ``tritonclient.grpc.aio`` (one shared client)."""
    if protocol == "grpc":
        import tritonclient.grpc.aio as tc

        client = tc.InferenceServerClient(target)
        inputs = []
        for x in arrays:
            i = tc.InferInput("image", list(x.shape), "FP32")
            i.set_data_from_numpy(x)
            inputs.append([i])
        outputs = [tc.InferRequestedOutput(n) for n in ("label", "exit_stage", "score")]
    else:
        import tritonclient.http.aio as tc

        client = tc.InferenceServerClient(target, conn_limit=clients)
        inputs = []
        for x in arrays:
            i = tc.InferInput("image", list(x.shape), "FP32")
            i.set_data_from_numpy(x, binary_data=True)
            inputs.append([i])
        outputs = [tc.InferRequestedOutput(n, binary_data=True) for n in ("label", "exit_stage", "score")]
    lat, codes, sent, steady = [], {}, [0], []
    t_begin = time.perf_counter()
    stop = t_begin + duration

    async def one_client(i: int) -> None:
        while time.perf_counter() < stop and sent[0] < max_requests:
            sent[0] += 1
            t0 = time.perf_counter()
            try:
                await client.infer(model, inputs[(i + sent[0]) % len(inputs)], outputs=outputs)
                code = 200
            except Exception as e:  # tritonclient raises InferenceServerException (status inside) or transport errors
                status = getattr(e, "status", lambda: None)()
                CLIENT_ERRORS[f"{protocol}:{status or type(e).__name__}"] += 1
                code = -1
            codes[code] = codes.get(code, 0) + 1
            if code == 200:
                t1 = time.perf_counter()
                lat.append(t1 - t0)
                if t0 >= t_begin + warmup:
                    steady.append(t1 - t0)

    try:
        await asyncio.gather(*(one_client(i) for i in range(clients)))
    finally:
        await client.close()
    wall = time.perf_counter() - t_begin
    out = summarize(lat, codes, sent[0], wall)
    if warmup:
        s = summarize(steady, {200: len(steady)}, len(steady), max(wall - warmup, 1e-9))
        out["steady"] = {"after_s": warmup, "ok": len(steady), "latency_ms": s["latency_ms"]}
    return out


async def open_loop(host: str, port: int, path: str, bodies: list[bytes], headers: dict[str, str], rate: float,
                    duration: float, max_requests: int, rss_of: int | None) -> dict:
    idle: list[Conn] = []
    lat, codes, answered, rss = [], {}, [0], []
    tasks = []

    async def one(i: int) -> None:
        conn = idle.pop() if idle else Conn(host, port)
        t0 = time.perf_counter()
        try:
            code, _ = await conn.request(path, bodies[i % len(bodies)], headers)
            idle.append(conn)
        except (ConnectionError, OSError, asyncio.IncompleteReadError) as e:
            code = client_error(e)
            conn.close()
        answered[0] += 1
        codes[code] = codes.get(code, 0) + 1
        if code == 200:
            lat.append(time.perf_counter() - t0)

    t_start = time.perf_counter()
    n = 0
    while (now := time.perf_counter()) < t_start + duration and n < max_requests:
        due = int((now - t_start) * rate) + 1
        while n < min(due, max_requests):
            tasks.append(asyncio.create_task(one(n)))
            n += 1
        if rss_of and (not rss or now - rss[-1][0] > 0.2):
            rss.append((now, read_rss_mb(rss_of)))
        await asyncio.sleep(0.002)
    await asyncio.wait_for(asyncio.gather(*tasks), timeout=120)
    wall = time.perf_counter() - t_start
    for c in idle:
        c.close()
    out = summarize(lat, codes, n, wall)
    out.update(offered_rate=rate, answered=answered[0], answered_exactly_once=answered[0] == n,
               rss_mb=[round(v, 1) for _, v in rss], rss_mb_max=max((v for _, v in rss), default=None))
    return out


def summarize(lat: list[float], codes: dict[int, int], sent: int, wall: float) -> dict:
    a = np.asarray(lat) * 1000
    return {"requests": sent, "wall_s": round(wall, 3), "ok_per_s": round(codes.get(200, 0) / wall, 2),
            "codes": {str(k): v for k, v in sorted(codes.items())},
            "latency_ms": {q: (round(float(np.percentile(a, p)), 2) if a.size else None)
                           for q, p in (("p50", 50), ("p90", 90), ("p99", 99), ("max", 100))}}


def offline(engine_dir: str, batch: int, threads: int | None, seconds: float, instances: int = 1) -> dict:
    """The cascade in-process on full batches: ``instances`` threads at once (as the server runs them), each with
    ``threads`` intra-op threads; rows/s counts all of them, ``batch_s_median`` is one batch's time."""
    from concurrent.futures import ThreadPoolExecutor

    from deploykit.runtime.cascade import Cascade

    with Cascade.from_dir(engine_dir, threads=threads) as c:
        shape = [int(v) for v in c.manifest.input_spec.shape[1:]]
        x = np.random.default_rng(0).standard_normal([batch, *shape]).astype(np.float32)
        for _ in range(3):
            c.run(x)

        def worker(_: int) -> list[float]:
            times: list[float] = []
            t_end = time.perf_counter() + seconds
            while time.perf_counter() < t_end or len(times) < 5:
                t0 = time.perf_counter()
                c.run(x)
                times.append(time.perf_counter() - t0)
            return times

        t0 = time.perf_counter()
        with ThreadPoolExecutor(instances) as ex:
            per = list(ex.map(worker, range(instances)))
        wall = time.perf_counter() - t0
        times = [t for ts in per for t in ts]
        med = float(np.median(times))
        return {"batch": batch, "instances": instances, "threads": threads, "runs": len(times),
                "batch_s_median": med, "rows_per_s": batch * len(times) / wall, "input_shape": shape,
                "model": c.manifest.name}


def batch_hist(url: str) -> dict[str, float]:
    """Cumulative batch-size buckets, plus the batch compute-time sum / count (keys ``_sum``, ``_count``)."""
    import urllib.request

    text = urllib.request.urlopen(url + "/metrics", timeout=10).read().decode()
    out = {}
    for line in text.splitlines():
        if line.startswith("deploykit_batch_size_bucket{"):
            le = line.split('le="')[1].split('"')[0]
            out[le] = float(line.rsplit(" ", 1)[1])
        elif line.startswith("deploykit_batch_compute_duration_seconds_sum{"):
            out["_sum"] = float(line.rsplit(" ", 1)[1])
        elif line.startswith("deploykit_batch_compute_duration_seconds_count{"):
            out["_count"] = float(line.rsplit(" ", 1)[1])
    return out


def hist_delta(a: dict[str, float], b: dict[str, float]) -> dict[str, int]:
    """Batches per size bucket between two scrapes (de-cumulated)."""
    keys = sorted((k for k in b if not k.startswith("_")), key=lambda k: float("inf") if k == "+Inf" else float(k))
    out, prev = {}, 0.0
    for k in keys:
        cum = b[k] - a.get(k, 0.0)
        if cum - prev:
            out[f"<={k}"] = int(cum - prev)
        prev = cum
    return out


def cpu_by_thread(pid: int | None) -> dict[str, float]:
    """CPU seconds (user + sys) of the server process: its main thread (the event loop) and all the others."""
    out: dict[str, float] = {}
    if not pid:
        return out
    tick = os.sysconf("SC_CLK_TCK")
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            stat = (task / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()
        key = "event_loop" if task.name == str(pid) else "other_threads"  # inference, gRPC poller, executor
        out[key] = out.get(key, 0.0) + (int(fields[11]) + int(fields[12])) / tick
    return out


def cpu_per_request(a: dict[str, float], b: dict[str, float], ok: int) -> dict[str, float]:
    """Server CPU ms per answered request between two :func:`cpu_by_thread` readings, by thread group."""
    if not ok or not b:
        return {}
    out = {k: round(1000 * (b[k] - a.get(k, 0.0)) / ok, 4) for k in b}
    out["total"] = round(sum(out.values()), 4)
    return out


def read_rss_mb(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def start_server(args: argparse.Namespace, port: int, grpc_port: int) -> subprocess.Popen:
    opts = ["--max-batch-size", str(args.max_batch_size), "--max-queue-delay-ms", str(args.max_queue_delay_ms),
            "--max-queue", str(args.max_queue)]
    if grpc_port:
        opts += ["--grpc-port", str(grpc_port)]
    if args.threads:
        opts += ["--threads", str(args.threads)]
    if args.instances > 1:
        opts += ["--instances", str(args.instances)]
    return start_serve_local(args.engine_dir, port, opts)


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 2, figsize=(11, 4))
    h = report["closed_loop"]["batch_size_distribution"]
    ax[0].bar(list(h), list(h.values()), color="#2f6fed")
    ax[0].set(title=f"batch sizes, {report['config']['clients']} clients", xlabel="rows per batch", ylabel="batches")
    protos = report["protocols"]
    names = ["offline", *(f"{k}\n(median)" for k in protos), "overload\n(200s / wall incl. drain)"]
    vals = [report["offline"]["rows_per_s"], *(v["ok_per_s_median"] for v in protos.values()),
            report["overload"]["ok_per_s"]]
    lo = [0.0, *(v["ok_per_s_median"] - v["ok_per_s_min"] for v in protos.values()), 0.0]
    hi = [0.0, *(v["ok_per_s_max"] - v["ok_per_s_median"] for v in protos.values()), 0.0]
    ax[1].bar(names, vals, yerr=[lo, hi], capsize=3, color=["#888", *(["#2f6fed"] * len(protos)), "#e07b00"])
    ax[1].set_title(f"rows/s, max batch {report['config']['max_batch_size']} (whiskers: min-max of repeats)",
                    fontsize=10)
    ax[1].set_ylabel("rows/s")
    ratios = [None, *(v.get("served_over_offline_median") for v in protos.values()), None]
    for i, (v, r) in enumerate(zip(vals, ratios)):
        ax[1].text(i, v + hi[i], f"{v:.0f}" + (f"\n{r:.2f}x offline" if r else ""), ha="center", va="bottom",
                   fontsize=8)
    ax[1].set_ylim(0, max(v + h for v, h in zip(vals, hi)) * 1.2)
    ax[1].tick_params(axis="x", labelsize=7)
    load = report.get("loadavg_start"), report.get("loadavg_end")
    loads = f"; 1-min load {load[0][0]:.1f} -> {load[1][0]:.1f}" if all(load) else ""
    fig.suptitle(f"serve-local load test: {report['offline']['model']} on {report['cpu']}{loads}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--engine-dir", required=True)
    p.add_argument("--url", help="use a running server on 127.0.0.1 instead of starting one")
    p.add_argument("--clients", type=int, default=64)
    p.add_argument("--duration", type=float, default=10.0)
    p.add_argument("--max-requests", type=int, default=200_000)
    p.add_argument("--max-batch-size", type=int, default=32)
    p.add_argument("--max-queue-delay-ms", type=float, default=5.0)
    p.add_argument("--max-queue", type=int, default=256)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--instances", type=int, default=1,
                   help="server --instances; offline is then measured both as the server runs (instances x threads) "
                        "and one batch at a time on instances*threads intra-op threads, and the targets use the "
                        "higher offline throughput and the shorter batch time (the stricter reading)")
    p.add_argument("--warmup", type=float, default=3.0, help="closed loop: seconds left out of steady-state p99")
    p.add_argument("--overload-factor", type=float, default=4.0)
    p.add_argument("--overload-duration", type=float, default=6.0)
    p.add_argument("--offline-seconds", type=float, default=5.0)
    p.add_argument("--protocols", default="raw-http,http,grpc",
                   help="closed-loop clients, comma-separated: raw-http (minimal client), http "
                        "(tritonclient.http.aio), grpc (tritonclient.grpc.aio)")
    p.add_argument("--repeats", type=int, default=1, help="closed loops per protocol, interleaved (spread)")
    p.add_argument("--grpc-url", help="with --url: the running server's gRPC address (127.0.0.1:PORT)")
    p.add_argument("--out", default="benchmarks/results/serve_load.json")
    args = p.parse_args()
    protocols = [v.strip() for v in args.protocols.split(",") if v.strip()]
    if not protocols or set(protocols) - {"raw-http", "http", "grpc"}:
        raise SystemExit(f"--protocols takes raw-http, http and grpc; got {args.protocols!r}")

    load_start = os.getloadavg()
    off = offline(args.engine_dir, args.max_batch_size, args.threads, args.offline_seconds, args.instances)
    alt = (offline(args.engine_dir, args.max_batch_size, args.instances * (args.threads or 1), args.offline_seconds)
           if args.instances > 1 else None)
    proc = None
    if args.url:
        if not args.url.startswith(("http://127.0.0.1", "http://localhost")) or (
                args.grpc_url and not args.grpc_url.startswith(("127.0.0.1:", "localhost:"))):
            raise SystemExit("loopback only: --url must be http://127.0.0.1:PORT, --grpc-url 127.0.0.1:PORT")
        url = args.url.rstrip("/")
        grpc_target = args.grpc_url
        if grpc_target is None and "grpc" in protocols:
            raise SystemExit("--protocols grpc with --url needs --grpc-url")
    else:
        port, gport = free_port(), (free_port() if "grpc" in protocols else 0)
        proc = start_server(args, port, gport)
        url, grpc_target = f"http://127.0.0.1:{port}", f"127.0.0.1:{gport}"
        if gport:
            wait_grpc(grpc_target)
    host, port = "127.0.0.1", int(url.rsplit(":", 1)[1])
    path = f"/v2/models/{off['model']}/infer"
    bodies, headers = make_payloads(off["input_shape"])
    arrays = make_arrays(off["input_shape"])

    def run_closed(proto: str, clients: int, duration: float, max_requests: int, warmup: float) -> dict:
        if proto == "raw-http":
            return asyncio.run(closed_loop(host, port, path, bodies, headers, clients, duration, max_requests,
                                           warmup))
        target = grpc_target if proto == "grpc" else url.removeprefix("http://")
        return asyncio.run(closed_loop_tritonclient(proto, target, off["model"], arrays, clients, duration,
                                                    max_requests, warmup))

    runs: dict[str, list[dict]] = {k: [] for k in protocols}
    try:
        for proto in protocols:  # warm-up, every protocol
            run_closed(proto, 8, 1.0, 2000, 0.0)
        for _ in range(args.repeats):
            for proto in protocols:
                h0, c0 = batch_hist(url), cpu_by_thread(proc.pid if proc else None)
                r = run_closed(proto, args.clients, args.duration, args.max_requests, args.warmup)
                h1, c1 = batch_hist(url), cpu_by_thread(proc.pid if proc else None)
                r["server_cpu_ms_per_request"] = cpu_per_request(c0, c1, r["codes"].get("200", 0))
                r["batch_size_distribution"] = hist_delta(h0, h1)
                n_batches = h1.get("_count", 0) - h0.get("_count", 0)
                busy = h1.get("_sum", 0) - h0.get("_sum", 0)
                r["served_batch_s_mean"] = busy / n_batches if n_batches else None
                r["inference_thread_busy_fraction"] = round(busy / r["wall_s"] / args.instances, 3)
                r["loadavg_end"] = os.getloadavg()
                runs[proto].append(r)
        closed = runs[protocols[0]][0]
        rate = args.overload_factor * closed["ok_per_s"]
        over = asyncio.run(open_loop(host, port, path, bodies, headers, rate, args.overload_duration,
                                     args.max_requests, proc.pid if proc else None))
        time.sleep(1.0)
        recovery = asyncio.run(closed_loop(host, port, path, bodies, headers, 4, 3.0, 5000))
    finally:
        if proc is not None:
            proc.terminate()
            rc = proc.wait(timeout=60)
    off_after = offline(args.engine_dir, args.max_batch_size, args.threads, args.offline_seconds, args.instances)
    offline_rate = max(off["rows_per_s"], alt["rows_per_s"] if alt else 0.0)
    batch_s = min(off["batch_s_median"], alt["batch_s_median"] if alt else float("inf"))
    bound_ms = 2 * (args.max_queue_delay_ms + 1000 * batch_s)
    served_bound_ms = 2 * (args.max_queue_delay_ms + 1000 * (closed["served_batch_s_mean"] or 0))
    per_protocol = {}
    for proto, rs in runs.items():
        rates = [r["ok_per_s"] for r in rs]
        med = float(np.median(rates))
        per_protocol[proto] = {
            "ok_per_s": rates, "ok_per_s_min": min(rates), "ok_per_s_median": med, "ok_per_s_max": max(rates),
            "p50_ms": [r["latency_ms"]["p50"] for r in rs], "p99_ms": [r["latency_ms"]["p99"] for r in rs],
            "server_cpu_ms_per_request": [r.get("server_cpu_ms_per_request") for r in rs],
            "steady_p99_ms": [r.get("steady", {}).get("latency_ms", {}).get("p99") for r in rs],
            "served_over_offline_median": round(med / offline_rate, 3),
            "served_over_offline_after_median": round(med / off_after["rows_per_s"], 3),
            "served_over_offline_min_max": [round(min(rates) / offline_rate, 3), round(max(rates) / offline_rate, 3)],
            "runs": rs,
        }
    report = {
        "cpu": cpu_model(), "cores": os.cpu_count(), "loadavg_start": load_start, "loadavg_end": os.getloadavg(),
        "note": "2 cores shared with other developers' jobs; figures are noisy",
        "config": vars(args), "offline": off, "offline_one_batch_all_threads": alt,
        "offline_after": off_after, "closed_loop": closed, "protocols": per_protocol, "overload": over,
        "recovery": recovery, "client_errors": dict(CLIENT_ERRORS),
        "server_exit_code": rc if proc is not None else None,
        "targets": {
            "offline_rows_per_s_used": round(offline_rate, 2), "full_batch_s_used": round(batch_s, 4),
            "served_over_offline": round(closed["ok_per_s"] / offline_rate, 3),
            "served_over_offline_by_protocol": {k: v["served_over_offline_median"] for k, v in per_protocol.items()},
            "throughput_ok": closed["ok_per_s"] >= 0.8 * offline_rate,
            "p99_ms": closed["latency_ms"]["p99"], "p99_bound_ms": round(bound_ms, 2),
            "p99_ok": (closed["latency_ms"]["p99"] or 1e9) <= bound_ms,
            "served_over_offline_after": round(closed["ok_per_s"] / off_after["rows_per_s"], 3),
            "p99_bound_with_served_batch_time_ms": round(served_bound_ms, 2),
            "p99_ok_with_served_batch_time": (closed["latency_ms"]["p99"] or 1e9) <= served_bound_ms,
            "steady_p99_ms": closed.get("steady", {}).get("latency_ms", {}).get("p99"),
            "overload_only_503": set(over["codes"]) <= {"200", "503"},
            "overload_answered_exactly_once": over["answered_exactly_once"],
            "recovered": set(recovery["codes"]) == {"200"},
        },
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    plot(report, out.with_suffix(".png"))
    print(json.dumps({"offline": off["rows_per_s"], "offline_after": off_after["rows_per_s"],
                      "protocols": {k: {q: v[q] for q in ("ok_per_s", "p50_ms", "p99_ms", "server_cpu_ms_per_request",
                                                          "served_over_offline_median")}
                                    for k, v in per_protocol.items()},
                      "overload_codes": over["codes"], "client_errors": dict(CLIENT_ERRORS),
                      "targets": report["targets"]}, indent=1))


if __name__ == "__main__":
    main()
