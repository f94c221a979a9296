"""TensorRT / ORT-GPU backends: everything that runs without a GPU, plus GPU tests that skip with a reason."""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from deploykit.backends import check_backend, create_runner
from deploykit.backends.ort import trt_provider
from deploykit.backends.trt import TrtRunner, check_engine_compat, trt_major, uses_strong_typing
from deploykit.cli import main
from deploykit.errors import BackendError, ConfigError, EngineError, ManifestError
from deploykit.graphs.trt_build import BuildSettings, build_engines


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


HAS_TRT = importlib.util.find_spec("tensorrt") is not None
needs_trt = pytest.mark.skipif(not (HAS_TRT and _cuda()), reason="needs the tensorrt package and a CUDA GPU")


def _ort_has(provider: str) -> bool:
    import onnxruntime as ort

    return provider in ort.get_available_providers()


# ---- version logic ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("version", "major"), [("10.3.0.30", 10), ("10.13.0.35", 10), ("11.4.0.106", 11), ("11", 11)])
def test_trt_major(version: str, major: int) -> None:
    assert trt_major(version) == major


@pytest.mark.parametrize("version", ["8.6.1", "9.3.0", "abc", ""])
def test_trt_major_refuses_old_or_unreadable(version: str) -> None:
    with pytest.raises(EngineError, match="TensorRT"):
        trt_major(version)


def test_strong_typing_by_version() -> None:
    assert uses_strong_typing(11, "fp16") and uses_strong_typing(11, "fp32")
    assert not uses_strong_typing(10, "fp16") and uses_strong_typing(10, "fp16", strongly_typed=True)
    with pytest.raises(ConfigError, match="strongly typed"):
        uses_strong_typing(11, "fp16", strongly_typed=False)


def test_engine_compat() -> None:
    built = {"version": "10.3.0", "compute_capability": [8, 7], "gpu": "Orin"}
    check_engine_compat(built, dict(built))
    with pytest.raises(EngineError, match="TensorRT 10.3.0 .* TensorRT 10.4.0"):
        check_engine_compat(built, {**built, "version": "10.4.0"})
    with pytest.raises(EngineError, match="compute capability"):
        check_engine_compat(built, {**built, "compute_capability": [9, 0], "gpu": "H100"})


