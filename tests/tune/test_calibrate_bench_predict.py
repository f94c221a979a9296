import json

import numpy as np
import pytest

from deploykit.errors import DataError
from deploykit.manifest import Manifest
from deploykit.tune.bench import bench
from deploykit.tune.calibrate import calibrate
from deploykit.tune.predict import predict


def test_calibrate_max_drop(engine_copy, tmp_path):
    out = tmp_path / "cal.json"
    r = calibrate(engine_copy, data="digits", max_drop=1.0, json_out=out)
    saved = json.loads(out.read_text())
    assert saved["thresholds"] == r["thresholds"] and len(r["thresholds"]) == 4 and r["thresholds"][-1] is None
    for key in ("full_accuracy", "cascade_accuracy", "flops_ratio"):
        assert 0 < saved["test"][key] <= 1
    assert (tmp_path / "cal.png").stat().st_size > 10_000
    # on the split the thresholds were chosen on, the promise holds exactly
    assert r["val"]["cascade_accuracy"] >= r["val"]["full_accuracy"] - 0.01 - 1e-9
    # the real cascade (with compaction) and the simulation from every exit agree on test
    assert r["test"]["cascade_accuracy"] == pytest.approx(r["test"]["simulated_cascade_accuracy"], abs=1 / 360)
    assert r["test"]["flops_ratio"] == pytest.approx(r["test"]["simulated_flops_ratio"], abs=0.01)
    assert sum(r["test"]["exit_fractions"]) == pytest.approx(1.0)
    m = Manifest.load(engine_copy)
    assert m.thresholds() == r["thresholds"] and m.calibration["test"] == r["test"]
    assert len(m.calibration["curve"]) >= 2


def test_calibrate_flops_budget(engine_copy):
    r = calibrate(engine_copy, data="digits", flops_budget=0.6, write=False)
    assert r["val"]["flops_ratio"] <= 0.6 + 1e-9
    assert Manifest.load(engine_copy).calibration is None  # write=False leaves the manifest alone


def test_calibrate_on_wrong_data(engine_copy, tmp_path):
    for c in ("cat", "dog"):
        (tmp_path / "imgs" / c).mkdir(parents=True)
    from PIL import Image

    for i in range(10):
        Image.new("RGB", (20, 20), (i * 20, 0, 0)).save(tmp_path / "imgs" / ("cat" if i % 2 else "dog") / f"{i}.png")
    with pytest.raises(DataError, match="classes"):
        calibrate(engine_copy, data=f"imagefolder:{tmp_path / 'imgs'}")


def test_bench_report(trained_engine, trained_run, tmp_path):
    r = bench(trained_engine, batch_sizes=[1, 8], exit_fractions=[0.4, 0.3, 0.2, 0.1], checkpoint=trained_run,
              samples=16, warmup=1, repeats=1, json_out=tmp_path / "b.json")
    saved = json.loads((tmp_path / "b.json").read_text())
    assert saved["runs"] == r["runs"]
    assert [run["batch_size"] for run in saved["runs"]] == [1, 8]
    for run in saved["runs"]:
        for key in ("monolithic_ms", "chain_noexit_ms", "cascade_ms", "torch_ms", "ideal_speedup", "speedup",
                    "efficiency", "chain_overhead", "exit_fractions"):
            assert run[key] is not None and np.isfinite(run[key]).all()
        assert run["efficiency"] == pytest.approx(run["speedup"] / run["ideal_speedup"])
        assert run["ideal_speedup"] > 1.3  # about 2x for 0.4/0.3/0.2/0.1 over 4 equal stages
        np.testing.assert_allclose(run["exit_fractions"], [0.4, 0.3, 0.2, 0.1], atol=0.07)
    assert (tmp_path / "b.png").exists()


def test_predict_files(trained_engine, tmp_path):
    from deploykit.data import write_samples

    paths = write_samples("digits", "test", 6, tmp_path)
    res = predict(trained_engine, paths)
    assert [r["image"] for r in res] == [str(p) for p in paths]
    for r in res:
        assert r["label"] in [str(i) for i in range(10)] and 0 <= r["exit_stage"] < 4 and 0 < r["confidence"] <= 1
    # same answer as the data pipeline: PNG files go through the same preprocessing
    from deploykit.data import stack_split
    from deploykit.runtime import Cascade

    with Cascade.from_dir(trained_engine) as c:
        x, _ = stack_split("digits", "test", c.manifest.preprocessing.__dict__, limit=6)
        direct = c.run(x)
    assert [int(r["class_index"]) for r in res] == direct.labels_idx.tolist()


def test_predict_undecodable_image_is_reported_and_the_rest_go_on(trained_engine, tmp_path):
    from deploykit.data import write_samples

    good = write_samples("digits", "test", 1, tmp_path)[0]
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 20)
    first, second = predict(trained_engine, [bad, good])
    assert first["image"] == str(bad) and "can't decode" in first["error"] and "label" not in first
    assert second["image"] == str(good) and "label" in second
    (only,) = predict(trained_engine, [tmp_path / "nope.png"])
    assert "does not exist" in only["error"]
