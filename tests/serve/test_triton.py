"""export-triton: every config.pbtxt parses with Triton's model-config protobuf; the BLS cascade logic matches the
deploykit cascade when each stage is a real ONNX Runtime session; and, where a ``tritonserver`` binary is found, a
real Triton server runs the ``--backend python`` repository over KServe v2 and gives deploykit's answers."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from serve_helpers import free_port, rows

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


_SHIPPED = """
import importlib.abc, importlib.util, json, sys
import numpy as np, onnxruntime as ort


class NoDeploykit(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "deploykit":
            raise ImportError("deploykit is not installed in Triton's Python stub")


sys.meta_path.insert(0, NoDeploykit())
repo, out = sys.argv[1], sys.argv[2]
spec = importlib.util.spec_from_file_location("model", f"{repo}/tiny/1/model.py")
model = importlib.util.module_from_spec(spec)
spec.loader.exec_module(model)
cfg = json.load(open(f"{repo}/tiny/1/cascade.json"))
sessions = [ort.InferenceSession(f"{repo}/{s['model']}/1/model.onnx", providers=["CPUExecutionProvider"])
            for s in cfg["stages"]]
x = np.load(out)["x"]
got = model.run_cascade(x, [lambda f, n, s=s: dict(zip(n, s.run(n, f))) for s in sessions], cfg)
assert not [m for m in sys.modules if m.split(".")[0] == "deploykit"]
np.savez(out, x=x, exit_stage=got["exit_stage"], probs=got["probabilities"])
"""


def test_shipped_bls_model_runs_without_deploykit_using_the_shared_exit_step(calibrated, tmp_path):
    """The repository's model.py + exit_step.py (a copy of deploykit/runtime/exit_step.py) need only numpy."""
    from deploykit.runtime import exit_step
    from deploykit.runtime.cascade import Cascade

    export_triton(calibrated, tmp_path / "repo")
    here = tmp_path / "repo" / "tiny" / "1"
    assert (here / "exit_step.py").read_text() == Path(exit_step.__file__).read_text()
    x = rows(32, seed=5)
    np.savez(tmp_path / "io.npz", x=x)
    r = subprocess.run([sys.executable, "-c", _SHIPPED, str(tmp_path / "repo"), str(tmp_path / "io.npz")],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    got = np.load(tmp_path / "io.npz")
    with Cascade.from_dir(calibrated, threads=1) as c:
        want = c.run(x)
    assert len(set(want.exit_stage.tolist())) > 1
    np.testing.assert_array_equal(got["exit_stage"], want.exit_stage)
    np.testing.assert_allclose(got["probs"], want.probs, atol=1e-6)


def test_tensorrt_backend_needs_built_plans(calibrated, tmp_path):
    with pytest.raises(ConfigError, match="deploykit build"):
        export_triton(calibrated, tmp_path / "repo", backend="tensorrt")


def test_python_backend_repository(calibrated, tmp_path):
    repo = tmp_path / "repo"
    r = CliRunner().invoke(main, ["export-triton", str(calibrated), "-o", str(repo), "--backend", "python",
                                  "--threads", "2", "--max-batch-size", "16"])
    assert r.exit_code == 0, r.output
    m = Manifest.load(calibrated)
    for k, s in enumerate(m.stages):
        c = parse(repo / f"tiny_stage{k}" / "config.pbtxt")
        assert c.backend == "python" and not c.platform and c.max_batch_size == 16
        assert c.parameters["intra_op_threads"].string_value == "2"
        assert c.instance_group[0].kind == model_config_pb2.ModelInstanceGroup.KIND_CPU
        assert [i.name for i in c.input] == [t.name for t in s.inputs]
        assert {o.name for o in c.output} == {t.name for t in s.outputs} | {"logits", "score"}
        assert (repo / f"tiny_stage{k}" / "1" / "model.onnx").read_bytes() == m.path_of(s.file).read_bytes()
        src = (repo / f"tiny_stage{k}" / "1" / "model.py").read_text()
        assert "class TritonPythonModel" in src and "onnxruntime" in src
        compile(src, "model.py", "exec")
    assert parse(repo / "tiny" / "config.pbtxt").backend == "python"
    with pytest.raises(ConfigError, match="threads"):
        export_triton(calibrated, tmp_path / "repo2", backend="python", threads=0)


def test_python_stage_model_merges_and_splits_requests():
    from deploykit.serve import triton_stage

    a, b = rows(2, seed=1), rows(3, seed=2)
    merged, counts = triton_stage.merge_requests([{"image": a}, {"image": b}])
    assert counts == [2, 3] and merged["image"].flags.c_contiguous
    np.testing.assert_array_equal(merged["image"], np.concatenate([a, b]))
    parts = triton_stage.split_outputs({"score": np.arange(5.0)}, counts)
    assert [p["score"].tolist() for p in parts] == [[0.0, 1.0], [2.0, 3.0, 4.0]]


# ---- a real tritonserver ---------------------------------------------------------------------------------------
_PROBE = r"""
import importlib.util, json, sys, sysconfig
from pathlib import Path
def version(mod):
    try:
        return __import__(mod).__version__
    except Exception:
        return None
spec = importlib.util.find_spec("pytriton")
print(json.dumps({"python": "%d.%d" % sys.version_info[:2], "libdir": sysconfig.get_config_var("LIBDIR"),
                  "bin": str(Path(sys.executable).parent), "numpy": version("numpy"),
                  "onnxruntime": version("onnxruntime"),
                  "pytriton": str(Path(spec.origin).parent) if spec and spec.origin else None}))
"""
_HOW = ("run `bash scripts/test-triton.sh`, which pip installs nvidia-pytriton onnxruntime 'numpy<2' into .venv/triton "
        "(PyTriton's Python-backend stub needs numpy<2) and sets DEPLOYKIT_TRITON_PYTHON=.venv/triton/bin/python; or "
        "set DEPLOYKIT_TRITONSERVER to a tritonserver binary with a Python backend")


def _triton_env(tmp: Path) -> tuple[list[str], dict[str, str]]:
    """The tritonserver binary and its environment: the Python backend runs ``DEPLOYKIT_TRITON_PYTHON`` (default:
    this interpreter), which needs numpy and onnxruntime. Skips with the reason when something is missing."""
    python = os.environ.get("DEPLOYKIT_TRITON_PYTHON") or sys.executable
    probe = json.loads(subprocess.run([python, "-c", _PROBE], check=True, capture_output=True, text=True).stdout)
    binary = os.environ.get("DEPLOYKIT_TRITONSERVER") or shutil.which("tritonserver")
    if not binary and probe["pytriton"]:
        binary = str(Path(probe["pytriton"]) / "tritonserver" / "bin" / "tritonserver")
    if os.environ.get("DEPLOYKIT_TRITONSERVER") and not os.access(binary, os.X_OK):
        pytest.fail(f"DEPLOYKIT_TRITONSERVER={binary} is not an executable file")
    if not binary or not os.access(binary, os.X_OK):
        pytest.skip(f"no tritonserver binary ({binary or 'none found'}): {_HOW}")
    if not probe["onnxruntime"] or not probe["numpy"]:
        pytest.skip(f"the Python backend's interpreter {python} lacks numpy/onnxruntime: {_HOW}")
    root = Path(binary).resolve().parent.parent
    backends = root / "backends"
    stub = root / "python_backend_stubs" / probe["python"] / "triton_python_backend_stub"
    libs = [probe["libdir"]] if probe["libdir"] else []  # the stub links libpython3.X.so of that interpreter
    if (root / "python_backend_stubs").is_dir():  # PyTriton's layout: put the stub for this Python by the backend
        if not stub.exists():
            pytest.skip(f"{root} has no Python-backend stub for Python {probe['python']}")
        if int(probe["numpy"].split(".")[0]) >= 2:
            pytest.skip(f"{python} has numpy {probe['numpy']}; PyTriton's stub reads numpy 2 arrays as empty: {_HOW}")
        backends = tmp / "backends"
        shutil.copytree(root / "backends" / "python", backends / "python")
        shutil.copy(stub, backends / "python" / "triton_python_backend_stub")
        libs.append(str(root.parent.parent / "nvidia_pytriton.libs"))  # the stub's bundled libraries
    if not (backends / "python" / "libtriton_python.so").exists():
        pytest.skip(f"{binary} has no Python backend under {backends}")
    env = dict(os.environ, OMP_NUM_THREADS="1", PATH=probe["bin"] + os.pathsep + os.environ.get("PATH", ""),
               LD_LIBRARY_PATH=os.pathsep.join([*libs, os.environ.get("LD_LIBRARY_PATH", "")]).rstrip(os.pathsep))
    return [binary, "--backend-directory", str(backends)], env


def test_real_tritonserver_runs_the_python_backend_repository(calibrated, tmp_path):
    httpclient = pytest.importorskip("tritonclient.http", reason="needs tritonclient[http]")
    from deploykit.runtime.cascade import Cascade

    cmd, env = _triton_env(tmp_path)
    repo = tmp_path / "repo"
    summary = export_triton(calibrated, repo, backend="python", max_batch_size=16, max_queue_delay_us=2000,
                            instances=5)
    port = free_port()
    cmd += ["--model-repository", str(repo), "--http-address", "127.0.0.1", "--http-port", str(port),
            "--allow-grpc", "false", "--allow-metrics", "false", "--allow-sagemaker", "false",
            "--allow-vertex-ai", "false", "--pinned-memory-pool-byte-size", "0", "--exit-on-error", "true"]
    log = tmp_path / "tritonserver.log"
    with open(log, "wb") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    client = None
    try:
        client = httpclient.InferenceServerClient(f"127.0.0.1:{port}")
        deadline = time.time() + 60
        while True:
            assert proc.poll() is None, f"tritonserver exited {proc.returncode}:\n{log.read_text()[-4000:]}"
            try:
                if client.is_server_ready() and client.is_model_ready("tiny"):
                    break
            except Exception:
                pass
            assert time.time() < deadline, f"tritonserver not ready in 60 s:\n{log.read_text()[-4000:]}"
            time.sleep(0.25)
        meta = client.get_model_metadata("tiny")
        assert [o["name"] for o in meta["outputs"]] == ["probabilities", "exit_stage", "score", "class_index"]

        def request(x):
            inp = httpclient.InferInput("image", list(x.shape), "FP32")
            inp.set_data_from_numpy(x, binary_data=True)
            return [inp]

        x = rows(48, seed=5)
        results = [client.infer("tiny", request(x[lo:hi])) for lo, hi in [(0, 1), (1, 8), (8, 24)]]

        def one_row(i):
            with httpclient.InferenceServerClient(f"127.0.0.1:{port}") as c:
                return c.infer("tiny", request(x[i:i + 1]))

        with ThreadPoolExecutor(8) as pool:  # concurrent one-row requests: Triton's dynamic batcher merges them
            results += list(pool.map(one_row, range(24, 48)))
        got = {k: np.concatenate([r.as_numpy(k) for r in results]) for k in
               ["probabilities", "exit_stage", "score", "class_index"]}
        with Cascade.from_dir(calibrated, threads=1) as c:
            want = c.run(x)
        assert len(set(want.exit_stage.tolist())) > 1  # the thresholds really split the batch
        np.testing.assert_array_equal(got["exit_stage"].reshape(-1), want.exit_stage)
        np.testing.assert_array_equal(got["class_index"].reshape(-1), want.labels_idx)
        np.testing.assert_allclose(got["probabilities"], want.probs, atol=1e-6)
        np.testing.assert_allclose(got["score"].reshape(-1), want.score, atol=1e-6)
        # batch compaction: stage k ran exactly the rows that had not exited before it
        stats = {s["name"]: s for s in client.get_inference_statistics()["model_stats"]}
        assert int(stats["tiny"]["inference_count"]) == 48
        for k, model in enumerate(summary["stage_models"]):
            assert int(stats[model]["inference_count"]) == int((want.exit_stage >= k).sum()), model
        counts = {n: (int(v["inference_count"]), int(v["execution_count"])) for n, v in stats.items()}
        assert counts["tiny"][1] < 27, counts  # the 24 concurrent requests were not all run one by one
        cfg = client.get_model_config("tiny_stage0")
        assert int(cfg["instance_group"][0]["count"]) == summary["instances"][0]
        with pytest.raises(Exception, match="unexpected shape for input 'image'"):  # Triton checks the dims
            client.infer("tiny", request(rows(1)[:, :, :8]))
    finally:
        if client is not None:
            client.close()
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:  # its own session: the server and its Python-backend stubs
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
