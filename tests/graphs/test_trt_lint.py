"""Offline TensorRT lint: our exported graphs pass, planted bad graphs are flagged with the right node."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

from deploykit.cli import main
from deploykit.errors import ExportError, ManifestError
from deploykit.graphs.trt_lint import check_trt, lint_engine_dir, lint_graph, opset_range
from deploykit.manifest import file_sha256


def _model(nodes, inputs, outputs, inits=(), opset=18, domains=()):
    graph = helper.make_graph(nodes, "planted", inputs, outputs, initializer=list(inits))
    imports = [helper.make_opsetid("", opset)] + [helper.make_opsetid(d, 1) for d in domains]
    return helper.make_model(graph, opset_imports=imports)


def _vi(name, shape, dtype=TensorProto.FLOAT):
    return helper.make_tensor_value_info(name, dtype, shape)


def _const(name, values, dtype=np.int64):
    return numpy_helper.from_array(np.asarray(values, dtype=dtype), name)


X = _vi("x", ["batch", 8])
Y = _vi("y", ["batch", 8])


def _issues(model, target="10.3"):
    return [(i.code, i.node, i.op, i.severity) for i in lint_graph(model, target=target)]


def _scatter(op, reduction):
    return _model(
        [helper.make_node(op, ["x", "idx", "x"], ["y"], name="bad_scatter", reduction=reduction)],
        [X], [Y], [_const("idx", np.zeros((1, 8)) if op == "ScatterElements" else np.zeros((1, 1)))])


PLANTED = {
    "unsupported-op": (_model([helper.make_node("Det", ["x"], ["y"], name="det_node")], [_vi("x", ["batch", 8, 8])],
                              [_vi("y", ["batch"])]), ("unsupported-op", "det_node", "Det", "error")),
    "scatternd-reduction": (_scatter("ScatterND", "add"), ("scatter-reduction", "bad_scatter", "ScatterND", "error")),
    "scatterelements-reduction": (_scatter("ScatterElements", "add"),
                                  ("scatter-reduction", "bad_scatter", "ScatterElements", "error")),
    "topk-unsorted": (_model([helper.make_node("TopK", ["x", "k"], ["y", "i"], name="topk0", sorted=0)], [X],
                             [_vi("y", ["batch", 2]), _vi("i", ["batch", 2], TensorProto.INT64)], [_const("k", [2])]),
                      ("topk-unsorted", "topk0", "TopK", "error")),
    "topk-large-k": (_model([helper.make_node("TopK", ["x", "k"], ["y", "i"], name="topk_big")],
                            [_vi("x", ["batch", 5000])], [_vi("y", ["batch", 4000]),
                                                           _vi("i", ["batch", 4000], TensorProto.INT64)],
                            [_const("k", [4000])]), ("topk-k", "topk_big", "TopK", "error")),
    "dynamic-dim": (_model([helper.make_node("Relu", ["x"], ["y"], name="relu")], [_vi("x", ["batch", "tokens"])],
                           [_vi("y", ["batch", "tokens"])]), ("dynamic-dim", "", "input", "error")),
    "int64-into-matmul": (_model([helper.make_node("Cast", ["x"], ["xi"], name="to_int", to=TensorProto.INT64),
                                  helper.make_node("MatMul", ["xi", "w"], ["y"], name="int_matmul")], [X], [Y],
                                 [_const("w", np.eye(8))]), ("dtype", "int_matmul", "MatMul", "error")),
    "if-control-flow": (_model([helper.make_node(
        "If", ["c"], ["y"], name="branch",
        then_branch=helper.make_graph([helper.make_node("Identity", ["x"], ["t"])], "t", [], [Y]),
        else_branch=helper.make_graph([helper.make_node("Identity", ["x"], ["e"])], "e", [], [Y]))],
        [X, _vi("c", [], TensorProto.BOOL)], [Y]), ("control-flow", "branch", "If", "error")),
    "opset-too-new": (_model([helper.make_node("Relu", ["x"], ["y"], name="r")], [X], [Y], opset=23),
                      ("opset", "", "opset", "error")),
    "custom-domain": (_model([helper.make_node("FastGelu", ["x"], ["y"], name="fused", domain="com.microsoft")], [X],
                             [Y], domains=["com.microsoft"]), ("custom-domain", "fused", "FastGelu", "error")),
    "reduce-axes-not-constant": (_model([helper.make_node("Shape", ["x"], ["s"], name="shape"),
                                         helper.make_node("Slice", ["s", "one", "two"], ["ax"], name="slice"),
                                         helper.make_node("ReduceMean", ["x", "ax"], ["y"], name="mean_dyn")],
                                        [X], [_vi("y", ["batch", 1])], [_const("one", [1]), _const("two", [2])]),
                                 ("non-constant-input", "mean_dyn", "ReduceMean", "error")),
}


@pytest.mark.parametrize("case", sorted(PLANTED))
def test_planted_bad_graph_is_flagged_with_its_node(case: str) -> None:
    model, expected = PLANTED[case]
    assert expected in _issues(model), _issues(model)


def test_int64_graph_io_is_a_warning_not_an_error() -> None:
    model = _model([helper.make_node("Identity", ["x"], ["y"], name="id")], [_vi("x", ["batch", 4], TensorProto.INT64)],
                   [_vi("y", ["batch", 4], TensorProto.INT64)])
    issues = lint_graph(model)
    assert {i.code for i in issues} == {"int64-io"} and all(i.severity == "warning" for i in issues)


def test_int64_shape_arithmetic_is_not_flagged() -> None:
    """Shape -> Gather -> Concat -> Reshape is INT64 everywhere and fine for TensorRT: no noise."""
    nodes = [helper.make_node("Shape", ["x"], ["s"], name="shape"),
             helper.make_node("Gather", ["s", "zero"], ["b"], name="gather", axis=0),
             helper.make_node("Concat", ["b", "rest"], ["shp"], name="concat", axis=0),
             helper.make_node("Reshape", ["x", "shp"], ["y"], name="reshape")]
    model = _model(nodes, [X], [_vi("y", ["batch", 2, 4])], [_const("zero", [0]), _const("rest", [2, 4])])
    assert lint_graph(model) == []


def test_topk_with_runtime_k_is_a_warning() -> None:
    nodes = [helper.make_node("Shape", ["x"], ["s"], name="shape"),
             helper.make_node("Slice", ["s", "one", "two"], ["k"], name="k_from_shape"),
             helper.make_node("TopK", ["x", "k"], ["y", "i"], name="topk_dyn")]
    model = _model(nodes, [X], [Y, _vi("i", ["batch", 8], TensorProto.INT64)], [_const("one", [1]), _const("two", [2])])
    assert ("non-constant-input", "topk_dyn", "TopK", "warning") in _issues(model)


def test_new_ops_depend_on_target_version() -> None:
    model = _model([helper.make_node("RMSNormalization", ["x", "g"], ["y"], name="rms")], [X], [Y],
                   [numpy_helper.from_array(np.ones(8, np.float32), "g")], opset=23)
    assert ("op-too-new", "rms", "RMSNormalization", "error") in _issues(model, target="10.3")
    assert _issues(model, target="11") == []
    assert opset_range("10.3") == (9, 20) and opset_range("11.4") == (9, 24)


def test_exported_graphs_pass_the_lint(trained_engine: Path) -> None:
    report = lint_engine_dir(trained_engine)
    assert report.ok and report.issues == [], report.format()
    assert len(report.graphs) == 5  # 4 stages + the monolithic graph
    assert check_trt(trained_engine, target="11").ok


def test_engine_dir_with_a_bad_stage_fails_lint_and_cli(trained_engine: Path, tmp_path: Path) -> None:
    eng = tmp_path / "eng"
    shutil.copytree(trained_engine, eng)
    model = onnx.load(str(eng / "stage1.onnx"))
    node = next(n for n in model.graph.node if n.op_type == "Softmax")
    node.op_type, node.domain = "FancySoftmax", "com.example"
    model.opset_import.append(helper.make_opsetid("com.example", 1))
    onnx.save(model, str(eng / "stage1.onnx"))
    m = json.loads((eng / "deploykit.json").read_text())
    m["stages"][1]["sha256"] = file_sha256(eng / "stage1.onnx")  # an edited graph, re-recorded: lint must catch it
    (eng / "deploykit.json").write_text(json.dumps(m))
    with pytest.raises(ExportError, match=node.name):
        check_trt(eng)
    res = CliRunner().invoke(main, ["lint", str(eng)])
    assert res.exit_code == 1 and node.name in res.output and "stage1.onnx" in res.output
    res = CliRunner().invoke(main, ["lint", str(trained_engine), "--json", str(tmp_path / "lint.json")])
    assert res.exit_code == 0 and str(tmp_path / "lint.json") in res.output
    assert json.loads((tmp_path / "lint.json").read_text())["ok"] is True


def test_lint_of_missing_dir_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ManifestError, match="does not exist"):
        lint_engine_dir(tmp_path / "nope")
    res = CliRunner().invoke(main, ["lint", str(tmp_path)])
    assert res.exit_code == 2 and "no manifest" in res.output


# ---- declared dynamic axes (MuE's text / past / src) ----------------------------------------------------------
def _kv_model():
    return _model([helper.make_node("Concat", ["past", "k"], ["kv"], name="cat", axis=2)],
                  [_vi("past", ["batch", 2, "past", 4]), _vi("k", ["batch", 2, 1, 4])],
                  [_vi("kv", ["batch", 2, "kv_len", 4])])


def test_declared_dynamic_axis_passes_and_undeclared_stays_an_error() -> None:
    model = _kv_model()
    undeclared = lint_graph(model)
    assert [(i.code, i.op, i.severity) for i in undeclared] == [("dynamic-dim", "input", "error"),
                                                               ("dynamic-dim", "output", "error")]
    assert "'past'" in undeclared[0].message
    # declared input axis: fine; the output's exporter-named axis is derived by shape inference (past + 1)
    issues = lint_graph(model, axis_ranges={"past": (0, 8, 16)})
    assert [i for i in issues if i.severity == "error" and i.op == "input"] == []
    other = lint_graph(model, axis_ranges={"text": (1, 8, 16)})
    assert [(i.code, i.op) for i in other if i.severity == "error"][0] == ("dynamic-dim", "input")


def test_static_output_dims_derived_by_shape_inference_are_fine() -> None:
    flat = helper.make_node("Flatten", ["x"], ["y"], name="flat", axis=1)
    model = _model([flat], [_vi("x", ["batch", 2, 4])], [_vi("y", ["batch", "exporter_dim_1"])])
    assert lint_graph(model) == []


def test_wide_declared_range_is_a_warning() -> None:
    issues = lint_graph(_kv_model(), axis_ranges={"past": (0, 2, 512), "kv_len": (1, 3, 513)})
    assert [(i.code, i.severity) for i in issues] == [("wide-axis-range", "warning")]


@pytest.mark.parametrize("bad", [{"text": [2, 1, 4]}, {"text": [-1, 1, 4]}, {"text": [0, 0, 0]}, {"text": [1, 2]},
                                 {"text": "1..4"}])
def test_bad_declared_ranges_are_refused(bad) -> None:
    from deploykit.graphs.trt_lint import axis_ranges_of

    with pytest.raises(ManifestError, match="dynamic_axes"):
        axis_ranges_of({"dynamic_axes": bad})
    assert axis_ranges_of({"dynamic_axes": {"past": [0, 9, 18]}}) == {"past": (0, 9, 18)}
