"""Native TensorRT: version detection, ``build_engines`` (one plan per stage graph) and :class:`TrtRunner`.

Supports TensorRT 10.x (JetPack 6 ships 10.3) and 11.x. FP16 differs between them:

- 10.x: the FP32 graph is built weakly typed with ``BuilderFlag.FP16`` (TensorRT picks per-layer precision);
- 11.x: networks are always strongly typed, so ``fp16`` means the ONNX graph is converted first
  (:mod:`deploykit.backends.fp16`, softmax / norms / exit score kept FP32) and built as it is typed.
  The same path can be chosen on 10.x with ``strongly_typed=True``.

Written from NVIDIA's Python API documentation; see docs/jetson.md for what has been verified on a GPU (nothing yet).
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from deploykit.backends import cuda
from deploykit.backends.base import Runner, require
from deploykit.errors import BackendError, ConfigError, DataError, EngineError, ManifestError

log = logging.getLogger(__name__)

PRECISIONS = ("fp32", "fp16")
TIMING_CACHE = "trt_timing.cache"
PLAN_SUFFIX = ".plan"
MIN_MAJOR, MAX_MAJOR = 10, 11


# ---- versions ---------------------------------------------------------------------------------------------------
def trt_major(version: str) -> int:
    """Major version of a TensorRT version string (``"10.3.0.30"`` -> 10), refusing what deploykit can't drive."""
    try:
        major = int(str(version).split(".")[0])
    except ValueError as e:
        raise EngineError(f"can't read the TensorRT version {version!r}; expected something like '10.3.0'") from e
    if major < MIN_MAJOR:
        raise EngineError(
            f"TensorRT {version} is too old: deploykit needs TensorRT 10 or 11 (name-based I/O, execute_async_v3); "
            "on Jetson use JetPack 6 (TensorRT 10.3) or newer, elsewhere `pip install 'deploykit[gpu]'`"
        )
    if major > MAX_MAJOR:
        log.warning("TensorRT %s is newer than deploykit was written for (10.x / 11.x); trying anyway", version)
    return major


def uses_strong_typing(major: int, precision: str, strongly_typed: bool | None = None) -> bool:
    """Whether the build uses a strongly typed network (always on 11; opt-in on 10)."""
    if major >= 11:
        if strongly_typed is False:
            raise ConfigError("TensorRT 11 builds strongly typed networks only; drop strongly_typed=False")
        return True
    return bool(strongly_typed)


def check_engine_compat(built: dict[str, Any], here: dict[str, Any], engine: str = "engine") -> None:
    """Refuse an engine built with another TensorRT version or for another GPU architecture.

    Args:
        built: ``{"version", "compute_capability", "gpu"}`` recorded at build time (manifest ``extra["trt"]``).
        here: the same keys for this process.
        engine: file name for the message.
    """
    if built.get("version") and here.get("version") and built["version"] != here["version"]:
        raise EngineError(
            f"{engine} was built with TensorRT {built['version']} but this is TensorRT {here['version']}; plans are "
            "not portable across TensorRT versions — rebuild on this device with `deploykit build ENGINE_DIR`"
        )
    cc_b, cc_h = built.get("compute_capability"), here.get("compute_capability")
    if cc_b and cc_h and list(cc_b) != list(cc_h):
        raise EngineError(
            f"{engine} was built for a GPU of compute capability {tuple(cc_b)} ({built.get('gpu', '?')}) but this GPU "
            f"is {tuple(cc_h)} ({here.get('gpu', '?')}); rebuild on this device with `deploykit build ENGINE_DIR`"
        )
    if built.get("gpu") and here.get("gpu") and built["gpu"] != here["gpu"]:
        log.warning("%s was built on %s and runs on %s (same architecture); rebuild if results or speed look off",
                    engine, built["gpu"], here["gpu"])


