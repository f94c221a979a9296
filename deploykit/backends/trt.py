"""Native TensorRT: version detection and :class:`TrtRunner`.

``build_engines`` (ONNX -> plan) lives with the other graph tools in :mod:`deploykit.graphs.trt_build`.

Supports TensorRT 10.x (JetPack 6 ships 10.3) and 11.x. FP16 differs between them:

- 10.x: the FP32 graph is built weakly typed with ``BuilderFlag.FP16`` (TensorRT picks per-layer precision);
- 11.x: networks are always strongly typed, so ``fp16`` means the ONNX graph is converted first
  (:mod:`deploykit.graphs.fp16`, softmax / norms / exit score kept FP32) and built as it is typed.
  The same path can be chosen on 10.x with ``strongly_typed=True``.

Written from NVIDIA's Python API documentation; see docs/jetson.md for what has been verified on a GPU (nothing yet).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import numpy as np

from deploykit.backends import cuda
from deploykit.backends.base import Runner, require
from deploykit.errors import BackendError, ConfigError, DataError, EngineError

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


class TrtRunner(cuda.DeviceOutputs, Runner):
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


    def close_impl(self) -> None:
        self.context = None
        self.engine = None


__all__ = ["PRECISIONS", "TrtRunner", "check_engine_compat", "device_info", "trt_major", "uses_strong_typing"]
