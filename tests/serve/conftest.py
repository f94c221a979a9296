"""Fixtures for serve-local tests: a tiny exported model, and real servers on free 127.0.0.1 ports."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from serve_helpers import ThreadServer

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


@pytest.fixture(autouse=True)
def _one_thread(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OMP_NUM_THREADS", os.environ.get("OMP_NUM_THREADS", "1"))
