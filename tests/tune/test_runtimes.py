"""``deploykit bench --runtimes``: the monolithic model on every installed CPU runtime, in the same timed loop."""

from __future__ import annotations

import json
from pathlib import Path

from click.testing import CliRunner

from deploykit.cli import main
from deploykit.tune.monolithic import installed_runtimes


def test_bench_runtimes_reports_every_installed_runtime(trained_engine: Path, tmp_path: Path) -> None:
    r = CliRunner().invoke(main, ["bench", str(trained_engine), "--runtimes", "--batch-sizes", "1,8", "--samples",
                                  "16", "--repeats", "1", "--warmup", "1", "--exit-fractions", "0.4,0.3,0.2,0.1",
                                  "--json", str(tmp_path / "b.json")])
    assert r.exit_code == 0, r.output
    report = json.loads((tmp_path / "b.json").read_text())
    want = installed_runtimes()
    assert {"ort_fp32_default", "ort_fp32_deploykit", "ort_int8_dynamic"} <= set(want)
    for run in report["runs"]:
        rt = run["runtimes"]
        assert list(rt["monolithic_ms"]) == want and all(v > 0 for v in rt["monolithic_ms"].values())
        assert rt["fastest_ms"] == min(rt["monolithic_ms"].values())
        assert abs(rt["cascade_vs_fastest"] - rt["fastest_ms"] / run["cascade_ms"]) < 1e-9


def test_bench_runtimes_subset_and_bad_names(trained_engine: Path, tmp_path: Path) -> None:
    cli = CliRunner()
    r = cli.invoke(main, ["bench", str(trained_engine), "--runtimes", "ort_int8_dynamic", "--batch-sizes", "4",
                          "--samples", "8", "--repeats", "1", "--warmup", "0", "--json", str(tmp_path / "b.json")])
    assert r.exit_code == 0, r.output
    (run,) = json.loads((tmp_path / "b.json").read_text())["runs"]
    assert list(run["runtimes"]["monolithic_ms"]) == ["ort_int8_dynamic"]
    bad = cli.invoke(main, ["bench", str(trained_engine), "--runtimes", "tflite"])
    assert bad.exit_code != 0 and "--runtimes" in bad.output and "ort_fp32_default" in bad.output
    assert "Traceback" not in bad.output
