"""serve-ray: the cascade as Ray Serve deployments, one per stage, behind a KServe v2 ingress.

Each stage deployment loads only its own graph and batches the calls of every request in flight with
``@serve.batch`` (the batch counts rows, like serve-local). The ingress is a thin adapter over serve-local's
KServe v2 request handler (:mod:`deploykit.serve.handler`: same routes, limits, errors and metrics); it decides
the exits between stages with the shared exit step (:mod:`deploykit.runtime.exit_step`) and sends on only the
surviving rows, so later stages see fewer rows and get fewer replicas (:mod:`deploykit.serve.sizing`). With
``latency_slo_ms`` it runs the same load-adaptive controller as serve-local (:mod:`deploykit.serve.adaptive`). The
ingress has no batching queue of its own, so the controller's inputs are the rows in flight through the stage
deployments and their completion rate: by Little's law, in-flight rows / completion rate is the time a row spends
in the cascade now. MuE engines are refused (:mod:`deploykit.serve.models` says why).

Graphs travel to replicas as bytes through Ray's object store, so the same code runs on a multi-node cluster
without a shared filesystem (deploykit itself must be importable on every node).
"""

from __future__ import annotations

import asyncio
import math
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from ray import serve
from starlette.requests import Request
from starlette.responses import Response

from deploykit.errors import ConfigError
from deploykit.manifest import Manifest
from deploykit.serve import protocol
from deploykit.serve.sizing import replica_split
from deploykit.serve.triton_stage import merge_requests, split_outputs


@dataclass
class RayConfig:
    """Replica and batching knobs (CLI flags of ``deploykit serve-ray``)."""

    replicas: list[int] | None = None  # per stage; None = sizing rule over total_replicas
    total_replicas: int | None = None  # None = one per stage on average
    autoscale: bool = False
    max_batch_size: int = 32
    max_queue_delay_ms: float = 5.0
    max_request_mb: float = 16.0
    threads: int = 1  # intra-op threads per stage replica
    backend: str = "ort-cpu"  # a CPU backend (ort-cpu or openvino) running each stage replica's graph
    replica_cpus: float = 0.25  # Ray logical CPUs reserved per replica
    latency_slo_ms: float | None = None  # load-adaptive exits in the ingress; None = off


def stage_replicas(manifest: Manifest, config: RayConfig) -> list[int]:
    """Replicas per stage: ``config.replicas`` as given, else the sizing rule (exit fractions x stage cost)."""
    if config.replicas is not None:
        if len(config.replicas) != manifest.num_stages or min(config.replicas) < 1:
            raise ConfigError(f"--replicas needs {manifest.num_stages} integers >= 1 (one per stage), "
                              f"got {config.replicas}")
        return list(config.replicas)
    total = config.total_replicas or manifest.num_stages
    if total < 1:
        raise ConfigError(f"--total-replicas must be >= 1, got {total}")
    return replica_split(manifest, total)


