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


MUE_TINY = {"name": "mue", "dim": 32, "heads": 2, "enc_layers": 3, "dec_layers": 3, "img_size": 32, "patch_size": 8,
            "max_text_len": 12, "max_gen_len": 18, "dec_prompt": True, "tasks": ["entailment", "caption"]}


@pytest.fixture(scope="session")
def mue_engine_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny MuE engine (entailment + caption), trained for a few steps and exported once per session."""
    from deploykit.export.mue import export_mue
    from deploykit.methods.mue.train import train_mue

    root = tmp_path_factory.mktemp("serve-mue")
    recipe = {"name": "tiny-mue", "method": dict(MUE_TINY),
              "data": {"spec": "synthetic-vl", "n_train": 96, "n_val": 8, "n_test": 8},
              "train": {"steps": 20, "batch_size": 32, "eval_every": 1000, "threads": 1}}
    run = train_mue(recipe, root / "run")
    export_mue(run, root / "engine", check=False)
    return root / "engine"


@pytest.fixture(scope="session")
def mue_inputs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Synthetic test scenes as PNG files, with their entailment hypotheses."""
    import io

    from deploykit.data.vl import synthetic_vl

    root = tmp_path_factory.mktemp("mue-inputs")
    rows = synthetic_vl("test", n=24, size=32, tasks=("entailment",))
    paths, files = [], []
    for i, r in enumerate(rows):
        buf = io.BytesIO()
        r.image.save(buf, format="PNG")
        files.append(buf.getvalue())
        paths.append(root / f"scene{i}.png")
        paths[-1].write_bytes(files[-1])
    return {"paths": paths, "files": files, "texts": [r.text for r in rows]}


@pytest.fixture(scope="session")
def mue_server(mue_engine_dir: Path) -> Iterator[ThreadServer]:
    """serve-local over the MuE engine: max batch 8, 20 ms queue delay."""
    from deploykit.runtime.generation import MuEEngine
    from deploykit.serve.app import ServeConfig, create_app

    engine = MuEEngine.from_dir(mue_engine_dir, threads=1)
    app = create_app(engine, ServeConfig(max_batch_size=8, max_queue_delay_ms=20, max_queue=64, max_request_mb=1))
    with ThreadServer(app) as s:
        yield s
    engine.close()
