import json

import numpy as np
import pytest

from deploykit.backends.ort import OrtRunner
from deploykit.data import stack_split
from deploykit.errors import BackendError, DataError, ManifestError
from deploykit.runtime import Cascade


@pytest.fixture(scope="module")
def digits_test(trained_engine):
    with Cascade.from_dir(trained_engine) as c:
        pre = c.manifest.preprocessing.__dict__
    return stack_split("digits", "test", pre, limit=96)


def test_compaction_matches_every_exit(trained_engine, digits_test):
    x, _ = digits_test
    with Cascade.from_dir(trained_engine) as c:
        every = c.run_all_exits(x)
        scores = np.stack([e["score"] for e in every])
        thr = [float(np.quantile(scores[k], 0.6)) for k in range(3)] + [None]
        res = c.run(x, thresholds=thr)
    # each row exits at the first stage whose score reaches its threshold, with that stage's logits
    for i in range(len(x)):
        hits = [k for k in range(3) if scores[k, i] >= thr[k]]
        want = hits[0] if hits else 3
        assert res.exit_stage[i] == want
        np.testing.assert_allclose(res.logits[i], every[want]["logits"][i], rtol=1e-4, atol=1e-4)
    assert res.stage_batch_sizes[0] == len(x)
    assert res.stage_batch_sizes == sorted(res.stage_batch_sizes, reverse=True)
    assert len(set(res.exit_stage.tolist())) > 1
    np.testing.assert_allclose(res.probs.sum(1), 1.0, rtol=1e-5)


def test_exits_disabled_equals_monolithic(trained_engine, digits_test):
    x, _ = digits_test
    with Cascade.from_dir(trained_engine) as c:
        res = c.run(x, thresholds=[None] * 4)
        mono = OrtRunner(trained_engine / "full.onnx").run({"image": x})["logits"]
    assert (res.exit_stage == 3).all()
    np.testing.assert_allclose(res.logits, mono, rtol=1e-4, atol=1e-4)
    assert (res.logits.argmax(1) == mono.argmax(1)).all()


@pytest.mark.parametrize("batch", [1, 3, 17])
def test_any_batch_size(trained_engine, digits_test, batch):
    x, _ = digits_test
    with Cascade.from_dir(trained_engine) as c:
        res = c.run(x[:batch], thresholds=[0.5, 0.5, 0.5])
        ref = c.run(x[:batch], thresholds=[None] * 4)
    assert res.logits.shape == (batch, 10)
    assert ((res.exit_stage == 3) <= True).all() and ref.exit_stage.max() == 3


@pytest.mark.parametrize("bad, match", [
    (np.zeros((2, 3, 16, 16), dtype=np.float64), "dtype float64"),
    (np.zeros((2, 3, 8, 8), dtype=np.float32), "shape"),
    (np.zeros((3, 16, 16), dtype=np.float32), "shape"),
    (np.zeros((0, 3, 16, 16), dtype=np.float32), "empty"),
    ([[0.0]], "numpy array"),
])
def test_bad_input(trained_engine, bad, match):
    with Cascade.from_dir(trained_engine) as c, pytest.raises(DataError, match=match):
        c.run(bad)


def test_nan_input(trained_engine):
    x = np.zeros((4, 3, 16, 16), dtype=np.float32)
    x[2, 0, 0, 0] = np.nan
    with Cascade.from_dir(trained_engine) as c, pytest.raises(DataError, match="NaN.*1 row"):
        c.run(x)


def test_bad_thresholds(trained_engine):
    x = np.zeros((2, 3, 16, 16), dtype=np.float32)
    with Cascade.from_dir(trained_engine) as c:
        with pytest.raises(DataError, match="thresholds"):
            c.run(x, thresholds=[0.5] * 6)
        with pytest.raises(DataError, match="finite"):
            c.run(x, thresholds=[float("nan")])


def _rehash(engine_dir, file):
    """Record a replaced file's hash, as a hand-edited manifest would, so the checks behind the hash are reached."""
    from deploykit.manifest import MANIFEST_NAME, file_sha256

    raw = json.loads((engine_dir / MANIFEST_NAME).read_text())
    for s in raw["stages"]:
        if s["file"] == file:
            s["sha256"] = file_sha256(engine_dir / file)
    (engine_dir / MANIFEST_NAME).write_text(json.dumps(raw))


def test_graph_not_matching_manifest(engine_copy):
    # stage 1's graph in stage 2's place: names don't match what the manifest promises
    (engine_copy / "stage2.onnx").write_bytes((engine_copy / "stage0.onnx").read_bytes())
    with pytest.raises(ManifestError, match="sha256"):
        Cascade.from_dir(engine_copy)
    _rehash(engine_copy, "stage2.onnx")
    with pytest.raises(ManifestError, match="don't belong together"):
        Cascade.from_dir(engine_copy)


def test_corrupt_graph(engine_copy):
    (engine_copy / "stage1.onnx").write_bytes(b"this is not onnx")
    with pytest.raises(ManifestError, match="stage1.onnx does not match the sha256"):
        Cascade.from_dir(engine_copy)
    _rehash(engine_copy, "stage1.onnx")
    with pytest.raises(BackendError, match="could not load"):
        Cascade.from_dir(engine_copy)


def test_missing_graph(engine_copy):
    (engine_copy / "stage3.onnx").unlink()
    with pytest.raises(ManifestError, match="missing"):
        Cascade.from_dir(engine_copy)


def test_unavailable_backend_names_the_install(trained_engine):
    with pytest.raises(BackendError, match="deploykit\\[gpu\\]"):
        Cascade.from_dir(trained_engine, backend="ort-cuda")
