"""serve-local: the KServe v2 HTTP server with dynamic batching over a cascade (see docs/serve.md)."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
from collections.abc import Iterator
from typing import Any

from deploykit.errors import ConfigError


def serve_local(engine_dir: str | os.PathLike, host: str = "127.0.0.1", port: int = 8000, backend: str = "ort-cpu",
                max_batch_size: int = 32, max_queue_delay_ms: float = 5.0, max_queue: int = 256,
                max_request_mb: float = 16.0, threads: int | None = None, log_level: str = "info",
                latency_slo_ms: float | None = None, instances: int = 1) -> None:
    """Load ``engine_dir`` and serve it until SIGINT / SIGTERM, then drain what is in flight and return.

    Binds 127.0.0.1 unless ``host`` says otherwise: putting a model on the network is the caller's explicit choice.
    ``latency_slo_ms`` turns on load-adaptive exits (see :mod:`deploykit.serve.adaptive`); off by default.
    ``instances`` > 1 runs that many batches at once on one set of ORT CPU sessions (``Run`` is thread-safe there;
    device backends keep per-run buffers, so they serve one batch at a time per process).
    """
    try:
        import uvicorn
    except ImportError as e:
        raise ConfigError(f"serve-local needs the serve extra ({e}); install it with "
                          "`pip install 'deploykit[serve]'`") from e
    from deploykit.runtime.cascade import Cascade
    from deploykit.serve.app import ServeConfig, create_app

    if max_batch_size < 1 or max_queue < 1 or max_queue_delay_ms < 0 or max_request_mb <= 0:
        raise ConfigError("expected --max-batch-size >= 1, --max-queue >= 1, --max-queue-delay-ms >= 0 and "
                          f"--max-request-mb > 0; got {max_batch_size}, {max_queue}, {max_queue_delay_ms}, "
                          f"{max_request_mb}")
    if latency_slo_ms is not None and latency_slo_ms <= 0:
        raise ConfigError(f"expected --latency-slo-ms > 0, got {latency_slo_ms}")
    if instances < 1:
        raise ConfigError(f"expected --instances >= 1, got {instances}")
    from deploykit.backends import CPU_BACKENDS

    if instances > 1 and backend not in CPU_BACKENDS:
        raise ConfigError(f"--instances {instances} needs a CPU backend ({', '.join(CPU_BACKENDS)}: thread-safe "
                          "runners); the "
                          f"{backend} runner keeps per-run device buffers, so run one server per device instead")
    cascade = Cascade.from_dir(engine_dir, backend=backend, threads=threads)
    try:
        app = create_app(cascade, ServeConfig(max_batch_size, max_queue_delay_ms, max_queue, max_request_mb,
                                                latency_slo_ms=latency_slo_ms, instances=instances))
        config = uvicorn.Config(app, host=host, port=port, log_level=log_level, access_log=False,
                                timeout_graceful_shutdown=60, loop="auto", http="auto")
        logging.getLogger("deploykit.serve").info("serving %s on http://%s:%d", cascade.manifest.name, host, port)
        _Server(config).run()
    finally:
        cascade.close()


def _server_class() -> Any:
    import uvicorn

    class Server(uvicorn.Server):
        """uvicorn's server, but a SIGTERM / SIGINT that was drained gracefully ends in exit code 0.

        uvicorn re-raises the captured signal after shutdown (so the process dies *by* the signal); a server that
        finished every request it accepted has done its job, so deploykit returns normally instead.
        """

        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:
            if threading.current_thread() is not threading.main_thread():
                yield
                return
            sigs = (signal.SIGINT, signal.SIGTERM)
            original = {s: signal.signal(s, self.handle_exit) for s in sigs}
            try:
                yield
            finally:
                for s, h in original.items():
                    signal.signal(s, h)

    return Server


def _Server(config: Any) -> Any:  # noqa: N802  (reads as a class at the call site)
    return _server_class()(config)


def serve_ray(engine_dir: str | os.PathLike, address: str = "local", host: str = "127.0.0.1", port: int = 8000,
              replicas: list[int] | None = None, total_replicas: int | None = None, autoscale: bool = False,
              max_batch_size: int = 32, max_queue_delay_ms: float = 5.0, max_request_mb: float = 16.0,
              threads: int = 1, replica_cpus: float = 0.25, num_cpus: float = 2,
              latency_slo_ms: float | None = None, backend: str = "ort-cpu") -> None:
    """Deploy ``engine_dir`` on Ray Serve (one deployment per stage) and serve until SIGINT / SIGTERM.

    ``address="local"`` starts a Ray cluster on 127.0.0.1 for this process and stops it at the end; ``auto`` (or
    ``HOST:PORT``) joins a running cluster and, at the end, deletes only this application.
    """
    try:
        from ray import serve
    except ImportError as e:
        raise ConfigError(f"serve-ray needs the ray extra ({e}); install it with `pip install 'deploykit[ray]'`") from e
    import ray

    from deploykit.serve.ray_app import RayConfig, connect, deploy

    config = RayConfig(replicas=replicas, total_replicas=total_replicas, autoscale=autoscale,
                       max_batch_size=max_batch_size, max_queue_delay_ms=max_queue_delay_ms,
                       max_request_mb=max_request_mb, threads=threads, replica_cpus=replica_cpus,
                       latency_slo_ms=latency_slo_ms, backend=backend)
    connect(address, num_cpus)
    stop = threading.Event()
    try:
        info = deploy(engine_dir, config, host=host, port=port)
        plan = ", ".join(f"stage{k}: {o.get('num_replicas') or o['autoscaling_config']}"
                         for k, o in enumerate(info["stages"]))
        logging.getLogger("deploykit.serve").info("serving %s on %s (%s)", engine_dir, info["url"], plan)
        for s in (signal.SIGINT, signal.SIGTERM):
            signal.signal(s, lambda *_: stop.set())
        stop.wait()
    finally:
        if address == "local":
            serve.shutdown()
            ray.shutdown()
        else:
            serve.delete("deploykit")


__all__ = ["serve_local", "serve_ray"]
