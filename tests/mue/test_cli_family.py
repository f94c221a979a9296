"""MuE through every command of the CLI, via its family: options honoured, or refused naming the option."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import onnx
import pytest
from click.testing import CliRunner

from deploykit.cli import main
from deploykit.manifest import Manifest

REPO = Path(__file__).resolve().parents[2]
TINY_SETS = ["method.dim=32", "method.heads=2", "method.enc_layers=2", "method.dec_layers=2", "method.img_size=32",
             "data.n_train=64", "data.n_val=8", "data.n_test=8", "train.batch_size=16", "train.eval_every=1000",
             "train.verbose=false"]


def run(*args: str) -> tuple[int, str]:
    r = CliRunner().invoke(main, [str(a) for a in args])
    return r.exit_code, r.output


def _sets() -> list[str]:
    return [a for s in TINY_SETS for a in ("--set", s)]


def test_methods_lists_mue_with_its_family():
    code, out = run("methods")
    assert code == 0 and any(line.startswith("mue") and "[vl-generation]" in line for line in out.splitlines())


def test_train_method_and_max_steps(tmp_path):
    code, out = run("train", "--recipe", REPO / "recipes/mue-synthetic.yaml", "--method", "mue", *_sets(),
                    "--max-steps", "3", "--out", tmp_path / "run")
    assert code == 0, out
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["step"] == 3  # stopped early
    cfg = json.loads((tmp_path / "run" / "config.json").read_text())
    assert cfg["train"]["steps"] == 3000 and cfg["train"]["max_steps"] == 3  # the schedule keeps its length


@pytest.mark.parametrize("args, match", [
    (["--epochs", "2"], "--epochs"),
    (["--backbone", "vit_tiny_patch16_224"], "--backbone"),
    (["--set", "train.bogus=1"], "unknown key(s) ['bogus'] in train"),
    (["--set", "data.n_val=abc"], "data.n_val"),
    (["--set", "backbone.name=vit"], "no backbone block"),
])
def test_train_refuses_what_mue_does_not_take(tmp_path, args, match):
    code, out = run("train", "--recipe", REPO / "recipes/mue-synthetic.yaml", *args, "--out", tmp_path / "r")
    assert code == 2 and match in out and "Traceback" not in out, out


def test_export_honours_its_options(mue_run, tmp_path):
    out = tmp_path / "eng"
    code, text = run("export", mue_run, "-o", out, "--no-check", "--opset", "18", "--check-trt")
    assert code == 0 and "TensorRT lint passed" in text, text
    m = Manifest.load(out)
    assert m.provenance["opset"] == 18
    assert all(o.version == 18 for o in onnx.load(str(out / "enc0.onnx")).opset_import if o.domain in ("", "ai.onnx"))
    assert "parity" not in m.extra["mue"]  # --no-check
    code, text = run("export", mue_run, "-o", out, "--no-check")
    assert code == 2 and "--force" in text
    code, text = run("export", mue_run, "-o", out, "--force", "--parity-samples", "6")
    assert code == 0 and "identical" in text, text
    assert Manifest.load(out).provenance["opset"] == 17  # MuE's default
    code, text = run("export", mue_run, "-o", tmp_path / "e2", "--score", "entropy")
    assert code == 2 and "--score entropy" in text and "cosine" in text
    assert not (tmp_path / "e2").exists()


def test_predict_backend_and_thresholds_refused(mue_engine, tmp_path):
    from deploykit.data.vl import synthetic_vl

    root, _ = mue_engine
    img = tmp_path / "scene.png"
    synthetic_vl("test", n=1, size=32, tasks=("caption",))[0].image.save(img)
    code, text = run("predict", root, img, "--task", "caption", "--backend", "trt")
    assert code == 2 and "--backend trt" in text and "ort-cpu" in text
    code, text = run("predict", root, img, "--thresholds", "0.9")
    assert code == 2 and "--thresholds" in text
    code, text = run("info", root)
    assert code == 0 and "entailment: thresholds" in text


def test_quantize_calibrate_bench_compare(mue_engine, mue_run, tmp_path):
    """INT8 copy: encoder layers and decoder steps INT8, embeddings / head / exit scores FP32; re-calibrated; timed
    beside FP32 (and PyTorch eager) in one bench run."""
    root, _ = mue_engine
    fp32 = tmp_path / "fp32"
    shutil.copytree(root, fp32)
    int8 = tmp_path / "int8"
    code, text = run("quantize", fp32, "-o", int8, "--mode", "static")
    assert code == 2 and "--mode static" in text
    code, text = run("quantize", fp32, "-o", int8, "--calib-samples", "32")
    assert code == 2 and "--calib-samples" in text
    code, text = run("quantize", fp32, "-o", int8)
    assert code == 0 and "int8-dynamic" in text, text
    m = Manifest.load(int8)
    graphs = m.extra["mue"]["graphs"]
    assert graphs["enc0"]["precision"] == graphs["dec0"]["precision"] == "int8-dynamic"
    assert graphs["head"].get("precision", "fp32") == "fp32" and graphs["image_stem"].get("precision", "fp32") == "fp32"
    assert (int8 / "vocab.json").exists() and m.calibration is None or "stale" in (m.calibration or {"stale": 1})
    q = m.extra["quantization"]["graphs"]
    assert q["enc0.onnx"]["quantized_nodes"] and "head.onnx" not in q
    ops = {n.op_type for n in onnx.load(str(int8 / "enc0.onnx")).graph.node}
    assert "MatMulInteger" in ops or "DynamicQuantizeLinear" in ops
    code, text = run("quantize", int8, "-o", tmp_path / "again")
    assert code == 2 and "already quantised" in text
    data = tmp_path / "data"
    from deploykit.data.vl import synthetic_vl, write_vl_jsonl

    for split in ("val", "test"):
        write_vl_jsonl(synthetic_vl(split, n=5, size=32), data, f"{split}.jsonl")
    for eng in (fp32, int8):
        code, text = run("calibrate", eng, "--data", f"jsonl:{data}/{{split}}.jsonl", "--max-drop", "100")
        assert code == 0, text
    code, text = run("bench", fp32, "--exit-fractions", "0.5,0.5")
    assert code == 2 and "--exit-fractions" in text
    out = tmp_path / "bench.json"
    code, text = run("bench", fp32, "--compare", int8, "--checkpoint", mue_run, "--batch-sizes", "1,4", "--samples",
                     "4", "--repeats", "2", "--warmup", "0", "--json", out)
    assert code == 0, text
    rep = json.loads(out.read_text())
    assert rep["precision"] == "fp32" and rep["compare"]["precision"] == "int8-dynamic"
    assert [r["batch_size"] for r in rep["runs"]] == [1, 4]
    for task, e in rep["runs"][0]["tasks"].items():
        assert {"full", "exits", "compare_full", "compare_exits", "torch_exits"} <= set(e), task
        assert e["full"]["layer_fraction"] == 1.0 and e["compare_full"]["layer_fraction"] == 1.0
        assert e["exits"]["ms"]["min"] <= e["exits"]["ms"]["median"] <= e["exits"]["ms"]["max"]
        # PyTorch eager at the same thresholds generates what ONNX Runtime does (same layers, same quality)
        assert e["torch_exits"]["layer_fraction"] == pytest.approx(e["exits"]["layer_fraction"])
    assert out.with_suffix(".png").exists()


def test_lint_and_build(mue_engine):
    from deploykit.errors import BackendError
    from deploykit.graphs.trt_build import BuildSettings, build_engines, plan_profiles
    from deploykit.manifest_sections import graph_entries

    root, _ = mue_engine
    code, text = run("lint", root)
    assert code == 0, text
    m = Manifest.load(root)
    profiles = plan_profiles(m, BuildSettings(max_batch=8))
    assert set(profiles) == {e.file for e in graph_entries(m)} == {g["file"] for g in m.extra["mue"]["graphs"].values()}
    axes = m.extra["dynamic_axes"]
    assert profiles["dec0.onnx"]["past_k"][2][2] == axes["past"][2] and profiles["enc0.onnx"]["x"][0][0] == 1
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        with pytest.raises(BackendError, match=r"deploykit\[gpu\]"):
            build_engines(root, max_batch=8)  # gets as far as TensorRT: MuE engines are no longer refused


def test_calibrate_reads_the_manifest_once(mue_engine, tmp_path, monkeypatch):
    root, _ = mue_engine
    eng = tmp_path / "eng"
    shutil.copytree(root, eng)
    calls = []
    load = Manifest.load.__func__

    def counting(cls, engine_dir):
        calls.append(str(engine_dir))
        return load(cls, engine_dir)

    monkeypatch.setattr(Manifest, "load", classmethod(counting))
    from deploykit.data.vl import synthetic_vl, write_vl_jsonl

    for split in ("val", "test"):
        write_vl_jsonl(synthetic_vl(split, n=4, size=32), tmp_path / "d", f"{split}.jsonl")
    code, text = run("calibrate", eng, "--data", f"jsonl:{tmp_path / 'd'}/{{split}}.jsonl")
    assert code == 0, text
    assert calls == [str(eng)]
