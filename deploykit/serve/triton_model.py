"""Triton Python-backend BLS model: the deploykit cascade with batch compaction over the per-stage models.

``deploykit export-triton`` copies this file verbatim as ``<model>/1/model.py`` and the exit step
(:mod:`deploykit.runtime.exit_step`, the one Cascade and serve-ray use) as ``<model>/1/exit_step.py`` beside it, which
this file loads by path; so it imports only numpy and the standard library at module level (Triton's Python stub
has no deploykit, and a copy keeps the repository tied to the deploykit that exported it rather than to whatever is
installed on the server); ``triton_python_backend_utils`` is imported inside the model class. The cascade itself
is :func:`run_cascade`, which takes one callable per stage, so it is tested against real ONNX Runtime sessions
without Triton.
"""

from __future__ import annotations

import importlib.util
import json
import os
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

StageFn = Callable[[dict[str, np.ndarray], list[str]], dict[str, np.ndarray]]


def _exit_step_module() -> Any:
    """The exit step: ``exit_step.py`` beside this file in a Triton repository, else deploykit's own module."""
    here = os.path.join(os.path.dirname(os.path.abspath(__file__)), "exit_step.py")
    if os.path.exists(here):
        spec = importlib.util.spec_from_file_location("deploykit_exit_step", here)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    from deploykit.runtime import exit_step

    return exit_step


_exit_step = _exit_step_module()
softmax = _exit_step.softmax


def run_cascade(x: np.ndarray, stages: Sequence[StageFn], spec: dict[str, Any],
                thresholds: Sequence[float | None] | None = None) -> dict[str, Any]:
    """Run ``x`` through the stages; rows whose score reaches their stage's threshold leave, the rest go on.

    Args:
        x: ``float32 [B, C, H, W]``.
        stages: per stage, ``(feeds, output_names) -> outputs`` (a BLS request to the stage model, or an ORT session).
        spec: ``cascade.json``: ``input`` name, ``num_classes``, ``thresholds`` and per stage ``outputs`` (state
            handed on), ``exit_logits``, ``exit_score``.
        thresholds: override of ``spec["thresholds"]`` (``None`` entries disable an exit; the last stage always exits).

    Returns:
        ``probabilities``, ``logits``, ``exit_stage``, ``score``, ``class_index`` per row in input order, and
        ``stage_batch_sizes``.
    """
    thr = list(spec["thresholds"] if thresholds is None else thresholds)
    st = spec["stages"]
    last = len(st) - 1
    state = _exit_step.ExitState(x.shape[0], int(spec["num_classes"]))
    feeds = {spec["input"]: x}
    sizes = []
    for k, (s, fn) in enumerate(zip(st, stages)):
        sizes.append(len(state.rows))
        res = fn(feeds, [*s["outputs"], s["exit_logits"], s["exit_score"]])
        keep = state.step(k, res[s["exit_score"]], thr[k] if k < len(thr) else None, k == last,
                          np.asarray(res[s["exit_logits"]]))
        if keep is None:
            break
        feeds = {name: np.ascontiguousarray(np.asarray(res[name])[keep]) for name in s["outputs"]}
    probs = state.probs()
    return {"probabilities": probs, "logits": state.logits, "exit_stage": state.exit_stage, "score": state.score,
            "class_index": probs.argmax(axis=1).astype(np.int64), "stage_batch_sizes": sizes}


def split_rows(result: dict[str, Any], counts: Sequence[int]) -> list[dict[str, np.ndarray]]:
    """Cut a batched result back into per-request pieces (Triton's dynamic batcher merged ``counts`` rows each)."""
    out, lo = [], 0
    for c in counts:
        out.append({k: v[lo:lo + c] for k, v in result.items() if isinstance(v, np.ndarray)})
        lo += c
    return out


class TritonPythonModel:
    """Triton entry point: concatenates the requests Triton batched, runs the cascade via BLS, splits the answers."""

    def initialize(self, args: dict[str, Any]) -> None:
        import triton_python_backend_utils as pb_utils

        self.pb = pb_utils
        here = os.path.join(args["model_repository"], args["model_version"])
        with open(os.path.join(here, "cascade.json")) as f:
            self.spec = json.load(f)

    def _stage(self, name: str) -> StageFn:
        pb = self.pb

        def call(feeds: dict[str, np.ndarray], outputs: list[str]) -> dict[str, np.ndarray]:
            req = pb.InferenceRequest(model_name=name, requested_output_names=outputs,
                                      inputs=[pb.Tensor(k, v) for k, v in feeds.items()])
            resp = req.exec()
            if resp.has_error():
                raise pb.TritonModelException(f"stage model {name}: {resp.error().message()}")
            return {o: pb.get_output_tensor_by_name(resp, o).as_numpy() for o in outputs}

        return call

    def execute(self, requests: list[Any]) -> list[Any]:
        pb = self.pb
        xs = [pb.get_input_tensor_by_name(r, self.spec["input"]).as_numpy() for r in requests]
        counts = [len(x) for x in xs]
        stages = [self._stage(s["model"]) for s in self.spec["stages"]]
        try:
            result = run_cascade(np.concatenate(xs).astype(np.float32, copy=False), stages, self.spec)
        except Exception as e:  # the whole batch fails with a message; Triton stays up
            return [pb.InferenceResponse(error=pb.TritonError(f"deploykit cascade failed: {e}")) for _ in requests]
        responses = []
        for part in split_rows(result, counts):
            tensors = [pb.Tensor("probabilities", part["probabilities"]),
                       pb.Tensor("exit_stage", part["exit_stage"].reshape(-1, 1)),
                       pb.Tensor("score", part["score"].reshape(-1, 1)),
                       pb.Tensor("class_index", part["class_index"].reshape(-1, 1))]
            responses.append(pb.InferenceResponse(output_tensors=tensors))
        return responses

    def finalize(self) -> None:
        pass
