"""``deploykit calibrate --confidence``: risk-controlled thresholds on a tiny trained engine, through the CLI."""

import json

import numpy as np
import pytest
from click.testing import CliRunner

from deploykit.cli import main
from deploykit.manifest import Manifest
from deploykit.tune import risk


def _run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def test_calibrate_confidence_records_the_guarantee(engine_copy, tmp_path):
    out = tmp_path / "g.json"
    r = _run("calibrate", engine_copy, "--max-drop", 3.0, "--confidence", 0.9, "--loss", "accuracy",
             "--json", out)
    assert r.exit_code == 0, r.output
    assert "guarantee: with probability >= 0.9" in r.output
    rep = json.loads(out.read_text())
    g = rep["guarantee"]
    assert g["delta"] == pytest.approx(0.1) and g["bound"] == "binomial" and g["loss"] == "accuracy"
    cal = Manifest.load(engine_copy).calibration
    assert cal["objective"]["delta"] == pytest.approx(0.1) and cal["objective"]["bound"] == "binomial"
    assert cal["guarantee"] == g and cal["exit_record"]["num_stages"] == 4
    thr = Manifest.load(engine_copy).thresholds()
    assert thr == rep["thresholds"] and thr[-1] is None
    if g["certified"]:  # one shared threshold, certified: its p-value is <= delta and the bound is above the loss
        assert len(set(thr[:-1])) == 1 and thr[0] is not None
        # the chosen point is on the stored curve, so load-adaptive serving starts from it, not from full depth
        assert sum(p["thresholds"] == thr for p in rep["curve"]) == 1
        from deploykit.serve.adaptive import AdaptiveController

        home = AdaptiveController.from_manifest(Manifest.load(engine_copy), 50).ladder[0]
        assert home.flops_ratio == pytest.approx(rep["test"]["flops_ratio"], abs=0.01)
        assert g["p_value"] <= 0.1 and g["empirical_risk"] <= g["upper_bound"] <= 0.03 + 1e-9
        # the p-value is the binomial tail of the val losses
        n, k = g["calibration_samples"], round(g["empirical_risk"] * g["calibration_samples"])
        assert g["p_value"] == pytest.approx(risk.binom_cdf(k, n, 0.03))
    else:
        assert thr == [None] * 4
    assert (tmp_path / "g.png").stat().st_size > 10_000
    assert sum(rep["exit_record"]["exit_fractions"]) == pytest.approx(1.0)


def test_calibrate_confidence_falls_back_to_full_depth(engine_copy):
    # 0.1 points at 95 % needs about 3,000 samples even with zero losses; the digits val split has 360
    r = CliRunner().invoke(main, ["calibrate", str(engine_copy), "--max-drop", "0.1", "--confidence", "0.95",
                                  "--bound", "hb"])
    assert r.exit_code == 0, r.output
    assert "warning: no threshold meets the guarantee" in r.stderr and "full depth" in r.stderr
    assert "not met, exits off" in r.stdout
    m = Manifest.load(engine_copy)
    assert m.thresholds() == [None] * 4
    assert m.calibration["guarantee"]["certified"] is False and m.calibration["objective"]["bound"] == "hb"
    assert m.calibration["test"]["exit_fractions"][-1] == 1.0
    info = _run("info", engine_copy)
    assert info.exit_code == 0 and "not met" in info.output


def test_calibrate_confidence_with_flops_budget(engine_copy):
    r = _run("calibrate", engine_copy, "--max-drop", 5, "--confidence", 0.9, "--flops-budget", 0.9)
    assert r.exit_code == 0, r.output
    cal = Manifest.load(engine_copy).calibration
    assert cal["objective"]["flops_budget"] == 0.9
    if cal["guarantee"]["certified"]:
        assert cal["val"]["flops_ratio"] <= 0.9 + 1e-9
    else:
        assert "FLOPs budget" in r.stderr or "no threshold" in r.stderr


def test_calibrate_options_that_do_not_apply(engine_copy):
    r = _run("calibrate", engine_copy, "--loss", "accuracy")
    assert r.exit_code != 0 and "--loss applies only with --confidence" in r.output
    r = _run("calibrate", engine_copy, "--confidence", 1.5)
    assert r.exit_code != 0 and "--confidence" in r.output and "Traceback" not in r.output
    assert Manifest.load(engine_copy).calibration is None


def test_calibrate_on_unlabelled_images(engine_copy, tmp_path):
    from deploykit.data import write_samples

    flat = tmp_path / "prod"
    write_samples("digits", "test", 120, flat)  # PNG files, no class folders
    r = _run("calibrate", engine_copy, "--data", f"imagefolder:{flat}", "--max-drop", 10, "--confidence", 0.9,
             "--json", tmp_path / "u.json")
    assert r.exit_code == 0, r.output
    assert "agreement with full depth" in r.output
    rep = json.loads((tmp_path / "u.json").read_text())
    assert rep["labelled"] is False and rep["guarantee"]["loss"] == "consistency"
    assert rep["val"]["samples"] + rep["test"]["samples"] == 120
    assert "full_accuracy" not in rep["test"] and 0 <= rep["test"]["agreement_with_full_depth"] <= 1
    assert Manifest.load(engine_copy).calibration["data"] == f"imagefolder:{flat}"
    # labels are needed for the accuracy loss and for the point-estimate calibration
    r = _run("calibrate", engine_copy, "--data", f"imagefolder:{flat}", "--confidence", 0.9, "--loss", "accuracy")
    assert r.exit_code != 0 and "needs labels" in r.output
    r = _run("calibrate", engine_copy, "--data", f"imagefolder:{flat}")
    assert r.exit_code != 0 and "no class folders" in r.output and "Traceback" not in r.output


def test_point_estimate_calibration_stores_exit_record(engine_copy):
    r = _run("calibrate", engine_copy, "--max-drop", 1.0)
    assert r.exit_code == 0, r.output
    cal = Manifest.load(engine_copy).calibration
    rec = cal["exit_record"]
    assert rec["samples"] == cal["val"]["samples"] > 300 and len(rec["score_edges"]) == 4
    assert sum(sum(p) for p in rec["probs"]) == pytest.approx(1.0)
    assert np.allclose(rec["exit_fractions"], [sum(p) for p in rec["probs"]])
