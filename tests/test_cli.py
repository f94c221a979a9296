"""The CLI end to end through its entry point, on real files."""

import json
import subprocess
import sys

from click.testing import CliRunner

from deploykit.cli import main


def test_help_is_instant_and_imports_no_heavy_modules():
    code = ("import sys; from deploykit.cli import main; "
            "heavy = [m for m in ('torch', 'onnxruntime', 'tensorrt', 'timm') if m in sys.modules]; "
            "assert not heavy, heavy")
    subprocess.run([sys.executable, "-c", code], check=True)
    r = CliRunner().invoke(main, ["--help"])
    assert r.exit_code == 0
    for cmd in ("train", "export", "calibrate", "bench", "predict"):
        assert cmd in r.output


def test_pipeline_through_cli(trained_run, tmp_path):
    runner = CliRunner()
    eng = tmp_path / "eng"
    r = runner.invoke(main, ["export", str(trained_run), "-o", str(eng)])
    assert r.exit_code == 0, r.output
    assert "predictions identical" in r.output
    r = runner.invoke(main, ["calibrate", str(eng), "--data", "digits", "--max-drop", "1",
                             "--json", str(tmp_path / "cal.json")])
    assert r.exit_code == 0, r.output
    cal = json.loads((tmp_path / "cal.json").read_text())
    assert {"full_accuracy", "cascade_accuracy", "flops_ratio"} <= set(cal["test"]) and "thresholds" in cal
    r = runner.invoke(main, ["bench", str(eng), "--batch-sizes", "2", "--samples", "4", "--repeats", "1", "--warmup",
                             "0", "--exit-fractions", "0.4,0.3,0.2,0.1", "--json", str(tmp_path / "b.json")])
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "b.json").read_text())["runs"][0]["batch_size"] == 2
    r = runner.invoke(main, ["samples", "digits", "-n", "2", "-o", str(tmp_path / "s")])
    assert r.exit_code == 0, r.output
    pngs = sorted(str(p) for p in (tmp_path / "s").glob("*.png"))
    r = runner.invoke(main, ["predict", str(eng), *pngs])
    assert r.exit_code == 0, r.output
    lines = [json.loads(line) for line in r.output.strip().splitlines()]
    assert len(lines) == 2 and all("exit_stage" in line for line in lines)
    r = runner.invoke(main, ["info", str(eng)])
    assert r.exit_code == 0 and "calibrated" in r.output


def test_errors_are_one_line_with_exit_code_2(tmp_path):
    runner = CliRunner()
    r = runner.invoke(main, ["calibrate", str(tmp_path)])
    assert r.exit_code == 2 and "error: no manifest" in r.output
    r = runner.invoke(main, ["export", str(tmp_path / "no-run"), "-o", str(tmp_path / "e")])
    assert r.exit_code == 2 and r.output.startswith("error:")
