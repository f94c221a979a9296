"""Start and stop a real ``deploykit serve-local`` on 127.0.0.1 for the load benchmarks (loopback only)."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
import urllib.request


def free_port() -> int:
    """A free TCP port on 127.0.0.1."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_serve_local(engine_dir: str, port: int, options: list[str], timeout_s: float = 120) -> subprocess.Popen:
    """Launch the server in a subprocess and wait until ``/v2/health/ready`` answers."""
    cmd = [sys.executable, "-c", "from deploykit.cli import main; main()", "serve-local", engine_dir,
           "--port", str(port), *options]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/health/ready", timeout=1)
            return proc
        except OSError:
            if proc.poll() is not None:
                raise SystemExit("server exited during startup") from None
            time.sleep(0.2)
    proc.kill()
    raise SystemExit("server did not become ready")


def wait_grpc(target: str, timeout_s: float = 60) -> None:
    """Wait until the gRPC endpoint (``127.0.0.1:PORT``) answers ServerReady."""
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    client = grpcclient.InferenceServerClient(target)
    deadline = time.time() + timeout_s
    try:
        while True:
            try:
                if client.is_server_ready():
                    return
            except InferenceServerException:
                pass
            if time.time() > deadline:
                raise SystemExit(f"gRPC at {target} did not become ready")
            time.sleep(0.2)
    finally:
        client.close()