def device_info(device_id: int = 0) -> dict[str, Any]:
    """TensorRT version and GPU name / compute capability of this process (needs tensorrt and a GPU)."""
    trt = require("tensorrt", "gpu")
    import torch

    dev = cuda.cuda_device(device_id)
    return {"version": trt.__version__, "major": trt_major(trt.__version__), "gpu": torch.cuda.get_device_name(dev),
            "compute_capability": list(torch.cuda.get_device_capability(dev))}


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
    """Build one TensorRT engine per stage graph (and the monolithic graph) of an exported engine directory.

    Every input gets one optimisation profile over the batch axis (min 1, opt, max) and over the named dynamic
    axes the manifest declares in ``extra["dynamic_axes"]`` (:func:`profile_shapes`); all builds share a timing
    cache file in ``engine_dir``; plans are written next to the graphs and recorded in the manifest (each stage's
    ``extra["trt"]`` and the top-level ``extra["trt"]``). The offline lint runs first and refuses bad graphs.

    Returns:
        The top-level ``extra["trt"]`` record written to the manifest.
    """
    from deploykit.export.trt_lint import axis_ranges_of, lint_engine_dir
    from deploykit.manifest import Manifest, file_sha256

    settings = BuildSettings(precision, max_batch, opt_batch, workspace_mb, strongly_typed)
    settings.validate()
    root = Path(engine_dir)
    if not root.is_dir():
        raise ManifestError(f"engine directory {root} does not exist; run `deploykit export RUN_DIR -o {root}` first")
    manifest = Manifest.load(root)
    if manifest.task.startswith("vl"):  # MuE graphs live in extra.mue, not stages: nothing would be built
        raise EngineError(f"{root} is a MuE engine; `deploykit build` builds stage engines only so far (the MuE "
                          "graphs' profile ranges are declared and linted, see docs/jetson.md) — use --backend ort-cpu")
    manifest.check_files()
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
    specs = list(manifest.stages) + ([manifest.monolithic] if manifest.monolithic else [])
    started = time.time()
    for spec in specs:
        onnx_path = manifest.path_of(spec.file)
        source = onnx_path
        if settings.precision == "fp16" and strong:
            from deploykit.backends.fp16 import convert_file

            source = onnx_path.with_name(f"{onnx_path.stem}.fp16.onnx")
            convert_file(onnx_path, source, keep_outputs=(spec.exit_score,) if spec.exit_score else ())
        plan_path = onnx_path.with_suffix(PLAN_SUFFIX)
        plan, profile, cache_bytes = _build_one(trt, logger, source, settings, strong, cache_bytes, axis_ranges)
        plan_path.write_bytes(plan)
        spec.extra["trt"] = {"engine": plan_path.name, "source": source.name,
                             "precision": f"int8+{settings.precision}" if settings.int8_qdq else settings.precision,
                             "sha256": file_sha256(plan_path), "profile": profile}
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


def is_qdq_manifest(manifest: Any) -> bool:
    """Whether an engine directory holds static INT8 QDQ graphs (``deploykit quantize --mode static``)."""
    return any(spec.precision == "int8-static" for spec in manifest.stages)


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


