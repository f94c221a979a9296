"""KServe v2 / Triton optional endpoints over HTTP with tritonclient.http unchanged: model config, statistics,
repository index; gzip / deflate request bodies (limits on the decompressed size); FP16 and UINT8 inputs."""

from __future__ import annotations

import gzip
import json
import zlib

import numpy as np
import pytest
from serve_helpers import error, fp32_request, http, outputs, rows

httpclient = pytest.importorskip("tritonclient.http", reason="tritonclient[http] not installed")


@pytest.fixture
def client(server):
    c = httpclient.InferenceServerClient(url=server.url.removeprefix("http://"))
    yield c
    c.close()


def test_model_config_statistics_and_repository_index(client, server):
    model_config_pb2 = pytest.importorskip("tritonclient.grpc.model_config_pb2")
    from google.protobuf import json_format

    cfg = client.get_model_config("tiny")
    assert cfg["name"] == "tiny" and cfg["max_batch_size"] == 8
    assert cfg["input"][0] == {"name": "image", "data_type": "TYPE_FP32", "dims": [3, 16, 16]}
    assert {o["name"]: o["dims"] for o in cfg["output"]}["probabilities"] == [10]
    assert cfg["dynamic_batching"]["max_queue_delay_microseconds"] == 20000
    json_format.ParseDict(cfg, model_config_pb2.ModelConfig())  # a valid Triton model configuration
    assert client.get_model_config("tiny", model_version="1")["name"] == "tiny"

    before = client.get_inference_statistics("tiny")["model_stats"][0]
    for n in (3, 2):
        inp = httpclient.InferInput("image", [n, 3, 16, 16], "FP32")
        inp.set_data_from_numpy(rows(n, seed=n))
        client.infer("tiny", [inp])
    after = client.get_inference_statistics("tiny")["model_stats"][0]
    assert after["name"] == "tiny" and after["version"] == "1"
    assert after["inference_count"] - before["inference_count"] == 5
    assert after["inference_stats"]["success"]["count"] - before["inference_stats"]["success"]["count"] == 2
    assert after["execution_count"] > before["execution_count"] and after["last_inference"] > 0
    assert after["inference_stats"]["compute_infer"]["ns"] > before["inference_stats"]["compute_infer"]["ns"]
    assert client.get_inference_statistics()["model_stats"][0]["name"] == "tiny"  # GET /v2/models/stats
    assert client.get_model_repository_index() == [{"name": "tiny", "version": "1", "state": "READY"}]
    code, _, body = http(server.url + "/v2/models/nope/config")
    assert code == 404 and "tiny" in error(body)


@pytest.mark.parametrize("algorithm", ["gzip", "deflate"])
def test_compressed_request_bodies(client, cascade, algorithm):
    x = rows(4, seed=7)
    for binary in (True, False):
        inp = httpclient.InferInput("image", list(x.shape), "FP32")
        inp.set_data_from_numpy(x, binary_data=binary)
        res = client.infer("tiny", [inp], request_compression_algorithm=algorithm)
        np.testing.assert_allclose(res.as_numpy("probabilities"), cascade.run(x).probs, rtol=1e-5, atol=1e-6)


def test_compressed_body_errors(server):
    url = server.url + "/v2/models/tiny/infer"
    body = json.dumps(fp32_request(rows(1))).encode()
    code, _, resp = http(url, gzip.compress(body)[:-20], {"content-encoding": "gzip"})
    assert code == 400 and ("truncated" in error(resp) or "corrupt" in error(resp))
    code, _, resp = http(url, b"not gzip at all", {"content-encoding": "gzip"})
    assert code == 400 and "corrupt" in error(resp)
    bomb = zlib.compress(b" " * (3 * 1024 * 1024))  # 3 MB of JSON whitespace in ~3 kB: over the 1 MB limit
    code, _, resp = http(url, bomb, {"content-encoding": "deflate"})
    assert code == 413 and "decompressed" in error(resp)
    code, _, resp = http(url, body, {"content-encoding": "br"})
    assert code == 415 and "gzip" in error(resp)
    assert http(server.url + "/v2/health/live")[0] == 200


def test_fp16_and_uint8_inputs(client, cascade, server):
    x = rows(3, seed=9).astype(np.float16)
    for binary in (True, False):
        inp = httpclient.InferInput("image", list(x.shape), "FP16")
        inp.set_data_from_numpy(x, binary_data=binary)
        res = client.infer("tiny", [inp])
        np.testing.assert_allclose(res.as_numpy("probabilities"), cascade.run(x.astype(np.float32)).probs,
                                   rtol=1e-5, atol=1e-6)
    u = np.random.default_rng(3).integers(0, 256, (2, 3, 16, 16), dtype=np.uint8)
    pre = cascade.manifest.preprocessing
    want = (u / np.float32(255.0) - np.asarray(pre.mean, np.float32)[:, None, None]) / \
        np.asarray(pre.std, np.float32)[:, None, None]
    for binary in (True, False):
        inp = httpclient.InferInput("image", list(u.shape), "UINT8")
        inp.set_data_from_numpy(u, binary_data=binary)
        res = client.infer("tiny", [inp])
        np.testing.assert_allclose(res.as_numpy("probabilities"), cascade.run(want.astype(np.float32)).probs,
                                   rtol=1e-5, atol=1e-6)
    bad = {"inputs": [{"name": "image", "datatype": "UINT8", "shape": [1, 3, 16, 16], "data": [300] * 768}]}
    code, _, body = http(server.url + "/v2/models/tiny/infer", bad)
    assert code == 400 and "0..255" in error(body)
    short = {"inputs": [{"name": "image", "datatype": "FP16", "shape": [1, 3, 16, 16],
                         "parameters": {"binary_data_size": 10}}]}
    header = json.dumps(short).encode()
    code, _, body = http(server.url + "/v2/models/tiny/infer", header + b"\0" * 10,
                         {"inference-header-content-length": str(len(header))})
    assert code == 400 and "binary FP16 data has 10 bytes" in error(body)
    assert outputs(http(server.url + "/v2/models/tiny/infer", fp32_request(rows(1)))[2])["label"].shape == (1,)
