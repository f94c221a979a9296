"""ONNX Runtime runners.

Threading: a cascade runs its stage sessions one after another, so each session gets the machine's physical cores
for intra-op work, no inter-op pool, and no spinning: a spinning pool of an idle stage would steal cycles from the
stage that is running (checked at batch 1 and 32 by ``deploykit bench``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from deploykit.backends import cuda
from deploykit.backends.base import Runner, require
from deploykit.errors import BackendError, DataError

ORT_PROVIDERS = {
    "ort-cpu": ["CPUExecutionProvider"],
    "ort-cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"],
    "ort-trt": ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"],
}

_ORT_DTYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(int64)": np.int64,
               "tensor(int32)": np.int32, "tensor(bool)": np.bool_, "tensor(uint8)": np.uint8}


def default_threads() -> int:
    """Threads for one session: the cores this process may use (affinity-aware), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


SPINNING = ("off", "in-run", "on")
DEFAULT_SPINNING = "off"


def session_options(threads: int | None = None, spinning: bool | str = DEFAULT_SPINNING) -> Any:
    """SessionOptions tuned for chained sessions on a small CPU.

    ``spinning``: ``off`` — pool threads block between parallel sections (no idle stage ever spins, at the cost of
    a wake-up per section); ``in-run`` — threads spin inside a ``Run`` and stop spinning when it returns
    (``session.force_spinning_stop``), so a finished stage doesn't spin against the next one; ``on`` — ORT's
    default, threads keep spinning after ``Run`` (fastest for one session alone, fights the next stage's pool).
    ``True`` / ``False`` mean ``on`` / ``off``. docs/openvino.md has the measurement behind the default.
    """
    ort = require("onnxruntime", "cpu")
    mode = ("on" if spinning else "off") if isinstance(spinning, bool) else spinning
    if mode not in SPINNING:
        raise BackendError(f"spinning must be one of {', '.join(SPINNING)}, got {spinning!r}")
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads or default_threads()
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.add_session_config_entry("session.intra_op.allow_spinning", "0" if mode == "off" else "1")
    if mode == "in-run":
        so.add_session_config_entry("session.force_spinning_stop", "1")
    so.log_severity_level = 3
    return so


class OrtRunner(Runner):
    """One ONNX graph in an ONNX Runtime session (CPU by default)."""

    def __init__(
            self,
            path: str | os.PathLike,
            providers: list[Any] | None = None,
            threads: int | None = None,
            spinning: bool | str = DEFAULT_SPINNING,
    ):
        super().__init__()
        self.path = Path(path)
        self.providers = providers or ORT_PROVIDERS["ort-cpu"]
        self.threads = threads
        self.spinning = spinning
        self.name = f"ort:{self.path.name}"
        self.session: Any = None
        self._inputs: list[str] = []
        self._outputs: list[str] = []
        self._input_types: dict[str, Any] = {}
        self._input_shapes: dict[str, list[Any]] = {}

    def load_impl(self) -> None:
        ort = require("onnxruntime", "cpu")
        if not self.path.exists():
            raise BackendError(f"graph file {self.path} does not exist; re-export the model")
        available = set(ort.get_available_providers())
        wanted = [p if isinstance(p, str) else p[0] for p in self.providers]
        if wanted[0] not in available:
            raise BackendError(
                f"ONNX Runtime here has no {wanted[0]} (available: {sorted(available)}); for GPU backends install "
                "`deploykit[gpu]` (onnxruntime-gpu) in an environment without the CPU onnxruntime wheel"
            )
        try:
            self.session = ort.InferenceSession(
                str(self.path), sess_options=session_options(self.threads, self.spinning), providers=self.providers
            )
        except Exception as e:  # ORT raises its own exception types for corrupt / invalid graphs
            raise BackendError(f"ONNX Runtime could not load {self.path}: {e}; the file is corrupt or not ONNX — "
                               "re-export the model") from e
        self._inputs = [i.name for i in self.session.get_inputs()]
        self._outputs = [o.name for o in self.session.get_outputs()]
        self._input_types = {i.name: _ORT_DTYPES.get(i.type) for i in self.session.get_inputs()}
        self._input_shapes = {i.name: list(i.shape) for i in self.session.get_inputs()}

    def input_shape(self, name: str) -> list[Any]:
        self.load()
        return self._input_shapes[name]

    def run_impl(self, feeds: dict[str, Any], outputs: list[str] | None) -> dict[str, Any]:
        names = outputs or self._outputs
        clean = {}
        for n in self._inputs:
            a = feeds[n]
            want = self._input_types.get(n)
            if want is not None and a.dtype != want:
                raise DataError(f"{self.name}: input {n!r} has dtype {a.dtype}, the graph wants {np.dtype(want)}")
            clean[n] = a
        try:
            res = self.session.run(names, clean)
        except Exception as e:
            raise BackendError(f"{self.name} failed: {e}") from e
        return dict(zip(names, res))

    def close_impl(self) -> None:
        self.session = None


