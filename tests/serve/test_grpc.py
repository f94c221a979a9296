"""KServe v2 over gRPC with tritonclient.grpc unchanged: health, metadata, config, statistics, repository index,
ModelInfer (raw and typed contents, FP32 / BYTES / MuE), error codes, shared batcher and metrics with HTTP."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import pytest
from serve_helpers import ThreadServer, free_port, http, png_bytes, rows

grpcclient = pytest.importorskip("tritonclient.grpc", reason="needs tritonclient[grpc]")
grpc = pytest.importorskip("grpc")
from tritonclient.grpc import service_pb2 as pb  # noqa: E402
from tritonclient.grpc import service_pb2_grpc as pb_grpc  # noqa: E402
from tritonclient.utils import InferenceServerException  # noqa: E402

from deploykit.serve.app import ServeConfig, create_app  # noqa: E402


class Both:
    """One server, HTTP and gRPC ports."""

    def __init__(self, engine: Any, **cfg: Any) -> None:
        self.grpc_port = free_port()
        self.http = ThreadServer(create_app(engine, ServeConfig(grpc_port=self.grpc_port, **cfg)))

    def __enter__(self) -> Both:
        self.http.__enter__()
        self.url = self.http.url
        self.target = f"127.0.0.1:{self.grpc_port}"
        return self

    def __exit__(self, *exc: Any) -> None:
        self.http.__exit__(*exc)


@pytest.fixture(scope="module")
def both(cascade):
    with Both(cascade, max_batch_size=8, max_queue_delay_ms=20, max_queue=64, max_request_mb=1) as s:
        yield s


@pytest.fixture
def client(both):
    c = grpcclient.InferenceServerClient(url=both.target)
    yield c
    c.close()


def _code(e: InferenceServerException) -> str:
    return str(e.status())


def test_health_metadata_config_statistics_index(client):
    assert client.is_server_live() and client.is_server_ready() and client.is_model_ready("tiny")
    assert client.get_server_metadata(as_json=True)["name"] == "deploykit"
    meta = client.get_model_metadata("tiny", as_json=True)
    assert meta["inputs"][0] == {"name": "image", "datatype": "FP32", "shape": ["-1", "3", "16", "16"]}
    cfg = client.get_model_config("tiny", as_json=True)["config"]
    assert cfg["name"] == "tiny" and cfg["max_batch_size"] == 8 and cfg["input"][0]["dims"] == ["3", "16", "16"]
    assert client.get_model_repository_index(as_json=True)["models"] == [
        {"name": "tiny", "version": "1", "state": "READY"}]
    with pytest.raises(InferenceServerException) as e:
        client.get_model_metadata("nope")
    assert _code(e.value) == "StatusCode.NOT_FOUND" and "tiny" in e.value.message()
    with pytest.raises(InferenceServerException) as e:
        client.is_model_ready("tiny", model_version="7")
    assert _code(e.value) == "StatusCode.NOT_FOUND"


def test_infer_matches_cascade_and_shares_metrics_with_http(client, both, cascade):
    before = client.get_inference_statistics("tiny", as_json=True)["model_stats"][0]
    x = rows(5, seed=11)
    inp = grpcclient.InferInput("image", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    res = client.infer("tiny", [inp], request_id="g1")
    np.testing.assert_allclose(res.as_numpy("probabilities"), cascade.run(x).probs, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(res.as_numpy("exit_stage"), cascade.run(x).exit_stage)
    assert res.get_response().id == "g1"
    assert [v.decode() for v in res.as_numpy("label")] == [f"class_{i}" for i in cascade.run(x).probs.argmax(1)]
    outs = [grpcclient.InferRequestedOutput("exit_stage"), grpcclient.InferRequestedOutput("score")]
    res = client.infer("tiny", [inp], outputs=outs, parameters={"exit_threshold": 0.0})
    assert (res.as_numpy("exit_stage") == 0).all() and res.as_numpy("probabilities") is None
    res = client.infer("tiny", [inp], parameters={"exit_thresholds": "[null, 0.0, null, null]"})
    assert (res.as_numpy("exit_stage") == 1).all()
    files = grpcclient.InferInput("image_bytes", [2], "BYTES")
    files.set_data_from_numpy(np.array([png_bytes(1), png_bytes(2)], dtype=object))
    assert client.infer("tiny", [files]).as_numpy("probabilities").shape == (2, 10)
    after = client.get_inference_statistics("tiny", as_json=True)["model_stats"][0]
    assert int(after["inference_count"]) - int(before.get("inference_count", 0)) == 17
    text = http(both.url + "/metrics")[2].decode()
    assert 'deploykit_requests_total{code="200",model="tiny",outcome="success"}' in text


def test_typed_contents_and_concurrent_batching(both, cascade):
    """A client that sends fp32_contents instead of raw bytes; concurrent gRPC + HTTP requests share batches."""
    x = rows(2, seed=12)
    with grpc.insecure_channel(both.target) as ch:
        stub = pb_grpc.GRPCInferenceServiceStub(ch)
        req = pb.ModelInferRequest(model_name="tiny")
        t = req.inputs.add(name="image", datatype="FP32", shape=[2, 3, 16, 16])
        t.contents.fp32_contents.extend(x.ravel().tolist())
        resp = stub.ModelInfer(req)
        names = [o.name for o in resp.outputs]
        probs = np.frombuffer(resp.raw_output_contents[names.index("probabilities")], "<f4").reshape(2, 10)
        np.testing.assert_allclose(probs, cascade.run(x).probs, rtol=1e-5, atol=1e-6)

    def one_grpc(i: int) -> np.ndarray:
        c = grpcclient.InferenceServerClient(url=both.target)
        inp = grpcclient.InferInput("image", [1, 3, 16, 16], "FP32")
        inp.set_data_from_numpy(rows(1, seed=100 + i))
        out = c.infer("tiny", [inp]).as_numpy("probabilities")
        c.close()
        return out

    def one_http(i: int) -> np.ndarray:
        from serve_helpers import fp32_request, outputs

        return outputs(http(both.url + "/v2/models/tiny/infer", fp32_request(rows(1, seed=200 + i)))[2])[
            "probabilities"]

    batches = lambda: sum(float(ln.rsplit(" ", 1)[1]) for ln in http(both.url + "/metrics")[2].decode().splitlines()  # noqa: E731
                          if ln.startswith("deploykit_batches_total{"))
    before = batches()
    with ThreadPoolExecutor(16) as ex:
        g = list(ex.map(one_grpc, range(8)))
        h = list(ex.map(one_http, range(8)))
    for i, p in enumerate(g):
        np.testing.assert_allclose(p, cascade.run(rows(1, seed=100 + i)).probs, rtol=1e-4, atol=1e-5)
    for i, p in enumerate(h):
        np.testing.assert_allclose(p, cascade.run(rows(1, seed=200 + i)).probs, rtol=1e-4, atol=1e-5)
    assert batches() - before < 16  # requests were batched together


def test_errors_map_to_grpc_status_codes(client, both):
    bad = grpcclient.InferInput("image", [1, 3, 8, 8], "FP32")
    bad.set_data_from_numpy(np.zeros((1, 3, 8, 8), np.float32))
    with pytest.raises(InferenceServerException) as e:
        client.infer("tiny", [bad])
    assert _code(e.value) == "StatusCode.INVALID_ARGUMENT" and "expected [B,3,16,16]" in e.value.message()
    inp = grpcclient.InferInput("image", [1, 3, 16, 16], "FP32")
    inp.set_data_from_numpy(rows(1))
    with pytest.raises(InferenceServerException) as e:
        client.infer("nope", [inp])
    assert _code(e.value) == "StatusCode.NOT_FOUND"
    with pytest.raises(InferenceServerException) as e:
        client.infer("tiny", [inp], parameters={"exit_threshold": 3.0})
    assert _code(e.value) == "StatusCode.INVALID_ARGUMENT" and "[0, 1]" in e.value.message()
    big = grpcclient.InferInput("image", [400, 3, 16, 16], "FP32")  # 1.2 MB of tensors: over the 1 MB limit
    big.set_data_from_numpy(rows(400))
    with pytest.raises(InferenceServerException) as e:
        client.infer("tiny", [big])
    assert _code(e.value) == "StatusCode.RESOURCE_EXHAUSTED"
    deep = "[" * 5000 + "]" * 5000  # hostile: JSON text in a string parameter, nested far past the limit
    with pytest.raises(InferenceServerException) as e:
        client.infer("tiny", [inp], parameters={"exit_thresholds": deep})
    assert _code(e.value) == "StatusCode.INVALID_ARGUMENT" and "nested" in e.value.message()
    assert client.is_server_live()


class _Slow:
    def __init__(self, cascade: Any, delay_s: float) -> None:
        self.cascade, self.manifest, self.delay_s = cascade, cascade.manifest, delay_s

    def run(self, x: np.ndarray, thresholds: Any = None) -> Any:
        time.sleep(self.delay_s)
        return self.cascade.run(x, thresholds)


def test_overload_is_resource_exhausted_with_retry_hint_and_draining_unavailable(cascade):
    with Both(_Slow(cascade, 0.3), max_batch_size=1, max_queue_delay_ms=0, max_queue=2) as s:
        def one(i: int) -> Any:
            with grpc.insecure_channel(s.target) as ch:
                req = pb.ModelInferRequest(model_name="tiny")
                req.inputs.add(name="image", datatype="FP32", shape=[1, 3, 16, 16])
                req.raw_input_contents.append(rows(1, seed=i).tobytes())
                try:
                    pb_grpc.GRPCInferenceServiceStub(ch).ModelInfer(req)
                    return "OK", {}, ""
                except grpc.RpcError as e:
                    return e.code().name, dict(e.trailing_metadata() or ()), e.details()

        with ThreadPoolExecutor(10) as ex:
            results = list(ex.map(one, range(10)))
        codes = [c for c, _, _ in results]
        assert set(codes) == {"OK", "RESOURCE_EXHAUSTED"}, codes
        for code, meta, details in results:
            if code == "RESOURCE_EXHAUSTED":
                assert meta["grpc-retry-pushback-ms"] == "1000" and "retry after 1 s" in details
        s.http.server.should_exit = True  # SIGTERM's path: the batcher drains and refuses new work
        deadline = time.time() + 10
        seen = set()
        while time.time() < deadline and s.http.thread.is_alive():
            seen.add(one(99)[0])
            if "UNAVAILABLE" in seen:
                break
        assert "UNAVAILABLE" in seen, seen


def test_mue_over_grpc_answers_as_predict(mue_engine_dir, mue_inputs):
    from deploykit.runtime.generation import MuEEngine, predict_vl

    files, texts = mue_inputs["files"][:3], mue_inputs["texts"][:3]
    want = predict_vl(mue_engine_dir, mue_inputs["paths"][:3], texts, "entailment")
    with MuEEngine.from_dir(mue_engine_dir, threads=1) as engine, Both(engine, max_batch_size=8) as s:
        c = grpcclient.InferenceServerClient(url=s.target)
        img = grpcclient.InferInput("image_bytes", [3], "BYTES")
        img.set_data_from_numpy(np.array(files, dtype=object))
        txt = grpcclient.InferInput("text", [3], "BYTES")
        txt.set_data_from_numpy(np.array([t.encode() for t in texts], dtype=object))
        res = c.infer("tiny-mue", [img, txt], parameters={"task": "entailment"})
        assert [v.decode() for v in res.as_numpy("text")] == [w["answer"] for w in want]
        assert res.as_numpy("image_layers").tolist() == [w["image_layers"] for w in want]
        assert res.get_response().parameters["task"].string_param == "entailment"
        with pytest.raises(InferenceServerException) as e:
            c.infer("tiny-mue", [img, txt])
        assert _code(e.value) == "StatusCode.INVALID_ARGUMENT" and "parameters.task" in e.value.message()
        c.close()


def test_malformed_grpc_requests_are_invalid_argument(both):
    with grpc.insecure_channel(both.target) as ch:
        stub = pb_grpc.GRPCInferenceServiceStub(ch)

        def call(req: Any) -> tuple[str, str]:
            try:
                stub.ModelInfer(req)
                return "OK", ""
            except grpc.RpcError as e:
                return e.code().name, e.details()

        req = pb.ModelInferRequest(model_name="tiny")  # two raw contents for one input
        req.inputs.add(name="image", datatype="FP32", shape=[1, 3, 16, 16])
        req.raw_input_contents.extend([rows(1).tobytes(), b"x"])
        assert call(req) == ("INVALID_ARGUMENT", "2 raw_input_contents for 1 inputs; send one per input, in order")
        req = pb.ModelInferRequest(model_name="tiny")  # raw bytes too short for the shape
        req.inputs.add(name="image", datatype="FP32", shape=[1, 3, 16, 16])
        req.raw_input_contents.append(b"\0" * 100)
        code, msg = call(req)  # refused by the element-count limit (serve/limits.py) before the byte check
        assert code == "INVALID_ARGUMENT" and "needs 768 values" in msg
        req = pb.ModelInferRequest(model_name="tiny")  # typed BYTES contents: an undecodable image
        t = req.inputs.add(name="image_bytes", datatype="BYTES", shape=[1])
        t.contents.bytes_contents.append(b"not an image")
        code, msg = call(req)
        assert code == "INVALID_ARGUMENT" and "row 0" in msg
        req = pb.ModelInferRequest(model_name="tiny")  # exit_thresholds must be JSON text
        req.inputs.add(name="image", datatype="FP32", shape=[1, 3, 16, 16])
        req.raw_input_contents.append(rows(1).tobytes())
        req.parameters["exit_thresholds"].string_param = "[0.5,"
        code, msg = call(req)
        assert code == "INVALID_ARGUMENT" and "JSON list" in msg
        req = pb.ModelInferRequest(model_name="tiny")  # no inputs at all
        code, msg = call(req)
        assert code == "INVALID_ARGUMENT" and "exactly one input" in msg
        req = pb.ModelInferRequest(model_name="tiny")  # a datatype without typed contents here
        req.inputs.add(name="image", datatype="FP16", shape=[1, 3, 16, 16])
        code, msg = call(req)
        assert code == "INVALID_ARGUMENT" and "raw_input_contents" in msg
