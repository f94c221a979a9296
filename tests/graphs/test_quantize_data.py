"""quantize --mode static calibrates on the engine's own data by default and refuses another class set."""

from __future__ import annotations

import json

from click.testing import CliRunner
from PIL import Image

from deploykit.cli import main
from deploykit.manifest import Manifest


def _four_class_folder(root):
    for c in ("ant", "bee", "cat", "dog"):
        (root / c).mkdir(parents=True)
        for i in range(5):
            Image.new("RGB", (20, 20), (40 * i, 60, 0)).save(root / c / f"{i}.png")
    return root


def test_static_quantize_uses_the_engine_data_and_refuses_other_classes(engine_copy, tmp_path):
    folder = _four_class_folder(tmp_path / "imgs")
    r = CliRunner().invoke(main, ["quantize", str(engine_copy), "-o", str(tmp_path / "q1"), "--mode", "static",
                                  "--calib-data", f"imagefolder:{folder}", "--calib-samples", "16"])
    assert r.exit_code == 2 and "classes ['ant', 'bee', 'cat', 'dog']" in r.output and "--calib-data" in r.output
    # the default is the manifest's own training data spec: point it at the 4-class folder to prove it is read
    m = Manifest.load(engine_copy)
    assert m.provenance["data"] == "digits"
    m.provenance["data"] = f"imagefolder:{folder}"
    m.save()
    r = CliRunner().invoke(main, ["quantize", str(engine_copy), "-o", str(tmp_path / "q2"), "--mode", "static",
                                  "--calib-samples", "16"])
    assert r.exit_code == 2 and "classes ['ant', 'bee', 'cat', 'dog']" in r.output
    m.provenance["data"] = "digits"
    m.save()
    r = CliRunner().invoke(main, ["quantize", str(engine_copy), "-o", str(tmp_path / "q3"), "--mode", "static",
                                  "--calib-samples", "16"])
    assert r.exit_code == 0, r.output
    q = json.loads((tmp_path / "q3" / "deploykit.json").read_text())["extra"]["quantization"]
    assert q["calib_data"] == "digits" and q["calib_samples"] == 16


def test_calib_data_with_dynamic_mode_is_refused(trained_engine, tmp_path):
    r = CliRunner().invoke(main, ["quantize", str(trained_engine), "-o", str(tmp_path / "q"), "--calib-data",
                                  "digits"])
    assert r.exit_code == 2 and "--calib-data applies to --mode static" in r.output
