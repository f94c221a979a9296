"""``deploykit calibrate --confidence`` on a MuE engine: per-task Learn-then-Test, recorded, full depth if unmet."""

import json
import shutil

import pytest
from click.testing import CliRunner

from deploykit.cli import main
from deploykit.manifest import Manifest
from deploykit.runtime.exit_rules import Thresholds
from deploykit.tune import mue_calibrate as mc
from deploykit.tune import risk

SMALL = {"entailment": {"img": [None, 0.99, 0.9, 0.5], "txt": [None, 0.95, 0.5], "dec": [None, 0.95, 0.5]},
         "caption": {"img": [None, 0.99, 0.5], "txt": [None, 0.5], "dec": [None, 0.95, 0.5]}}


@pytest.fixture()
def engine_copy(mue_engine, tmp_path, monkeypatch):
    monkeypatch.setattr(mc, "GRID", SMALL)
    monkeypatch.setattr(mc, "DEFAULT_N", {"val": 16, "test": 16})
    dst = tmp_path / "engine"
    shutil.copytree(mue_engine[0], dst)
    return dst


def test_mue_confidence_per_task(engine_copy, tmp_path):
    out = tmp_path / "g.json"
    r = CliRunner().invoke(main, ["calibrate", str(engine_copy), "--max-drop", "60", "--confidence", "0.9",
                                  "--json", str(out)])
    assert r.exit_code == 0, r.output
    rep = json.loads(out.read_text())
    m = Manifest.load(engine_copy)
    for task in ("entailment", "caption"):
        t, g = rep["tasks"][task], rep["tasks"][task]["guarantee"]
        assert g["delta"] == pytest.approx(0.1) and g["bound"] == "binomial" and g["loss"] == "consistency"
        assert g["calibration_samples"] == 8  # the second half of val; the path is learnt on the first
        assert m.calibration["tasks"][task]["guarantee"] == g
        assert m.calibration["tasks"][task]["objective"]["delta"] == pytest.approx(0.1)
        assert m.extra["mue"]["thresholds"][task] == t["thresholds"]
        pv = g["path_pvalues"]
        assert all(p <= 0.1 for p in pv[: g["candidates_certified"]])
        assert len(pv) == g["candidates_certified"] or pv[g["candidates_certified"]] > 0.1
        if g["certified"]:  # with 8 rows and 60 points, up to 2 disagreements pass: P(Bin(8, .6) <= 2) < 0.1
            assert g["empirical_risk"] * 8 <= 2 + 1e-9
            assert g["p_value"] == pytest.approx(risk.binom_cdf(round(g["empirical_risk"] * 8), 8, 0.6))
        else:
            assert Thresholds(**t["thresholds"]) == Thresholds.full_depth()


def test_mue_confidence_falls_back_and_refuses_accuracy_for_captions(engine_copy):
    r = CliRunner().invoke(main, ["calibrate", str(engine_copy), "--max-drop", "1", "--confidence", "0.95"])
    assert r.exit_code == 0, r.output
    assert "no threshold meets the guarantee" in r.stderr and "full depth" in r.stderr
    m = Manifest.load(engine_copy)
    for task in ("entailment", "caption"):
        assert m.calibration["tasks"][task]["guarantee"]["certified"] is False
        thr = m.extra["mue"]["thresholds"][task]
        assert (thr["img"], thr["txt"], thr["dec"]) == (None, None, None)
    r = CliRunner().invoke(main, ["calibrate", str(engine_copy), "--confidence", "0.9", "--loss", "accuracy"])
    assert r.exit_code != 0 and "BLEU" in r.output and "--loss consistency" in r.output
