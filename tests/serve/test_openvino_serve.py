"""serve-local and serve-ray with ``--backend openvino``: real servers on 127.0.0.1, answers equal to the offline
ONNX Runtime cascade."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from serve_helpers import fp32_request, free_port, http, outputs, rows, wait_ready

pytest.importorskip("openvino", reason="openvino is not installed (pip install 'deploykit[openvino]')")

from deploykit.cli import main  # noqa: E402
from deploykit.runtime.cascade import Cascade  # noqa: E402

THRESHOLDS = [0.2, 0.18, 0.15, None]  # the untrained tiny engine's max-softmax scores sit around 0.1-0.3


def _check(out: dict[str, np.ndarray], ref, x: np.ndarray) -> None:
    np.testing.assert_array_equal(out["exit_stage"], ref.exit_stage)
    np.testing.assert_allclose(out["probabilities"], ref.probs, rtol=1e-4, atol=1e-5)


def test_serve_local_cli_openvino_two_instances(engine_dir: Path) -> None:
    x = rows(24, seed=3)
    with Cascade.from_dir(engine_dir, threads=1) as c:
        ref = c.run(x, thresholds=THRESHOLDS)
    port = free_port()
    env = {**os.environ, "PYTHONPATH": os.environ.get("PYTHONPATH", str(Path(__file__).parents[2]))}
    proc = subprocess.Popen([sys.executable, "-m", "deploykit", "serve-local", str(engine_dir), "--backend",
                             "openvino", "--port", str(port), "--instances", "2", "--threads", "1"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url, proc, 120, poll_s=0.5)
        name = "tiny"  # the serve conftest exports the engine under this name
        code, _, body = http(f"{url}/v2/models/{name}/infer", fp32_request(x, exit_thresholds=THRESHOLDS))
        assert code == 200, body
        _check(outputs(body), ref, x)
    finally:
        proc.terminate()
        proc.wait(timeout=60)


def test_serve_ray_refuses_non_cpu_backend(engine_dir: Path) -> None:
    r = CliRunner().invoke(main, ["serve-ray", str(engine_dir), "--backend", "trt"])
    assert r.exit_code == 2 and "'trt' is not one of" in r.output


def test_serve_ray_openvino_stage_replicas(engine_dir: Path) -> None:
    ray = pytest.importorskip("ray", reason="needs the ray extra: pip install 'deploykit[ray]'")
    try:
        from ray import serve
    except Exception as e:  # noqa: BLE001  (a protobuf clash raises at import)
        pytest.skip(f"ray.serve can't be imported here ({type(e).__name__})")
    from deploykit.serve.ray_app import RayConfig, connect, deploy

    x = rows(20, seed=4)
    with Cascade.from_dir(engine_dir, threads=1) as c:
        ref = c.run(x, thresholds=THRESHOLDS)
    connect("local", num_cpus=2)
    try:
        info = deploy(engine_dir, RayConfig(replicas=[1, 1, 1, 1], max_batch_size=8, replica_cpus=0.1,
                                            backend="openvino"), port=free_port())
        code, _, body = http(f"{info['url']}/v2/models/tiny/infer", fp32_request(x, exit_thresholds=THRESHOLDS),
                             timeout=120)
        assert code == 200, body
        _check(outputs(body), ref, x)
    finally:
        serve.shutdown()
        ray.shutdown()
