"""``deploykit serve-ray`` as a user runs it (docs/scaling.md): a child process with its own local Ray cluster,
answering KServe v2 over HTTP and over gRPC with the offline cascade's answers, and stopping cleanly on SIGINT."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import numpy as np
import pytest
from serve_helpers import fp32_request, free_port, http, outputs, wait_ready

pytest.importorskip("ray", reason="needs the ray extra: pip install 'deploykit[ray]'")
grpcclient = pytest.importorskip("tritonclient.grpc", reason="needs tritonclient[grpc]")

from deploykit.manifest import Manifest  # noqa: E402


@pytest.fixture(scope="module")
def ray_cli(trained_engine):
    port, grpc_port = free_port(), free_port()
    # --host 0.0.0.0: Ray's gRPC proxy binds every interface, so serve-ray wants that said; clients use 127.0.0.1
    cmd = [sys.executable, "-m", "deploykit", "serve-ray", str(trained_engine), "--host", "0.0.0.0", "--port",
           str(port), "--grpc-port", str(grpc_port), "--total-replicas", "4", "--replica-cpus", "0.1",
           "--max-batch-size", "16"]
    proc = subprocess.Popen(cmd, env=dict(os.environ, OMP_NUM_THREADS="1", RAY_USAGE_STATS_ENABLED="0"),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    wait_ready(url, proc, 180, poll_s=0.5)
    yield {"proc": proc, "url": url, "grpc": f"127.0.0.1:{grpc_port}"}
    if proc.poll() is None:
        proc.kill()
        proc.wait()


def test_serve_ray_cli_answers_http_and_grpc_then_stops_on_sigint(ray_cli, trained_engine):
    from deploykit.data import stack_split
    from deploykit.runtime.cascade import Cascade

    m = Manifest.load(trained_engine)
    x, _ = stack_split("digits", "test", m.preprocessing, limit=40)
    with Cascade.from_dir(trained_engine, threads=1) as cascade:
        ref = cascade.run(x)
    code, _, body = http(f"{ray_cli['url']}/v2/models/{m.name}/infer", fp32_request(x), timeout=120)
    assert code == 200, body
    np.testing.assert_array_equal(outputs(body)["exit_stage"], ref.exit_stage)

    client = grpcclient.InferenceServerClient(ray_cli["grpc"])
    try:
        assert client.is_server_ready() and client.is_model_ready(m.name)
        inp = grpcclient.InferInput(m.input_spec.name, list(x.shape), "FP32")
        inp.set_data_from_numpy(x)
        res = client.infer(m.name, [inp])
        np.testing.assert_array_equal(res.as_numpy("exit_stage"), ref.exit_stage)
        np.testing.assert_allclose(res.as_numpy("probabilities"), ref.probs, atol=1e-5)
    finally:
        client.close()

    proc = ray_cli["proc"]
    proc.send_signal(signal.SIGINT)
    out = proc.communicate(timeout=120)[0].decode()
    assert proc.returncode == 0, out[-3000:]
    assert "gRPC on" in out and "Traceback" not in out, out[-3000:]
