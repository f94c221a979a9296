"""``deploykit quantize --mode openvino``: NNCF INT8 IR per stage, exit heads FP32, hashed files, re-calibration."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

pytest.importorskip("openvino", reason="openvino is not installed (pip install 'deploykit[openvino]')")
pytest.importorskip("nncf", reason="nncf is not installed (pip install 'deploykit[openvino]')")

from deploykit.cli import main  # noqa: E402
from deploykit.errors import ManifestError  # noqa: E402
from deploykit.manifest import Manifest  # noqa: E402
from deploykit.runtime.cascade import Cascade  # noqa: E402

AGREEMENT_FLOOR = 0.95  # tiny 4-block model; the digits benchmark measures the real figure


@pytest.fixture(scope="module")
def ov_int8(trained_engine: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The session engine quantised by NNCF through the CLI (module-wide; don't modify)."""
    out = tmp_path_factory.mktemp("ov-int8") / "engine"
    r = CliRunner().invoke(main, ["quantize", str(trained_engine), "-o", str(out), "--mode", "openvino",
                                  "--calib-samples", "64"])
    assert r.exit_code == 0, r.output
    assert "--backend openvino" in r.output
    return out


def test_manifest_names_ir_and_hashes_weights(ov_int8: Path, trained_engine: Path) -> None:
    m = Manifest.load(ov_int8)
    m.check_files(verify_hash=True)
    assert [s.file for s in m.stages] == [f"stage{k}.xml" for k in range(4)] and m.monolithic.file == "full.xml"
    assert {s.precision for s in [*m.stages, m.monolithic]} == {"int8-openvino"}
    for s in [*m.stages, m.monolithic]:
        (side,) = s.extra["sidecars"]
        assert side["file"] == s.file.replace(".xml", ".bin") and len(side["sha256"]) == 64
    q = m.extra["quantization"]
    assert q["mode"] == "openvino" and q["calib_samples"] == 64 and q["source"] == str(trained_engine.resolve())
    assert all(g["quantized_nodes"] for g in q["graphs"].values())
    assert m.calibration is None or "stale" in m.calibration


def test_exit_heads_have_no_fake_quantize(ov_int8: Path) -> None:
    import openvino as ov

    m = Manifest.load(ov_int8)
    for spec in [*m.stages, m.monolithic]:
        model = ov.Core().read_model(str(m.path_of(spec.file)))
        ops = {o.get_friendly_name(): o for o in model.get_ops()}
        head = m.extra["quantization"]["graphs"][spec.file]["exit_head_ops_fp32"]
        matmuls = [n for n in head if ops[n].get_type_name() == "MatMul"]
        assert matmuls, f"{spec.file}: the exit head's linear layer was not found"
        for n in head:
            producers = {i.get_source_output().get_node().get_type_name() for i in ops[n].inputs()}
            assert "FakeQuantize" not in producers, (spec.file, n)
        assert any(o.get_type_name() == "FakeQuantize" for o in model.get_ops())  # the trunk is INT8


def test_int8_agrees_with_fp32_and_recalibrates(ov_int8: Path, trained_engine: Path, tmp_path: Path) -> None:
    from deploykit.data import stack_split

    x, _ = stack_split("digits", "test", Manifest.load(trained_engine).preprocessing.__dict__)
    with Cascade.from_dir(trained_engine) as fp32, Cascade.from_dir(ov_int8, backend="openvino") as int8:
        agree = [float((r["logits"].argmax(1) == g["logits"].argmax(1)).mean())
                 for r, g in zip(fp32.run_all_exits(x), int8.run_all_exits(x))]
    assert min(agree) >= AGREEMENT_FLOOR, agree
    import shutil

    d = tmp_path / "e"
    shutil.copytree(ov_int8, d)
    r = CliRunner().invoke(main, ["calibrate", str(d), "--backend", "openvino", "--json", str(tmp_path / "c.json")])
    assert r.exit_code == 0, r.output
    assert "stale" not in (Manifest.load(d).calibration or {})
    assert json.loads((tmp_path / "c.json").read_text())["test"]["cascade_accuracy"] > 0.1


def test_ir_refused_by_onnx_runtime_and_tampered_weights(ov_int8: Path, tmp_path: Path) -> None:
    import shutil

    r = CliRunner().invoke(main, ["calibrate", str(ov_int8)])
    assert r.exit_code != 0 and "--backend openvino" in r.output and "Traceback" not in r.output
    r = CliRunner().invoke(main, ["lint", str(ov_int8)])
    assert r.exit_code != 0 and "OpenVINO IR" in r.output and "Traceback" not in r.output
    d = tmp_path / "e"
    shutil.copytree(ov_int8, d)
    w = d / "stage1.bin"
    w.write_bytes(w.read_bytes()[:-4] + b"\0\0\0\1")
    with pytest.raises(ManifestError, match="stage1.bin does not match"):
        Manifest.load(d).check_files(verify_hash=True)
    w.unlink()
    with pytest.raises(ManifestError, match=r"stage1\.bin .*is missing"):  # the sidecar is a named, hashed file
        Manifest.load(d).check_files()


def test_openvino_mode_needs_enough_calibration_samples(trained_engine: Path, tmp_path: Path) -> None:
    r = CliRunner().invoke(main, ["quantize", str(trained_engine), "-o", str(tmp_path / "q"), "--mode", "openvino",
                                  "--calib-samples", "4"])
    assert r.exit_code != 0 and "at least 16" in r.output
    assert not (tmp_path / "q").exists() or not any((tmp_path / "q").iterdir())
