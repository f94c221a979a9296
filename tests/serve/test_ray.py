"""serve-ray on a real local Ray cluster (127.0.0.1): KServe v2 answers identical to serve-local and the offline
cascade on the digits test split, and per-stage replica counts that follow the sizing rule."""

from __future__ import annotations

import json
import shutil
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from serve_helpers import ThreadServer, error, fp32_request, free_port, http, outputs

ray = pytest.importorskip("ray", reason="needs the ray extra: pip install 'deploykit[ray]'")
try:  # a ray whose protobuf clashes with another package's raises at import, not ImportError
    from ray import serve
except Exception as e:  # noqa: BLE001
    pytest.skip(f"ray.serve can't be imported here ({type(e).__name__}: {str(e)[:120]})", allow_module_level=True)

from deploykit.manifest import Manifest  # noqa: E402
from deploykit.serve.sizing import replica_split  # noqa: E402


@pytest.fixture(scope="module")
def calibrated_digits(trained_engine, tmp_path_factory):
    from deploykit.tune.calibrate import calibrate

    d = tmp_path_factory.mktemp("ray") / "tiny-digits"
    shutil.copytree(trained_engine, d)
    calibrate(d, data="digits", max_drop=1.0, write=True)
    return d


@pytest.fixture(scope="module")
def digits_test(calibrated_digits):
    from deploykit.data import stack_split

    return stack_split("digits", "test", Manifest.load(calibrated_digits).preprocessing)


@pytest.fixture(scope="module")
def ray_server(calibrated_digits):
    from deploykit.serve.ray_app import RayConfig, connect, deploy

    connect("local", num_cpus=2)
    try:
        # the SLO is on but far away: the controller stays home, so answers must equal serve-local's
        # gRPC on: Ray's gRPC proxy listens on every interface, so deploy refuses it on a loopback --host; the
        # clients below still connect over 127.0.0.1
        port, grpc_port = free_port(), free_port()
        info = deploy(calibrated_digits, RayConfig(total_replicas=5, max_batch_size=16, max_queue_delay_ms=5,
                                                   replica_cpus=0.1, latency_slo_ms=60_000), host="0.0.0.0",
                      port=port, grpc_port=grpc_port)
        yield {**info, "url": f"http://127.0.0.1:{port}", "grpc": f"127.0.0.1:{grpc_port}"}
    finally:
        serve.shutdown()
        ray.shutdown()


def _infer_all(url: str, x: np.ndarray, chunk: int = 37) -> dict[str, np.ndarray]:
    """POST the rows in uneven chunks, concurrently, and stitch the answers back in order."""
    def one(lo: int) -> dict[str, np.ndarray]:
        code, _, body = http(url, fp32_request(x[lo:lo + chunk]), timeout=120)
        assert code == 200, body
        return outputs(body)

    with ThreadPoolExecutor(8) as pool:
        parts = list(pool.map(one, range(0, len(x), chunk)))
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def test_answers_match_serve_local_and_offline_cascade(ray_server, calibrated_digits, digits_test):
    from deploykit.runtime.cascade import Cascade
    from deploykit.serve.app import ServeConfig, create_app

    x, _ = digits_test
    name = Manifest.load(calibrated_digits).name
    ray_out = _infer_all(f"{ray_server['url']}/v2/models/{name}/infer", x)
    with Cascade.from_dir(calibrated_digits, threads=1) as cascade:
        ref = cascade.run(x)
        with ThreadServer(create_app(cascade, ServeConfig(max_batch_size=16))) as local:
            local_out = _infer_all(f"{local.url}/v2/models/{name}/infer", x)
    assert len(set(ref.exit_stage.tolist())) > 1  # calibrated: rows leave at several stages
    for out in (ray_out, local_out):
        np.testing.assert_array_equal(out["exit_stage"], ref.exit_stage)
        np.testing.assert_allclose(out["probabilities"], ref.probs, rtol=1e-5, atol=1e-5)
        np.testing.assert_array_equal(out["class_index"], ref.probs.argmax(1))
    assert list(ray_out["label"]) == list(local_out["label"])
    np.testing.assert_allclose(ray_out["probabilities"], local_out["probabilities"], rtol=1e-5, atol=1e-5)


