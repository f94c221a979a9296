"""Triton Python-backend stage model: one cascade stage's ONNX graph run with ONNX Runtime on CPU.

``deploykit export-triton --backend python`` copies this file verbatim as ``<name>_stage<k>/1/model.py`` next to
``1/model.onnx``, for Triton builds without the ONNX Runtime backend (PyTriton's bundled ``tritonserver``, minimal
images). It imports only numpy and the standard library at module level; ``onnxruntime`` (CPU) must be importable
by the Python backend's interpreter, and ``triton_python_backend_utils`` is imported inside the model class. The
model's ``parameters`` set ``intra_op_threads`` (ONNX Runtime intra-op threads per instance, default 1).
``merge_requests`` / ``split_outputs`` also serve serve-ray's stage replicas, which batch the same way.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import Any

import numpy as np


def merge_requests(feeds: Sequence[dict[str, np.ndarray]]) -> tuple[dict[str, np.ndarray], list[int]]:
    """Concatenate the inputs of the requests Triton's dynamic batcher put together; also return rows per request."""
    counts = [len(next(iter(f.values()))) for f in feeds]
    merged = {n: np.ascontiguousarray(np.concatenate([f[n] for f in feeds]) if len(feeds) > 1 else feeds[0][n])
              for n in feeds[0]}
    return merged, counts


def split_outputs(outputs: dict[str, np.ndarray], counts: Sequence[int]) -> list[dict[str, np.ndarray]]:
    """Cut the batched outputs back into one dict per request."""
    out, lo = [], 0
    for c in counts:
        out.append({k: np.ascontiguousarray(v[lo:lo + c]) for k, v in outputs.items()})
        lo += c
    return out


class TritonPythonModel:
    """Triton entry point: one ONNX Runtime session per instance over the stage graph ``1/model.onnx``."""

    def initialize(self, args: dict[str, Any]) -> None:
        import onnxruntime as ort
        import triton_python_backend_utils as pb_utils

        self.pb = pb_utils
        config = json.loads(args["model_config"])
        params = config.get("parameters") or {}
        threads = int((params.get("intra_op_threads") or {}).get("string_value") or 1)
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        path = os.path.join(args["model_repository"], args["model_version"], "model.onnx")
        self.session = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
        self.inputs = [i["name"] for i in config["input"]]
        self.outputs = [o["name"] for o in config["output"]]

    def execute(self, requests: list[Any]) -> list[Any]:
        pb = self.pb
        feeds = [{n: pb.get_input_tensor_by_name(r, n).as_numpy() for n in self.inputs} for r in requests]
        try:
            merged, counts = merge_requests(feeds)
            wanted = [sorted(r.requested_output_names()) or self.outputs for r in requests]
            names = sorted({n for w in wanted for n in w})
            res = dict(zip(names, self.session.run(names, merged)))
        except Exception as e:  # the whole batch fails with a message; Triton stays up
            return [pb.InferenceResponse(error=pb.TritonError(f"deploykit stage failed: {e}")) for _ in requests]
        return [pb.InferenceResponse(output_tensors=[pb.Tensor(n, part[n]) for n in w])
                for part, w in zip(split_outputs(res, counts), wanted)]

    def finalize(self) -> None:
        self.session = None
