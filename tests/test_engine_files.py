"""Engine directories an attacker (or a bad copy) could hand over: escaping paths, tampered graphs, manifests that
parse but mean nothing. Each is refused at load with a one-line error, before any answer is given."""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from deploykit.cli import main
from deploykit.errors import ManifestError
from deploykit.manifest import Manifest, file_sha256, resolve_inside


def _edit(engine: Path, fn) -> None:
    p = engine / "deploykit.json"
    d = json.loads(p.read_text())
    fn(d)
    p.write_text(json.dumps(d))


def _cli(*args: str) -> tuple[int, str]:
    r = CliRunner().invoke(main, list(args))
    assert r.exception is None or isinstance(r.exception, SystemExit), r.exc_info
    return r.exit_code, r.output


def _one_line_error(code: int, out: str, *expect: str) -> None:
    assert code == 2, out
    assert "Traceback" not in out
    lines = [ln for ln in out.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, out
    for e in expect:
        assert e in lines[0], out


def _image(tmp_path: Path) -> Path:
    from PIL import Image

    p = tmp_path / "img.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(p)
    return p


# ---- confinement --------------------------------------------------------------------------------------------
def test_resolve_inside_refuses_escapes(tmp_path):
    root = tmp_path / "engine"
    root.mkdir()
    (root / "a.onnx").write_bytes(b"x")
    (tmp_path / "outside.onnx").write_bytes(b"x")
    (root / "link.onnx").symlink_to(tmp_path / "outside.onnx")
    (root / "inner").symlink_to(root)  # a symlink that stays inside is fine
    assert resolve_inside(root, "a.onnx") == (root / "a.onnx").resolve()
    assert resolve_inside(root, "inner/a.onnx") == (root / "a.onnx").resolve()
    for bad in ("../outside.onnx", "../../x", str(tmp_path / "outside.onnx"), "link.onnx", "", ".", "sub/../.."):
        with pytest.raises(ManifestError, match="engine directory"):
            resolve_inside(root, bad)


@pytest.mark.parametrize("how", ["dotdot", "absolute", "symlink"])
def test_escaping_stage_file_is_refused_by_every_command(engine_copy, tmp_path, how):
    secret = tmp_path / "secret.onnx"
    secret.write_bytes((engine_copy / "stage0.onnx").read_bytes())  # same bytes: only confinement can refuse it
    if how == "symlink":
        (engine_copy / "stage0.onnx").unlink()
        (engine_copy / "stage0.onnx").symlink_to(secret)
    else:
        rel = os.path.relpath(secret, engine_copy) if how == "dotdot" else str(secret)
        _edit(engine_copy, lambda d: d["stages"][0].update(file=rel))
    with pytest.raises(ManifestError, match="outside the engine directory|relative paths inside"):
        Manifest.load(engine_copy)
    _one_line_error(*_cli("info", str(engine_copy)), "engine directory")
    _one_line_error(*_cli("predict", str(engine_copy), str(_image(tmp_path))), "engine directory")
    repo = tmp_path / "repo"
    _one_line_error(*_cli("export-triton", str(engine_copy), "-o", str(repo)), "engine directory")
    copied = [p for p in repo.rglob("*") if p.is_file()] if repo.exists() else []
    assert copied == []  # nothing, in particular not the outside file, was copied


# ---- sha256 -------------------------------------------------------------------------------------------------
def _flip(path: Path, n: int = 256) -> None:
    b = bytearray(path.read_bytes())
    mid = len(b) // 2
    for i in range(mid, mid + n):
        b[i] ^= 0xFF
    path.write_bytes(bytes(b))


def test_tampered_graph_is_refused_before_any_answer(engine_copy, tmp_path):
    before = (engine_copy / "deploykit.json").read_text()
    _flip(engine_copy / "stage0.onnx")
    with pytest.raises(ManifestError, match="stage0.onnx does not match the sha256"):
        Manifest.load(engine_copy)
    img = str(_image(tmp_path))
    code, out = _cli("predict", str(engine_copy), img)
    _one_line_error(code, out, "stage0.onnx", "sha256")
    assert "confidence" not in out and "NaN" not in out
    _one_line_error(*_cli("calibrate", str(engine_copy), "--data", "digits", "--max-drop", "1"), "stage0.onnx")
    assert (engine_copy / "deploykit.json").read_text() == before  # thresholds not overwritten
    env = dict(os.environ, OMP_NUM_THREADS="1")
    with socket.socket() as s:  # a free port: the refusal must come from the graph, not the port
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    r = subprocess.run([sys.executable, "-m", "deploykit", "serve-local", str(engine_copy), "--port", str(port),
                        "--grpc-port", "0"],
                       capture_output=True, text=True, timeout=120, env=env)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "stage0.onnx" in r.stderr and "sha256" in r.stderr


def test_verification_is_one_read_per_graph_and_names_the_file(engine_copy):
    m = Manifest.load(engine_copy)
    files = dict(m.named_files())
    assert set(files) >= {"stage0.onnx", "stage3.onnx", "full.onnx"} and all(files.values())
    (engine_copy / "full.onnx").write_bytes(b"replaced")
    with pytest.raises(ManifestError, match="full.onnx"):
        Manifest.load(engine_copy)
    Manifest.load(engine_copy, verify=False)  # structure still loads when asked not to hash


def _poison(engine: Path) -> None:
    """A graph whose weights are NaN, with its hash re-recorded (a "valid" but broken engine)."""
    import onnx
    from onnx import numpy_helper

    path = engine / "stage0.onnx"
    model = onnx.load(str(path))
    for init in model.graph.initializer:
        arr = numpy_helper.to_array(init)
        if arr.dtype == np.float32 and arr.ndim == 2:
            init.CopyFrom(numpy_helper.from_array(np.full_like(arr, np.nan), init.name))
    onnx.save(model, str(path))
    _edit(engine, lambda d: d["stages"][0].update(sha256=file_sha256(path)))


def test_non_finite_outputs_are_refused_never_emitted_as_nan(engine_copy, tmp_path):
    from deploykit.errors import BackendError
    from deploykit.runtime.cascade import Cascade

    _poison(engine_copy)
    x = np.zeros((2, *Manifest.load(engine_copy).preprocessing.input_size), np.float32)
    with Cascade.from_dir(engine_copy, threads=1) as c, pytest.raises(BackendError, match="NaN or infinite"):
        c.run(x)
    code, out = _cli("predict", str(engine_copy), str(_image(tmp_path)))
    _one_line_error(code, out, "NaN or infinite", "re-export")
    before = (engine_copy / "deploykit.json").read_text()
    _one_line_error(*_cli("calibrate", str(engine_copy), "--data", "digits", "--max-drop", "1"), "NaN or infinite")
    assert (engine_copy / "deploykit.json").read_text() == before  # no thresholds chosen on NaN scores


# ---- semantics, once at load ----------------------------------------------------------------------------------
SEMANTIC = {
    "std 0": (lambda d: d["preprocessing"].update(std=[0.0] * len(d["preprocessing"]["std"])), "std"),
    "mean []": (lambda d: d["preprocessing"].update(mean=[]), "preprocessing.mean"),
    "input_size vs graph": (lambda d: d["preprocessing"].update(input_size=[3, 32, 32]), "input_size"),
    "NaN threshold": (lambda d: d["exit_policy"].update(thresholds=[math.nan, None, None, None]), "non-finite"),
    "name with /": (lambda d: d.update(name="../evil/model"), "without '/'"),
    "non-integer dim": (lambda d: d["stages"][0]["inputs"][0].update(shape=["batch", 3, 16.5, 16]), "shape"),
    "labels not a list": (lambda d: d.update(labels=5), "wrong form"),
    "no labels": (lambda d: d.update(labels=[]), "no labels"),
    "malformed calibration": (lambda d: d.update(calibration={"test": {"cascade_accuracy": "high"}}), "calibration"),
    "calibration a list": (lambda d: d.update(calibration=[1, 2]), "calibration"),
}


@pytest.mark.parametrize("what", list(SEMANTIC))
def test_meaningless_manifest_is_refused_at_load_with_one_line(engine_copy, tmp_path, what):
    fn, expect = SEMANTIC[what]
    _edit(engine_copy, fn)
    with pytest.raises(ManifestError, match=None) as e:
        Manifest.load(engine_copy)
    assert expect in str(e.value), str(e.value)
    _one_line_error(*_cli("info", str(engine_copy)), expect)
    _one_line_error(*_cli("predict", str(engine_copy), str(_image(tmp_path))), expect)


def test_label_count_must_match_the_graphs_classes(engine_copy, tmp_path):
    _edit(engine_copy, lambda d: d.update(labels=d["labels"][:5]))
    _one_line_error(*_cli("predict", str(engine_copy), str(_image(tmp_path))), "classes", "5 labels")


def test_manifest_that_is_a_directory(engine_copy):
    (engine_copy / "deploykit.json").unlink()
    (engine_copy / "deploykit.json").mkdir()
    for args in (["info"], ["calibrate", "--data", "digits"], ["bench"], ["export-triton", "-o", "/tmp/x-14"]):
        cmd, *rest = args
        _one_line_error(*_cli(cmd, str(engine_copy), *rest), "deploykit.json")