def test_replica_counts_follow_sizing_rule(ray_server, calibrated_digits):
    m = Manifest.load(calibrated_digits)
    want = replica_split(m, 5)
    assert want[0] >= want[-1] and want == [o["num_replicas"] for o in ray_server["stages"]]
    deps = serve.status().applications[ray_server["app"]].deployments
    running = [sum(deps[f"stage{k}"].replica_states.values()) for k in range(m.num_stages)]
    assert running == want


def test_protocol_endpoints_and_errors(ray_server, calibrated_digits, digits_test):
    u = ray_server["url"]
    name = Manifest.load(calibrated_digits).name
    assert http(u + "/v2/health/ready")[0] == 200
    code, _, body = http(u + f"/v2/models/{name}")
    assert code == 200 and json.loads(body)["parameters"]["num_stages"] == 4
    code, _, body = http(u + "/v2/models/nope/infer", fp32_request(digits_test[0][:2]))
    assert code == 404 and name in error(body)
    code, _, body = http(u + f"/v2/models/{name}/infer", {"inputs": []})
    assert code == 400 and "exactly one input" in error(body)
    x = digits_test[0][:6]
    out = outputs(http(u + f"/v2/models/{name}/infer", fp32_request(x, exit_threshold=0.0))[2])
    assert (out["exit_stage"] == 0).all()
    out = outputs(http(u + f"/v2/models/{name}/infer", fp32_request(x, exit_thresholds=[None] * 4))[2])
    assert (out["exit_stage"] == 3).all()


def test_autoscale_options_keep_the_split(calibrated_digits):
    from deploykit.serve.ray_app import RayConfig, deployment_options

    m = Manifest.load(calibrated_digits)
    n = replica_split(m, 8)
    opts = deployment_options(m, RayConfig(total_replicas=8, autoscale=True))
    assert [o["autoscaling_config"]["initial_replicas"] for o in opts] == n
    assert [o["autoscaling_config"]["max_replicas"] for o in opts] == [2 * v for v in n]
    assert all("num_replicas" not in o for o in opts)


def test_operating_point_in_responses_and_metrics(ray_server, calibrated_digits, digits_test):
    u = ray_server["url"]
    name = Manifest.load(calibrated_digits).name
    code, _, body = http(u + f"/v2/models/{name}/infer", fp32_request(digits_test[0][:4]))
    assert code == 200
    params = json.loads(body)["parameters"]
    from deploykit.serve.adaptive import AdaptiveController

    home = AdaptiveController.from_manifest(Manifest.load(calibrated_digits), 60_000).ladder[0]
    assert params["operating_point"] == 0 and params["expected_accuracy"] == home.expected_accuracy is not None
    text = http(u + "/metrics")[2].decode()
    assert f'deploykit_operating_point{{model="{name}"}} 0.0' in text
    assert 'deploykit_requests_total{code="200"' in text
    exits = [float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith("deploykit_exits_total{")]
    assert len(exits) == 4 and sum(exits) >= 4


class _OrtStage:
    """A stage deployment's handle, minus Ray: ``remote`` runs the stage graph in a real ORT session."""

    def __init__(self, path, outputs):
        from deploykit.backends.ort import OrtRunner

        self.runner, self.outputs = OrtRunner(path, threads=1).load(), outputs

    async def remote(self, feeds):
        import asyncio

        return await asyncio.to_thread(self.runner.run, feeds, self.outputs)