# ---- run --------------------------------------------------------------------------------------------------------
def _engine_record(plan: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """Build records (top-level, per-engine) from the manifest next to ``plan``; empty when there is none."""
    from deploykit.manifest import MANIFEST_NAME, Manifest

    if not (plan.parent / MANIFEST_NAME).exists():
        return {}, {}
    m = Manifest.load(plan.parent)
    for spec in list(m.stages) + ([m.monolithic] if m.monolithic else []):
        rec = spec.extra.get("trt", {})
        if rec.get("engine") == plan.name:
            return dict(m.extra.get("trt", {})), dict(rec)
    return dict(m.extra.get("trt", {})), {}


class TrtRunner(Runner):
    """One TensorRT plan on one GPU; outputs stay on the device as torch CUDA tensors.

    ``path`` may be the plan or its stage graph (``stage0.onnx`` -> ``stage0.plan``). Inputs may be numpy arrays
    or torch CUDA tensors (a previous stage's outputs). Work is enqueued on torch's current CUDA stream, so stages
    run in order without host syncs; ``to_host`` copies what the cascade asks for (the exit scores).
    """

    def __init__(self, path: str | os.PathLike, device_id: int = 0, share_memory: bool = True, **_: Any):
        super().__init__()
        p = Path(path)
        self.path = p.with_suffix(PLAN_SUFFIX) if p.suffix == ".onnx" else p
        self.device_id = device_id
        self.share_memory = share_memory
        self.name = f"trt:{self.path.name}"
        self.engine: Any = None
        self.context: Any = None
        self._inputs: list[str] = []
        self._outputs: list[str] = []
        self._dtypes: dict[str, Any] = {}
        self._max_batch: dict[str, int] = {}
        self._scratch: cuda.SharedScratch | None = None
        self._scratch_gen = -1
        self._shapes: dict[str, tuple[int, ...]] = {}

    def load_impl(self) -> None:
        if not self.path.exists():
            raise EngineError(f"no TensorRT engine at {self.path}; build it on this device with "
                              f"`deploykit build {self.path.parent}`")
        trt = require("tensorrt", "gpu")
        device = cuda.cuda_device(self.device_id)
        built, _ = _engine_record(self.path)
        if built:
            check_engine_compat(built, device_info(self.device_id), self.path.name)
        trt_major(trt.__version__)
        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)
        self.engine = self._runtime.deserialize_cuda_engine(self.path.read_bytes())
        if self.engine is None:
            raise EngineError(f"TensorRT {trt.__version__} could not load {self.path.name}: built with another "
                              "TensorRT version or for another GPU, or corrupt — rebuild with `deploykit build`")
        self.device = device
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self._inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self._outputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        self._dtypes = {n: cuda.torch_dtype(np.dtype(trt.nptype(self.engine.get_tensor_dtype(n)))) for n in names}
        for n in self._inputs:
            _, _, mx = self.engine.get_tensor_profile_shape(n, 0)
            self._max_batch[n] = int(mx[0])
        if self.share_memory:
            strategy = trt.ExecutionContextAllocationStrategy.USER_MANAGED
            self.context = self.engine.create_execution_context(strategy)
            size = getattr(self.engine, "device_memory_size_v2", None)
            if size is None:  # TensorRT 10.0 has only the v1 property
                size = self.engine.device_memory_size
            self._scratch = cuda.SharedScratch.for_device(device)
            self._scratch.reserve(int(size))
        else:
            self.context = self.engine.create_execution_context()

    @property
    def max_batch(self) -> int:
        """Largest batch the engine's profile accepts."""
        self.load()
        return min(self._max_batch.values())

    def _point_scratch(self) -> None:
        s = self._scratch
        if s is None or s.generation == self._scratch_gen:
            return
        if hasattr(self.context, "set_device_memory"):
            self.context.set_device_memory(s.ptr, s.nbytes)
        else:
            self.context.device_memory = s.ptr
        self._scratch_gen = s.generation

    def run_impl(self, feeds: dict[str, Any], outputs: list[str] | None) -> dict[str, Any]:
        import torch

        bufs: dict[str, Any] = {}
        for n in self._inputs:
            t = cuda.to_device(feeds[n], self.device, self._dtypes[n], n)
            if t.shape[0] > self._max_batch[n]:
                raise EngineError(f"{self.name}: batch {t.shape[0]} is above the engine's profile max "
                                  f"{self._max_batch[n]}; rebuild with `deploykit build --max-batch N` or send "
                                  "smaller batches")
            if t.shape[0] < 1:
                raise DataError(f"{self.name}: empty batch for input {n!r}")
            if self._shapes.get(n) != tuple(t.shape):
                if not self.context.set_input_shape(n, tuple(t.shape)):
                    raise EngineError(f"{self.name}: input {n!r} shape {tuple(t.shape)} is outside the engine's "
                                      "profile; check the image size against the manifest")
                self._shapes[n] = tuple(t.shape)
            bufs[n] = t
        for n in self._outputs:
            shape = tuple(self.context.get_tensor_shape(n))
            bufs[n] = torch.empty(shape, dtype=self._dtypes[n], device=self.device)
        for n, t in bufs.items():
            if t.numel() == 0:  # empty tensors (MuE's KV cache at step 0) still need a non-null address
                t = bufs[n] = torch.empty(1, dtype=t.dtype, device=self.device).as_strided(t.shape, t.stride())
            self.context.set_tensor_address(n, int(t.data_ptr()))
        self._point_scratch()
        stream = torch.cuda.current_stream(self.device)
        if not self.context.execute_async_v3(stream.cuda_stream):
            raise BackendError(f"{self.name}: TensorRT execution failed; see the TensorRT log")
        return {n: bufs[n] for n in (outputs or self._outputs)}

    def to_host(self, x: Any) -> np.ndarray:
        """Copy a device output to the host (only the exit scores and final rows need this)."""
        return cuda.to_host(x)

    def take(self, x: Any, index: np.ndarray) -> Any:
        """Survivor rows of a device tensor, gathered on the GPU."""
        return cuda.take(x, index)

    def close_impl(self) -> None:
        self.context = None
        self.engine = None


__all__ = ["BuildSettings", "PRECISIONS", "TrtRunner", "build_engines", "check_engine_compat", "device_info",
           "onnx_input_specs", "profile_shapes", "trt_major", "uses_strong_typing"]
