"""serve-local: the KServe v2 HTTP server with dynamic batching over a cascade or a MuE engine (docs/serve.md)."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import signal
import socket
import threading
from collections.abc import Iterator
from typing import Any

from deploykit.errors import ConfigError


def check_port_free(host: str, port: int, flag: str = "--port") -> None:
    """Refuse a port another process listens on with a one-line error (the server would log and exit 1 later).

    ``flag`` names the option the port came from (``--port``, or ``--grpc-port``, which 0 turns off).
    """
    import socket

    try:
        family, _, _, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except socket.gaierror as e:
        raise ConfigError(f"--host {host!r} can't be resolved ({e.strerror}); give an IP address such as "
                          "127.0.0.1") from None
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn: a port in TIME_WAIT is free
        try:
            s.bind(addr)
        except OSError as e:
            if flag == "--port":
                raise ConfigError(f"can't listen on {host}:{port} ({e.strerror}); another server holds the port: "
                                  "stop it or pick another with --port") from None
            raise ConfigError(f"{flag} {port}: can't bind {host}:{port} ({e.strerror}); pick another port, or 0 to "
                              "turn gRPC off") from None


def serve_local(engine_dir: str | os.PathLike, host: str = "127.0.0.1", port: int = 8000, backend: str = "ort-cpu",
                max_batch_size: int = 32, max_queue_delay_ms: float = 5.0, max_queue: int = 256,
                max_request_mb: float = 16.0, threads: int | None = None, log_level: str = "info",
                latency_slo_ms: float | None = None, instances: int = 1, drift_window: int | None = None,
                drift_threshold: float | None = None, grpc_port: int | None = None, read_timeout_s: float = 30.0,
                drain_timeout_s: float = 30.0, max_image_pixels: int | None = None) -> None:
    """Load ``engine_dir`` and serve it until SIGINT / SIGTERM, then drain what is in flight and return.

    Binds 127.0.0.1 unless ``host`` says otherwise: putting a model on the network is the caller's explicit choice.
    ``latency_slo_ms`` turns on load-adaptive exits (see :mod:`deploykit.serve.adaptive`); off by default.
    ``grpc_port`` serves KServe v2 over gRPC on that port too (0: off; None: 8001 when the grpc extra is
    installed, else off). ``instances`` > 1 runs that many batches at once on one set of ORT CPU sessions (``Run``
    is thread-safe there; device backends keep per-run buffers, so they serve one batch at a time per process).
    ``drift_window`` / ``drift_threshold``: drift watch against the calibration record (``deploykit.serve.drift``);
    on with the defaults when the manifest has a record, required (error without one) when either is given;
    ``drift_window=0`` turns it off.
    ``read_timeout_s`` bounds how long a request's headers, and then its body, may take to arrive;
    ``drain_timeout_s`` how long SIGTERM waits for accepted requests; ``max_image_pixels`` is the per-image
    budget read from the header before decoding.
    """
    try:
        import uvicorn
    except ImportError as e:
        raise ConfigError(f"serve-local needs the serve extra ({e}); install it with "
                          "`pip install 'deploykit[serve]'`") from e
    from deploykit.serve.app import ServeConfig, create_app
    from deploykit.serve.models import open_engine

    if max_batch_size < 1 or max_queue < 1 or max_queue_delay_ms < 0 or max_request_mb <= 0:
        raise ConfigError("expected --max-batch-size >= 1, --max-queue >= 1, --max-queue-delay-ms >= 0 and "
                          f"--max-request-mb > 0; got {max_batch_size}, {max_queue}, {max_queue_delay_ms}, "
                          f"{max_request_mb}")
    if latency_slo_ms is not None and latency_slo_ms <= 0:
        raise ConfigError(f"expected --latency-slo-ms > 0, got {latency_slo_ms}")
    if instances < 1:
        raise ConfigError(f"expected --instances >= 1, got {instances}")
    if not read_timeout_s > 0 or not drain_timeout_s >= 0:
        raise ConfigError(f"expected --read-timeout > 0 and --drain-timeout >= 0 (seconds), got {read_timeout_s} and "
                          f"{drain_timeout_s}")
    if max_image_pixels is not None and max_image_pixels < 1:
        raise ConfigError(f"expected --max-image-pixels >= 1, got {max_image_pixels}")
    from deploykit.backends import CPU_BACKENDS

    if instances > 1 and backend not in CPU_BACKENDS:
        raise ConfigError(f"--instances {instances} needs a CPU backend ({', '.join(CPU_BACKENDS)}: thread-safe "
                          "runners); the "
                          f"{backend} runner keeps per-run device buffers, so run one server per device instead")
    from deploykit.serve.drift import DEFAULT_THRESHOLD, DEFAULT_WINDOW

    if drift_window is not None and drift_window < 0 or drift_threshold is not None and not 0 < drift_threshold < 1:
        raise ConfigError(f"expected --drift-window >= 0 rows (0 = off) and 0 < --drift-threshold < 1 (a "
                          f"total-variation distance); got {drift_window}, {drift_threshold}")
    if drift_window == 0 and drift_threshold is not None:
        raise ConfigError("--drift-threshold applies only with drift watch on; drop --drift-window 0")
    drift = {"drift_window": DEFAULT_WINDOW if drift_window is None else drift_window,
             "drift_threshold": DEFAULT_THRESHOLD if drift_threshold is None else drift_threshold,
             "drift_required": bool(drift_window) or drift_threshold is not None}
    check_port_free(host, port)
    grpc_port = _grpc_port(host, grpc_port)
    engine = open_engine(engine_dir, backend=backend, threads=threads)
    try:
        extra = {} if max_image_pixels is None else {"max_image_pixels": max_image_pixels}
        app = create_app(engine, ServeConfig(max_batch_size, max_queue_delay_ms, max_queue, max_request_mb,
                                             latency_slo_ms=latency_slo_ms, instances=instances,
                                             grpc_port=grpc_port, grpc_host=host, read_timeout_s=read_timeout_s,
                                             drain_timeout_s=drain_timeout_s, **drift, **extra))
        from deploykit.serve.header_deadline import http_protocol

        config = uvicorn.Config(app, host=host, port=port, log_level=log_level, access_log=False,
                                timeout_graceful_shutdown=max(1.0, drain_timeout_s), loop="auto",
                                http=http_protocol(read_timeout_s),  # headers too must arrive in --read-timeout
                                proxy_headers=False)  # loopback by default; X-Forwarded-* is not used
        logging.getLogger("deploykit.serve").info("serving %s on http://%s:%d%s", engine.manifest.name, host, port,
                                                  f" and grpc://{host}:{grpc_port}" if grpc_port else "")
        _Server(config).run()
    finally:
        engine.close()


def _grpc_port(host: str, port: int | None) -> int:
    """The gRPC port to open (0: none); an explicit port needs the grpc extra and must be free."""
    from deploykit.serve.grpc_app import require_grpc

    if port is None:  # the default: Triton's 8001 when gRPC can be served
        try:
            require_grpc()
        except ConfigError:
            logging.getLogger("deploykit.serve").info("gRPC off: install 'deploykit[grpc]' to serve it")
            return 0
        port = 8001
    if port == 0:
        return 0
    if not 0 < port < 65536:
        raise ConfigError(f"expected --grpc-port in 1..65535 (0 turns gRPC off), got {port}")
    require_grpc()
    check_port_free(host, port, "--grpc-port")
    return port


def _server_class() -> Any:
    import uvicorn

    class Server(uvicorn.Server):
        """uvicorn's server with a bounded drain, and a SIGTERM / SIGINT that was drained ending in exit code 0.

        Drain (SIGTERM): readiness turns 503 at once and requests keep being served, until none is in the handler
        or ``--drain-timeout`` passes; then the connections already waiting in the listen backlog are accepted
        (so no request already sent is reset), the listener is closed, and whatever is still queued at the
        deadline is answered 503. uvicorn re-raises the captured signal after shutdown (so the process dies *by*
        the signal); a server that answered every request it accepted has done its job, so deploykit returns
        normally instead.
        """

        async def shutdown(self, sockets: Any = None) -> None:
            drain = getattr(getattr(self.config.app, "state", None), "drain", None)
            if drain is not None and not self.force_exit:
                drain.begin()
                await self._wait(drain)
                self._accept_backlog_and_close()
                await asyncio.sleep(0.2)  # let just-accepted connections read their requests
                await self._wait(drain)
                drain.expire()
                await asyncio.sleep(0.05)
            await super().shutdown(sockets)

        async def _wait(self, drain: Any) -> None:
            while drain.active and drain.remaining_s() > 0 and not self.force_exit:
                await asyncio.sleep(0.02)

        def _accept_backlog_and_close(self) -> None:
            """Accept every connection the kernel already completed, then stop listening (one synchronous step)."""
            loop = asyncio.get_running_loop()
            factory = functools.partial(self.config.http_protocol_class, config=self.config,
                                        server_state=self.server_state, app_state=self.lifespan.state)
            for server in self.servers:
                for tsock in server.sockets or ():
                    with socket.socket(fileno=os.dup(tsock.fileno())) as listener:
                        listener.setblocking(False)
                        while True:
                            try:
                                conn, _ = listener.accept()
                            except (BlockingIOError, InterruptedError, OSError):
                                break
                            conn.setblocking(False)
                            loop.create_task(loop.connect_accepted_socket(factory, conn))
                server.close()

        def handle_exit(self, sig: int, frame: Any) -> None:
            if self.should_exit:  # a second signal: stop now
                self.force_exit = True
            self.should_exit = True

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
              latency_slo_ms: float | None = None, backend: str = "ort-cpu", grpc_port: int = 0) -> None:
    """Deploy ``engine_dir`` on Ray Serve (one deployment per stage) and serve until SIGINT / SIGTERM.

    ``address="local"`` starts a Ray cluster on 127.0.0.1 for this process and stops it at the end; ``auto`` (or
    ``HOST:PORT``) joins a running cluster and, at the end, deletes only this application.
    """
    try:
        from ray import serve
    except ImportError as e:
        raise ConfigError(f"serve-ray needs the ray extra ({e}); install it with `pip install 'deploykit[ray]'`") from e
    import ray

    from deploykit.manifest import Manifest
    from deploykit.serve.models import check_frontend
    from deploykit.serve.ray_app import RayConfig, connect, deploy, grpc_options

    check_frontend(Manifest.load(engine_dir), "serve-ray")  # before a Ray cluster starts
    grpc_options(host, grpc_port)  # refused before a Ray cluster starts, too
    if address == "local":  # a cluster that is joined may already run Serve's proxies on these ports
        check_port_free(host, port)
        if grpc_port:
            check_port_free("::", grpc_port, "--grpc-port")  # Ray's gRPC proxy binds every interface
    config = RayConfig(replicas=replicas, total_replicas=total_replicas, autoscale=autoscale,
                       max_batch_size=max_batch_size, max_queue_delay_ms=max_queue_delay_ms,
                       max_request_mb=max_request_mb, threads=threads, replica_cpus=replica_cpus,
                       latency_slo_ms=latency_slo_ms, backend=backend)
    connect(address, num_cpus)
    stop = threading.Event()
    # before deploy: a Ctrl-C / SIGTERM while the replicas start still ends in the clean shutdown below
    for s in (signal.SIGINT, signal.SIGTERM):
        signal.signal(s, lambda *_: stop.set())
    try:
        info = deploy(engine_dir, config, host=host, port=port, grpc_port=grpc_port)
        plan = ", ".join(f"stage{k}: {o.get('num_replicas') or o['autoscaling_config']}"
                         for k, o in enumerate(info["stages"]))
        grpc = f", gRPC on {info['grpc']}" if info["grpc"] else ""
        logging.getLogger("deploykit.serve").info("serving %s on %s%s (%s)", engine_dir, info["url"], grpc, plan)
        stop.wait()
    finally:
        if address == "local":
            serve.shutdown()
            ray.shutdown()
        else:
            serve.delete("deploykit")


__all__ = ["serve_local", "serve_ray"]
