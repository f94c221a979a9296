"""Fixtures for serve-local tests: a tiny exported model, and real servers on free 127.0.0.1 ports."""

from __future__ import annotations

import asyncio
import os
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytest.importorskip("starlette")
pytest.importorskip("uvicorn")
pytest.importorskip("prometheus_client")

LABELS = [f"class_{i}" for i in range(10)]
PRE = {"input_size": [3, 16, 16], "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25], "interpolation": "bilinear"}


@pytest.fixture(scope="session")
def engine_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny untrained 4-exit ViT, exported once per session."""
    import torch

    from deploykit.export import export_model
    from deploykit.methods import create_backbone, create_method

    torch.manual_seed(0)
    bb = create_backbone("vit_tiny_patch16_224", 10, img_size=16, patch_size=4, depth=4, embed_dim=32, num_heads=2)
    model = create_method("multiexit", bb, 10)
    out = tmp_path_factory.mktemp("serve") / "tiny"
    export_model(model, out, labels=LABELS, preprocessing=PRE, name="tiny")
    return out


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


@pytest.fixture(scope="session")
def cascade(engine_dir: Path) -> Iterator[Any]:
    from deploykit.runtime.cascade import Cascade

    c = Cascade.from_dir(engine_dir, threads=1)
    yield c
    c.close()


@pytest.fixture(scope="session")
def server(cascade: Any) -> Iterator[ThreadServer]:
    """The shared server: max batch 8, 20 ms queue delay (long enough to batch concurrent test requests)."""
    from deploykit.serve.app import ServeConfig, create_app

    app = create_app(cascade, ServeConfig(max_batch_size=8, max_queue_delay_ms=20, max_queue=64, max_request_mb=1))
    with ThreadServer(app) as s:
        yield s


def rows(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, 3, 16, 16)).astype(np.float32)


def png_bytes(seed: int = 0, size: int = 24) -> bytes:
    import io

    from PIL import Image

    arr = np.random.default_rng(seed).integers(0, 255, (size, size, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(autouse=True)
def _one_thread(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OMP_NUM_THREADS", os.environ.get("OMP_NUM_THREADS", "1"))
