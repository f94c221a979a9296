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


def session_options(threads: int | None = None, spinning: bool = False) -> Any:
    """SessionOptions tuned for chained sessions on a small CPU."""
    ort = require("onnxruntime", "cpu")
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads or default_threads()
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    so.log_severity_level = 3
    return so


class OrtRunner(Runner):
    """One ONNX graph in an ONNX Runtime session (CPU by default)."""

    def __init__(
            self,
            path: str | os.PathLike,
            providers: list[Any] | None = None,
            threads: int | None = None,
            spinning: bool = False,
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

    @property
    def input_names(self) -> list[str]:
        self.load()
        return self._inputs

    @property
    def output_names(self) -> list[str]:
        self.load()
        return self._outputs

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
