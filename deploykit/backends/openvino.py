"""OpenVINO runner: each stage graph (ONNX, or OpenVINO IR ``.xml`` + ``.bin``) compiled for the CPU.

Threading: the stages of a cascade run one after another in the caller's thread, so they share one ``ov.Core``
(one plugin, one TBB arena) and each compiled model gets one stream, the LATENCY hint and ``threads`` inference
threads. With one stream per stage there is no pool per stage left spinning while another stage runs; CPU pinning
is off because the cores are shared (with the other stages' ORT / torch pools, and on a busy host with other
processes) and a pinned thread can't move away from a busy core. The measured choice is in docs/openvino.md.
Precision is pinned to f32 (``INFERENCE_PRECISION_HINT``): on CPUs with bf16 support OpenVINO would otherwise
lower FP32 graphs to bf16 on its own and the exits would no longer agree with ONNX Runtime's.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any

import numpy as np

from deploykit.backends.base import Runner, require
from deploykit.errors import BackendError, DataError

_CORE: Any = None
_CORE_LOCK = threading.Lock()
IR_SUFFIX = ".xml"

_OV_DTYPES = {"f32": np.float32, "f16": np.float16, "i64": np.int64, "i32": np.int32, "boolean": np.bool_,
              "u8": np.uint8}


def shared_core() -> Any:
    """The process's one ``ov.Core``: every stage compiled through it shares the CPU plugin's thread arena."""
    global _CORE
    ov = require("openvino", "openvino")
    with _CORE_LOCK:
        if _CORE is None:
            _CORE = ov.Core()
        return _CORE


def compile_config(threads: int | None = None, pinning: bool = False) -> dict[str, Any]:
    """Compile properties for one stage of a chain (see the module docstring for why)."""
    from deploykit.backends.ort import default_threads

    return {
        "PERFORMANCE_HINT": "LATENCY",
        "NUM_STREAMS": 1,
        "INFERENCE_NUM_THREADS": int(threads or default_threads()),
        "INFERENCE_PRECISION_HINT": "f32",
        "ENABLE_CPU_PINNING": bool(pinning),
    }


class OpenVinoRunner(Runner):
    """One graph compiled by OpenVINO for the CPU; one infer request per calling thread."""

    def __init__(self, path: str | os.PathLike, threads: int | None = None, pinning: bool = False,
                 core: Any = None, config: dict[str, Any] | None = None):
        super().__init__()
        self.path = Path(path)
        self.threads = threads
        self.config = config or compile_config(threads, pinning)
        self.core = core
        self.name = f"openvino:{self.path.name}"
        self.compiled: Any = None
        self._local = threading.local()
        self._input_types: dict[str, Any] = {}

    def load_impl(self) -> None:
        core = self.core or shared_core()
        if not self.path.exists():
            raise BackendError(f"graph file {self.path} does not exist; re-export the model")
        if self.path.suffix == IR_SUFFIX and not self.path.with_suffix(".bin").exists():
            raise BackendError(f"OpenVINO IR {self.path} has no weights file {self.path.with_suffix('.bin').name} "
                               "beside it; re-run `deploykit quantize --mode openvino`")
        try:
            model = core.read_model(str(self.path))
            self.compiled = core.compile_model(model, "CPU", self.config)
        except Exception as e:  # OpenVINO raises RuntimeError subclasses for unreadable / unsupported graphs
            raise BackendError(f"OpenVINO could not load {self.path}: {e}; the file is corrupt or not a graph — "
                               "re-export the model") from e
        self._inputs = [i.get_any_name() for i in self.compiled.inputs]
        self._outputs = [o.get_any_name() for o in self.compiled.outputs]
        self._input_types = {i.get_any_name(): _OV_DTYPES.get(i.get_element_type().get_type_name())
                             for i in self.compiled.inputs}
        self._local = threading.local()

    def _request(self) -> Any:
        req = getattr(self._local, "request", None)
        if req is None:
            req = self._local.request = self.compiled.create_infer_request()
        return req

    def run_impl(self, feeds: dict[str, Any], outputs: list[str] | None) -> dict[str, Any]:
        names = outputs or self._outputs
        unknown = [n for n in names if n not in self._outputs]
        if unknown:
            raise DataError(f"{self.name}: unknown output(s) {unknown}; the graph has {self._outputs}")
        clean = {}
        for n in self._inputs:
            a = np.ascontiguousarray(feeds[n])
            want = self._input_types.get(n)
            if want is not None and a.dtype != want:
                raise DataError(f"{self.name}: input {n!r} has dtype {a.dtype}, the graph wants {np.dtype(want)}")
            clean[n] = a
        try:
            # share_outputs=False copies: the request's buffers are reused by its next run
            res = self._request().infer(clean, share_inputs=True, share_outputs=False)
        except Exception as e:
            raise BackendError(f"{self.name} failed: {e}") from e
        return {n: res[n] for n in names}

    def close_impl(self) -> None:
        self.compiled = None
        self._local = threading.local()


def check_openvino() -> None:
    """Raise :class:`BackendError` naming the extra to install when OpenVINO is missing."""
    import importlib.util

    if importlib.util.find_spec("openvino") is None:
        raise BackendError("backend 'openvino' needs the openvino Python package, which is not installed; install "
                           "it with `pip install 'deploykit[openvino]'`")