# ---- build validation (before any TensorRT import) --------------------------------------------------------------
@pytest.mark.parametrize(("kwargs", "match"), [
    ({"precision": "int8"}, "precision"), ({"max_batch": 0}, "max-batch"), ({"max_batch": 4, "opt_batch": 8}, "opt"),
    ({"workspace_mb": 0}, "workspace"),
])
def test_build_settings_refuse_bad_values(kwargs: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        BuildSettings(**kwargs).validate()


def test_default_opt_batch() -> None:
    assert BuildSettings(max_batch=32).opt == 8 and BuildSettings(max_batch=6).opt == 4
    assert BuildSettings(max_batch=1).opt == 1


def test_build_refuses_missing_dir_and_manifest(tmp_path: Path) -> None:
    with pytest.raises(ManifestError, match="does not exist"):
        build_engines(tmp_path / "nope")
    with pytest.raises(ManifestError, match="no manifest"):
        build_engines(tmp_path)
    with pytest.raises(ConfigError, match="precision"):
        build_engines(tmp_path, precision="fp8")


def test_build_cli_errors(tmp_path: Path, trained_engine: Path) -> None:
    run = CliRunner().invoke
    assert run(main, ["build", str(tmp_path / "nope")]).exit_code == 2
    res = run(main, ["build", str(trained_engine), "--max-batch", "0"])
    assert res.exit_code == 2 and "--max-batch must be >= 1" in res.output
    res = run(main, ["build", str(trained_engine), "--precision", "int8"])
    assert res.exit_code == 2 and "int8" in res.output
    res = run(main, ["build", str(tmp_path)])
    assert res.exit_code == 2 and "no manifest" in res.output


@pytest.mark.skipif(HAS_TRT, reason="tensorrt is installed here")
def test_build_without_tensorrt_says_what_to_install(trained_engine: Path) -> None:
    with pytest.raises(BackendError, match=r"deploykit\[gpu\]"):
        build_engines(trained_engine, precision="fp16", max_batch=8)


# ---- runners: clear errors on a CPU machine ---------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["trt", "ort-cuda", "ort-trt"])
def test_gpu_backend_unavailable_is_a_clear_error(backend: str, trained_engine: Path) -> None:
    try:
        check_backend(backend)
    except BackendError:
        pass
    else:
        pytest.skip(f"{backend} is available here")
    with pytest.raises(BackendError, match=r"deploykit\[gpu\]|no CUDA device"):
        create_runner(trained_engine / "stage0.onnx", backend)


def test_trt_runner_missing_engine_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(EngineError, match="deploykit build"):
        TrtRunner(tmp_path / "stage0.onnx").load()


def test_trt_provider_options(tmp_path: Path) -> None:
    name, opts = trt_provider({"image": ["batch", 3, 16, 16]}, tmp_path, max_batch=32, opt_batch=8, fp16=True)
    assert name == "TensorrtExecutionProvider"
    assert opts["trt_profile_min_shapes"] == "image:1x3x16x16"
    assert opts["trt_profile_opt_shapes"] == "image:8x3x16x16"
    assert opts["trt_profile_max_shapes"] == "image:32x3x16x16"
    assert opts["trt_engine_cache_enable"] == opts["trt_timing_cache_enable"] == "1"
    assert opts["trt_engine_cache_path"] == str(tmp_path) and opts["trt_fp16_enable"] == "1"
    with pytest.raises(BackendError, match="dynamic"):
        trt_provider({"tokens": ["batch", "n", 48]}, tmp_path)


# ---- on a GPU ---------------------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.trt
@needs_trt
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_build_and_run_engines_on_gpu(precision: str, trained_engine: Path, tmp_path: Path) -> None:
    from deploykit.backends.ort import OrtRunner
    from deploykit.data import stack_split
    from deploykit.manifest import Manifest

    eng = tmp_path / "eng"
    shutil.copytree(trained_engine, eng)
    record = build_engines(eng, precision=precision, max_batch=16, opt_batch=8)
    m = Manifest.load(eng)
    assert m.extra["trt"]["version"] == record["version"] and (eng / "trt_timing.cache").exists()
    x, _ = stack_split("digits", "test", m.preprocessing, limit=16)
    atol = 1e-3 if precision == "fp32" else 2e-2
    feeds_t, feeds_o = {"image": x}, {"image": x}
    for s in m.stages:
        assert s.extra["trt"]["profile"][s.inputs[0].name][2][0] == 16
        with TrtRunner(m.path_of(s.file)) as trt_r, OrtRunner(m.path_of(s.file)) as ort_r:
            got, ref = trt_r.run(feeds_t), ort_r.run(feeds_o)
            assert got[s.exit_score].is_cuda  # outputs stay on the device
            assert np.abs(trt_r.to_host(got[s.exit_score]) - ref[s.exit_score]).max() <= atol
            keep = np.array([0, 2, 5])
            assert trt_r.take(got[s.exit_logits], keep).is_cuda
            feeds_t = {t.name: got[t.name] for t in s.outputs}
            feeds_o = {t.name: ref[t.name] for t in s.outputs}
    with TrtRunner(m.path_of(m.stages[0].file)) as r, pytest.raises(EngineError, match="profile max 16"):
        r.run({"image": np.zeros((17, *x.shape[1:]), np.float32)})


@pytest.mark.gpu
@pytest.mark.skipif(not (_cuda() and _ort_has("CUDAExecutionProvider")), reason="needs onnxruntime-gpu and a GPU")
def test_ort_cuda_iobinding_runner(trained_engine: Path) -> None:
    from deploykit.backends.ort import OrtRunner
    from deploykit.data import stack_split
    from deploykit.manifest import Manifest

    m = Manifest.load(trained_engine)
    x, _ = stack_split("digits", "test", m.preprocessing, limit=8)
    s = m.stages[0]
    with create_runner(m.path_of(s.file), "ort-cuda") as g, OrtRunner(m.path_of(s.file)) as c:
        got, ref = g.run({"image": x}), c.run({"image": x})
        assert got[s.outputs[0].name].is_cuda
        assert np.abs(g.to_host(got[s.exit_score]) - ref[s.exit_score]).max() < 1e-3


# ---- optimisation profile shapes (pure; no TensorRT) ------------------------------------------------------------
MUE_AXES = {"text": [1, 8, 16], "seq": [1, 36, 36], "src": [37, 44, 52], "past": [0, 9, 18]}
DEC_STEP_INPUTS = [("x", ["batch", 1, 64]), ("past_k", ["batch", 4, "past", 16]), ("past_v", ["batch", 4, "past", 16]),
                   ("cross_k", ["batch", 4, "src", 16]), ("cross_v", ["batch", 4, "src", 16]),
                   ("enc_mask", ["batch", "src"])]


def test_profile_shapes_for_a_mue_decoder_step() -> None:
    from deploykit.graphs.trt_build import profile_shapes

    p = profile_shapes(DEC_STEP_INPUTS, (1, 8, 32), MUE_AXES)
    assert p["x"] == [[1, 1, 64], [8, 1, 64], [32, 1, 64]]
    assert p["past_k"] == p["past_v"] == [[1, 4, 0, 16], [8, 4, 9, 16], [32, 4, 18, 16]]
    assert p["cross_k"] == p["cross_v"] == [[1, 4, 37, 16], [8, 4, 44, 16], [32, 4, 52, 16]]
    assert p["enc_mask"] == [[1, 37], [8, 44], [32, 52]]
    # every profile is ordered min <= opt <= max, as TensorRT requires
    assert all(lo <= o <= hi for mn, op, mx in p.values() for lo, o, hi in zip(mn, op, mx))


def test_profile_shapes_batch_only_and_undeclared_axis() -> None:
    from deploykit.graphs.trt_build import profile_shapes

    assert profile_shapes([("image", ["batch", 3, 16, 16])], (1, 8, 32)) == {
        "image": [[1, 3, 16, 16], [8, 3, 16, 16], [32, 3, 16, 16]]}
    with pytest.raises(EngineError, match="'past_k' axis 2 .'past'. is dynamic with no declared range"):
        profile_shapes(DEC_STEP_INPUTS, (1, 8, 32), {"src": [37, 44, 52]})
