"""``deploykit build``: one TensorRT plan per stage graph (ONNX -> engine, so it sits with the other graph tools).

Written from NVIDIA's Python API documentation (TensorRT 10.x for JetPack 6, 11.x strongly typed); see docs/jetson.md
for what has been verified on a GPU. Version checks and the runner stay in :mod:`deploykit.backends.trt`.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from deploykit.backends.base import require
from deploykit.backends.trt import PLAN_SUFFIX, PRECISIONS, TIMING_CACHE, device_info, trt_major, uses_strong_typing
from deploykit.errors import ConfigError, EngineError, ManifestError

log = logging.getLogger(__name__)


# ---- build ------------------------------------------------------------------------------------------------------
@dataclass
class BuildSettings:
    """What ``deploykit build`` was asked for, validated before TensorRT is imported."""

    precision: str = "fp32"
    max_batch: int = 32
    opt_batch: int | None = None
    workspace_mb: int | None = None
    strongly_typed: bool | None = None
    int8_qdq: bool = False  # graphs from `deploykit quantize --mode static`: INT8 where their Q/DQ nodes say

    def validate(self) -> None:
        """Raise :class:`ConfigError` for settings no build can satisfy."""
        if self.precision not in PRECISIONS:
            raise ConfigError(f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if self.max_batch < 1:
            raise ConfigError(f"--max-batch must be >= 1, got {self.max_batch}")
        opt = self.opt
        if not 1 <= opt <= self.max_batch:
            raise ConfigError(f"--opt-batch must be in 1..max-batch ({self.max_batch}), got {opt}")
        if self.workspace_mb is not None and self.workspace_mb < 1:
            raise ConfigError(f"--workspace must be >= 1 MB, got {self.workspace_mb}")

    @property
    def opt(self) -> int:
        """Batch the kernels are tuned for: the given one, else the largest power of two <= min(8, max)."""
        if self.opt_batch is not None:
            return self.opt_batch
        return 1 << (min(8, self.max_batch).bit_length() - 1)


def build_engines(
        engine_dir: str | os.PathLike,
        precision: str = "fp32",
        max_batch: int = 32,
        opt_batch: int | None = None,
        workspace_mb: int | None = None,
        strongly_typed: bool | None = None,
        device_id: int = 0,
) -> dict[str, Any]:
    """Build one TensorRT engine per graph of an exported engine directory (any family: ``graph_entries``).

    Every input gets one optimisation profile over the batch axis (min 1, opt, max) and over the named dynamic
    axes the manifest declares in ``extra["dynamic_axes"]`` (:func:`profile_shapes`); all builds share a timing
    cache file in ``engine_dir``; plans are written next to the graphs and recorded in the manifest (each stage's
    ``extra["trt"]`` and the top-level ``extra["trt"]``). The offline lint runs first and refuses bad graphs.

    Returns:
        The top-level ``extra["trt"]`` record written to the manifest.
    """
    from deploykit.graphs.trt_lint import axis_ranges_of, lint_engine_dir
    from deploykit.manifest import Manifest, file_sha256
    from deploykit.manifest_sections import graph_entries

    settings = BuildSettings(precision, max_batch, opt_batch, workspace_mb, strongly_typed)
    settings.validate()
    root = Path(engine_dir)
    if not root.is_dir():
        raise ManifestError(f"engine directory {root} does not exist; run `deploykit export RUN_DIR -o {root}` first")
    manifest = Manifest.load(root)
    entries = graph_entries(manifest)
    plan_profiles(manifest, settings)  # every graph's profile is decidable before TensorRT is needed
    trt = require("tensorrt", "gpu")
    major = trt_major(trt.__version__)
    here = device_info(device_id)
    report = lint_engine_dir(root, target=".".join(trt.__version__.split(".")[:2]))
    if not report.ok:
        raise EngineError(f"graphs in {root} won't build with TensorRT {trt.__version__}:\n{report.format()}")
    strong = uses_strong_typing(major, settings.precision, settings.strongly_typed)
    axis_ranges = axis_ranges_of(manifest.extra)
    settings.int8_qdq = is_qdq_manifest(manifest)
    if settings.int8_qdq and strong and settings.precision == "fp16":
        raise ConfigError("these are INT8 QDQ graphs: strongly typed TensorRT builds them as they are typed; the FP16 "
                          "conversion is for FP32 graphs — build with --precision fp32 (INT8 layers come from Q/DQ)")

    logger = trt.Logger(trt.Logger.WARNING)
    cache_path = root / TIMING_CACHE
    cache_bytes = cache_path.read_bytes() if cache_path.exists() else b""
    started = time.time()
    for entry in entries:
        onnx_path = manifest.path_of(entry.file)
        source = onnx_path
        if settings.precision == "fp16" and strong:
            from deploykit.graphs.fp16 import convert_file

            source = onnx_path.with_name(f"{onnx_path.stem}.fp16.onnx")
            convert_file(onnx_path, source, keep_outputs=tuple(entry.score_outputs))
        plan_path = onnx_path.with_suffix(PLAN_SUFFIX)
        plan, profile, cache_bytes = _build_one(trt, logger, source, settings, strong, cache_bytes, axis_ranges)
        plan_path.write_bytes(plan)
        entry.set("trt", {"engine": plan_path.name, "source": source.name,
                          "precision": f"int8+{settings.precision}" if settings.int8_qdq else settings.precision,
                          "sha256": file_sha256(plan_path), "profile": profile})
        log.info("built %s (%s, %.1f MB)", plan_path.name, settings.precision, len(plan) / 2**20)
    cache_path.write_bytes(cache_bytes)
    record = {**here, "precision": settings.precision, "strongly_typed": strong, "max_batch": settings.max_batch,
              "opt_batch": settings.opt, "workspace_mb": settings.workspace_mb, "timing_cache": TIMING_CACHE,
              "built_at": time.time(), "build_seconds": round(time.time() - started, 1), "int8_qdq": settings.int8_qdq}
    manifest.extra["trt"] = record
    for spec in manifest.stages:
        if not settings.int8_qdq:  # QDQ stages keep their int8-static precision
            spec.precision = settings.precision
    manifest.save()
    return record


def plan_profiles(manifest: Any, settings: BuildSettings) -> dict[str, dict[str, list[list[int]]]]:
    """Every graph's optimisation profile ``{graph file: {input: [min, opt, max]}}``, without TensorRT.

    The batch axis takes ``1..max_batch`` (opt ``settings.opt``); named axes take the manifest's declared ranges
    (MuE's ``text`` / ``seq`` / ``src`` / ``past`` / ``prompt``). An undeclared dynamic axis is an EngineError here,
    before any build starts.
    """
    from deploykit.graphs.trt_lint import axis_ranges_of
    from deploykit.manifest_sections import graph_entries

    ranges = axis_ranges_of(manifest.extra)
    out = {}
    for e in graph_entries(manifest):
        path = manifest.path_of(e.file)
        if not path.exists():
            raise ManifestError(f"graph file {path} named by the manifest is missing; re-export the model")
        try:
            out[e.file] = profile_shapes(onnx_input_specs(path), (1, settings.opt, settings.max_batch), ranges)
        except EngineError as err:
            raise EngineError(f"{e.file}: {err}") from err
    return out


def is_qdq_manifest(manifest: Any) -> bool:
    """Whether an engine directory holds static INT8 QDQ graphs (``deploykit quantize --mode static``)."""
    from deploykit.manifest_sections import graph_entries

    return any(e.get("precision") == "int8-static" for e in graph_entries(manifest))


def onnx_input_specs(onnx_path: str | os.PathLike) -> list[tuple[str, list[int | str]]]:
    """``(name, dims)`` of a graph's inputs (initializers excluded); a dim is its size or its symbolic name."""
    import onnx

    g = onnx.load(str(onnx_path), load_external_data=False).graph
    inits = {t.name for t in g.initializer}
    return [(v.name, [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else (d.dim_param or "?")
                      for d in v.type.tensor_type.shape.dim])
            for v in g.input if v.name not in inits]


def profile_shapes(input_specs: list[tuple[str, list[int | str]]], batch_range: tuple[int, int, int],
                   axis_ranges: dict[str, Any] | None = None) -> dict[str, list[list[int]]]:
    """``{input: [min, opt, max]}`` shapes of one optimisation profile (pure; what ``build`` passes to TensorRT).

    Axis 0 is the batch axis and takes ``batch_range``; a fixed axis keeps its size; a named dynamic axis takes
    its declared ``axis_ranges[name]`` (``(min, opt, max)``, from the manifest's ``extra["dynamic_axes"]``).
    A dynamic non-batch axis with no declared range is an :class:`EngineError`.
    """
    ranges = {k: [int(x) for x in v] for k, v in (axis_ranges or {}).items()}
    out: dict[str, list[list[int]]] = {}
    for name, dims in input_specs:
        mins, opts, maxs = [], [], []
        for axis, d in enumerate(dims):
            if axis == 0:
                r = list(batch_range)
            elif isinstance(d, int) and d > 0:
                r = [d, d, d]
            elif isinstance(d, str) and d in ranges:
                r = ranges[d]
            else:
                raise EngineError(f"input {name!r} axis {axis} ({d!r}) is dynamic with no declared range; declare it "
                                  "in the manifest's extra.dynamic_axes as [min, opt, max] or re-export static")
            for dst, v in zip((mins, opts, maxs), r):
                dst.append(int(v))
        out[name] = [mins, opts, maxs]
    return out


def _build_one(trt: Any, logger: Any, onnx_path: Path, s: BuildSettings, strong: bool,
               cache_bytes: bytes, axis_ranges: dict[str, Any] | None = None
               ) -> tuple[bytes, dict[str, list[list[int]]], bytes]:
    """Parse, profile and build one graph; returns the plan, the profile ranges and the updated timing cache."""
    builder = trt.Builder(logger)
    flags = 0
    if strong and hasattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED"):
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise EngineError(f"TensorRT could not parse {onnx_path.name}: {errors}; run `deploykit lint` on the directory")
    config = builder.create_builder_config()
    if s.workspace_mb:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, s.workspace_mb << 20)
    if s.precision == "fp16" and not strong:
        config.set_flag(trt.BuilderFlag.FP16)  # TensorRT 10 weak typing only; removed in 11
    if s.int8_qdq and not strong:
        config.set_flag(trt.BuilderFlag.INT8)  # TensorRT 10 weak typing: explicit-precision Q/DQ needs it; 11: typed
    profile = builder.create_optimization_profile()
    try:
        ranges = profile_shapes(onnx_input_specs(onnx_path), (1, s.opt, s.max_batch), axis_ranges)
    except EngineError as e:
        raise EngineError(f"{onnx_path.name}: {e}") from e
    for i in range(network.num_inputs):
        t = network.get_input(i)
        mins, opts, maxs = ranges[t.name]
        profile.set_shape(t.name, min=mins, opt=opts, max=maxs)
    config.add_optimization_profile(profile)
    cache = config.create_timing_cache(cache_bytes)
    config.set_timing_cache(cache, ignore_mismatch=False)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise EngineError(f"TensorRT failed to build {onnx_path.name}; see the TensorRT log above (out of memory on "
                          "a small Jetson? lower --workspace / --max-batch)")
    return bytes(plan), ranges, bytes(config.get_timing_cache().serialize())