# ---- GPU: CUDA / TensorRT execution providers with I/O binding (issue 6) -----------------------------------------
def _shape_str(name: str, shape: list[Any], batch: int) -> str:
    return f"{name}:" + "x".join([str(batch)] + [str(int(d)) for d in shape[1:]])


def cuda_provider(device_id: int = 0, stream: int | None = None) -> tuple[str, dict[str, str]]:
    """CUDA EP entry; with ``stream`` ORT enqueues on that CUDA stream (torch's), so no cross-stream syncs."""
    opts = {"device_id": str(device_id)}
    if stream is not None:
        opts.update(has_user_compute_stream="1", user_compute_stream=str(stream))
    return "CUDAExecutionProvider", opts


def trt_provider(
        inputs: dict[str, list[Any]],
        cache_dir: str | os.PathLike,
        max_batch: int = 32,
        opt_batch: int = 8,
        fp16: bool = False,
        workspace_mb: int | None = None,
        device_id: int = 0,
        stream: int | None = None,
) -> tuple[str, dict[str, str]]:
    """TensorRT EP entry with an explicit batch profile and engine + timing caches, so nothing rebuilds at run time.

    Args:
        inputs: graph input name -> shape (axis 0 is the batch; the rest must be static).
        cache_dir: where the EP keeps engines and the timing cache (next to the graphs: built once, reused).
        max_batch: profile max batch; larger batches would make the EP rebuild, so the runner refuses them.
        opt_batch: batch the kernels are tuned for.
        fp16: ``trt_fp16_enable`` (weak typing: TensorRT 10 only; on TensorRT 11 feed an fp16.py-converted graph).
        workspace_mb: ``trt_max_workspace_size``.
        device_id: GPU index.
        stream: CUDA stream handle to run on (torch's current stream).
    """
    for name, shape in inputs.items():
        if any(not isinstance(d, int) or d < 1 for d in shape[1:]):
            raise BackendError(f"input {name!r} has dynamic non-batch axes {shape}; the TensorRT EP profile covers the "
                               "batch axis only — re-export with static shapes")
    cache = str(Path(cache_dir))
    opts = {
        "device_id": str(device_id),
        "trt_engine_cache_enable": "1",
        "trt_engine_cache_path": cache,
        "trt_timing_cache_enable": "1",
        "trt_timing_cache_path": cache,
        "trt_fp16_enable": "1" if fp16 else "0",
        "trt_profile_min_shapes": ",".join(_shape_str(n, s, 1) for n, s in inputs.items()),
        "trt_profile_opt_shapes": ",".join(_shape_str(n, s, opt_batch) for n, s in inputs.items()),
        "trt_profile_max_shapes": ",".join(_shape_str(n, s, max_batch) for n, s in inputs.items()),
    }
    if workspace_mb:
        opts["trt_max_workspace_size"] = str(int(workspace_mb) << 20)
    if stream is not None:
        opts.update(has_user_compute_stream="1", user_compute_stream=str(stream))
    return "TensorrtExecutionProvider", opts


