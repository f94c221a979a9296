"""``deploykit export-triton``: a Triton model repository with one model per stage and a BLS cascade model.

Layout (``REPO``)::

    <name>_stage<k>/config.pbtxt, 1/model.onnx | 1/model.plan   one per stage, dynamic batching
                                  (--backend python: 1/model.onnx + 1/model.py, a Python-backend ORT stage)
    <name>/config.pbtxt, 1/model.py, 1/exit_step.py, 1/cascade.json   Python-backend BLS model: the cascade

Ensembles can't express the data-dependent exit (see docs/scaling.md), so the cascade is a BLS model whose logic
is :func:`deploykit.serve.triton_model.run_cascade`. The config text is written by hand (no tritonclient needed to
export); the tests parse every file with Triton's own ``model_config_pb2``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from importlib import resources
from pathlib import Path
from typing import Any

from deploykit.errors import ConfigError
from deploykit.manifest import Manifest
from deploykit.serve.models import check_frontend
from deploykit.serve.sizing import replica_split

_TYPES = {"float32": "TYPE_FP32", "float16": "TYPE_FP16", "int64": "TYPE_INT64", "int32": "TYPE_INT32"}
_PLATFORMS = {"onnxruntime": ("onnxruntime_onnx", "model.onnx"), "tensorrt": ("tensorrt_plan", "model.plan"),
              "python": (None, "model.onnx")}


def export_triton(engine_dir: str | os.PathLike, out: str | os.PathLike, backend: str = "onnxruntime",
                  max_batch_size: int | None = None, max_queue_delay_us: int = 500, instances: int | None = None,
                  name: str | None = None, threads: int = 1) -> dict[str, Any]:
    """Write the model repository; returns a summary (models, max batch, instances per stage).

    Args:
        engine_dir: exported (and ideally calibrated) engine directory.
        out: repository directory to create (must not hold a different repository).
        backend: ``onnxruntime`` (the stage ONNX graphs), ``tensorrt`` (plans from ``deploykit build``) or
            ``python`` (each stage a Python-backend model running its ONNX graph with ONNX Runtime on CPU, for
            Triton builds without the ONNX Runtime backend; the server's Python needs numpy and onnxruntime).
        max_batch_size: Triton ``max_batch_size`` (default: the TensorRT build's max batch, else 32).
        max_queue_delay_us: ``dynamic_batching.max_queue_delay_microseconds`` for every model.
        instances: total stage instances to split by calibrated exit fractions × stage cost (default 1 each).
        name: the BLS model's name (default: the manifest's name).
        threads: ``--backend python`` only: ONNX Runtime intra-op threads per stage instance.
    """
    if backend not in _PLATFORMS:
        raise ConfigError(f"--backend must be one of {sorted(_PLATFORMS)}, got {backend!r}")
    if threads < 1:
        raise ConfigError(f"--threads must be >= 1, got {threads}")
    m = Manifest.load(engine_dir)
    check_frontend(m, "export-triton")
    trt = m.extra.get("trt") or {}
    if backend == "tensorrt" and not all("trt" in s.extra for s in m.stages):
        raise ConfigError(f"{engine_dir} has no TensorRT plans; run `deploykit build {engine_dir}` on the target GPU "
                          "first (plans are tied to the GPU and TensorRT version of the Triton server)")
    mbs = int(max_batch_size or trt.get("max_batch") or 32)
    if backend == "tensorrt" and trt.get("max_batch") and mbs > int(trt["max_batch"]):
        raise ConfigError(f"--max-batch-size {mbs} exceeds the plans' profile max batch {trt['max_batch']}")
    name = name or re.sub(r"[^A-Za-z0-9_.-]", "_", m.name)
    counts = replica_split(m, instances) if instances else [1] * m.num_stages
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    platform, fname = _PLATFORMS[backend]
    preferred = [int(trt["opt_batch"])] if backend == "tensorrt" and trt.get("opt_batch") else []
    stages = []
    for k, s in enumerate(m.stages):
        model = f"{name}_stage{k}"
        d = out / model / "1"
        d.mkdir(parents=True, exist_ok=True)
        src = m.path_of(s.extra["trt"]["engine"] if backend == "tensorrt" else s.file)
        shutil.copyfile(src, d / fname)
        if backend == "python":
            (d / "model.py").write_text(resources.files("deploykit.serve").joinpath("triton_stage.py").read_text())
        ins = [(t.name, t.dtype, t.shape[1:]) for t in s.inputs]
        outs = [(t.name, t.dtype, t.shape[1:]) for t in s.outputs]
        outs += [(s.exit_logits, "float32", [m.num_classes]), (s.exit_score, "float32", [])]
        kind = {"tensorrt": "KIND_GPU", "python": "KIND_CPU"}.get(backend, "KIND_AUTO")
        text = _config(model, mbs, max_queue_delay_us, ins, outs, platform=platform, count=counts[k],
                       preferred=preferred, kind=kind, backend="python" if backend == "python" else None,
                       parameters={"intra_op_threads": str(threads)} if backend == "python" else None)
        (out / model / "config.pbtxt").write_text(text)
        stages.append({"model": model, "outputs": [t.name for t in s.outputs], "exit_logits": s.exit_logits,
                       "exit_score": s.exit_score})
    d = out / name / "1"
    d.mkdir(parents=True, exist_ok=True)
    (d / "model.py").write_text(resources.files("deploykit.serve").joinpath("triton_model.py").read_text())
    (d / "exit_step.py").write_text(resources.files("deploykit.runtime").joinpath("exit_step.py").read_text())
    spec = {"input": m.input_spec.name, "num_classes": m.num_classes, "labels": m.labels,
            "thresholds": m.thresholds(), "stages": stages, "source": m.name}
    (d / "cascade.json").write_text(json.dumps(spec, indent=2) + "\n")
    chw = [int(v) for v in m.input_spec.shape[1:]]
    bls_outs = [("probabilities", "float32", [m.num_classes]), ("exit_stage", "int64", [1]),
                ("score", "float32", [1]), ("class_index", "int64", [1])]
    (out / name / "config.pbtxt").write_text(
        _config(name, mbs, max_queue_delay_us, [(m.input_spec.name, "float32", chw)], bls_outs, backend="python",
                count=1, kind="KIND_CPU"))
    return {"repository": str(out), "model": name, "stage_models": [s["model"] for s in stages],
            "backend": backend, "max_batch_size": mbs, "instances": counts, "thresholds": m.thresholds()}


def _dims(shape: list[Any]) -> str:
    if any(not isinstance(d, int) for d in shape):
        raise ConfigError(f"Triton needs static non-batch dims; the manifest has {shape} — re-export with static "
                          "shapes")
    return "[ " + ", ".join(str(d) for d in shape) + " ]"


def _tensor(name: str, dtype: str, shape: list[Any]) -> str:
    if dtype not in _TYPES:
        raise ConfigError(f"tensor {name!r} has dtype {dtype!r}; export-triton handles {sorted(_TYPES)}")
    if not shape:  # a [batch] vector: Triton wants one dim, reshaped away
        return f'  {{ name: "{name}" data_type: {_TYPES[dtype]} dims: [ 1 ] reshape: {{ shape: [ ] }} }}'
    return f'  {{ name: "{name}" data_type: {_TYPES[dtype]} dims: {_dims(shape)} }}'


def _config(name: str, mbs: int, delay_us: int, ins: list[tuple], outs: list[tuple], platform: str | None = None,
            backend: str | None = None, count: int = 1, preferred: list[int] | None = None,
            kind: str = "KIND_AUTO", parameters: dict[str, str] | None = None) -> str:
    lines = [f'name: "{name}"']
    lines.append(f'platform: "{platform}"' if platform else f'backend: "{backend}"')
    lines.append(f"max_batch_size: {mbs}")
    lines.append("input [\n" + ",\n".join(_tensor(*t) for t in ins) + "\n]")
    lines.append("output [\n" + ",\n".join(_tensor(*t) for t in outs) + "\n]")
    pref = f"  preferred_batch_size: [ {', '.join(map(str, preferred))} ]\n" if preferred else ""
    lines.append(f"dynamic_batching {{\n{pref}  max_queue_delay_microseconds: {int(delay_us)}\n}}")
    lines.append(f"instance_group [ {{ count: {count} kind: {kind} }} ]")
    for key, value in (parameters or {}).items():
        lines.append(f'parameters {{ key: "{key}" value: {{ string_value: "{value}" }} }}')
    return "\n".join(lines) + "\n"
