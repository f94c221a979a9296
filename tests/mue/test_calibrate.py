"""``deploykit calibrate`` on MuE engines: per-task thresholds from val, written to the manifest, used by default."""

import json
import shutil

import pytest
from click.testing import CliRunner

from deploykit.errors import ConfigError
from deploykit.manifest import Manifest
from deploykit.runtime.exit_rules import Thresholds
from deploykit.runtime.generation import MuEEngine
from deploykit.tune import mue_calibrate as mc

SMALL = {"entailment": {"img": [None, 0.99, 0.9, 0.5], "txt": [None, 0.95, 0.5], "dec": [None, 0.95, 0.5]},
         "caption": {"img": [None, 0.99, 0.5], "txt": [None, 0.5], "dec": [None, 0.95, 0.5]}}


@pytest.fixture()
def engine_copy(mue_engine, tmp_path, monkeypatch):
    monkeypatch.setattr(mc, "GRID", SMALL)
    monkeypatch.setattr(mc, "DEFAULT_N", {"val": 16, "test": 16})
    root, _ = mue_engine
    dst = tmp_path / "engine"
    shutil.copytree(root, dst)
    return dst


def _point(eng, task, thr, split="val", n=16):
    rows = mc.load_vl_split(None, split, task, n, 32)
    res = eng.generate_ids(eng.load_images([r.image for r in rows]), eng.encode_texts([r.text for r in rows]), task,
                           thr, batch_size=5)  # another batch size than the sweep: per-sample decisions
    return mc._point(task, thr or eng.thresholds[task], res, rows, eng)


def test_cli_calibrate_writes_per_task_thresholds_used_by_default(engine_copy, tmp_path):
    from deploykit.cli import main

    out = tmp_path / "cal" / "report.json"
    r = CliRunner().invoke(main, ["calibrate", str(engine_copy), "--max-drop", "100", "--json", str(out)])
    assert r.exit_code == 0, r.output
    assert r.stdout.startswith("calibrated entailment: test") and str(out) in r.stdout  # one line; JSON in --json
    assert len(r.stdout.strip().splitlines()) == 1
    report = json.loads(out.read_text())
    assert out.with_suffix(".png").exists() and report["plot"] == str(out.with_suffix(".png"))
    m = Manifest.load(engine_copy)  # validates
    assert m.exit_policy.thresholds == [] and set(m.calibration["tasks"]) == {"entailment", "caption"}
    with MuEEngine.from_dir(engine_copy) as eng:
        for task in ("entailment", "caption"):
            t = report["tasks"][task]
            assert t["thresholds"] == m.extra["mue"]["thresholds"][task]
            assert t["thresholds"]["decay"] is (task == "caption")
            # --max-drop 100 allows anything: the cheapest point of the sweep, which exits somewhere
            assert t["val"]["chosen"]["layer_fraction"] == min(p["layer_fraction"] for p in t["sweep_val"]) < 1
            assert eng.thresholds[task] == Thresholds(**t["thresholds"])
            # the engine's default (no thresholds given) reproduces the calibrated test figures
            assert _point(eng, task, None, "test") == t["test"]["chosen"]


def test_sweep_figures_match_the_runtime(engine_copy):
    """The gathered sweep (cached encoder layers, analytic entailment decoder) equals real runs of the runtime."""
    report = mc.calibrate_mue(engine_copy, write=False, n_val=16, n_test=16)
    with MuEEngine.from_dir(engine_copy) as eng:
        for task, r in report["tasks"].items():
            pts = r["sweep_val"]
            assert r["points_searched"] == len(pts) >= 6
            picks = [pts[0], pts[len(pts) // 2], pts[-1], r["val"]["chosen"],
                     min(pts, key=lambda p: p["layer_fraction"])]
            for p in picks:
                got = _point(eng, task, Thresholds(**p["thresholds"]))
                assert got["thresholds"] == p["thresholds"]
                for k in ("quality", "layer_fraction", "image_layers", "text_layers", "decoder_layers_per_token"):
                    assert got[k] == pytest.approx(p[k]), (task, k, p["thresholds"])
            assert r["val"]["full"]["layer_fraction"] == 1.0
    # write=False left the manifest alone
    assert Manifest.load(engine_copy).calibration is None


def test_selection_rules():
    pts = [{"quality": 0.90, "layer_fraction": 1.0}, {"quality": 0.895, "layer_fraction": 0.6},
           {"quality": 0.80, "layer_fraction": 0.3}, {"quality": 0.895, "layer_fraction": 0.7}]
    assert mc.choose_point(pts, 0.89, None) is pts[1]  # cheapest within the target
    with pytest.raises(ConfigError, match="target"):
        mc.choose_point(pts, 0.95, None)
    assert mc.choose_point(pts, None, 0.65) is pts[1]  # best quality within a layer budget
    with pytest.raises(ConfigError, match="budget"):
        mc.choose_point(pts, None, 0.1)
    # the refusal names the task and the cheapest point there is, so the user knows what budget to ask for
    with pytest.raises(ConfigError, match=r"caption: .*cheapest uses 0\.300.*--flops-budget"):
        mc.choose_point(pts, None, 0.1, "caption")
    assert [p["layer_fraction"] for p in mc.pareto(pts)] == [0.3, 0.6, 1.0]


def test_caption_grid_reaches_the_cheapest_decoder():
    # on a 200-step model the decoder grid stopping at 0.6 made 0.66 of the layers the cheapest caption point;
    # with 0.0 it is 0.60, about the floor the forced full-depth steps leave
    assert min(t for t in mc.GRID["caption"]["dec"] if t is not None) == 0.0


def test_calibrate_refuses_conflicting_objectives_and_unknown_data(engine_copy):
    with pytest.raises(ConfigError, match="not both"):
        mc.calibrate_mue(engine_copy, max_drop=1.0, layer_budget=0.5)
    with pytest.raises(ConfigError, match="synthetic-vl"):
        mc.calibrate_mue(engine_copy, data="digits-but-not-vl", tasks=["entailment"])


def test_predict_with_thresholds_on_a_vl_engine_is_a_config_error(mue_engine, tmp_path):
    from deploykit.cli import main
    from deploykit.data.vl import synthetic_vl
    from deploykit.families import family_for_manifest

    root, _ = mue_engine
    img = tmp_path / "scene.png"
    synthetic_vl("test", n=1, size=32, tasks=("caption",))[0].image.save(img)
    m = Manifest.load(root)
    with pytest.raises(ConfigError, match="calibrate"):
        family_for_manifest(m).predict(m, [img], thresholds=[0.9], task="caption")
    r = CliRunner().invoke(main, ["predict", str(root), str(img), "--task", "caption", "--thresholds", "0.9"])
    assert r.exit_code != 0 and "calibrate" in r.output
    ok = CliRunner().invoke(main, ["predict", str(root), str(img), "--task", "caption"])
    assert ok.exit_code == 0 and "caption" in json.loads(ok.output.splitlines()[-1])