def deployment_options(manifest: Manifest, config: RayConfig) -> list[dict[str, Any]]:
    """Ray Serve options per stage: fixed ``num_replicas``, or with ``autoscale`` an autoscaling config.

    Autoscaling keeps the sizing rule's proportions: ``min = max(1, n // 2)``, ``initial = n``, ``max = 2 n``.
    """
    opts = []
    for n in stage_replicas(manifest, config):
        o: dict[str, Any] = {"ray_actor_options": {"num_cpus": config.replica_cpus},
                             "max_ongoing_requests": max(64, 2 * config.max_batch_size)}
        if config.autoscale:
            o["autoscaling_config"] = {"min_replicas": max(1, n // 2), "initial_replicas": n,
                                       "max_replicas": 2 * n, "target_ongoing_requests": config.max_batch_size}
        else:
            o["num_replicas"] = n
        opts.append(o)
    return opts


def _rows(items: list[dict[str, np.ndarray]]) -> int:
    return sum(len(next(iter(it.values()))) for it in items)


class StageReplica:
    """One stage graph on a CPU backend; batches the rows of concurrent calls (``@serve.batch`` counts rows)."""

    def __init__(self, stage: dict[str, Any], graph: bytes, last: bool, threads: int, max_batch_size: int,
                 wait_s: float, backend: str = "ort-cpu", weights: bytes | None = None) -> None:
        from deploykit.backends import create_runner
        from deploykit.manifest import StageSpec

        spec = StageSpec.from_dict(stage)
        self._dir = tempfile.TemporaryDirectory(prefix="deploykit-stage-")
        path = Path(self._dir.name) / Path(spec.file).name
        path.write_bytes(graph)
        if weights is not None:  # OpenVINO IR: the .bin beside the .xml
            path.with_suffix(".bin").write_bytes(weights)
        self.runner = create_runner(path, backend, threads=threads).load()
        self.outputs = ([] if last else [t.name for t in spec.outputs]) + [spec.exit_logits, spec.exit_score]
        self.run_batch.set_max_batch_size(max_batch_size)
        self.run_batch.set_batch_wait_timeout_s(wait_s)

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.005, batch_size_fn=_rows)
    async def run_batch(self, items: list[dict[str, np.ndarray]]) -> list[dict[str, np.ndarray]]:
        feeds, counts = merge_requests(items)
        res = await asyncio.to_thread(self.runner.run, feeds, self.outputs)
        return split_outputs({k: np.asarray(v) for k, v in res.items()}, counts)

    async def __call__(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return await self.run_batch(feeds)


class Ingress:
    """The shared KServe v2 handler (:mod:`deploykit.serve.handler`); runs the exit decision between the stages."""

    def __init__(self, manifest: dict[str, Any], stages: list[Any], max_batch_size: int,
                 max_request_mb: float, latency_slo_ms: float | None = None, tick_s: float = 0.05) -> None:
        from deploykit.serve.handler import KServeHandler
        from deploykit.serve.metrics import ServeMetrics
        from deploykit.serve.models import model_for

        self.manifest = Manifest.from_dict(manifest)
        self.model = model_for(self.manifest)
        self.info = self.model.info
        self.stages = stages
        self.max_batch_size = max_batch_size
        self.metrics = ServeMetrics(self.model.name, self.model.num_stages)
        self.adaptive = (self.model.adaptive_controller(latency_slo_ms, 1) if latency_slo_ms is not None else None)
        if self.adaptive is not None:
            self.adaptive.listeners.append(self.metrics.observe_operating_point)
            self.metrics.observe_operating_point(self.adaptive.current(), self.adaptive.slo_s)
        self.handler = KServeHandler(self.model, self._submit, self.metrics, max_request_mb, adaptive=self.adaptive,
                                     batching={"max_batch_size": max_batch_size})
        self.tick_s = tick_s
        self._in_flight: dict[int, tuple[float, int]] = {}  # request id -> (arrival, rows)
        self._done_rows: dict[int, int] = {}  # operating point -> rows finished since the last tick
        self._ticker: asyncio.Task | None = None
        self._grpc: Any = None

    async def _adapt(self) -> None:
        """Feed the controller every ``tick_s``: completion rate per operating point, rows in flight, oldest age."""
        last = time.perf_counter()
        while True:
            await asyncio.sleep(self.tick_s)
            now = time.perf_counter()
            done, self._done_rows = self._done_rows, {}
            for level, rows in done.items():
                self.adaptive.observe_batch(rows, now - last, level)
            last = now
            flight = list(self._in_flight.values())
            oldest = now - min(t for t, _ in flight) if flight else 0.0
            self.adaptive.tick(oldest, sum(n for _, n in flight))

    async def __call__(self, request: Request) -> Response:
        if self.adaptive is not None and self._ticker is None:
            self._ticker = asyncio.get_running_loop().create_task(self._adapt())
        headers = {k.lower(): v for k, v in request.headers.items()}
        r = await self.handler.handle(request.method, request.url.path, headers, request.stream)
        return Response(r.body, r.status, headers=r.headers)

    def grpc_service(self) -> Any:
        """The KServe v2 gRPC service over this ingress's handler (Ray Serve's gRPC proxy calls the RPC methods)."""
        if self._grpc is None:
            from deploykit.serve.grpc_app import KServeGrpc

            self._grpc = KServeGrpc(self.handler)
        return self._grpc

    async def _submit(self, req: protocol.InferRequest) -> Any:
        """Run a parsed request through the stage deployments, ``max_batch_size`` rows per call at most."""
        from deploykit.serve.handler import Submitted

        point = self.adaptive.current() if self.adaptive is not None and req.thresholds is None else None
        if point is not None:  # requests without their own thresholds follow the controller
            thr = list(point.thresholds)
        else:
            thr = list(self.manifest.thresholds() if req.thresholds is None else req.thresholds)
        step = self.max_batch_size
        key = id(req)
        self._in_flight[key] = (time.perf_counter(), len(req.rows))
        try:
            parts = await asyncio.gather(*[self.cascade(req.rows[lo:lo + step], thr)
                                           for lo in range(0, len(req.rows), step)])
        finally:
            self._in_flight.pop(key, None)
        level = point.level if point is not None else 0
        self._done_rows[level] = self._done_rows.get(level, 0) + len(req.rows)
        result = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
        self.metrics.observe_exits(result["exit_stage"])
        return Submitted(result, None, point.as_params() if point is not None else None)

    async def cascade(self, x: np.ndarray, thr: list[float | None]) -> dict[str, np.ndarray]:
        """Call the stages in turn; rows whose score reaches their stage's threshold leave, the rest go on."""
        from deploykit.runtime.exit_step import ExitState

        last = self.manifest.num_stages - 1
        state = ExitState(len(x), self.manifest.num_classes)
        feeds: dict[str, np.ndarray] = {self.info.input_name: np.ascontiguousarray(x)}
        for k, spec in enumerate(self.manifest.stages):
            res = await self.stages[k].remote(feeds)
            keep = state.step(k, res[spec.exit_score], thr[k], k == last, res[spec.exit_logits])
            if keep is None:
                break
            feeds = {t.name: np.ascontiguousarray(res[t.name][keep]) for t in spec.outputs}
        bad = state.nonfinite_rows()
        if len(bad):  # as Cascade.run does: a NaN must never reach a client as a number
            from deploykit.errors import BackendError

            raise BackendError(f"the engine produced NaN or infinite outputs for {len(bad)} row(s); the graphs or "
                               "their weights are broken — re-export the model")
        return {"probs": state.probs(), "exit_stage": state.exit_stage, "score": state.score}


def _add_grpc_methods() -> None:
    """The KServe v2 gRPC RPCs as ingress methods (Ray Serve routes an RPC to the method of its name)."""
    from deploykit.serve.grpc_app import RPCS, ray_rpc

    for name in RPCS:
        setattr(Ingress, name, ray_rpc(name))


_add_grpc_methods()


def _weights(manifest: Manifest, file: str) -> bytes | None:
    """The weights file of an OpenVINO IR stage (``.xml`` + ``.bin``); None for ONNX graphs."""
    path = manifest.path_of(file)
    return path.with_suffix(".bin").read_bytes() if path.suffix == ".xml" else None


def build_app(engine_dir: str | os.PathLike, config: RayConfig) -> tuple[Any, list[dict[str, Any]]]:
    """The Ray Serve application (ingress bound to one deployment per stage) and the per-stage options."""
    from deploykit.serve.models import check_frontend

    manifest = Manifest.load(engine_dir)
    check_frontend(manifest, "serve-ray")
    manifest.check_files()
    if config.max_batch_size < 1 or config.max_queue_delay_ms < 0 or config.max_request_mb <= 0:
        raise ConfigError("expected --max-batch-size >= 1, --max-queue-delay-ms >= 0 and --max-request-mb > 0")
    from deploykit.backends import CPU_BACKENDS, check_backend

    if config.backend not in CPU_BACKENDS:
        raise ConfigError(f"serve-ray runs stage replicas on CPU backends ({', '.join(CPU_BACKENDS)}), not "
                          f"{config.backend!r}")
    check_backend(config.backend)
    opts = deployment_options(manifest, config)
    last = manifest.num_stages - 1
    stage_dep = serve.deployment(StageReplica)
    stages = [
        stage_dep.options(name=f"stage{k}", **o).bind(
            manifest.to_dict()["stages"][k], manifest.path_of(s.file).read_bytes(), k == last, config.threads,
            config.max_batch_size, config.max_queue_delay_ms / 1000.0, config.backend, _weights(manifest, s.file))
        for k, (s, o) in enumerate(zip(manifest.stages, opts))
    ]
    ingress = serve.deployment(Ingress).options(
        name="ingress", num_replicas=1, max_ongoing_requests=1024,
        ray_actor_options={"num_cpus": config.replica_cpus})
    if config.latency_slo_ms is not None:
        if config.latency_slo_ms <= 0:
            raise ConfigError(f"expected --latency-slo-ms > 0, got {config.latency_slo_ms}")
        from deploykit.serve.adaptive import AdaptiveController

        AdaptiveController.from_manifest(manifest, config.latency_slo_ms)  # an uncalibrated engine fails here, early
    return ingress.bind(manifest.to_dict(), stages, config.max_batch_size, config.max_request_mb,
                        config.latency_slo_ms), opts


def connect(address: str = "local", num_cpus: float | None = None) -> None:
    """Start a local Ray cluster on 127.0.0.1 (``local``) or join a running one (``auto`` or ``HOST:PORT``)."""
    import ray

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if ray.is_initialized():
        return
    if address == "local":
        ray.init(address="local", include_dashboard=False, num_cpus=math.ceil(num_cpus or 2),
                 _node_ip_address="127.0.0.1", log_to_driver=False, configure_logging=False)
    else:
        ray.init(address=address, log_to_driver=False, configure_logging=False)


def grpc_options(host: str, grpc_port: int) -> dict[str, Any] | None:
    """Ray Serve's gRPC proxy options for ``--grpc-port`` (None: off).

    Ray's proxy listens on every interface (``[::]:PORT``) whatever ``--host`` says, so gRPC is refused while the
    HTTP side is loopback-only: nothing is exposed to the network unless the user asked for it with ``--host``.
    """
    if not grpc_port:
        return None
    from deploykit.serve.grpc_app import SERVICER_FUNCTION, require_grpc

    require_grpc()
    if _is_loopback(host):
        raise ConfigError(f"serve-ray --grpc-port {grpc_port}: Ray Serve's gRPC proxy listens on every interface "
                          "([::]) and can't be bound to loopback; pass --host 0.0.0.0 to serve on the network "
                          "deliberately, or use serve-local for loopback-only gRPC")
    return {"port": grpc_port, "grpc_servicer_functions": [SERVICER_FUNCTION]}


def _is_loopback(host: str) -> bool:
    import ipaddress

    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def deploy(engine_dir: str | os.PathLike, config: RayConfig, host: str = "127.0.0.1", port: int = 8000,
           app_name: str = "deploykit", grpc_port: int = 0) -> dict[str, Any]:
    """Start Serve's proxies (HTTP on ``host:port``, gRPC on ``grpc_port`` unless 0) and deploy.

    Returns the URL, the gRPC address (or None) and the per-stage replica plan.
    """
    grpc = grpc_options(host, grpc_port)
    app, opts = build_app(engine_dir, config)
    serve.start(http_options={"host": host, "port": port}, **({"grpc_options": grpc} if grpc else {}))
    serve.run(app, name=app_name, route_prefix="/", blocking=False)
    return {"url": f"http://{host}:{port}", "grpc": f"{host}:{grpc_port}" if grpc else None, "app": app_name,
            "stages": opts}
