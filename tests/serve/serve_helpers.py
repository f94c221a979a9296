"""Helpers for serve tests: plain-HTTP client calls (stdlib only), inputs, and an in-process uvicorn server.

A module of its own (not conftest.py): several test folders have a conftest, and ``from conftest import`` picks
whichever was imported first.
"""

from __future__ import annotations

import asyncio
import base64
import json
import socket
import threading
import time
import urllib.error
import urllib.request
from typing import Any

import numpy as np


def http(url: str, body: bytes | dict | None = None, headers: dict[str, str] | None = None,
         timeout: float = 30) -> tuple[int, dict[str, str], bytes]:
    data = json.dumps(body).encode() if isinstance(body, dict) else body
    req = urllib.request.Request(url, data=data, headers=headers or {}, method="POST" if data is not None else "GET")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, {k.lower(): v for k, v in r.headers.items()}, r.read()
    except urllib.error.HTTPError as e:
        return e.code, {k.lower(): v for k, v in e.headers.items()}, e.read()


def fp32_request(x: np.ndarray, nested: bool = False, **params: Any) -> dict:
    data = x.tolist() if nested else x.ravel().tolist()
    req: dict[str, Any] = {"inputs": [{"name": "image", "shape": list(x.shape), "datatype": "FP32", "data": data}]}
    if params:
        req["parameters"] = params
    return req


def bytes_request(files: list[bytes]) -> dict:
    return {"inputs": [{"name": "image_bytes", "shape": [len(files)], "datatype": "BYTES",
                        "data": [base64.b64encode(f).decode() for f in files]}]}


def outputs(body: bytes) -> dict[str, np.ndarray]:
    d = json.loads(body)
    return {o["name"]: np.asarray(o["data"]).reshape(o["shape"]) for o in d["outputs"]}


def error(body: bytes) -> str:
    d = json.loads(body)
    assert set(d) == {"error"}, d
    return d["error"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ThreadServer:
    """uvicorn in a background thread of the test process (in-process, real sockets, real HTTP)."""

    def __init__(self, app: Any) -> None:
        import uvicorn

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning",
                                                    access_log=False))
        self.thread = threading.Thread(target=lambda: asyncio.run(self.server.serve()), daemon=True)

    def __enter__(self) -> ThreadServer:
        self.thread.start()
        deadline = time.time() + 20
        while not self.server.started:
            if time.time() > deadline or not self.thread.is_alive():
                raise RuntimeError("server did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc: Any) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


def rows(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, 3, 16, 16)).astype(np.float32)


def png_bytes(seed: int = 0, size: int = 24) -> bytes:
    import io

    from PIL import Image

    arr = np.random.default_rng(seed).integers(0, 255, (size, size, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def wait_ready(url: str, proc: Any, timeout_s: float, poll_s: float = 0.2) -> None:
    """Wait for a child server's ``/v2/health/ready``; RuntimeError with its output if it exits or times out."""
    deadline = time.time() + timeout_s
    while True:
        try:
            if http(url + "/v2/health/ready", timeout=2)[0] == 200:
                return
        except OSError:
            pass
        if proc.poll() is not None or time.time() > deadline:
            if proc.poll() is None:
                proc.kill()
            raise RuntimeError(f"the server did not come up: {proc.stdout.read().decode()[-3000:]}")
        time.sleep(poll_s)


class ProcessServer:
    """``deploykit serve-local`` in a child process (real signals, real RSS), on a free 127.0.0.1 port."""

    def __init__(self, engine_dir: Any, *args: str) -> None:
        import os
        import sys

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.cmd = [sys.executable, "-m", "deploykit", "serve-local", str(engine_dir), "--port", str(self.port),
                    "--threads", "1", "--grpc-port", "0", *args]
        self.env = dict(os.environ, OMP_NUM_THREADS="1")
        self.proc: Any = None

    def __enter__(self) -> ProcessServer:
        import subprocess

        self.proc = subprocess.Popen(self.cmd, env=self.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        wait_ready(self.url, self.proc, 90, poll_s=0.1)
        return self

    def rss_kb(self, field: str = "VmRSS") -> int:
        """Resident set (``VmRSS``) or its peak so far (``VmHWM``) of the server process, in KiB."""
        with open(f"/proc/{self.proc.pid}/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
        raise RuntimeError(field)

    def __exit__(self, *exc: Any) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
