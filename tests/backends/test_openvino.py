"""OpenVINO backend: parity with ONNX Runtime on a real exported engine, and the CLI commands that take --backend."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

pytest.importorskip("openvino", reason="openvino is not installed (pip install 'deploykit[openvino]')")

from deploykit.backends import create_runner  # noqa: E402
from deploykit.backends.openvino import OpenVinoRunner, shared_core  # noqa: E402
from deploykit.cli import main  # noqa: E402
from deploykit.errors import BackendError, DataError  # noqa: E402
from deploykit.manifest import Manifest  # noqa: E402
from deploykit.runtime.cascade import Cascade  # noqa: E402
from deploykit.tune.bench import thresholds_for_fractions  # noqa: E402


@pytest.fixture(scope="module")
def digits_test(trained_engine: Path) -> tuple[np.ndarray, np.ndarray]:
    from deploykit.data import stack_split

    return stack_split("digits", "test", Manifest.load(trained_engine).preprocessing.__dict__)


def test_cascade_matches_onnx_runtime(trained_engine: Path, digits_test: tuple[np.ndarray, np.ndarray]) -> None:
    x, _ = digits_test
    with Cascade.from_dir(trained_engine) as ort, Cascade.from_dir(trained_engine, backend="openvino") as ov:
        assert all(isinstance(r, OpenVinoRunner) for r in ov.runners)
        for ref, got in zip(ort.run_all_exits(x), ov.run_all_exits(x)):
            np.testing.assert_allclose(got["logits"], ref["logits"], atol=2e-4, rtol=1e-4)
            np.testing.assert_allclose(got["score"], ref["score"], atol=2e-5)
            assert (got["logits"].argmax(1) == ref["logits"].argmax(1)).all()
        scores = np.stack([o["score"] for o in ort.run_all_exits(x)])
        # thresholds between two scores (the fraction quantiles are scores themselves), so numeric noise within
        # the 2e-5 checked above can't move a row across one
        thr = [_between(scores[k], t) for k, t in
               enumerate(thresholds_for_fractions(scores, [0.4, 0.3, 0.2, 0.1]))]
        a, b = ort.run(x, thresholds=thr), ov.run(x, thresholds=thr)
        assert (a.labels_idx == b.labels_idx).all() and (a.exit_stage == b.exit_stage).all()
        assert len(set(b.exit_stage.tolist())) > 1  # the thresholds really split the batch


def test_stages_share_one_core_and_outputs_are_not_overwritten(trained_engine: Path,
                                                               digits_test: tuple[np.ndarray, np.ndarray]) -> None:
    x, _ = digits_test
    m = Manifest.load(trained_engine)
    with create_runner(m.path_of(m.stages[0].file), "openvino", threads=1) as r:
        assert r.compiled.get_property("INFERENCE_NUM_THREADS") == 1
        assert str(r.compiled.get_property("INFERENCE_PRECISION_HINT")) == "<Type: 'float32'>"
        assert r.core is None and shared_core() is shared_core()
        first = r.run({"image": x[:8]})
        keep = {k: v.copy() for k, v in first.items()}
        r.run({"image": x[8:16]})  # reuses the infer request: the first result must be a copy
        for k in keep:
            np.testing.assert_array_equal(first[k], keep[k])


def test_concurrent_threads_get_their_own_requests(trained_engine: Path,
                                                   digits_test: tuple[np.ndarray, np.ndarray]) -> None:
    x, _ = digits_test
    with Cascade.from_dir(trained_engine, backend="openvino") as ov:
        want = ov.run(x[:64], thresholds=[None] * 4).logits
        got: list[np.ndarray] = []

        def work() -> None:
            for _ in range(3):
                got.append(ov.run(x[:64], thresholds=[None] * 4).logits)

        threads = [threading.Thread(target=work) for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert len(got) == 6 and all(np.array_equal(g, want) for g in got)


def test_bad_inputs_and_files(trained_engine: Path, tmp_path: Path) -> None:
    m = Manifest.load(trained_engine)
    with create_runner(m.path_of(m.stages[0].file), "openvino") as r:
        with pytest.raises(DataError, match="dtype float64"):
            r.run({"image": np.zeros((1, *m.input_spec.shape[1:]), dtype=np.float64)})
        with pytest.raises(DataError, match="missing input"):
            r.run({"x": np.zeros(1, dtype=np.float32)})
    with pytest.raises(BackendError, match="does not exist"):
        create_runner(tmp_path / "nope.onnx", "openvino").load()
    (tmp_path / "junk.onnx").write_bytes(b"not a graph")
    with pytest.raises(BackendError, match="could not load"):
        create_runner(tmp_path / "junk.onnx", "openvino").load()
    (tmp_path / "lonely.xml").write_text("<net/>")
    with pytest.raises(BackendError, match="no weights file"):
        create_runner(tmp_path / "lonely.xml", "openvino").load()
    with pytest.raises(BackendError, match="--backend openvino"):
        create_runner(tmp_path / "lonely.xml", "ort-cpu")


def test_cli_predict_calibrate_bench(engine_copy: Path, tmp_path: Path) -> None:
    from deploykit.data import write_samples

    cli = CliRunner()
    images = [str(p) for p in write_samples("digits", "test", 4, tmp_path / "img")]
    ort = cli.invoke(main, ["predict", str(engine_copy), *images])
    ov = cli.invoke(main, ["predict", str(engine_copy), *images, "--backend", "openvino"])
    assert ort.exit_code == 0 and ov.exit_code == 0, ov.output
    a = [json.loads(line) for line in ort.output.splitlines()]
    b = [json.loads(line) for line in ov.output.splitlines()]
    assert [r["label"] for r in a] == [r["label"] for r in b] and len(b) == 4
    cal = cli.invoke(main, ["calibrate", str(engine_copy), "--backend", "openvino", "--json",
                            str(tmp_path / "cal.json")])
    assert cal.exit_code == 0, cal.output
    assert json.loads((tmp_path / "cal.json").read_text())["backend"] == "openvino"
    bench = cli.invoke(main, ["bench", str(engine_copy), "--backend", "openvino", "--batch-sizes", "1,8",
                              "--samples", "16", "--repeats", "1", "--warmup", "1", "--exit-fractions",
                              "0.4,0.3,0.2,0.1", "--json", str(tmp_path / "b.json")])
    assert bench.exit_code == 0, bench.output
    report = json.loads((tmp_path / "b.json").read_text())
    assert report["backend"] == "openvino" and [r["batch_size"] for r in report["runs"]] == [1, 8]
    assert all(r["cascade_ms"] > 0 for r in report["runs"])


def _between(scores: np.ndarray, t: float | None) -> float | None:
    """A threshold halfway from ``t`` to the next score above it (exits as ``t`` does, up to rows scoring ``t``)."""
    if t is None:
        return None
    above = np.sort(scores[scores > t])
    return float((t + above[0]) / 2) if len(above) else t
