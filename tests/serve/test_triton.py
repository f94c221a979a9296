"""export-triton: every config.pbtxt parses with Triton's model-config protobuf; the BLS cascade logic matches the
deploykit cascade when each stage is a real ONNX Runtime session."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from click.testing import CliRunner
from serve_helpers import rows

from deploykit.cli import main
from deploykit.errors import ConfigError
from deploykit.manifest import Manifest
from deploykit.serve import triton_model
from deploykit.serve.triton import export_triton

model_config_pb2 = pytest.importorskip("tritonclient.grpc.model_config_pb2", reason="needs tritonclient[grpc]")
text_format = pytest.importorskip("google.protobuf.text_format")


def parse(path) -> object:
    return text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())


@pytest.fixture(scope="module")
def calibrated(engine_dir, tmp_path_factory):
    d = tmp_path_factory.mktemp("triton") / "tiny"
    shutil.copytree(engine_dir, d)
    from deploykit.runtime.cascade import Cascade

    with Cascade.from_dir(d, threads=1) as c:  # thresholds at score medians, so every stage takes some rows
        outs = c.run_all_exits(rows(48, seed=3))
    m = Manifest.load(d)
    m.exit_policy.thresholds = [round(float(np.median(o["score"])), 6) for o in outs[:3]] + [None]
    m.calibration = {"test": {"exit_fractions": [0.5, 0.25, 0.125, 0.125]}}
    m.save()
    return d


def test_repository_configs_parse_with_tritons_protobuf(calibrated, tmp_path):
    repo = tmp_path / "repo"
    r = CliRunner().invoke(main, ["export-triton", str(calibrated), "-o", str(repo), "--max-batch-size", "16",
                                  "--instances", "6"])
    assert r.exit_code == 0, r.output
    m = Manifest.load(calibrated)
    for k, s in enumerate(m.stages):
        c = parse(repo / f"tiny_stage{k}" / "config.pbtxt")
        assert c.name == f"tiny_stage{k}" and c.platform == "onnxruntime_onnx" and c.max_batch_size == 16
        assert c.dynamic_batching.max_queue_delay_microseconds == 500
        assert [i.name for i in c.input] == [t.name for t in s.inputs]
        assert list(c.input[0].dims) == [int(v) for v in s.inputs[0].shape[1:]]  # dims exclude the batch
        outs = {o.name: o for o in c.output}
        assert set(outs) == {t.name for t in s.outputs} | {"logits", "score"}
        assert list(outs["logits"].dims) == [10] and list(outs["score"].dims) == [1]
        assert outs["score"].HasField("reshape") and list(outs["score"].reshape.shape) == []
        assert (repo / f"tiny_stage{k}" / "1" / "model.onnx").read_bytes() == m.path_of(s.file).read_bytes()
    counts = [parse(repo / f"tiny_stage{k}" / "config.pbtxt").instance_group[0].count for k in range(4)]
    assert counts[0] >= counts[-1] and min(counts) >= 1  # later stages see fewer rows: fewer instances
    bls = parse(repo / "tiny" / "config.pbtxt")
    assert bls.backend == "python" and bls.max_batch_size == 16 and bls.HasField("dynamic_batching")
    assert [o.name for o in bls.output] == ["probabilities", "exit_stage", "score", "class_index"]
    assert list(bls.input[0].dims) == [3, 16, 16]
    src = (repo / "tiny" / "1" / "model.py").read_text()
    assert "triton_python_backend_utils" in src and "class TritonPythonModel" in src
    compile(src, "model.py", "exec")
    spec = json.loads((repo / "tiny" / "1" / "cascade.json").read_text())
    assert spec["thresholds"] == m.thresholds() and spec["stages"][1]["model"] == "tiny_stage1"


def test_bls_cascade_logic_matches_deploykit_cascade_with_ort_sessions(calibrated, tmp_path):
    import onnxruntime as ort

    from deploykit.runtime.cascade import Cascade

    export_triton(calibrated, tmp_path / "repo")
    spec = json.loads((tmp_path / "repo" / "tiny" / "1" / "cascade.json").read_text())
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    sessions = [ort.InferenceSession(str(tmp_path / "repo" / s["model"] / "1" / "model.onnx"), opts,
                                     providers=["CPUExecutionProvider"]) for s in spec["stages"]]

    def stage(sess):
        return lambda feeds, names: dict(zip(names, sess.run(names, feeds)))

    x = rows(48, seed=3)
    got = triton_model.run_cascade(x, [stage(s) for s in sessions], spec)
    with Cascade.from_dir(calibrated, threads=1) as c:
        want = c.run(x)
    assert len(set(want.exit_stage.tolist())) > 1  # the thresholds really split the batch
    np.testing.assert_array_equal(got["exit_stage"], want.exit_stage)
    np.testing.assert_allclose(got["probabilities"], want.probs, atol=1e-6)
    assert got["stage_batch_sizes"] == list(want.stage_batch_sizes)
    parts = triton_model.split_rows(got, [5, 40, 3])  # Triton batched three requests
    assert [len(p["exit_stage"]) for p in parts] == [5, 40, 3]
    np.testing.assert_array_equal(parts[1]["class_index"], got["class_index"][5:45])


def test_tensorrt_backend_needs_built_plans(calibrated, tmp_path):
    with pytest.raises(ConfigError, match="deploykit build"):
        export_triton(calibrated, tmp_path / "repo", backend="tensorrt")
