"""INT8 stages: runnable cascades, exit heads kept FP32, settings recorded, agreement with FP32, re-calibration."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

from deploykit.cli import main
from deploykit.errors import ConfigError, DataError
from deploykit.graphs.quantize import INT8_OPS, exit_head_nodes, quantize
from deploykit.graphs.trt_lint import lint_engine_dir, lint_graph
from deploykit.manifest import Manifest
from deploykit.runtime.cascade import Cascade

AGREEMENT_FLOOR = 0.95  # tiny 4-block model, 6 epochs; the digits benchmark measures the real figure


@pytest.fixture(scope="module")
def int8_dirs(trained_engine: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The session engine quantised both ways (module-wide; don't modify)."""
    root = tmp_path_factory.mktemp("int8")
    out = {}
    for mode in ("dynamic", "static"):
        quantize(trained_engine, root / mode, mode=mode, calib_samples=64)
        out[mode] = root / mode
    return out


@pytest.fixture(scope="module")
def digits_test(trained_engine: Path) -> tuple[np.ndarray, np.ndarray]:
    from deploykit.data import stack_split

    return stack_split("digits", "test", Manifest.load(trained_engine).preprocessing.__dict__)


@pytest.mark.parametrize("mode", ["dynamic", "static"])
def test_int8_cascade_runs_and_agrees_with_fp32(mode: str, int8_dirs: dict[str, Path], trained_engine: Path,
                                                digits_test: tuple[np.ndarray, np.ndarray]) -> None:
    x, y = digits_test
    with Cascade.from_dir(trained_engine) as fp32, Cascade.from_dir(int8_dirs[mode]) as int8:
        ref, got = fp32.run_all_exits(x), int8.run_all_exits(x)
        agree = [float((r["logits"].argmax(1) == g["logits"].argmax(1)).mean()) for r, g in zip(ref, got)]
        assert min(agree) >= AGREEMENT_FLOOR, f"INT8 agrees with FP32 per exit on {agree} of the test split"
        for r, g in zip(ref, got):
            assert np.abs(r["score"] - g["score"]).mean() < 0.05
        thr = [0.9, 0.9, 0.9, None]
        res, ref_res = int8.run(x, thresholds=thr), fp32.run(x, thresholds=thr)
        assert res.logits.shape == (len(x), 10) and set(res.exit_stage) <= {0, 1, 2, 3}
        acc, ref_acc = float((res.labels_idx == y).mean()), float((ref_res.labels_idx == y).mean())
        assert acc >= ref_acc - 0.03, (acc, ref_acc)


@pytest.mark.parametrize("mode", ["dynamic", "static"])
def test_manifest_records_precision_and_settings(mode: str, int8_dirs: dict[str, Path], trained_engine: Path) -> None:
    src, m = Manifest.load(trained_engine), Manifest.load(int8_dirs[mode])
    m.check_files(verify_hash=True)
    assert [s.precision for s in m.stages] == [f"int8-{mode}"] * 4 and m.monolithic.precision == f"int8-{mode}"
    assert [(s.flops, s.exit_flops) for s in m.stages] == [(s.flops, s.exit_flops) for s in src.stages]
    assert m.monolithic.flops == src.monolithic.flops
    q = m.extra["quantization"]
    assert q["mode"] == mode and q["source"] == str(trained_engine.resolve())
    assert set(q["graphs"]) == {"stage0.onnx", "stage1.onnx", "stage2.onnx", "stage3.onnx", "full.onnx"}
    if mode == "static":
        assert q["calib_samples"] == 64 and q["calib_data"] == "digits" and q["calibrate_method"] == "minmax"
    for spec in [*m.stages, m.monolithic]:  # every graph, the monolithic one too, has INT8 trunk nodes
        ops = {n.op_type for n in onnx.load(str(m.path_of(spec.file))).graph.node}
        assert ops & INT8_OPS, spec.file


@pytest.mark.parametrize("mode", ["dynamic", "static"])
def test_exit_heads_and_scores_stay_fp32(mode: str, int8_dirs: dict[str, Path]) -> None:
    m = Manifest.load(int8_dirs[mode])
    for spec in [*m.stages, m.monolithic]:
        head = m.extra["quantization"]["graphs"][spec.file]["exit_head_nodes"]
        g = onnx.load(str(m.path_of(spec.file))).graph
        by_name = {n.name: n for n in g.node}
        producer = {o: n for n in g.node for o in n.output}
        inits = {t.name: t for t in g.initializer}
        # the nodes writing logits and score are part of the kept head
        for out in filter(None, (spec.exit_logits, spec.exit_score)):
            assert producer[out].name in head and producer[out].op_type not in INT8_OPS
        assert any(by_name[n].op_type in ("Gemm", "MatMul") for n in head), f"{spec.file}: head has no linear"
        for name in head:
            node = by_name[name]  # still there under its own name: not rewritten by the quantiser
            assert node.op_type not in INT8_OPS
            for i in node.input:
                assert i not in producer or producer[i].op_type not in INT8_OPS, f"{spec.file}: {name} reads INT8"
                if i in inits:
                    assert inits[i].data_type not in (TensorProto.INT8, TensorProto.UINT8), f"{name} has INT8 weights"


def test_exit_head_found_without_exporter_metadata(trained_engine: Path) -> None:
    m = Manifest.load(trained_engine)
    for spec in (m.stages[-1], m.monolithic):
        model = onnx.load(str(m.path_of(spec.file)))
        exits = [n for n in (spec.exit_logits, spec.exit_score) if n]
        with_meta = exit_head_nodes(model, [], exits)
        for n in model.graph.node:
            del n.metadata_props[:]
        assert exit_head_nodes(model, [], exits) == with_meta
        assert not any(n.startswith("node_MatMul") for n in with_meta)  # no trunk block in the head


