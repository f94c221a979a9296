"""MuE engines and the offline TensorRT lint: declared axis ranges make every graph pass; undeclared ones don't."""

from __future__ import annotations

import shutil

import pytest

from deploykit.errors import EngineError, ExportError
from deploykit.graphs.trt_build import onnx_input_specs, profile_shapes
from deploykit.graphs.trt_lint import check_trt, lint_engine_dir
from deploykit.manifest import Manifest


def test_exported_mue_engine_declares_axis_ranges_and_passes_the_lint(mue_engine):
    root, manifest = mue_engine
    meta = manifest.extra["mue"]
    n, lt, lg = meta["num_patches"], meta["max_text_len"], meta["max_gen_len"]
    axes = manifest.extra["dynamic_axes"]
    assert axes["text"][0] == 1 and axes["text"][2] == lt
    assert axes["src"] == [n + 1, n + axes["text"][1], n + lt]
    assert axes["past"][0] == 0 and axes["past"][2] == lg
    assert meta["dec_prompt"] and axes["prompt"] == [2, axes["text"][1] + 1, lt + 1]  # <bos> + hypothesis
    report = lint_engine_dir(root)
    assert report.ok, report.format()
    assert sorted(report.graphs) == sorted(g["file"] for g in meta["graphs"].values())
    assert {i.code for i in report.warnings} <= {"int64-io", "empty-axis"}
    assert check_trt(root, target="11").ok


def test_mue_engine_without_declared_ranges_is_flagged(mue_engine, tmp_path):
    root, _ = mue_engine
    eng = tmp_path / "eng"
    shutil.copytree(root, eng)
    m = Manifest.load(eng)
    m.extra["dynamic_axes"] = {k: v for k, v in m.extra["dynamic_axes"].items() if k != "past"}
    m.save()
    report = lint_engine_dir(eng)
    bad = {(i.graph, i.message.split("'")[1]) for i in report.errors}
    assert bad == {(f"dec{j}.onnx", t) for j in range(m.extra["mue"]["dec_layers"]) for t in ("past_k", "past_v")}
    with pytest.raises(ExportError, match="'past'"):
        check_trt(eng)


def test_profile_shapes_of_the_exported_decoder_step(mue_engine):
    root, manifest = mue_engine
    axes = manifest.extra["dynamic_axes"]
    specs = onnx_input_specs(root / "dec0.onnx")
    p = profile_shapes(specs, (1, 4, 16), axes)
    heads, dh = manifest.extra["mue"]["heads"], manifest.extra["mue"]["dim"] // manifest.extra["mue"]["heads"]
    assert p["past_k"] == [[1, heads, axes["past"][0], dh], [4, heads, axes["past"][1], dh],
                           [16, heads, axes["past"][2], dh]]
    assert p["enc_mask"] == [[1, axes["src"][0]], [4, axes["src"][1]], [16, axes["src"][2]]]
    p = profile_shapes(onnx_input_specs(root / "dec0_prompt.onnx"), (1, 4, 16), axes)
    dim = manifest.extra["mue"]["dim"]
    assert p["x"] == [[1, axes["prompt"][0], dim], [4, axes["prompt"][1], dim], [16, axes["prompt"][2], dim]]
    for name in manifest.extra["mue"]["graphs"]:  # every graph's inputs get a complete profile
        assert profile_shapes(onnx_input_specs(root / f"{name}.onnx"), (1, 4, 16), axes)
    with pytest.raises(EngineError, match="no declared range"):
        profile_shapes(specs, (1, 4, 16), {})
