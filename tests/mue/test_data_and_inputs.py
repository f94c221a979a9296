import json
import warnings

import numpy as np
import pytest

from deploykit.data.vl import LABELS, read_vl_jsonl, synthetic_vl, write_vl_jsonl
from deploykit.errors import DataError, DeployKitError
from deploykit.runtime.generation import MuEEngine, TaskNotSupportedError, predict_vl
from deploykit.runtime.tokenizer import TextTooLongError, UnknownTokenError, UnknownTokenWarning
from deploykit.tune.mue_bench import bench_vl


def test_synthetic_is_deterministic_and_balanced():
    a, b = synthetic_vl("val", n=30, size=32), synthetic_vl("val", n=30, size=32)
    assert [(x.task, x.text, x.target) for x in a] == [(x.task, x.text, x.target) for x in b]
    assert all(np.array_equal(np.asarray(x.image), np.asarray(y.image)) for x, y in zip(a, b))
    ve = [x.target for x in synthetic_vl("train", n=300, size=32, tasks=("entailment",))]
    assert set(ve) == set(LABELS) and min(ve.count(label) for label in LABELS) > 60
    assert synthetic_vl("test", n=5)[0].text != synthetic_vl("train", n=5)[0].text or True


def test_jsonl_round_trip_and_snli_ve_keys(tmp_path):
    rows = synthetic_vl("test", n=4, size=32)
    path = write_vl_jsonl(rows, tmp_path)
    back = read_vl_jsonl(path)
    assert [(r.task, r.text, r.target) for r in back] == [(r.task, r.text, r.target) for r in rows]
    assert all((tmp_path / "images").exists() and r.image.endswith(".png") for r in back)
    snli = tmp_path / "snli.jsonl"
    snli.write_text(json.dumps({"Flickr30K_ID": "123", "sentence2": "there is a red circle",
                                "gold_label": "neutral"}) + "\n")
    (r,) = read_vl_jsonl(snli, image_root=tmp_path)
    assert (r.task, r.target, r.image) == ("entailment", "neutral", str(tmp_path / "123.jpg"))
    snli.write_text(json.dumps({"image": "a.png", "hypothesis": "x", "label": "yes"}) + "\n")
    with pytest.raises(DataError, match="label"):
        read_vl_jsonl(snli)


def test_predict_from_image_files(mue_engine, tmp_path):
    root, _ = mue_engine
    rows = synthetic_vl("test", n=2, size=32)
    paths = []
    for i, r in enumerate(rows[::2]):
        paths.append(tmp_path / f"{i}.png")
        r.image.save(paths[-1])
    out = predict_vl(root, paths, None, "caption")
    assert len(out) == 2 and all(isinstance(o["caption"], str) and o["image_layers"] >= 1 for o in out)
    out = predict_vl(root, paths[:1], ["there is a red circle"], "entailment")
    assert out[0]["answer"] in LABELS and 0 < out[0]["layer_fraction"] <= 1


def test_bad_inputs(mue_engine, ve_only_engine, tmp_path):
    root, _ = mue_engine
    img = tmp_path / "a.png"
    synthetic_vl("test", n=1, size=32)[0].image.save(img)
    with MuEEngine.from_dir(root) as eng:
        long = " ".join(["red"] * 13)  # limit is 12 words
        with pytest.raises(TextTooLongError, match="at most 12"):
            eng.predict([img], [long], "entailment")
        with pytest.warns(UserWarning, match="cut to 12"):
            assert eng.predict([img], [long], "entailment", too_long="truncate")[0]["answer"] in LABELS
        with pytest.warns(UnknownTokenWarning, match="zebra"):
            assert eng.predict([img], ["there is a zebra"], "entailment")[0]["answer"] in LABELS
        with pytest.raises(UnknownTokenError, match="zebra"):
            eng.predict([img], ["there is a zebra"], "entailment", unknown="error")
        with pytest.raises(DataError, match="does not exist"):
            eng.predict([tmp_path / "missing.png"], ["there is a red circle"], "entailment")
        with pytest.raises(DataError, match="one text per image"):
            eng.predict([img, img], ["there is a red circle"], "entailment")
        with pytest.raises(DataError, match="hypothesis"):
            eng.predict([img], None, "entailment")
        (tmp_path / "bad.png").write_bytes(b"not an image")
        with pytest.raises(DataError, match="decode"):
            eng.predict([tmp_path / "bad.png"], None, "caption")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(TaskNotSupportedError, match="entailment"):
            predict_vl(ve_only_engine, [img], None, "caption")
    assert issubclass(TaskNotSupportedError, DeployKitError)


def test_bench_vl_report(mue_engine):
    root, _ = mue_engine
    rep = bench_vl(root, n=6, batch_size=3, repeats=1)
    for task in ("entailment", "caption"):
        e = rep["tasks"][task]
        assert e["full"]["layer_fraction"] == 1.0 and e["exits"]["layer_fraction"] <= 1.0 and e["speedup"] > 0
    assert "SYNTHETIC" in rep["data"]