def graph_inputs(path: str | os.PathLike) -> dict[str, list[Any]]:
    """Input name -> shape of an ONNX graph (without starting a session), for TensorRT EP profiles."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    inits = {t.name for t in model.graph.initializer}
    return {v.name: [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?")
                     for d in v.type.tensor_type.shape.dim]
            for v in model.graph.input if v.name not in inits}


class OrtIoBindingRunner(cuda.DeviceOutputs, OrtRunner):
    """ONNX Runtime on the GPU (CUDA or TensorRT EP) with I/O binding: inputs and outputs are torch CUDA tensors.

    Outputs are allocated by torch and bound by pointer, so a stage's state goes to the next stage without leaving
    the GPU; ``take`` compacts on the device and ``to_host`` copies only what is asked for. ORT runs on torch's
    current CUDA stream (``user_compute_stream``).
    """

    def __init__(
            self,
            path: str | os.PathLike,
            backend: str = "ort-cuda",
            device_id: int = 0,
            max_batch: int = 32,
            opt_batch: int = 8,
            fp16: bool = False,
            cache_dir: str | os.PathLike | None = None,
            **kwargs: Any,
    ):
        if backend not in ("ort-cuda", "ort-trt"):
            raise BackendError(f"OrtIoBindingRunner runs ort-cuda or ort-trt, not {backend!r}")
        kwargs.pop("providers", None)
        super().__init__(path, providers=ORT_PROVIDERS[backend], **kwargs)
        self.backend, self.device_id = backend, device_id
        self.max_batch, self.opt_batch, self.fp16 = max_batch, opt_batch, fp16
        self.cache_dir = Path(cache_dir) if cache_dir else self.path.parent / "ort_trt_cache"
        self.name = f"{backend}:{self.path.name}"
        self._output_shapes: dict[str, list[Any]] = {}
        self._output_types: dict[str, Any] = {}

    def load_impl(self) -> None:
        import torch


        self.device = cuda.cuda_device(self.device_id)
        stream = torch.cuda.current_stream(self.device).cuda_stream
        providers: list[Any] = [cuda_provider(self.device_id, stream), "CPUExecutionProvider"]
        if self.backend == "ort-trt":
            if not self.path.exists():
                raise BackendError(f"graph file {self.path} does not exist; re-export the model")
            self.cache_dir.mkdir(parents=True, exist_ok=True)
            trt = trt_provider(graph_inputs(self.path), self.cache_dir, self.max_batch, self.opt_batch, self.fp16,
                               device_id=self.device_id, stream=stream)
            providers.insert(0, trt)
        self.providers = providers
        super().load_impl()
        self._output_shapes = {o.name: list(o.shape) for o in self.session.get_outputs()}
        self._output_types = {o.name: _ORT_DTYPES.get(o.type) for o in self.session.get_outputs()}

    def run_impl(self, feeds: dict[str, Any], outputs: list[str] | None) -> dict[str, Any]:
        import torch

        names = outputs or self._outputs
        io = self.session.io_binding()
        batch = None
        keep = []
        for n in self._inputs:
            want = self._input_types.get(n) or np.float32
            t = cuda.to_device(feeds[n], self.device, cuda.torch_dtype(want), n)
            batch = int(t.shape[0])
            if self.backend == "ort-trt" and batch > self.max_batch:
                raise BackendError(f"{self.name}: batch {batch} is above the TensorRT EP profile max {self.max_batch} "
                                   "(the EP would rebuild its engine); send smaller batches or raise max_batch")
            io.bind_input(n, "cuda", self.device_id, want, list(t.shape), t.data_ptr())
            keep.append(t)
        out: dict[str, Any] = {}
        for n in names:
            shape = [batch if i == 0 else int(d) for i, d in enumerate(self._output_shapes[n])]
            if any(not isinstance(d, int) for d in shape):
                raise BackendError(f"{self.name}: output {n!r} has dynamic non-batch axes {self._output_shapes[n]}")
            dtype = self._output_types.get(n) or np.float32
            buf = torch.empty(shape, dtype=cuda.torch_dtype(dtype), device=self.device)
            io.bind_output(n, "cuda", self.device_id, dtype, shape, buf.data_ptr())
            out[n] = buf
        try:
            io.synchronize_inputs()
            self.session.run_with_iobinding(io)
            io.synchronize_outputs()
        except Exception as e:
            raise BackendError(f"{self.name} failed: {e}") from e
        return out