def test_recalibration_on_int8(engine_copy: Path, tmp_path: Path) -> None:
    from deploykit.tune.calibrate import calibrate

    calibrate(engine_copy, max_drop=1.0, write=True)
    q = tmp_path / "q"
    m = quantize(engine_copy, q, mode="static", calib_samples=32)
    fp32 = Manifest.load(engine_copy)
    assert m.calibration["stale"] and m.exit_policy.thresholds == fp32.exit_policy.thresholds
    report = calibrate(q, max_drop=1.0, write=True)
    m2 = Manifest.load(q)
    assert "stale" not in m2.calibration and m2.exit_policy.thresholds == report["thresholds"]
    assert report["test"]["cascade_accuracy"] >= fp32.calibration["test"]["cascade_accuracy"] - 0.03


def test_lint_passes_static_and_flags_dynamic(int8_dirs: dict[str, Path]) -> None:
    for target in ("10.3", "11"):
        report = lint_engine_dir(int8_dirs["static"], target=target)
        assert report.ok and not report.warnings, report.format()
    report = lint_engine_dir(int8_dirs["dynamic"])
    assert not report.ok and {i.code for i in report.errors} == {"dynamic-int8"}
    assert "--mode static" in report.errors[0].message


def test_lint_flags_asymmetric_qdq() -> None:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 8])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 8])
    inits = [numpy_helper.from_array(np.array(0.1, np.float32), "s"),
             numpy_helper.from_array(np.array(128, np.uint8), "zp")]
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "zp"], ["q"], name="q_u8"),
             helper.make_node("DequantizeLinear", ["q", "s", "zp"], ["y"], name="dq_u8")]
    model = helper.make_model(helper.make_graph(nodes, "qdq", [x], [y], initializer=inits),
                              opset_imports=[helper.make_opsetid("", 18)])
    issues = [(i.code, i.node) for i in lint_graph(model)]
    assert issues == [("qdq-zero-point", "q_u8"), ("qdq-zero-point", "dq_u8")]


def test_bench_compares_int8_with_fp32(int8_dirs: dict[str, Path], trained_engine: Path) -> None:
    from deploykit.tune.bench import bench

    r = bench(int8_dirs["static"], batch_sizes=[8], exit_fractions=[0.4, 0.3, 0.2, 0.1], samples=40, repeats=1,
              warmup=0, threads=1, compare=trained_engine)
    run = r["runs"][0]
    assert r["compare"]["precision"] == "fp32" and r["precision"] == "int8-static"
    assert np.allclose(run["exit_fractions"], [0.4, 0.3, 0.2, 0.1], atol=0.05)
    assert np.allclose(run["compare"]["exit_fractions"], [0.4, 0.3, 0.2, 0.1], atol=0.05)
    assert run["compare"]["cascade_ms"] > 0 and run["compare"]["cascade_speedup_vs_compare"] > 0


# ---- bad input --------------------------------------------------------------------------------------------------
def test_bad_inputs_are_clear_errors(trained_engine: Path, int8_dirs: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(DataError, match="at least 16 calibration samples"):
        quantize(trained_engine, tmp_path / "a", mode="static", calib_samples=4)
    with pytest.raises(DataError, match=r"shape \[20, 3, 8, 8\].*\[batch, 3, 16, 16\]"):
        quantize(trained_engine, tmp_path / "b", mode="static", calib_data=np.zeros((20, 3, 8, 8), np.float32))
    with pytest.raises(DataError, match="gives 10 calibration samples"):
        quantize(trained_engine, tmp_path / "c", mode="static", calib_data=np.zeros((10, 3, 16, 16), np.float32))
    with pytest.raises(ConfigError, match="already quantised"):
        quantize(int8_dirs["static"], tmp_path / "d", mode="dynamic")
    with pytest.raises(ConfigError, match="mode must be one of"):
        quantize(trained_engine, tmp_path / "e", mode="int4")
    with pytest.raises(ConfigError, match="must differ"):
        quantize(trained_engine, trained_engine)
    (tmp_path / "f").mkdir()
    (tmp_path / "f" / "x.txt").write_text("mine")
    with pytest.raises(ConfigError, match="not a deploykit engine directory"):
        quantize(trained_engine, tmp_path / "f")
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())  # no temp dirs left behind


def test_cli(trained_engine: Path, int8_dirs: dict[str, Path], tmp_path: Path) -> None:
    run = CliRunner().invoke
    res = run(main, ["quantize", str(trained_engine), "-o", str(tmp_path / "q"), "--mode", "dynamic"])
    assert res.exit_code == 0, res.output
    assert "int8-dynamic" in res.output and "deploykit calibrate" in res.output
    res = run(main, ["quantize", str(trained_engine), "-o", str(tmp_path / "q"), "--mode", "dynamic"])
    assert res.exit_code == 2 and "--force" in res.output
    res = run(main, ["quantize", str(int8_dirs["dynamic"]), "-o", str(tmp_path / "r")])
    assert res.exit_code == 2 and "already quantised" in res.output
    res = run(main, ["quantize", str(trained_engine), "-o", str(tmp_path / "s"), "--mode", "static",
                     "--calib-samples", "3"])
    assert res.exit_code == 2 and "at least 16" in res.output
    shutil.rmtree(tmp_path / "q")