def test_ingress_moves_to_earlier_exits_when_latency_nears_the_slo(calibrated_digits, digits_test):
    """The ingress's controller wiring over real HTTP and real stage sessions: an SLO no cascade can meet drives
    it down the calibrated ladder, and responses and /metrics say where it is."""
    from starlette.requests import Request

    from deploykit.serve.ray_app import Ingress

    m = Manifest.load(calibrated_digits)
    m.exit_policy.thresholds = [None] * m.num_stages  # home = full depth, so the calibrated curve lies below it
    last = m.num_stages - 1
    stages = [_OrtStage(m.path_of(s.file), ([] if k == last else [t.name for t in s.outputs])
                        + [s.exit_logits, s.exit_score]) for k, s in enumerate(m.stages)]
    ingress = Ingress(m.to_dict(), stages, 16, 1.0, latency_slo_ms=0.001)

    async def app(scope, receive, send):
        if scope["type"] == "http":
            response = await ingress(Request(scope, receive))
            await response(scope, receive, send)

    url = None
    with ThreadServer(app) as s:
        url = s.url + f"/v2/models/{m.name}/infer"
        levels = []
        for i in range(120):  # until the cheapest rung (a loaded machine adapts more slowly)
            j = i % (len(digits_test[0]) // 4)
            code, _, body = http(url, fp32_request(digits_test[0][j * 4:(j + 1) * 4]))
            assert code == 200
            levels.append(json.loads(body)["parameters"]["operating_point"])
            if levels[-1] == len(ingress.adaptive.ladder) - 1:
                break
            time.sleep(0.05)
        text = http(s.url + "/metrics")[2].decode()
    assert len(ingress.adaptive.ladder) > 1 and levels[0] == 0
    assert levels[-1] == len(ingress.adaptive.ladder) - 1, levels  # reached the cheapest rung
    assert levels == sorted(levels)  # only down while the SLO can't be met
    assert 'deploykit_operating_point_changes_total{direction="down"' in text


def test_kserve_grpc_on_ray_serve_answers_as_http(ray_server, calibrated_digits, digits_test):
    """tritonclient.grpc, unchanged, against Ray Serve's gRPC proxy: the same service and answers as over HTTP."""
    grpcclient = pytest.importorskip("tritonclient.grpc", reason="needs tritonclient[grpc]")
    from tritonclient.utils import InferenceServerException

    name = Manifest.load(calibrated_digits).name
    x, _ = digits_test
    client = grpcclient.InferenceServerClient(ray_server["grpc"])
    try:
        assert client.is_server_live() and client.is_server_ready() and client.is_model_ready(name)
        assert client.get_model_metadata(name, as_json=True)["inputs"][0]["datatype"] == "FP32"
        assert client.get_model_config(name, as_json=True)["config"]["max_batch_size"] == 16
        inp = grpcclient.InferInput("image", list(x[:24].shape), "FP32")
        inp.set_data_from_numpy(x[:24])
        res = client.infer(name, [inp], request_id="r1")
        via_http = _infer_all(f"{ray_server['url']}/v2/models/{name}/infer", x[:24], chunk=24)
        np.testing.assert_array_equal(res.as_numpy("exit_stage"), via_http["exit_stage"])
        np.testing.assert_allclose(res.as_numpy("probabilities"), via_http["probabilities"], atol=1e-6)
        assert res.get_response().id == "r1"
        bad = grpcclient.InferInput("image", [1, 3, 8, 8], "FP32")
        bad.set_data_from_numpy(np.zeros((1, 3, 8, 8), np.float32))
        with pytest.raises(InferenceServerException) as e:
            client.infer(name, [bad])
        assert str(e.value.status()) == "StatusCode.INVALID_ARGUMENT" and "expected [B," in e.value.message()
        with pytest.raises(InferenceServerException) as e:
            client.infer("nope", [inp])
        assert str(e.value.status()) == "StatusCode.NOT_FOUND"
    finally:
        client.close()


def test_grpc_on_a_loopback_host_is_refused_before_ray_starts(calibrated_digits):
    """Ray's gRPC proxy binds every interface: with the default --host the CLI says so and exits 2 (checked in
    ``serve_ray`` before ``connect``, so no cluster is started for a refused command)."""
    from click.testing import CliRunner

    from deploykit.cli import main

    r = CliRunner().invoke(main, ["serve-ray", str(calibrated_digits), "--grpc-port", str(free_port())])
    assert r.exit_code == 2 and "--host 0.0.0.0" in r.output and "Traceback" not in r.output, r.output


def test_busy_ports_are_refused_before_ray_starts(calibrated_digits):
    """A port another process listens on is a one-line error, not Ray's proxy failing with a traceback later."""
    import socket

    from click.testing import CliRunner

    from deploykit.cli import main

    with socket.socket(socket.AF_INET6) as held:
        held.bind(("::", 0))
        held.listen()
        busy = held.getsockname()[1]
        for args, what in ((["--port", str(busy)], "can't listen on"),
                           (["--host", "0.0.0.0", "--port", str(free_port()), "--grpc-port", str(busy)],
                            f"--grpc-port {busy}: can't bind")):
            r = CliRunner().invoke(main, ["serve-ray", str(calibrated_digits), *args])
            assert r.exit_code == 2 and what in r.output and r.output.count("\n") == 1, r.output
