"""ONNX-level FP16 conversion: sensitive ops stay FP32, outputs stay within tolerance on ORT CPU, same exits.

Tolerance: FP16 has a 10-bit mantissa (relative step 2**-10 ~ 1e-3). The converted graphs round weights and
activations to FP16 at every layer; over a few blocks the errors add up to a few 1e-3 relative. We allow
logits ``atol = 2e-2 * max(1, max|logits|)`` and scores ``atol = 1e-2`` (scores are probabilities in [0, 1];
a 1e-2 score error is what moves a decision only for rows sitting within 1e-2 of a threshold). Exit decisions must
match for every row whose FP32 score is farther than that from the threshold. Note ORT CPU runs many FP16 nodes by
casting them back to FP32 internally, so this checks the rounding of weights and activations, not FP16 accumulation
inside TensorRT kernels (which keeps FP32 accumulators for MatMul / Conv).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from deploykit.graphs.fp16 import convert_file, convert_to_fp16, fp32_compute_ops
from deploykit.manifest import Manifest

LOGIT_ATOL = 2e-2
SCORE_ATOL = 1e-2


def _session(path: Path | str | bytes) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.log_severity_level = 3
    src = path if isinstance(path, bytes) else str(path)
    return ort.InferenceSession(src, so, providers=["CPUExecutionProvider"])


def _run(path: Path, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    sess = _session(path)
    return dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feeds)))


def _ops_by_type(model: onnx.ModelProto, kind: str) -> set[str]:
    names = set(fp32_compute_ops(model)[kind])
    return {n.op_type for n in model.graph.node if n.name in names}


@pytest.fixture(scope="module")
def converted(trained_engine: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Manifest, Path]:
    m = Manifest.load(trained_engine)
    out = tmp_path_factory.mktemp("fp16")
    for s in list(m.stages) + [m.monolithic]:
        convert_file(m.path_of(s.file), out / s.file, keep_outputs=(s.exit_score,) if s.exit_score else ())
    return m, out


@pytest.fixture(scope="module")
def digits(trained_engine: Path) -> tuple[np.ndarray, np.ndarray]:
    from deploykit.data import stack_split

    m = Manifest.load(trained_engine)
    return stack_split("digits", "test", m.preprocessing)


def test_sensitive_ops_and_io_stay_fp32(converted: tuple[Manifest, Path]) -> None:
    m, out = converted
    for s in m.stages:
        model = onnx.load(str(out / s.file))
        fp32, fp16 = _ops_by_type(model, "float32"), _ops_by_type(model, "float16")
        assert {"Softmax", "LayerNormalization", "ReduceMax"} <= fp32, fp32  # ReduceMax: max-softmax exit score
        assert not {"Softmax", "LayerNormalization", "ReduceMax"} & fp16
        assert {"MatMul", "Gemm"} <= fp16
        for v in list(model.graph.input) + list(model.graph.output):
            assert v.type.tensor_type.elem_type == TensorProto.FLOAT, v.name
        size = {dt: sum(int(np.prod(t.dims)) for t in model.graph.initializer if t.data_type == dt)
                for dt in (TensorProto.FLOAT, TensorProto.FLOAT16)}
        assert size[TensorProto.FLOAT16] > 0.9 * (size[TensorProto.FLOAT] + size[TensorProto.FLOAT16])  # weights FP16


def test_fp16_matches_fp32_on_real_digits(converted: tuple[Manifest, Path], digits: tuple[np.ndarray, ...]) -> None:
    m, out = converted
    x, _ = digits
    feeds32 = feeds16 = {"image": x}
    for s in m.stages:
        ref, got = _run(m.path_of(s.file), feeds32), _run(out / s.file, feeds16)
        lg, sc = ref[s.exit_logits], ref[s.exit_score]
        assert got[s.exit_logits].dtype == np.float32
        assert np.abs(got[s.exit_logits] - lg).max() <= LOGIT_ATOL * max(1.0, np.abs(lg).max())
        assert np.abs(got[s.exit_score] - sc).max() <= SCORE_ATOL
        # exit decisions at thresholds spread over the score range
        for thr in np.quantile(sc, [0.25, 0.5, 0.75]):
            clear = np.abs(sc - thr) > SCORE_ATOL
            assert np.array_equal((got[s.exit_score] >= thr)[clear], (sc >= thr)[clear])
        # next stage: each graph gets its own precision's state, so errors compound as in a real cascade
        names = [t.name for t in s.outputs]
        feeds32 = {n: ref[n] for n in names}
        feeds16 = {n: got[n] for n in names}


def test_decomposed_layernorm_chain_stays_fp32() -> None:
    """ReduceMean -> Sub -> Pow -> ReduceMean -> Add -> Sqrt -> Div (an LN exported without LayerNormalization)."""
    r = np.random.RandomState(0)
    inits = [numpy_helper.from_array(a, n) for n, a in [
        ("axes", np.array([-1], np.int64)), ("two", np.array(2.0, np.float32)), ("eps", np.array(1e-5, np.float32)),
        ("w", r.randn(16, 16).astype(np.float32))]]
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"], name="proj"),
             helper.make_node("ReduceMean", ["h", "axes"], ["mu"], name="ln_mean"),
             helper.make_node("Sub", ["h", "mu"], ["d"], name="ln_sub"),
             helper.make_node("Pow", ["d", "two"], ["d2"], name="ln_pow"),
             helper.make_node("ReduceMean", ["d2", "axes"], ["var"], name="ln_var"),
             helper.make_node("Add", ["var", "eps"], ["ve"], name="ln_add"),
             helper.make_node("Sqrt", ["ve"], ["sd"], name="ln_sqrt"),
             helper.make_node("Div", ["d", "sd"], ["y"], name="ln_div")]
    graph = helper.make_graph(nodes, "ln", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 16])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    conv, summary = convert_to_fp16(model)
    kept = {n.split("#")[-1] for n in summary.fp32_nodes}
    assert {"ln_mean", "ln_sub", "ln_pow", "ln_var", "ln_add", "ln_sqrt", "ln_div"} <= kept
    assert fp32_compute_ops(conv)["float16"] == ["proj"]
    x = r.randn(4, 16).astype(np.float32)
    ref = _session(model.SerializeToString()).run(None, {"x": x})[0]
    got = _session(conv.SerializeToString()).run(None, {"x": x})[0]
    assert got.dtype == np.float32 and np.abs(got - ref).max() < 2e-2


def test_keep_nodes_and_no_layernorm_patterns() -> None:
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"], name="a"),
             helper.make_node("MatMul", ["h", "w"], ["y"], name="b")]
    w = numpy_helper.from_array(np.eye(4, dtype=np.float32), "w")
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])], [w])
    conv, _ = convert_to_fp16(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), keep_nodes=["b"])
    ops = fp32_compute_ops(conv)
    assert ops == {"float32": ["b"], "float16": ["a"]}
    # the shared weight stays FP32 for "b" (casted copy for "a")
    assert {t.data_type for t in conv.graph.initializer} == {TensorProto.FLOAT}
    x = np.arange(8, dtype=np.float32).reshape(2, 4)
    assert np.allclose(_session(conv.SerializeToString()).run(None, {"x": x})[0], x)
